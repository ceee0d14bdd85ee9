"""ACDC slice pairs with a contrast change on the moving image: the default (L1) against local NCC.

The paper's 2-D protocol (ES slice -> ED slice where LV, Myo and RV are in both
phases, ES labels warped by nearest neighbour). For every pair and seed the
moving (ES) slice gets a smooth multiplicative bias field spanning 0.6-1.4 and
a gamma in [0.6, 0.8] (:func:`varreg.synthetic.contrast_change`), as happens
across scans, coils and sequences; "clean" rows use the unchanged pairs.

    python benchmarks/contrast_change.py --split val --seeds 3
    python benchmarks/contrast_change.py --split train --every 4 --grid    # the NCC weight/window search

Peers in the same run: scikit-image's TV-L1 (its defaults), and ANTs SyN with
its CC metric when antspyx is importable (varreg_bench.peers.ants_syn).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from acdc_2d import load_pairs  # the 2-D protocol's pairs (this folder is on sys.path when run as a script)

import varreg
from varreg import acdc, synthetic

ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "acdc"


def changed(moving, seed: int, index: int):
    """The moving slice with its contrast changed: bias 0.6-1.4 and gamma in [0.6, 0.8], per (seed, pair)."""
    rng = np.random.default_rng([seed, index])
    gamma = rng.uniform(0.6, 0.8)
    return synthetic.contrast_change(moving, gamma=gamma, bias=synthetic.bias_field(moving.shape, rng=rng))


def methods(names):
    table = {
        "varreg (default, L1)": lambda f, m: varreg.register(f, m).displacement,
        "varreg ncc": lambda f, m: varreg.register(f, m, data_term="ncc").displacement,
    }
    if "ncc-local" in names:  # the opt-in robust local fit (docs/bench.md)
        from varreg.data_terms import NCC

        table["varreg ncc, local_robust=0.2"] = lambda f, m: varreg.register(
            f, m, data_term=NCC(local_robust=0.2)).displacement
    if "skimage" in names:
        from skimage.registration import optical_flow_tvl1

        table["scikit-image tvl1 (default)"] = lambda f, m: optical_flow_tvl1(f, m).astype(np.float32)
    if "ants" in names:
        try:
            from varreg_bench.peers import ANTS_PARAMS, ants_syn

            table["ANTs SyN (CC)"] = lambda f, m: ants_syn(f, m, None, "cpu", **ANTS_PARAMS)
        except ImportError as exc:
            print(f"note: ANTs SyN skipped ({exc})")
    return table


def evaluate(pairs, fns, seeds, desc):
    """Rows per (method, condition): mean Dice per pair, folds, time."""
    from tqdm import tqdm

    for fn in fns.values():
        fn(pairs[0][2], pairs[0][3])  # warm-up (numba, imports)
    rows = {}
    jobs = [("clean", None)] + [("changed", s) for s in seeds]
    for i, (pid, z, f, m, fl, ml) in enumerate(tqdm(pairs, desc=desc, unit="pair")):
        for cond, seed in jobs:
            mm = m if seed is None else changed(m, seed, i)
            for name, fn in fns.items():
                t0 = time.perf_counter()
                u = fn(f, mm)
                dt = time.perf_counter() - t0
                s = acdc.score_pair(fl, ml, u)
                r = rows.setdefault((name, cond), dict(dice=[], fold=[], t=[]))
                r["dice"].append(float(np.mean(list(s["dice"].values()))))
                r["fold"].append(s["fold_pct"])
                r["t"].append(dt)
    return rows


def print_table(rows, n_pairs, seeds):
    print(f"\n{n_pairs} slice pairs; changed = bias 0.6-1.4 x gamma 0.6-0.8 on the moving slice, "
          f"seeds {list(seeds)}")
    print("| method | Dice clean | Dice changed | folds % clean / changed | ms / pair |")
    print("|---|---|---|---|---|")
    names = dict.fromkeys(n for n, _ in rows)
    for n in names:
        c, ch = rows[(n, "clean")], rows[(n, "changed")]
        t = 1000 * np.mean(c["t"] + ch["t"])
        print(f"| {n} | {np.mean(c['dice']):.4f} | {np.mean(ch['dice']):.4f} | "
              f"{np.mean(c['fold']):.3f} / {np.mean(ch['fold']):.3f} | {t:.1f} |")


def grid(pairs, seeds):
    """NCC weights (theta = lam scale c, refine_lam), window, floor, the global map's bias order and its
    robust cutoff around the default."""
    from varreg.data_terms import NCC

    w = NCC.weights
    points = [dict()]
    for c in (0.7, 1.4):
        points.append(dict(theta=w.theta * c, lam=w.lam * c, refine_lam=w.refine_lam * c))
    for lam in (0.7, 1.4):
        points.append(dict(lam=w.lam * lam))
    for rl in (0.5, 2.0):
        points.append(dict(refine_lam=w.refine_lam * rl))
    for window in (81, 151):
        points.append(dict(window=window))
    for bias_order in (0, 1):
        points.append(dict(bias_order=bias_order))
    for floor in (0.03, 0.3):
        points.append(dict(floor=floor))
    for robust in (None, 0.8):
        points.append(dict(robust=robust))
    fns = {}
    for p in points:
        term_keys = ("window", "floor", "bias_order", "robust")
        term = {k: p[k] for k in term_keys if k in p}
        solver = {k: v for k, v in p.items() if k not in term_keys}
        label = ", ".join(f"{k}={v}" if v is None else f"{k}={v:g}" for k, v in p.items()) or "default"
        fns[label] = (lambda f, m, t=NCC(**term), s=solver:
                      varreg.register(f, m, data_term=t, **s).displacement)
    rows = evaluate(pairs, fns, seeds, "ncc grid")
    print_table(rows, len(pairs), seeds)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT)
    ap.add_argument("--split", default="val", choices=sorted(acdc.SPLITS))
    ap.add_argument("--every", type=int, default=1, help="every N-th patient")
    ap.add_argument("--seeds", type=int, default=3, help="contrast changes per pair")
    ap.add_argument("--peers", default="skimage,ants",
                    help="comma list of skimage, ants (when installed), ncc-local (NCC(local_robust=0.2))")
    ap.add_argument("--grid", action="store_true",
                    help="search the NCC weights, window, floor, bias order and robust cutoff instead")
    args = ap.parse_args(argv)
    ids, pairs = load_pairs(args.data, args.split, args.every)
    seeds = range(args.seeds)
    if args.grid:
        grid(pairs, seeds)
        return
    rows = evaluate(pairs, methods(args.peers.split(",")), seeds, f"ACDC {args.split}")
    print_table(rows, len(pairs), seeds)


if __name__ == "__main__":
    main()
