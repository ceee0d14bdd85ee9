"""The report's figures (matplotlib, Agg backend, imported when a figure is drawn)."""
from __future__ import annotations

import math

import numpy as np

from .pairs import STRUCTURES
from .run import finite

__all__ = ["boxplots", "scaling_plot", "close_figure"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def close_figure(fig) -> None:
    """Release a figure drawn here (pyplot keeps every figure until it is closed)."""
    _pyplot().close(fig)


def boxplots(records: list, order: list, labels: dict, title: str, dist_unit: str):
    """The paper's Fig. 5: box plots of Dice (top row) and HD (bottom row) per structure and averaged."""
    plt = _pyplot()
    names = [n for n in order if any(r["method"] == n for r in records)]
    cols = [s for _, s in STRUCTURES] + ["Avg"]
    fig, axes = plt.subplots(2, len(cols), figsize=(max(3.2, 0.45 * len(names) + 1.2) * len(cols), 7.0),
                             squeeze=False)
    for row, metric in enumerate(("dice", "hd")):
        for j, s in enumerate(cols):
            ax = axes[row, j]
            data = []
            for n in names:
                rs = [r for r in records if r["method"] == n]
                if s == "Avg":
                    v = [np.nanmean(finite([r[f"{metric}_{t}"] for _, t in STRUCTURES]))
                         if finite([r[f"{metric}_{t}"] for _, t in STRUCTURES]).size else np.nan for r in rs]
                else:
                    v = [r[f"{metric}_{s}"] for r in rs]
                data.append(finite(v))
            ax.boxplot(data, showfliers=True, flierprops=dict(markersize=2))
            ax.set_xticks(range(1, len(names) + 1))
            if row == 1:
                ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)  # the short method names
            else:
                ax.set_xticklabels([])
            ax.set_title(f"{'Dice' if metric == 'dice' else 'HD (' + dist_unit + ')'} {s}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def scaling_plot(rows: list[dict], labels: dict):
    """Time and peak memory against the number of voxels (log-log), one line per method, dimension and device."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    keys = list(dict.fromkeys((r["method"], r["ndim"], r["device"]) for r in rows))
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(k[0] for k in keys))}
    for key in keys:
        rs = [r for r in rows if (r["method"], r["ndim"], r["device"]) == key and isinstance(r.get("time_s"), float)]
        if not rs:
            continue
        x = [r["voxels"] for r in rs]
        lab = f"{labels.get(key[0], key[0])} {key[1]}D" + (" GPU" if key[2] == "gpu" else "")
        style = ("-o" if key[1] == 2 else "--s") if key[2] == "cpu" else ":^"
        axes[0].loglog(x, [r["time_s"] for r in rs], style, color=colours[key[0]], label=lab)
        mem = [r.get("peak_above_before_gib") for r in rs]
        if key[2] == "cpu" and all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in mem):
            axes[1].loglog(x, mem, style, color=colours[key[0]], label=lab)
    axes[0].set(xlabel="voxels", ylabel="time (s)", title="registration time")
    axes[1].set(xlabel="voxels", ylabel="peak memory above start (GiB)", title="peak memory (CPU)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
