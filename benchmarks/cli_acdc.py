"""``varreg register --slices`` on every ACDC ED/ES pair of a split, against the core API.

For each patient the CLI runs as a separate process (start-up, NIfTI I/O,
registration of every slice, metrics, atomic writes: what a user waits for),
ES -> ED with both label maps. The same slices are then registered in this
process with ``varreg.register`` (the core API benchmark's protocol: slices
where LV, Myo and RV are present in both phases) and scored with our own Dice.

Prints a table: mean Dice per structure (before, CLI, core API) over the
protocol slices of the split, and the CLI overhead per stack:
``CLI wall time - solver time`` (the solver time that the CLI's metrics.json
reports), also against the core API's in-process time for the same stack.

Run: ``python benchmarks/cli_acdc.py [--split val] [--threads 1] [--limit N]``
(reads ``../shared/data/acdc`` relative to the repository root).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import varreg  # noqa: E402
from varreg import acdc  # noqa: E402


def dice(a, b):
    s = np.count_nonzero(a) + np.count_nonzero(b)
    return 2.0 * np.count_nonzero(a & b) / s if s else float("nan")


def cli_command():
    exe = Path(sys.executable).with_name("varreg")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "varreg_cli.main"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(REPO / ".." / "shared" / "data" / "acdc"))
    ap.add_argument("--split", default="val", choices=sorted(acdc.SPLITS))
    ap.add_argument("--threads", type=int, default=None, help="numba threads for the CLI and the API")
    ap.add_argument("--limit", type=int, default=None, help="only the first N patients")
    ap.add_argument("--qc", action="store_true", help="also write qc.png (included in the overhead)")
    args = ap.parse_args(argv)

    root = Path(args.root)
    if not root.is_dir():
        print(f"ACDC data not found at {root}; nothing to do")
        return 0
    patients = acdc.patients(root, args.split)[: args.limit]
    if args.threads:
        import numba

        numba.set_num_threads(args.threads)
    env = dict(os.environ)
    if args.threads:
        env["NUMBA_NUM_THREADS"] = str(args.threads)

    # warm the numba cache once so that no run pays a compilation
    c0 = acdc.load_case(root, patients[0])
    varreg.register(c0.ed[..., 0], c0.es[..., 0])

    before = {k: [] for k in acdc.LABELS}
    cli = {k: [] for k in acdc.LABELS}
    api = {k: [] for k in acdc.LABELS}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pid in patients:
            f = lambda s: str(root / f"{pid}_{s}.nii.gz")  # noqa: E731
            out = Path(tmp) / pid
            cmd = cli_command() + ["register", f("ED"), f("ES"), "-o", str(out), "--slices", "--quiet",
                                   "--fixed-labels", f("ED_gt"), "--moving-labels", f("ES_gt")]
            if args.qc:
                cmd += ["--qc", "qc.png"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                print(f"{pid}: CLI failed: {proc.stderr.strip()}")
                return 1
            m = json.loads((out / "metrics.json").read_text())
            for e in m["slices"]["per_slice"]:
                if e["all_labels_present"]:
                    for k in acdc.LABELS:
                        cli[k].append(e["dice"][str(k)])

            case = acdc.load_case(root, pid)
            t1 = time.perf_counter()
            for z in range(case.ed.shape[2]):  # the whole stack, as the CLI does
                r = varreg.register(case.ed[..., z], case.es[..., z])
                if all((case.ed_gt[..., z] == k).any() and (case.es_gt[..., z] == k).any() for k in acdc.LABELS):
                    wl = np.asarray(varreg.warp(case.es_gt[..., z], r.displacement, order=0))
                    for k in acdc.LABELS:
                        api[k].append(dice(case.ed_gt[..., z] == k, wl == k))
                        before[k].append(dice(case.ed_gt[..., z] == k, case.es_gt[..., z] == k))
            api_s = time.perf_counter() - t1
            rows.append(dict(patient=pid, slices=case.ed.shape[2], wall=wall, solver=m["time_s"]["solver"],
                             api=api_s, inproc=m["time_s"]["total"]))

    print(f"ACDC {args.split} split: {len(patients)} patients, {len(cli[1])} slice pairs (LV, Myo, RV in both phases)")
    print(f"{'structure':<10}{'before':>9}{'CLI':>9}{'core API':>10}{'max |diff|':>12}")
    for k, name in acdc.LABELS.items():
        diff = max(abs(a - b) for a, b in zip(cli[k], api[k])) if cli[k] else float("nan")
        print(f"{name:<10}{np.mean(before[k]):9.4f}{np.mean(cli[k]):9.4f}{np.mean(api[k]):10.4f}{diff:12.2e}")
    mean = lambda d: np.mean([np.mean(v) for v in d.values()])  # noqa: E731
    print(f"{'mean':<10}{mean(before):9.4f}{mean(cli):9.4f}{mean(api):10.4f}")
    assert len(cli[1]) == len(api[1]), "CLI and API scored different slices"

    over = [r["wall"] - r["solver"] for r in rows]
    over_api = [r["wall"] - r["api"] for r in rows]
    inproc = [r["inproc"] - r["solver"] for r in rows]
    print()
    print(f"per stack ({statistics.mean(r['slices'] for r in rows):.1f} slices on average), seconds:")
    print(f"  CLI wall time                 mean {statistics.mean(r['wall'] for r in rows):6.2f}")
    print(f"  solver time (CLI metrics)     mean {statistics.mean(r['solver'] for r in rows):6.2f}")
    print(f"  core API, same stack          mean {statistics.mean(r['api'] for r in rows):6.2f}")
    print(f"  overhead = wall - solver      mean {statistics.mean(over):6.2f}  median {statistics.median(over):6.2f}  max {max(over):6.2f}")
    print(f"    of which inside the command mean {statistics.mean(inproc):6.2f} (reading, metrics, writing)")
    print(f"  wall - core API time          mean {statistics.mean(over_api):6.2f}  median {statistics.median(over_api):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
