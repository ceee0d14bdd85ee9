"""The evidence behind the L1 defaults of ``varreg.options.SolverOptions``, against their neighbours on ACDC.

    python benchmarks/tune_defaults.py                   # train split, every 4th patient (102 pairs)
    python benchmarks/tune_defaults.py --split val --every 1

Defaults are chosen on the *train* split (patients with number % 5 in {1, 2, 3}) and
then checked once on val (number % 5 == 4), the split of the issue's target. Every
configuration is ``varreg.register`` with the defaults except the options named in
its row; all run on the same pairs, interleaved pair by pair (acdc_2d.py's loop), so
their times compare. The rows walk one step from the default along each knob:
the TV weight ``lam`` of the pyramid, its ``warps``, the quadratic ``refine`` warps
per level (finest first) and their weight ``refine_lam``; the first rows are the
previous default (lam 0.04, 5 warps, no refinement) and the default without refinement.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import varreg
from acdc_2d import ROOT, defaults, evaluate, load_pairs, print_table
from varreg import acdc

CONFIGS = {
    "previous default (lam 0.04, warps 5, refine 0)": dict(lam=0.04, warps=5, refine=0),
    "default without refinement (refine 0)": dict(refine=0),
    "lam 0.04": dict(lam=0.04),
    "lam 0.06": dict(lam=0.06),
    "lam 0.16": dict(lam=0.16),
    "warps 5": dict(warps=5),
    "refine 15 (finest level only)": dict(refine=15),
    "refine 5,20": dict(refine=(5, 20)),
    "refine 10,30,30": dict(refine=(10, 30, 30)),
    "refine_lam 0.06": dict(refine_lam=0.06),
    "refine_denoiser tv": dict(refine_denoiser="tv"),
    "L2: previous default (lam 0.004, warps 5, refine 0)": dict(data_term="l2", lam=0.004, warps=5, refine=0),
    "L2: lam 0.08": dict(data_term="l2", lam=0.08),
    "L2: refine_lam 0.006": dict(data_term="l2", refine_lam=0.006),
    "L2: default": dict(data_term="l2"),
    "**default**": dict(),
}


def _method(options):
    return lambda f, m: varreg.register(f, m, **options).displacement


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT)
    ap.add_argument("--split", default="train", choices=sorted(acdc.SPLITS))
    ap.add_argument("--every", type=int, default=4, help="every N-th patient of the split (default 4)")
    args = ap.parse_args(argv)
    ids, pairs = load_pairs(args.data, args.split, args.every)
    rows = evaluate(pairs, {name: _method(o) for name, o in CONFIGS.items()}, f"ACDC {args.split} 2D, schedules")
    print(f"\nACDC {args.split} split, every {args.every}th patient: {len(pairs)} slice pairs from {len(ids)} patients")
    print_table(rows, "**default**")
    print(f"\ndefaults: {defaults('l1')}")


if __name__ == "__main__":
    main()
