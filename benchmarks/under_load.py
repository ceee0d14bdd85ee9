"""Registration time on a busy machine: quiet, with one and with two CPU-bound processes beside it.

Nodes are shared: a batch worker shares its cores with other jobs. This script
starts the busy processes itself (plain Python spin loops, one core each, ended
when the measurement ends or after --limit seconds), and times the same 2-D
ACDC slice pairs in a fresh child process per condition, so that every
condition starts alike (numba kernels from the disk cache, torch imported).

    python benchmarks/under_load.py                       # classical default and VR-Net, 2 threads
    python benchmarks/under_load.py --threads 1 --pairs 20 --methods varreg

Prints, per method: the median time per pair quiet, with 1 and with 2 busy
processes, and the ratios (a fair share of 2 cores gives 1.5x with one busy
process and 2x with two).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "acdc"

CHILD = r"""
import json, sys, time
import numpy as np
args = json.loads(sys.argv[1])
import numba
if args["threads"]:
    numba.set_num_threads(args["threads"])
import varreg
from varreg import acdc
pairs = []
for pid in acdc.patients(args["data"], "val")[: args["patients"]]:
    case = acdc.load_case(args["data"], pid)
    pairs += [(f, m) for z, f, m, a, b in acdc.slice_pairs(case)]
pairs = pairs[: args["pairs"]]
if args["method"] == "vrnet":
    import torch
    from pathlib import Path
    import varreg_learned
    from varreg_learned import register_learned
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    ck = Path(varreg_learned.__file__).parent / "checkpoints" / "vrnet2d_acdc.pt"
    run = lambda f, m: register_learned(f, m, ck, device="cpu", post_warps=0)  # the network alone
else:
    run = lambda f, m: varreg.register(f, m, device="cpu")
for f, m in pairs[:2]:
    run(f, m)  # warm-up
print("READY", flush=True)
sys.stdin.readline()  # the parent starts the busy processes, then says go
times = []
for _ in range(args["repeat"]):
    for f, m in pairs:
        t0 = time.perf_counter()
        run(f, m)
        times.append(time.perf_counter() - t0)
print(json.dumps(times), flush=True)
"""

BUSY = "import time, sys\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"


def measure(method: str, busy: int, args) -> list[float]:
    """Per-pair seconds of ``method`` in a fresh process with ``busy`` spinning processes beside it."""
    spec = dict(method=method, threads=args.threads, data=str(args.data), patients=args.patients,
                pairs=args.pairs, repeat=args.repeat)
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    spinners = []
    try:
        line = child.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"child failed before timing: {line!r}")
        spinners = [subprocess.Popen([sys.executable, "-c", BUSY, str(args.limit)]) for _ in range(busy)]
        time.sleep(0.5 if busy else 0.0)  # let the spinners take their cores
        child.stdin.write("go\n")
        child.stdin.flush()
        out = child.stdout.readline()
        child.wait(timeout=args.limit)
        return json.loads(out)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
        if child.poll() is None:
            child.kill()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT)
    ap.add_argument("--methods", default="varreg,vrnet", help="comma list of varreg, vrnet")
    ap.add_argument("--threads", type=int, default=0, help="numba/torch threads in the child (0: their default)")
    ap.add_argument("--patients", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternate the conditions this many times (medians over all)")
    ap.add_argument("--limit", type=float, default=300.0, help="seconds after which busy processes end anyway")
    args = ap.parse_args(argv)
    env = {k: os.environ.get(k) for k in ("NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                          "VARREG_THREADS")}
    print(f"cpus usable: {len(os.sched_getaffinity(0))}; threads: {args.threads or 'default'}; "
          f"env: { {k: v for k, v in env.items() if v} }")
    print("| method | quiet ms | 1 busy ms | 2 busy ms | 1 busy / quiet | 2 busy / quiet |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        times = {0: [], 1: [], 2: []}
        for _ in range(args.rounds):
            for busy in (0, 1, 2):
                times[busy] += measure(method, busy, args)
        med = {b: 1000 * statistics.median(t) for b, t in times.items()}
        print(f"| {method} | {med[0]:.1f} | {med[1]:.1f} | {med[2]:.1f} | {med[1] / med[0]:.2f} | "
              f"{med[2] / med[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
