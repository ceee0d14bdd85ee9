"""Pairs per second of ``varreg batch`` (Dask) against a plain loop of ``varreg register`` processes.

On ACDC (every patient's ED <- ES stack with both label maps, ``--slices``;
a manifest is written into a temporary folder) the same pairs are registered:

- by ``varreg_cli.batch`` on a LocalCluster of 2 workers x 1 thread,
- on 1 worker x 1 thread,
- by a plain loop of ``varreg register --slices --threads 1`` subprocesses, one per pair.

The batch times include starting the cluster (what a user waits for); the
cluster's workers register one pair at a time with one solver thread. Prints
pairs/s, the ratios (target: 2x1 >= 1.8x the pairs/s of 1x1 and >= 1.3x the
loop), the peak memory of each worker process (RSS high-water mark, VmHWM,
read on the workers with ``client.run``) and of the loop's processes, and
whether the three give the same metrics (they run the same code).

    python benchmarks/batch_throughput.py                 # all 80 patients (several minutes)
    python benchmarks/batch_throughput.py --patients 6    # a quick check

Needs ``pip install -e ".[batch]"`` and ``../shared/data/acdc``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from varreg import acdc  # noqa: E402


def cli_command():
    exe = Path(sys.executable).with_name("varreg")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "varreg_cli.main"]


def write_manifest(root: Path, patients, path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "fixed", "moving", "fixed_labels", "moving_labels"])
        for p in patients:
            f = lambda s: str(root / f"{p}_{s}.nii.gz")  # noqa: E731
            w.writerow([p, f("ED"), f("ES"), f("ED_gt"), f("ES_gt")])


def worker_stats() -> dict:
    """On a worker (client.run): RSS high-water mark (bytes) and CPU seconds (user + system) of its process."""
    from varreg_cli.batch import _worker_memory

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {**_worker_memory(), "cpu": ru.ru_utime + ru.ru_stime}


def run_batch(manifest: Path, out: Path, workers: int, threads: int) -> dict:
    """One batch on its own LocalCluster (started inside the timing); the workers' peak RSS."""
    import logging

    from distributed import Client, LocalCluster

    from varreg_cli import batch as B

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0", resources={B.RESOURCE: 1}, silence_logs=logging.ERROR)
    client = Client(cluster)
    t_up = time.perf_counter() - t0
    try:
        results = list(B.register_pairs(manifest, out, client=client, slices=True))
        wall = time.perf_counter() - t0
        mem = list(client.run(worker_stats).values())
    finally:
        client.close()
        cluster.close()
    failed = [r for r in results if not r.ok]
    if failed:
        raise SystemExit(f"{len(failed)} pairs failed, e.g. {failed[0].id}: {failed[0].error}")
    return dict(wall=wall, startup=t_up, n=len(results), hwm=[m["hwm"] for m in mem], cpu=sum(m["cpu"] for m in mem),
                dice={r.id: r.metrics["mean_dice"] for r in results})


def run_loop(manifest: Path, out: Path) -> dict:
    from varreg_cli import batch as B

    pairs = B.read_manifest(manifest)
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    t0 = time.perf_counter()
    hwm = cpu = 0
    for p in pairs:
        cmd = cli_command() + ["register", p.fixed, p.moving, "-o", str(out / p.id), "--slices", "--threads", "1",
                               "--fixed-labels", p.fixed_labels, "--moving-labels", p.moving_labels, "--quiet"]
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
            _, status, ru = os.wait4(proc.pid, 0)  # this process's own rusage: CPU and peak RSS
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                err.seek(0)
                raise SystemExit(f"{p.id}: varreg register failed: {err.read().decode().strip()}")
        hwm, cpu = max(hwm, ru.ru_maxrss * 1024), cpu + ru.ru_utime + ru.ru_stime
    wall = time.perf_counter() - t0
    dice = {}
    for p in pairs:
        m = json.loads((out / p.id / "metrics.json").read_text())
        dice[p.id] = B.row_metrics(m)["mean_dice"]
    return dict(wall=wall, startup=0.0, n=len(pairs), hwm=[hwm], cpu=cpu, dice=dice)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(REPO / ".." / "shared" / "data" / "acdc"))
    ap.add_argument("--patients", type=int, default=None, help="only the first N patients (default: all)")
    ap.add_argument("--skip-loop", action="store_true", help="leave out the plain loop")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    if not root.is_dir():
        print(f"ACDC data not found at {root}; nothing to do")
        return 0
    patients = acdc.patients(root, "all")[: args.patients]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    with tempfile.TemporaryDirectory(prefix="varreg-batch-bench-") as tmp:
        tmp = Path(tmp)
        manifest = tmp / "manifest.csv"
        write_manifest(root, patients, manifest)
        # warm the numba disk cache once, outside the timings
        p0 = patients[0]
        subprocess.run(cli_command() + ["register", str(root / f"{p0}_ED.nii.gz"), str(root / f"{p0}_ES.nii.gz"),
                                        "-o", str(tmp / "warm"), "--slices", "--threads", "1", "-q"], check=True)
        runs = {}
        runs["2 workers x 1 thread"] = run_batch(manifest, tmp / "b21", 2, 1)
        runs["1 worker x 1 thread"] = run_batch(manifest, tmp / "b11", 1, 1)
        if not args.skip_loop:
            runs["loop of varreg register"] = run_loop(manifest, tmp / "loop")

    n = len(patients)
    print(f"ACDC: {n} ED<-ES stacks with labels, --slices; {cores} usable cores")
    print(f"{'configuration':<26}{'wall s':>9}{'start s':>9}{'pairs/s':>9}{'CPU s':>8}{'cores busy':>11}"
          f"{'peak RSS MiB per process':>28}")
    for name, r in runs.items():
        rate = r["n"] / r["wall"]
        r["rate"] = rate
        mem = ", ".join(f"{h / 2**20:.0f}" for h in r["hwm"] if h) or "-"
        print(f"{name:<26}{r['wall']:9.1f}{r['startup']:9.1f}{rate:9.3f}{r['cpu']:8.1f}{r['cpu'] / r['wall']:11.2f}"
              f"{mem:>28}")
    a, b = runs["2 workers x 1 thread"]["rate"], runs["1 worker x 1 thread"]["rate"]
    print()
    print(f"2x1 / 1x1   {a / b:5.2f}   (target >= 1.8)  {'ok' if a / b >= 1.8 else 'BELOW TARGET'}")
    if "loop of varreg register" in runs:
        c = runs["loop of varreg register"]["rate"]
        print(f"2x1 / loop  {a / c:5.2f}   (target >= 1.3)  {'ok' if a / c >= 1.3 else 'BELOW TARGET'}")
    ref = runs["1 worker x 1 thread"]["dice"]
    diff = max(abs((r["dice"][k] or 0) - (ref[k] or 0)) for r in runs.values() for k in ref)
    print(f"max |mean Dice difference| between the configurations: {diff:.2e} (the same code on every pair)")
    if cores < 2:
        print("note: fewer than 2 usable cores; 2 workers cannot run in parallel here")
    print("(CPU s: user + system time of the worker processes, or of the loop's processes; cores busy = CPU s /"
          " wall s: below 2 for 2x1 means the workers waited for a core, e.g. other load on the machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
