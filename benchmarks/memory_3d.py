"""Peak memory and time of a 3D registration (default 256^3 float32), each size in a fresh process.

    python benchmarks/memory_3d.py                 # 256^3
    python benchmarks/memory_3d.py --sizes 64 128 256
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np
import varreg
from varreg import metrics, synthetic
n = int(sys.argv[1])
shape = (n, n, n)
fixed = synthetic.smooth_random_image(shape, rng=0)
truth = synthetic.sinusoidal_displacement(shape, amplitude=2.0)
moving = synthetic.deform(fixed, truth)
del truth
varreg.register(fixed[:16, :16, :16], moving[:16, :16, :16])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
t0 = time.perf_counter()
res = varreg.register(fixed, moving)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps(dict(n=n, time_s=dt, peak_gib=peak, before_gib=base, input_gib=2 * fixed.nbytes / 2**30)))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[256])
    args = ap.parse_args(argv)
    print("| size | pair in memory GiB | process peak RSS GiB | time s |")
    print("|---|---|---|---|")
    for n in args.sizes:
        r = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"| {n}^3 | failed: {r.stderr.strip().splitlines()[-1]} | | |")
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"| {n}^3 | {d['input_gib']:.2f} | {d['peak_gib']:.2f} | {d['time_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
