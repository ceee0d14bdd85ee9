"""``varreg bench --tune``: grid search of the peers' parameters (on the ACDC train split)."""
from __future__ import annotations

from .methods import Method, installed
from .peers import ANTS_PARAMS, DEMONS_PARAMS, ELASTIX_PARAMS, PEERS, ants_syn, elastix_ffd, sitk_demons, skimage_tvl1
from .tables import markdown, mean_std

__all__ = ["TUNING_GRIDS", "tune_methods", "tuning_table"]

#: Grids searched by ``varreg bench --tune`` (on the train split): name -> (runner, list of parameter dicts)
TUNING_GRIDS = {
    "skimage-tvl1": (skimage_tvl1, [dict(attachment=a, tightness=t) for a in (5, 10, 15, 30) for t in (0.3, 0.6)]),
    "sitk-demons": (sitk_demons, [dict(DEMONS_PARAMS, iterations=it, std=s)
                                  for it in ((20, 10, 5), (50, 30, 20), (100, 50, 25)) for s in (0.5, 1.0, 1.5)]),
    "elastix-ffd": (elastix_ffd, [dict(ELASTIX_PARAMS, grid_spacing=g, iterations=it, metric=me)
                                  for g in (4.0, 8.0, 16.0) for it in (256, 512)
                                  for me in ("AdvancedMattesMutualInformation", "AdvancedMeanSquares")]),
    "ants-syn": (ants_syn, [dict(ANTS_PARAMS, flow_sigma=fs, reg_iterations=it)
                            for fs in (2.0, 3.0) for it in ((40, 20, 10), (80, 40, 20))]),
}


def tune_methods(names: list[str]) -> tuple[list[Method], list[str], dict]:
    """One :class:`Method` per grid point of each peer in ``names``; ``(methods, notes, {method: (peer, params)})``."""
    methods, notes, grid = [], [], {}
    for name in names:
        if name not in TUNING_GRIDS:
            notes.append(f"{name}: no tuning grid (only peers are tuned: {', '.join(TUNING_GRIDS)})")
            continue
        if not installed(PEERS[name][0]):
            notes.append(f"{name} skipped: not installed")
            continue
        runner, points = TUNING_GRIDS[name]
        for k, p in enumerate(points):
            mname = f"{name}#{k}"

            def run(fixed, moving, spacing=None, device="cpu", _r=runner, _p=p):
                return _r(fixed, moving, spacing, device, **_p)

            methods.append(Method(mname, f"{name} {short_params(p)}", "peer", run, (2, 3), ("cpu",), "", True))
            grid[mname] = (name, p)
    return methods, notes, grid


def short_params(p: dict) -> str:
    """The searched parameters of one grid point, ``k=v, ...`` (the fixed ones left out)."""
    return ", ".join(f"{k}={v}" for k, v in p.items() if k not in ("histogram_matching", "shrink", "syn_metric", "resolutions",
                                                                      "syn_sampling", "total_sigma", "grad_step"))


def tuning_table(summary: list, grid: dict) -> str:
    hdr = ["peer", "parameters", "Dice Avg", "HD Avg", "det ≤ 0 (%)", "s / pair", "best Dice"]
    best = {}
    for r in summary:
        peer = grid[r["method"]][0]
        if peer not in best or r["dice_avg_mean"] > best[peer]:
            best[peer] = r["dice_avg_mean"]
    rows = [[grid[r["method"]][0], short_params(grid[r["method"]][1]),
             mean_std(r["dice_avg_mean"], r["dice_avg_std"], ".4f"), mean_std(r["hd_avg_mean"], r["hd_avg_std"], ".2f"),
             f"{r['fold_pct_mean']:.3f}", f"{r['time_s_mean']:.3f}",
             "**best**" if r["dice_avg_mean"] == best[grid[r["method"]][0]] else ""] for r in summary]
    return markdown(hdr, rows)
