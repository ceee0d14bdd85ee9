"""Metrics of a registration on label volumes, as ``varreg register`` and ``varreg evaluate`` report them.

:func:`evaluate_labels` scores label maps on one grid (3-D, one 2-D slice, or
a stack slice by slice with the ACDC protocol's rule for the mean over slices,
:func:`varreg.acdc.all_present`); the values are JSON-ready (an undefined
distance is ``None``). Built on :mod:`varreg.metrics`.
"""
from __future__ import annotations

import math

import numpy as np

from . import metrics as M
from .acdc import all_present

__all__ = ["evaluate_labels", "summary_line"]


def _finite(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _by_label(d: dict) -> dict:
    return {str(k): _finite(v) for k, v in d.items()}


def _mean(vals):
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _disp_metrics(u_active, spacing):
    det = M.jacobian_determinant(u_active)
    grad = M.jacobian_gradient_magnitude(u_active, spacing=spacing)
    return 100.0 * float(np.count_nonzero(det <= 0)) / det.size, float(grad)


def evaluate_labels(fixed_labels, warped_labels, u=None, *, spacing, mode: str, moving_labels=None,
                    label_names=None) -> dict:
    """Dice, HD and HD95 (mm) per label, folds and mean |grad det| of ``u``; per slice in ``slices`` mode.

    Arrays are 3-D on one grid (``spacing`` its voxel sizes in mm); ``u`` ``(3, X, Y, Z)`` voxels or None.
    ``mode``: ``"3d"`` (volume), ``"2d"`` (one axis of length 1), ``"slices"`` (volume metrics plus
    per-slice 2-D metrics along the last axis and their mean over the slices where every label is
    present in the fixed and the moving (else warped) labels: the ACDC 2-D protocol).
    """
    fl, wl = np.asarray(fixed_labels), np.asarray(warped_labels)
    ml = None if moving_labels is None else np.asarray(moving_labels)
    present = np.union1d(np.unique(fl), np.unique(wl if ml is None else ml))
    labels = [int(v) for v in present if v != 0]
    sp = tuple(float(s) for s in spacing)
    if mode == "2d":
        c = [i for i, n in enumerate(fl.shape) if n == 1][0]
        act = [i for i in range(3) if i != c]
        sq = lambda a: np.take(a, 0, axis=c)  # noqa: E731
        fl_e, wl_e, ml_e = sq(fl), sq(wl), (None if ml is None else sq(ml))
        sp_e = tuple(sp[i] for i in act)
        u_e = None if u is None else np.stack([sq(u[i]) for i in act])
    else:
        fl_e, wl_e, ml_e, sp_e = fl, wl, ml, sp
        u_e = u
    lm = M.label_metrics(fl_e, wl_e, labels, sp_e)
    out = {
        "labels": labels,
        "dice": _by_label(lm["dice"]),
        "hd_mm": _by_label(lm["hd"]),
        "hd95_mm": _by_label(lm["hd95"]),
        "mean_dice": _mean(lm["dice"].values()),
    }
    if label_names:
        out["label_names"] = {str(k): v for k, v in label_names.items() if k in labels}
    if ml_e is not None:
        before = M.dice(fl_e, ml_e, labels=labels)
        out["dice_before"] = _by_label(before)
        out["mean_dice_before"] = _mean(before.values())
    if u_e is not None and mode != "slices":
        fold, grad = _disp_metrics(u_e, sp_e)
        out["folding_percent"] = fold
        out["mean_grad_jacobian_per_mm"] = grad
    if mode == "slices":
        per, folds_n, grads = [], 0, []
        ref = ml if ml is not None else wl
        for z in range(fl.shape[2]):
            a, b = fl[..., z], wl[..., z]
            entry = {"index": z}
            s_lm = M.label_metrics(a, b, labels, sp[:2])
            entry["dice"] = _by_label(s_lm["dice"])
            entry["hd_mm"] = _by_label(s_lm["hd"])
            entry["hd95_mm"] = _by_label(s_lm["hd95"])
            if ml is not None:
                entry["dice_before"] = _by_label(M.dice(a, ml[..., z], labels=labels))
            entry["all_labels_present"] = all_present(a, ref[..., z], labels)
            if u is not None:
                uz = u[:2, :, :, z]
                det = M.jacobian_determinant(uz)
                folds_n += int(np.count_nonzero(det <= 0))
                entry["folding_percent"] = 100.0 * float(np.count_nonzero(det <= 0)) / det.size
                g = float(M.jacobian_gradient_magnitude(uz, spacing=sp[:2]))
                grads.append(g)
                entry["mean_grad_jacobian_per_mm"] = g
            per.append(entry)
        if u is not None:
            out["folding_percent"] = 100.0 * folds_n / fl.size
            out["mean_grad_jacobian_per_mm"] = float(np.mean(grads))
        chosen = [e for e in per if e["all_labels_present"]]
        summ = {"axis": 2, "rule": "slices where every label is present in the fixed and the moving labels",
                "n_slices": len(per), "n_evaluated": len(chosen), "indices": [e["index"] for e in chosen]}
        for key in ("dice", "hd_mm", "hd95_mm", "dice_before"):
            if chosen and key in chosen[0]:
                summ[key] = {str(k): _mean_or_none([e[key][str(k)] for e in chosen]) for k in labels}
        if chosen and "dice" in summ:
            summ["mean_dice"] = _mean(summ["dice"].values())
            if "dice_before" in summ:
                summ["mean_dice_before"] = _mean(summ["dice_before"].values())
        if chosen and u is not None:
            summ["folding_percent"] = float(np.mean([e["folding_percent"] for e in chosen]))
            summ["mean_grad_jacobian_per_mm"] = float(np.mean([e["mean_grad_jacobian_per_mm"] for e in chosen]))
        summ["per_slice"] = per
        out["slices"] = summ
    return out


def _mean_or_none(vals):
    """Mean of per-slice values; None if any is None (an infinite distance) or none are given."""
    if not vals or any(v is None for v in vals):
        return None
    return float(np.mean(vals))


def summary_line(m: dict, label_names=None) -> str:
    """``Dice RV 0.80→0.91  Myo ...  mean 0.61→0.83 | folds 0.00 % | ...``."""
    names = {int(k): v for k, v in (m.get("label_names") or label_names or {}).items()}
    src, where = m, ""
    if "slices" in m and m["slices"].get("n_evaluated"):
        src = m["slices"]
        where = f" (mean of {src['n_evaluated']} slices)"
    parts = []
    for k in m["labels"]:
        after = src.get("dice", {}).get(str(k))
        before = src.get("dice_before", {}).get(str(k)) if "dice_before" in src else None
        name = names.get(k, str(k))
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        parts.append(f"{name} {fmt(before)}→{fmt(after)}" if "dice_before" in src else f"{name} {fmt(after)}")
    mean_a, mean_b = src.get("mean_dice"), src.get("mean_dice_before")
    line = f"Dice{where} " + "  ".join(parts)
    if mean_a is not None:
        line += f"  mean {mean_b:.3f}→{mean_a:.3f}" if mean_b is not None else f"  mean {mean_a:.3f}"
    if "folding_percent" in m:
        line += f" | folds {m['folding_percent']:.2f} %"
    return line
