"""Running every method on every pair, scoring each displacement, and summarising over pairs.

Labelled pairs are scored by :func:`varreg.acdc.score_pair` (the protocol of
``benchmarks/acdc_2d.py`` and the VR-Net paper), the synthetic pair by its
end-point error (:mod:`varreg.metrics`). Hausdorff averages are over finite
values; a structure warped away entirely (HD undefined) is counted in ``lost``.
Standard deviations are over pairs (``ddof=0``). Times are per pair, after one
warm-up call of every method, with the methods interleaved pair by pair so
that a shared machine slows them alike.
"""
from __future__ import annotations

import time

import numpy as np

from varreg import acdc, metrics
from varreg.backend import to_numpy

from .methods import Method
from .pairs import STRUCTURES, Pair, crop

__all__ = ["score", "run_suite", "summarise", "finite"]


def score(pair: Pair, u) -> dict:
    """Metrics of one displacement on one pair.

    Labels: ``dice_<S>``, ``hd_<S>``, ``hd95_<S>`` for S in LV, Myo, RV
    (:func:`varreg.acdc.score_pair`: moving labels warped by nearest neighbour;
    distances with ``pair.spacing``). Truth: ``epe``, ``epe_inner`` (without an
    8-voxel margin), in voxels. Always: ``fold_pct`` (% det(I + ∇u) ≤ 0) and
    ``jgrad`` (mean |∇det|, per voxel).
    """
    u = np.asarray(to_numpy(u))
    out = {}
    scored = None
    if pair.fixed_labels is not None:
        scored = acdc.score_pair(pair.fixed_labels, pair.moving_labels, u, spacing=pair.spacing,
                                 labels=acdc.TABLE_ORDER)
        for k, s in STRUCTURES:
            out[f"dice_{s}"] = scored["dice"][k]
            out[f"hd_{s}"] = scored["hd"][k]
            out[f"hd95_{s}"] = scored["hd95"][k]
    if pair.truth is not None:
        inner = (slice(None),) + tuple(slice(8, n - 8) if n > 16 else slice(None) for n in u.shape[1:])
        out["epe"] = metrics.endpoint_error(u, pair.truth)
        out["epe_inner"] = metrics.endpoint_error(u[inner], pair.truth[inner])
    if scored is not None:
        out["fold_pct"], out["jgrad"] = scored["fold_pct"], scored["jgrad"]
    else:
        out["fold_pct"] = 100.0 * metrics.folding_fraction(u)
        out["jgrad"] = metrics.jacobian_gradient_magnitude(u)
    return out


def _timed(method: Method, pair: Pair, device: str):
    sp = pair.spacing if method.uses_spacing else None
    t0 = time.perf_counter()
    u = method.run(pair.fixed, pair.moving, sp, device)
    dt = time.perf_counter() - t0
    return u, dt


def run_suite(pairs: list, methods: list, *, gpu: bool = False, progress=None, warmup_crop: int | None = None) -> tuple:
    """Run every method on every pair (interleaved pair by pair) and score it.

    One warm-up call per method first (on the first pair, or its centre crop of
    ``warmup_crop`` voxels), timed separately. With ``gpu``, methods that can
    run on a GPU are also timed there on every pair (scores come from the CPU run).

    Returns ``(records, warmups)``: one dict per (pair, method) with ``suite``,
    ``pair``, ``patient``, ``index``, ``method``, ``time_s``, ``time_gpu_s``
    (or ``nan``) and the :func:`score` fields; ``{method: {"cpu": s, "gpu": s}}``.
    """
    ndim = pairs[0].fixed.ndim if pairs else 2
    methods = [m for m in methods if ndim in m.dims]
    warm = pairs[0] if warmup_crop is None or not pairs else crop(pairs[0], warmup_crop)
    warmups = {}
    for m in methods:
        if not pairs:
            break
        try:
            warmups[m.name] = {"cpu": _timed(m, warm, "cpu")[1]}
            if gpu and "gpu" in m.devices:
                warmups[m.name]["gpu"] = _timed(m, warm, "gpu")[1]
        except Exception as exc:  # noqa: BLE001 - reported with the pairs' failures
            warmups[m.name] = {"cpu": float("nan"), "error": f"{type(exc).__name__}: {exc}"[:300]}
    records = []
    for pair in pairs:
        for m in methods:
            rec = dict(suite=pair.suite, pair=pair.key, patient=pair.patient,
                       index=-1 if pair.index is None else pair.index, method=m.name, time_s=float("nan"),
                       time_gpu_s=float("nan"))
            try:
                u, rec["time_s"] = _timed(m, pair, "cpu")
                if gpu and "gpu" in m.devices:
                    rec["time_gpu_s"] = _timed(m, pair, "gpu")[1]
                rec.update(score(pair, u))
            except Exception as exc:  # noqa: BLE001 - one failing pair of one method must not lose the run
                rec.update({k: float("nan") for k in _score_keys(pair)})
                rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
            records.append(rec)
        if progress is not None:
            progress(1)
    return records, warmups


def _score_keys(pair: Pair) -> list[str]:
    keys = []
    if pair.fixed_labels is not None:
        keys += [f"{m}_{s}" for m in ("dice", "hd", "hd95") for _, s in STRUCTURES]
    if pair.truth is not None:
        keys += ["epe", "epe_inner"]
    return keys + ["fold_pct", "jgrad"]


def finite(x) -> np.ndarray:
    """The finite values of ``x`` as a float64 array."""
    x = np.asarray(x, dtype=np.float64)
    return x[np.isfinite(x)]


def _mean_std(x):
    x = finite(x)
    return (float(x.mean()), float(x.std())) if x.size else (float("nan"), float("nan"))


def summarise(records: list, method_names: list) -> list[dict]:
    """One row per method (in ``method_names`` order, those with records).

    ``dice_<S>_mean/std``; ``dice_avg_mean`` (over pairs and structures) and
    ``dice_avg_std`` (over pairs of the per-pair mean); ``hd_*`` and ``hd95_*``
    the same over finite values; ``lost`` (pair, structure) cases with an
    undefined HD; ``fold_pct_*``, ``jgrad_*``, ``epe*``, ``time_s_*``,
    ``time_gpu_s_*``, ``n``.
    """
    rows = []
    for name in method_names:
        rs = [r for r in records if r["method"] == name]
        if not rs:
            continue
        row = {"method": name, "n": len(rs), "failed": sum(1 for r in rs if r.get("error"))}
        if "dice_LV" in rs[0]:
            for metric in ("dice", "hd", "hd95"):
                mat = np.array([[r[f"{metric}_{s}"] for _, s in STRUCTURES] for r in rs], dtype=np.float64)
                for j, (_, s) in enumerate(STRUCTURES):
                    row[f"{metric}_{s}_mean"], row[f"{metric}_{s}_std"] = _mean_std(mat[:, j])
                fin = np.isfinite(mat)
                row[f"{metric}_avg_mean"] = float(mat[fin].mean()) if fin.any() else float("nan")
                per_pair = [float(v[np.isfinite(v)].mean()) for v in mat if np.isfinite(v).any()]
                row[f"{metric}_avg_std"] = float(np.std(per_pair)) if per_pair else float("nan")
                if metric == "hd":
                    row["lost"] = int(np.isinf(mat).sum())
        for key in ("epe", "epe_inner", "fold_pct", "jgrad", "time_s", "time_gpu_s"):
            if key in rs[0]:
                row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r[key] for r in rs])
        rows.append(row)
    return rows
