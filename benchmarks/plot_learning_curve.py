"""Plot the validation Dice of `varreg train` runs against the training step (reads OUTDIR/log.jsonl).

    python benchmarks/plot_learning_curve.py runs/vrnet2d_dice_aug runs/vrnet2d_half \
        --label "label Dice + augmentation (vrnet2d_acdc.pt)" --label "unsupervised (vrnet2d_acdc_unsupervised.pt)" \
        -o docs/vrnet_learning_curve.png

Prints the curves as a table (one row per run) and writes the figure (PNG).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def val_curve(run: Path) -> list[tuple[int, float]]:
    """``[(step, validation mean Dice), ...]`` from ``run/log.jsonl``."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no training log (is {run} a varreg train output folder?)")
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "val" in rec:
            out.append((int(rec["step"]), float(rec["val"]["dice_mean"])))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="varreg train output folders")
    ap.add_argument("--label", action="append", default=[], help="legend entry per run (default: the folder name)")
    ap.add_argument("-o", "--out", type=Path, required=True, help="PNG to write")
    args = ap.parse_args(argv)
    labels = args.label + [r.name for r in args.runs[len(args.label):]]

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for run, label in zip(args.runs, labels):
        curve = val_curve(run)
        print(f"{label}: " + ", ".join(f"{s}: {d:.3f}" for s, d in curve))
        ax.plot([s for s, _ in curve], [d for _, d in curve], marker="o", ms=3, label=label)
    ax.set_xlabel("training step (batch 8)")
    ax.set_ylabel("validation mean Dice (40 pairs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = args.out.with_name(args.out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
