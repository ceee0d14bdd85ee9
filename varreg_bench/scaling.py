"""Time and peak memory as the image grows: each (method, size) in a fresh Python process.

:func:`scaling_run` starts ``python -m varreg_bench.scaling METHOD NDIM N THREADS DEVICE SEED``
per case; that child registers one synthetic ``N^NDIM`` pair and prints one JSON line.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import numpy as np

from .machine import apply_threads, reset_peak_rss, rss_gib
from .methods import registry
from .tables import markdown

__all__ = ["SCALING_METHODS", "scaling_run", "scaling_table"]

#: the methods ``--scaling`` can measure (varreg's solver and the peers)
SCALING_METHODS = ("varreg", "skimage-tvl1", "sitk-demons", "ants-syn")


def scaling_child(method: str, ndim: int, n: int, threads: int, device: str, seed: int) -> dict:
    """In a fresh process: time and peak memory of one registration of an ``n^ndim`` synthetic pair."""
    import varreg
    from varreg import synthetic

    m = registry()[method]
    apply_threads(threads)
    shape = (n,) * ndim
    fixed = synthetic.smooth_random_image(shape, rng=seed)
    w = -synthetic.sinusoidal_displacement(shape, amplitude=2.0)
    moving = np.asarray(varreg.warp(fixed, w))  # moving(x + u) ~ fixed(x) for u ~ -w: a known-size motion
    del w
    small = tuple(slice(0, 16) for _ in shape)
    m.run(np.ascontiguousarray(fixed[small]), np.ascontiguousarray(moving[small]), None, device)  # warm-up
    if device == "gpu":
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
    reset = reset_peak_rss()
    base, _ = rss_gib()
    t0 = time.perf_counter()
    u = m.run(fixed, moving, None, device)
    dt = time.perf_counter() - t0
    cur, peak = rss_gib()
    out = dict(method=method, ndim=ndim, n=n, voxels=n**ndim, device=device, time_s=dt, rss_before_gib=base,
               peak_rss_gib=peak, peak_above_before_gib=(peak - base) if reset else float("nan"),
               pair_gib=2 * fixed.nbytes / 2**30, threads=threads)
    if device == "gpu":
        import cupy

        out["gpu_pool_gib"] = cupy.get_default_memory_pool().total_bytes() / 2**30
    del u
    return out


def scaling_run(methods: list[str], sizes_2d, sizes_3d, *, threads: int, timeout: float, seed: int = 0,
                gpu: bool = False, progress=None) -> list[dict]:
    """Every (method, size) in a fresh Python process (``python -m varreg_bench.scaling``); failures/timeouts noted."""
    rows = []
    cases = [(m, 2, n) for m in methods for n in sizes_2d] + [(m, 3, n) for m in methods for n in sizes_3d]
    devs = ["cpu"] + (["gpu"] if gpu else [])
    for m, nd, n in cases:
        for dev in devs:
            if dev == "gpu" and m != "varreg":
                continue
            cmd = [sys.executable, "-m", "varreg_bench.scaling", m, str(nd), str(n), str(threads), dev, str(seed)]
            row = dict(method=m, ndim=nd, n=n, voxels=n**nd, device=dev)
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                if r.returncode == 0:
                    row.update(json.loads(r.stdout.strip().splitlines()[-1]))
                else:
                    tail = (r.stderr.strip().splitlines() or ["?"])[-1]
                    row["note"] = f"failed (exit {r.returncode}): {tail[:200]}"
            except subprocess.TimeoutExpired:
                row["note"] = f"stopped after the {timeout:.0f} s limit"
            rows.append(row)
            if progress is not None:
                progress(1)
    return rows


def scaling_table(rows: list[dict], labels: dict) -> str:
    hdr = ["Method", "device", "size", "voxels", "time (s)", "peak RSS (GiB)", "above start (GiB)", "pair (GiB)", "note"]
    out = []
    for r in rows:
        size = "×".join([str(r["n"])] * r["ndim"])
        f = lambda k, fmt, r=r: (f"{r[k]:{fmt}}" if isinstance(r.get(k), float) and math.isfinite(r[k])  # noqa: E731
                                 else "–")
        note = r.get("note", "")
        if r.get("gpu_pool_gib") is not None:
            note = (note + " " if note else "") + f"GPU pool {r['gpu_pool_gib']:.2f} GiB"
        out.append([labels.get(r["method"], r["method"]), r["device"], size, r["voxels"], f("time_s", ".3f"),
                    f("peak_rss_gib", ".2f"), f("peak_above_before_gib", ".2f"), f("pair_gib", ".3f"), note])
    return markdown(hdr, out) + ("\nEach row in a fresh process: synthetic pair (smooth random image, sinusoidal "
                                 "motion of 2 voxels), one warm-up call on a 16-voxel crop, then one timed "
                                 "registration. Peak RSS: the process's resident memory high-water mark during the "
                                 "registration; 'above start': minus the resident memory just before it (pair, "
                                 "libraries).\n")


def main(argv) -> int:
    """``python -m varreg_bench.scaling METHOD NDIM N THREADS DEVICE SEED``: one case, one JSON line."""
    if len(argv) == 6:
        method, nd, n, threads, dev, seed = argv
        print(json.dumps(scaling_child(method, int(nd), int(n), int(threads), dev, int(seed))))
        return 0
    print("usage: python -m varreg_bench.scaling METHOD NDIM N THREADS DEVICE SEED (internal; use 'varreg bench')",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
