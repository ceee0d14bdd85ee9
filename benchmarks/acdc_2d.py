"""ACDC 2D benchmark: varreg against scikit-image's TV-L1 on the paper's 2D protocol.

Every ES slice (moving) is registered to its ED slice (fixed) where LV, Myo and
RV are present in both phases; the ES labels are warped (nearest neighbour) and
compared with the ED labels. All methods run on the same pairs in the same
process, interleaved pair by pair, after a warm-up call each, so their times
are comparable on a shared machine.

    python benchmarks/acdc_2d.py --split val            # the issue's table
    python benchmarks/acdc_2d.py --split val --quick    # every 4th patient
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import varreg
from varreg import acdc
from varreg.options import SolverOptions

ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "acdc"


def numba_startup_seconds() -> tuple[float, float]:
    """(compile from scratch, load from cache) of the numba kernels, each in a fresh process."""
    code = "import varreg.kernels as k; print(k.warm_up())"
    env = dict(os.environ)
    out = []
    with __import__("tempfile").TemporaryDirectory() as tmp:
        env["NUMBA_CACHE_DIR"] = tmp
        for _ in range(2):
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
            out.append(float(r.stdout.strip().splitlines()[-1]))
    return out[0], out[1]


def defaults(data_term="l1") -> dict:
    """The solver's default schedule for ``data_term`` (:class:`varreg.options.SolverOptions`), for the footer."""
    o = SolverOptions(data_term=data_term).resolved()
    return {k: getattr(o, k) for k in ("theta", "lam", "warps", "iterations", "denoiser_iterations", "refine",
                                       "refine_lam")}


def methods(which):
    from skimage.registration import optical_flow_tvl1

    table = {
        "unregistered": lambda f, m: np.zeros((2, *f.shape), np.float32),
        "skimage tvl1 (default)": lambda f, m: optical_flow_tvl1(f, m).astype(np.float32),
        "varreg l1-tv (default)": lambda f, m: varreg.register(f, m).displacement,
        "varreg l2-tv": lambda f, m: varreg.register(f, m, data_term="l2").displacement,
        "varreg l1-huber": lambda f, m: varreg.register(f, m, denoiser="huber").displacement,
        "varreg l1-tv-vectorial": lambda f, m: varreg.register(f, m, denoiser="tv-vectorial").displacement,
    }
    return {k: v for k, v in table.items() if which is None or k in which}


def load_pairs(data, split, every=1):
    """(patient, slice, fixed, moving, fixed labels, moving labels) of the 2-D protocol; every ``every``-th patient."""
    ids = acdc.patients(data, split)[::every]
    pairs = []
    for pid in ids:
        case = acdc.load_case(data, pid)
        pairs += [(pid, z, f, m, fl, ml) for z, f, m, fl, ml in acdc.slice_pairs(case)]
    return ids, pairs


def evaluate(pairs, meths, desc):
    """Run every method on every pair, interleaved pair by pair after one warm-up call each; the per-pair rows."""
    for fn in meths.values():  # warm-up: numba kernels, imports
        fn(pairs[0][2], pairs[0][3])
    rows = {k: dict(dice=[], hd=[], hd95=[], fold_pct=[], jgrad=[], t=[]) for k in meths}
    for pid, z, f, m, fl, ml in tqdm(pairs, desc=desc, unit="pair"):
        for name, fn in meths.items():
            t0 = time.perf_counter()
            u = fn(f, m)
            rows[name]["t"].append(time.perf_counter() - t0)
            scored = acdc.score_pair(fl, ml, u, labels=tuple(acdc.LABELS))  # columns RV, Myo, LV
            for key in ("dice", "hd", "hd95"):
                rows[name][key].append([scored[key][k] for k in acdc.LABELS])
            rows[name]["fold_pct"].append(scored["fold_pct"])
            rows[name]["jgrad"].append(scored["jgrad"])
    return rows


def print_table(rows, ref=None):
    """One markdown row per method; ``ref``: the method whose mean time the last column divides."""
    ref_t = np.mean(rows[ref]["t"]) if ref in rows else None
    hdr = ("| method | Dice RV | Dice Myo | Dice LV | Dice mean | HD mean | HD95 mean | structures lost | "
           "det<=0 % | mean abs grad det | ms / pair | time vs " + (ref or "-") + " |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for name, r in rows.items():
        d = np.asarray(r["dice"])
        t = np.mean(r["t"])
        ratio = f"1/{ref_t / t:.1f}" if ref_t and t > 0 and name != "unregistered" else "-"
        hd, hd95 = np.asarray(r["hd"]), np.asarray(r["hd95"])
        lost = int((~np.isfinite(hd)).sum())  # a structure warped away entirely: HD undefined
        print(f"| {name} | {d[:, 0].mean():.4f} | {d[:, 1].mean():.4f} | {d[:, 2].mean():.4f} | "
              f"**{d.mean():.4f}** ± {d.mean(1).std():.3f} | {hd[np.isfinite(hd)].mean():.2f} | "
              f"{hd95[np.isfinite(hd95)].mean():.2f} | {lost} | "
              f"{np.mean(r['fold_pct']):.3f} | {np.mean(r['jgrad']):.4f} | {1000 * t:.1f} | {ratio} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT)
    ap.add_argument("--split", default="val", choices=sorted(acdc.SPLITS))
    ap.add_argument("--quick", action="store_true", help="every 4th patient")
    ap.add_argument("--methods", nargs="*", default=None)
    args = ap.parse_args(argv)

    compile_s, cached_s = numba_startup_seconds()
    ids, pairs = load_pairs(args.data, args.split, 4 if args.quick else 1)
    rows = evaluate(pairs, methods(args.methods), f"ACDC {args.split} 2D")
    print(f"\nACDC {args.split} split, 2D protocol: {len(pairs)} slice pairs from {len(ids)} patients "
          f"(distances in pixels: the data's affine is the identity)")
    print_table(rows, "skimage tvl1 (default)")
    print(f"\nnumba kernels: {compile_s:.1f} s to compile from scratch, {cached_s:.2f} s to load from the on-disk cache "
          "(once per process, excluded from the per-pair times)")
    print(f"defaults: {defaults('l1')}; HD columns average the finite values, "
          "'structures lost' counts (pair, structure) cases where the warped label vanished")


if __name__ == "__main__":
    main()
