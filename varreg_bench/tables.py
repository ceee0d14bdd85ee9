"""The report's tables (Markdown, in the layout of the VR-Net paper's Tables III-VI) and CSV."""
from __future__ import annotations

import csv
import io
import math

import numpy as np

from .pairs import STRUCTURES

__all__ = ["mean_std", "markdown", "results_table", "epe_table", "runtime_table", "write_csv", "csv_text"]


def mean_std(mean, std, fmt) -> str:
    """``"mean (std)"`` with ``fmt``, or ``"–"`` when the mean is missing or not finite."""
    if mean is None or not math.isfinite(mean):
        return "–"
    return f"{mean:{fmt}} ({std:{fmt}})"


def markdown(header, rows) -> str:
    """A Markdown table: one header row, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def results_table(summary: list, labels: dict, dist_unit: str) -> str:
    """Markdown in the layout of the paper's Tables III-V: mean (std) over pairs."""
    hdr = (["Method"] + [f"Dice {s}" for _, s in STRUCTURES] + ["Dice Avg"] + [f"HD {s}" for _, s in STRUCTURES]
           + ["HD Avg", "det ≤ 0 (%)", "mean abs ∇det", "HD95 Avg", "lost", "pairs"])
    rows = []
    for r in summary:
        rows.append([labels.get(r["method"], r["method"])]
                    + [mean_std(r[f"dice_{s}_mean"], r[f"dice_{s}_std"], ".3f") for _, s in STRUCTURES]
                    + [mean_std(r["dice_avg_mean"], r["dice_avg_std"], ".3f")]
                    + [mean_std(r[f"hd_{s}_mean"], r[f"hd_{s}_std"], ".2f") for _, s in STRUCTURES]
                    + [mean_std(r["hd_avg_mean"], r["hd_avg_std"], ".2f"),
                       mean_std(r["fold_pct_mean"], r["fold_pct_std"], ".3f"),
                       mean_std(r["jgrad_mean"], r["jgrad_std"], ".4f"),
                       mean_std(r["hd95_avg_mean"], r["hd95_avg_std"], ".2f"),
                       r["lost"], r["n"]])
    return markdown(hdr, rows) + (f"\nDice and Hausdorff distance (HD, {dist_unit}) per structure and averaged; mean "
                                  "(standard deviation over pairs); HD over finite values, 'lost' counts (pair, "
                                  "structure) cases where the warped structure vanished (HD undefined); det ≤ 0: % "
                                  "voxels with det(I + ∇u) ≤ 0; mean abs ∇det: mean |∇ det(I + ∇u)| per "
                                  "voxel.\n")


def epe_table(summary: list, labels: dict) -> str:
    hdr = ["Method", "EPE (voxels)", "EPE without 8-voxel margin", "det ≤ 0 (%)", "mean abs ∇det", "time (s)"]
    rows = [[labels.get(r["method"], r["method"]), f"{r['epe_mean']:.3f}", f"{r['epe_inner_mean']:.3f}",
             f"{r['fold_pct_mean']:.3f}", f"{r['jgrad_mean']:.4f}", f"{r['time_s_mean']:.2f}"] for r in summary]
    return markdown(hdr, rows)


def runtime_table(summaries: dict, labels: dict, warmups: dict, order: list) -> str:
    """Table VI layout: seconds per pair, mean (std), after warm-up; 2-D and 3-D, CPU and GPU."""
    cols = [("acdc-2d", "time_s", "2D CPU"), ("acdc-2d", "time_gpu_s", "2D GPU"),
            ("acdc-3d", "time_s", "3D CPU"), ("acdc-3d", "time_gpu_s", "3D GPU")]
    hdr = ["Method"] + [c[2] for c in cols] + ["first call 2D / 3D CPU (s)"]
    rows = []
    for name in order:
        cells, seen = [], False
        for suite, key, _ in cols:
            r = next((x for x in summaries.get(suite, []) if x["method"] == name), None)
            if r is None or f"{key}_mean" not in r:
                cells.append("–")
                continue
            seen = seen or math.isfinite(r[f"{key}_mean"])
            cells.append(mean_std(r[f"{key}_mean"], r[f"{key}_std"], ".3f"))
        if not seen:
            continue
        w = [warmups.get(s, {}).get(name, {}).get("cpu") for s in ("acdc-2d", "acdc-3d")]
        cells.append(" / ".join("–" if x is None or not math.isfinite(x) else f"{x:.2f}" for x in w))
        rows.append([labels.get(name, name)] + cells)
    return markdown(hdr, rows) + ("\nSeconds per pair, mean (standard deviation), after one warm-up call per method "
                                  "(its time, which includes compilation and imports, in the last column); methods "
                                  "run interleaved pair by pair in one process with the same thread count; '–': not "
                                  "run.\n")


def write_csv(rows: list[dict], fh) -> None:
    """Rows (dicts) as CSV with every field; floats in full precision (``repr``), nan/inf as such."""
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    w = csv.DictWriter(fh, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(float(v)) if isinstance(v, (float, np.floating)) else v) for k, v in r.items()})


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    write_csv(rows, buf)
    return buf.getvalue()
