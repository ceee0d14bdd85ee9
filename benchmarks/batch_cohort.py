"""A 1,000-pair cohort through ``varreg batch``, with a worker and the driver killed on the way.

The cohort is synthesized from ACDC: end-diastolic short-axis slices with all
three labels (cropped around the heart), each deformed by its own random
smooth displacement (Gaussian-smoothed noise, a few pixels) into a moving
image and moving labels; written as one-slice NIfTI files with a manifest into
a temporary folder.

The benchmark starts a LocalCluster itself (workers under nannies, 127.0.0.1)
and runs ``varreg batch MANIFEST -o OUT --scheduler ADDRESS`` as a
subprocess. When a quarter of the pairs is done it SIGKILLs one worker process
(its pid from ``client.run(os.getpid)``; the nanny starts a new one and the
pair is run again); at half it SIGKILLs the driver and starts the same command
again, which skips the pairs already done. At the end it checks that nothing
was lost: results.csv has one row per pair, each once, all ok; every pair
folder has its complete outputs and its ``done`` marker; no temporary file is
left. Prints the wall time of each phase and pairs/s.

    python benchmarks/batch_cohort.py                    # 1,000 pairs, 2 workers
    python benchmarks/batch_cohort.py --pairs 60         # a quick check

Needs ``pip install -e ".[batch]"`` and ``../shared/data/acdc``.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from varreg import acdc  # noqa: E402


def cli_command():
    exe = Path(sys.executable).with_name("varreg")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "varreg_cli.main"]


def source_slices(root: Path, size: int, max_patients: int):
    """ED slices with all three labels, cropped to ``size`` x ``size`` around the labels' centre."""
    out = []
    for pid in acdc.patients(root, "all")[:max_patients]:
        case = acdc.load_case(root, pid)
        for z in range(case.ed.shape[2]):
            lab = case.ed_gt[..., z]
            if not acdc.all_present(lab, lab):
                continue
            img = case.ed[..., z]
            if min(img.shape) < size:
                continue
            cy, cx = (int(round(c.mean())) for c in np.nonzero(lab))
            y0 = min(max(cy - size // 2, 0), img.shape[0] - size)
            x0 = min(max(cx - size // 2, 0), img.shape[1] - size)
            out.append((pid, z, img[y0:y0 + size, x0:x0 + size], lab[y0:y0 + size, x0:x0 + size], case.spacing))
    return out


def random_field(shape, rng, amplitude=3.0, sigma=10.0):
    from scipy import ndimage

    u = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect") for _ in range(2)])
    return (amplitude * u / max(np.abs(u).max(), 1e-12)).astype(np.float32)


def synthesize(root: Path, folder: Path, n: int, size: int, seed: int) -> Path:
    import nibabel as nib

    import varreg

    rng = np.random.default_rng(seed)
    slices = source_slices(root, size, max_patients=100)
    data = folder / "data"
    data.mkdir(parents=True)
    rows = [["id", "fixed", "moving", "fixed_labels", "moving_labels"]]
    for i in range(n):
        pid, z, img, lab, sp = slices[i % len(slices)]
        u = random_field(img.shape, rng)
        moving = np.asarray(varreg.warp(img, u))
        mlab = np.asarray(varreg.warp(lab, u, order=0))
        aff = np.diag([sp[0], sp[1], sp[2], 1.0])
        names = []
        for k, a, dt in (("f", img, np.float32), ("m", moving, np.float32), ("fl", lab, np.uint8),
                         ("ml", mlab, np.uint8)):
            name = f"data/c{i:04d}_{k}.nii.gz"
            nib.save(nib.Nifti1Image(a[:, :, None].astype(dt), aff), str(folder / name))
            names.append(name)
        rows.append([f"c{i:04d}", *names])
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return manifest


def n_done(out: Path) -> int:
    k = 0
    for p in glob.glob(str(out / "*" / ".varreg-batch.json")):
        try:
            with open(p) as fh:
                k += json.load(fh).get("state") == "done"
        except (OSError, ValueError):
            pass
    return k


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(REPO / ".." / "shared" / "data" / "acdc"))
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--size", type=int, default=128, help="slice crop in pixels (default 128)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", metavar="DIR", default=None, help="work in DIR (kept) instead of a temporary folder")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    if not root.is_dir():
        print(f"ACDC data not found at {root}; nothing to do")
        return 0

    from distributed import Client, LocalCluster

    from varreg_cli import batch as B

    tmpctx = tempfile.TemporaryDirectory(prefix="varreg-cohort-") if args.keep is None else None
    work = Path(tmpctx.name if tmpctx else args.keep)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    manifest = synthesize(root, work / "cohort", args.pairs, args.size, args.seed)
    t_gen = time.perf_counter() - t0
    out = work / "out"
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0", resources={B.RESOURCE: 1}, silence_logs=logging.ERROR)
    client = Client(cluster)
    cmd = cli_command() + ["batch", str(manifest), "-o", str(out), "--scheduler", cluster.scheduler_address, "-q"]
    log = open(work / "driver.log", "w")
    events = []
    try:
        t1 = time.perf_counter()
        drv = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        killed_worker = killed_driver = False
        while True:
            done = n_done(out)
            if not killed_worker and done >= args.pairs // 4:
                pids = sorted(client.run(os.getpid).values())
                os.kill(pids[0], signal.SIGKILL)
                events.append(f"{time.perf_counter() - t1:7.1f} s  {done:5d} done: SIGKILL worker pid {pids[0]}")
                killed_worker = True
            if killed_worker and not killed_driver and done >= args.pairs // 2:
                drv.kill()
                drv.wait()
                events.append(f"{time.perf_counter() - t1:7.1f} s  {n_done(out):5d} done: SIGKILL driver; restarted")
                drv = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
                killed_driver = True
            if drv.poll() is not None:
                break
            time.sleep(0.2)
        wall = time.perf_counter() - t1
        rc = drv.returncode
        events.append(f"{wall:7.1f} s  {n_done(out):5d} done: driver exited with code {rc}")
        workers_now = sorted(client.run(os.getpid).values())
    finally:
        client.close()
        cluster.close()
        log.close()

    if not (out / "results.csv").exists():
        print(f"the driver ended with code {rc} and wrote no results.csv; its log ({work / 'driver.log'}):")
        print("".join(open(work / "driver.log").readlines()[-10:]))
        return 1
    # nothing lost, nothing twice, nothing half-written
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    ids = [r["id"] for r in rows]
    expected = [f"c{i:04d}" for i in range(args.pairs)]
    names = {"warped.nii.gz", "displacement.nii.gz", "warped_labels.nii.gz", "metrics.json", B.MARKER}
    incomplete = [i for i in expected if set(os.listdir(out / i)) != names]
    not_done = [i for i in expected if (B.read_marker(str(out / i)) or {}).get("state") != "done"]
    tmp_left = glob.glob(str(out / "**" / ".*tmp*"), recursive=True)
    checks = {
        f"results.csv rows == {args.pairs}": len(rows) == args.pairs,
        "each id once": sorted(ids) == expected and len(set(ids)) == len(ids),
        "all ok": all(r["status"] == "ok" for r in rows),
        "complete outputs in every pair folder": not incomplete,
        "done marker in every pair folder": not not_done,
        "no temporary file left": not tmp_left,
        "driver exit code 0": rc == 0,
    }
    dice = [float(r["mean_dice"]) for r in rows if r["mean_dice"]]
    print(f"cohort: {args.pairs} pairs ({args.size}x{args.size} ACDC ED slices, random smooth deformations), "
          f"synthesized in {t_gen:.1f} s; {args.workers} workers x 1 thread")
    print("events:")
    for e in events:
        print("  " + e)
    print(f"worker pids at the end: {workers_now} (one replaced by the nanny)")
    print(f"wall time {wall:.1f} s, {args.pairs / wall:.2f} pairs/s (both drivers, with the kills)")
    print(f"mean Dice over the cohort {np.mean(dice):.4f}")
    for k, v in checks.items():
        print(f"  {'ok  ' if v else 'FAIL'} {k}")
    if tmpctx is not None:
        tmpctx.cleanup()
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
