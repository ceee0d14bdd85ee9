"""VR-Net ablation on ACDC in the spirit of the paper's Table I: data term x cascades.

Every configuration is the shipped light architecture (residual U-Net GDL, width 8,
depth 3, Theta2, U-Net initialisation) trained with the same budget (steps, batch,
crop, learning rate, seed) on the train split, then evaluated on the whole
validation split with the 2D protocol (ES -> ED slices, ES labels warped with
nearest neighbour), beside varreg's classical TV-L1 defaults in the same run.
Runs are resumable: a configuration whose ``OUT/NAME/best.pt`` holds the requested
number of steps is not trained again.

    python benchmarks/vrnet_ablation.py --steps 1000 --out runs/ablation     # docs/vrnet.md's table

Columns: Dice per structure and mean, Hausdorff (px), % det <= 0, parameters,
training wall time and seconds per step, the process's peak RSS while training
(GiB; the high-water mark is reset before each run, so later runs can show the
memory an earlier one left allocated), CPU inference ms/pair (batch 1, after a
warm-up) and the peak RSS of one inference of a 256x216 pair in a fresh process
(GiB, and above the RSS just before it: model loaded and warmed up).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import varreg
from varreg import acdc
from varreg_bench.machine import reset_peak_rss, rss_gib
from varreg_bench.pairs import STRUCTURES, acdc_pairs
from varreg_bench.run import score
from varreg_learned import register_learned
from varreg_learned.checkpoint import load_checkpoint
from varreg_learned.loss import LossConfig
from varreg_learned.model import VRNetConfig
from varreg_learned.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "varreg_learned" / "checkpoints").glob("*.pt"))

#: (name, data term, n_warps, n_iters, scale, dice weight): the paper's R-L{1,2}-NxM notation; "@0.5": the
#: network runs on the pair shrunk to half size (VRNetConfig.scale) and its displacement is upsampled;
#: "+Dice": the loss adds the label-overlap term (LossConfig.dice_weight, beyond the paper's unsupervised loss).
CONFIGS = [("R-L1-2x1", "l1", 2, 1, 1.0, 0.0), ("R-L1-3x2", "l1", 3, 2, 1.0, 0.0), ("R-L2-2x1", "l2", 2, 1, 1.0, 0.0),
           ("R-L2-3x2", "l2", 3, 2, 1.0, 0.0), ("R-L1-3x2@0.5", "l1", 3, 2, 0.5, 0.0),
           ("R-L1-3x2@0.5+Dice", "l1", 3, 2, 0.5, 1.0)]


def trained(path: Path, steps: int) -> bool:
    if not path.exists():
        return False
    meta = load_checkpoint(path)[1]
    return int(meta.get("steps", -1)) >= steps


def train_one(name, data_term, n_warps, n_iters, scale, dice_weight, args) -> dict:
    out = Path(args.out) / name
    log = out / "train_summary.json"
    if trained(out / "best.pt", args.steps) and log.exists():
        return json.loads(log.read_text())
    mcfg = VRNetConfig(ndim=2, data_term=data_term, n_warps=n_warps, n_iters=n_iters, width=args.width,
                       depth=args.depth, scale=scale)
    tcfg = TrainConfig(data=str(args.data), out=str(out), steps=args.steps, batch_size=args.batch_size,
                       size=tuple(args.size), lr=args.lr, seed=args.seed, val_every=0, device="cpu",
                       threads=args.threads, progress=not args.no_progress)
    reset = reset_peak_rss()
    base = rss_gib()[0]
    t0 = time.perf_counter()
    summary = train(tcfg, mcfg, LossConfig(dice_weight=dice_weight), log=lambda s: tqdm.write(f"[{name}] {s}"))
    wall = time.perf_counter() - t0
    peak = rss_gib()[1]
    res = dict(train_wall_s=wall, s_per_step=summary["s_per_step"], train_peak_gib=peak,
               train_peak_above_gib=(peak - base) if reset else float("nan"), steps=args.steps)
    log.write_text(json.dumps(res))
    return res


_MEMORY_CHILD = """
import json, sys, numpy as np, torch
from varreg_bench.machine import reset_peak_rss, rss_gib
from varreg_learned import register_learned
torch.set_num_threads(int(sys.argv[3]))
rng = np.random.default_rng(0)
shape = tuple(int(n) for n in sys.argv[2].split("x"))
f, m = rng.random(shape, dtype=np.float32), rng.random(shape, dtype=np.float32)
register_learned(f, m, sys.argv[1], post_warps=0)  # load, warm up
ok = reset_peak_rss()
base = rss_gib()[0]
register_learned(f, m, sys.argv[1], post_warps=0)
print(json.dumps(dict(base=base, peak=rss_gib()[1], reset=ok)))
"""


def inference_memory(checkpoint, shape=(256, 216), threads=2) -> dict:
    """Peak RSS of one CPU inference (GiB) in a fresh process: absolute, and above the RSS before it."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(checkpoint), "x".join(map(str, shape)),
                          str(threads)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return dict(infer_peak_gib=r["peak"], infer_above_gib=(r["peak"] - r["base"]) if r["reset"] else float("nan"))


def evaluate(pairs, fn, desc):
    """Metrics of ``fn(fixed, moving) -> u`` over ``pairs`` (:class:`varreg_bench.pairs.Pair`, scored by
    :func:`varreg_bench.run.score`); time per pair after a warm-up. HD: mean over the finite values."""
    fn(pairs[0].fixed, pairs[0].moving)
    scores, times = [], []
    for pair in tqdm(pairs, desc=desc, unit="pair", leave=False):
        t0 = time.perf_counter()
        u = fn(pair.fixed, pair.moving)
        times.append(time.perf_counter() - t0)
        scores.append(score(pair, u))
    out = {s: float(np.mean([r[f"dice_{s}"] for r in scores])) for _, s in STRUCTURES}
    out["mean"] = float(np.mean([out[s] for _, s in STRUCTURES]))
    hd = np.asarray([r[f"hd_{s}"] for r in scores for _, s in STRUCTURES])
    out.update(hd=float(np.mean(hd[np.isfinite(hd)])), fold_pct=float(np.mean([r["fold_pct"] for r in scores])),
               ms=1000 * float(np.mean(times)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "acdc")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "ablation")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--size", type=int, nargs=2, default=(128, 128))
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", nargs="*", default=None, help="subset of " + ", ".join(c[0] for c in CONFIGS))
    ap.add_argument("--max-pairs", type=int, default=None, help="evenly spaced subset of the val pairs")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    configs = [c for c in CONFIGS if args.configs is None or c[0] in args.configs]
    train_info = {}
    for c in configs:
        train_info[c[0]] = train_one(*c, args)

    pairs = acdc_pairs(args.data, acdc.patients(args.data, "val"), dims=(2,))["acdc-2d"]
    if args.max_pairs and len(pairs) > args.max_pairs:
        pairs = [pairs[i] for i in np.linspace(0, len(pairs) - 1, args.max_pairs).round().astype(int)]

    rows = [("varreg classical L1-TV (defaults)", {}, evaluate(pairs, lambda f, m: varreg.register(f, m).displacement,
                                                               "classical"))]
    entries = [(name, Path(args.out) / name / "best.pt", train_info[name]) for name, *_ in configs]
    for path in SHIPPED:
        model, meta = load_checkpoint(path)
        c, dice_w = model.config, meta.get("loss", {}).get("dice_weight", 0.0)
        extras = ("+Dice" if dice_w else "") + ("+aug" if meta.get("train", {}).get("augment") else "")
        entries.append((f"shipped {path.name}: R-{c.data_term.upper()}-{c.n_warps}x{c.n_iters}@{c.scale:g}{extras} "
                        f"({meta.get('steps')} steps)", path, {}))
    for name, path, tinfo in entries:
        res = evaluate(pairs, lambda f, m, p=path: register_learned(f, m, p, post_warps=0).displacement, name)
        n_par = sum(p.numel() for p in load_checkpoint(path)[0].parameters())
        res.update(inference_memory(path, threads=args.threads))
        rows.append((name, dict(tinfo, params=n_par), res))
        torch.set_num_threads(args.threads)

    print(f"\nACDC val, {len(pairs)} pairs; training: {args.steps} steps, batch {args.batch_size}, crop "
          f"{args.size[0]}x{args.size[1]}, lr {args.lr}, width {args.width}, depth {args.depth}, seed {args.seed}, "
          f"{args.threads} threads\n")
    head = ("| method | RV | Myo | LV | mean Dice | HD (px) | det<=0 % | params | train min | s/step | "
            "train peak GiB | ms/pair | infer peak GiB (+above start) |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, t, r in rows:
        mem = f"{r['infer_peak_gib']:.2f} (+{r['infer_above_gib']:.3f})" if "infer_peak_gib" in r else "-"
        tr = (f"{t['train_wall_s'] / 60:.1f} | {t['s_per_step']:.2f} | {t['train_peak_gib']:.2f}"
              if "train_wall_s" in t else "- | - | -")
        print(f"| {name} | {r['RV']:.3f} | {r['Myo']:.3f} | {r['LV']:.3f} | {r['mean']:.3f} | {r['hd']:.2f} | "
              f"{r['fold_pct']:.3f} | {t.get('params', '-')} | {tr} | {r['ms']:.0f} | {mem} |")


if __name__ == "__main__":
    main()
