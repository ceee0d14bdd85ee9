"""The comparison behind ``varreg bench`` (issue #5): methods, pairs, runs, tables, plots.

Pure logic without click; :mod:`varreg_cli.bench` parses the options and writes
the report folder. Every method is a function ``run(fixed, moving, spacing,
device) -> u`` returning a NumPy displacement ``(ndim, *fixed.shape)`` float32
in voxels of the fixed grid, pull-back (``moving(x + u(x)) ~ fixed(x)``), the
convention of :func:`varreg.register`; every method is scored by the same code
(:func:`score`, built on :mod:`varreg.metrics`).

Suites (the protocol of ``benchmarks/acdc_2d.py`` and the VR-Net paper):

``acdc-2d``
    each ES slice (moving) onto its ED slice (fixed), on the slices where LV,
    Myo and RV are present in both phases (:func:`varreg.acdc.slice_pairs`);
    ES labels warped by nearest neighbour; distances in the data's in-plane
    voxel size (pixels for ``../shared/data/acdc``, whose affine is the identity).
``acdc-3d``
    the ES volume onto the ED volume, all slices, with an assumed voxel
    spacing (default 1.5 x 1.5 x 10 mm for the (H, W, slice) axes, since the
    data kept none): methods that take a spacing get it, distances are in mm.
``synthetic-3d``
    a smooth random volume and its copy deformed by a known sinusoidal
    displacement (``benchmarks/synthetic_3d.py``): end-point error.

Hausdorff averages are over finite values; a structure warped away entirely
(HD undefined) is counted in ``lost``. Standard deviations are over pairs
(``ddof=0``). Times are per pair, after one warm-up call of every method, with
the methods interleaved pair by pair so that a shared machine slows them alike.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path
from typing import Callable

import numpy as np

from . import acdc, metrics
from .backend import to_numpy

__all__ = [
    "STRUCTURES", "SUITES", "Method", "Pair", "registry", "select_methods", "default_methods", "QUICK_METHODS",
    "acdc_pairs", "synthetic_pair", "score", "run_suite", "summarise", "results_table", "runtime_table",
    "epe_table", "write_csv", "boxplots", "header_info", "apply_threads", "scaling_run", "scaling_table",
    "scaling_plot", "TUNING_GRIDS", "tune_methods", "tuning_table", "rss_gib", "reset_peak_rss",
]

#: (label value, name) in the column order of the paper's Tables III-V
STRUCTURES = ((3, "LV"), (2, "Myo"), (1, "RV"))
SUITES = ("acdc-2d", "acdc-3d", "synthetic-3d")
DEFAULT_SPACING_3D = (1.5, 1.5, 10.0)
QUICK_METHODS = ("unregistered", "varreg", "skimage-tvl1")


# =========================================================================== methods
@dataclass
class Method:
    """One registration method as the benchmark runs it.

    ``run(fixed, moving, spacing, device)``: ``spacing`` is ``None`` (voxels)
    or one physical size per axis; ``device`` is ``"cpu"`` or ``"gpu"``.
    """

    name: str
    label: str
    kind: str  # "baseline" | "varreg" | "learned" | "peer"
    run: Callable
    dims: tuple = (2, 3)
    devices: tuple = ("cpu",)
    config: str = ""
    uses_spacing: bool = False


@dataclass
class Unavailable:
    """A method that cannot run here, and why (a missing optional package, no checkpoint)."""

    name: str
    label: str
    kind: str
    reason: str


def _unregistered(fixed, moving, spacing=None, device="cpu"):
    return np.zeros((fixed.ndim, *fixed.shape), np.float32)


# --------------------------------------------------------------------------- varreg
#: name -> (data term, denoiser, label); each at varreg.DEFAULTS of its data term
VARREG_CONFIGS = {
    "varreg": ("l1", "tv", "varreg L1-TV (default)"),
    "varreg-l1-huber": ("l1", "huber", "varreg L1-Huber"),
    "varreg-l1-quadratic": ("l1", "quadratic", "varreg L1-quadratic"),
    "varreg-l2-tv": ("l2", "tv", "varreg L2-TV"),
    "varreg-l2-huber": ("l2", "huber", "varreg L2-Huber"),
    "varreg-l2-quadratic": ("l2", "quadratic", "varreg L2-quadratic"),
    "varreg-l1-tv-vectorial": ("l1", "tv-vectorial", "varreg L1-vectorial TV"),
    "varreg-l1-tgv": ("l1", "tgv", "varreg L1-TGV"),
}


def _varreg_method(name):
    import varreg

    data_term, denoiser, label = VARREG_CONFIGS[name]

    def run(fixed, moving, spacing=None, device="cpu"):
        res = varreg.register(fixed, moving, data_term=data_term, denoiser=denoiser, spacing=spacing, device=device)
        return np.asarray(to_numpy(res.displacement), dtype=np.float32)

    d = varreg.DEFAULTS[data_term]
    den_iters = varreg.registration.DENOISER_ITERATIONS.get(denoiser, d["denoiser_iterations"])
    cfg = (f"varreg.register(data_term={data_term!r}, denoiser={denoiser!r}): theta {d['theta']}, lam {d['lam']}, "
           f"warps {d['warps']} per level (finest first) x {d['iterations']} iterations x {den_iters} denoiser steps, "
           f"then refine {d['refine']} quadratic warps per level (lam {d['refine_lam']}), "
           f"scale {varreg.register.__kwdefaults__['scale']}"
           " (varreg.DEFAULTS of the data term, chosen for TV on the ACDC train split; not retuned per denoiser)")
    from .backend import gpu_available

    return Method(name, label, "varreg", run, (2, 3), ("cpu", "gpu") if gpu_available() else ("cpu",), cfg, True)


def _varreg_slices_method():
    import varreg

    def run(fixed, moving, spacing=None, device="cpu"):
        res = varreg.register_slices(fixed, moving, axis=-1, spacing=spacing, device=device)
        return np.asarray(res.displacement, dtype=np.float32)

    cfg = ("varreg.register_slices(axis=-1): varreg's default L1-TV on every 2-D slice of the last axis, "
           "no through-slice motion; for stacks of thick slices")
    from .backend import gpu_available

    return Method("varreg-slices", "varreg L1-TV slice by slice", "varreg", run, (3,),
                  ("cpu", "gpu") if gpu_available() else ("cpu",), cfg, True)


# --------------------------------------------------------------------------- VR-Net
def _vrnet_methods(checkpoints, refine_warps):
    """``vrnet``, ``vrnet+refine`` (warps with the default refinement denoiser, quadratic) and
    ``vrnet+refine-tgv`` (TGV warps) per checkpoint
    (named ``vrnet[stem]`` ... when there are several)."""
    from .registration import DEFAULT_REFINE_DENOISER

    variants = (("vrnet", 0, None), ("vrnet+refine", refine_warps, DEFAULT_REFINE_DENOISER),
                ("vrnet+refine-tgv", refine_warps, "tgv"))
    out = []
    if not checkpoints:
        for name, _, _ in variants:
            out.append(Unavailable(name, name, "learned", "no --checkpoint given (the package ships varreg_learned/checkpoints/vrnet2d_acdc.pt, 2-D)"))
        return out
    from varreg_learned.inference import load_model, register_learned
    from varreg_learned.model import resolve_precision
    import torch

    for ck in checkpoints:
        model, meta, path = load_model(ck)  # errors propagate: the CLI names the file
        ndim = model.config.ndim
        tag = "" if len(checkpoints) == 1 else f"[{Path(ck).stem}]"
        cuda = torch.cuda.is_available()
        for base, refine, denoiser in variants:
            def run(fixed, moving, spacing=None, device="cpu", _ck=ck, _refine=refine, _den=denoiser):
                opts = {}
                if _refine:
                    opts["denoiser"] = _den
                    if spacing is not None:
                        opts["spacing"] = spacing
                    if device == "gpu":
                        opts["device"] = "gpu"
                res = register_learned(fixed, moving, _ck, refine=_refine,
                                       device="cuda" if device == "gpu" else "cpu", **opts)
                return np.asarray(to_numpy(res.displacement), dtype=np.float32)

            cfg = (f"checkpoint {path} ({ndim}-D, {model.config.data_term}, {model.config.n_warps}x"
                   f"{model.config.n_iters} cascades, {meta.get('steps', '?')} training steps; U-Nets in "
                   f"{resolve_precision('auto', 'cpu')} on the CPU, precision='auto')")
            if refine:
                cfg += (f", then {refine} warps of varreg.register(denoiser={denoiser!r}) at the finest level "
                        "(levels=1, initial=network)")
            den_name = {"tv": "TV", "tgv": "TGV"}.get(denoiser, denoiser)
            label = ("VR-Net" if refine == 0 else f"VR-Net + {refine} classical {den_name} warps") + tag
            out.append(Method(f"{base}{tag}", label, "learned", run, (ndim,), ("cpu", "gpu") if cuda else ("cpu",),
                              cfg, bool(refine)))
    return out


# --------------------------------------------------------------------------- peers
#: Parameters of the peers, checked with ``varreg bench --tune`` on ACDC *train* patients (docs/bench.md):
#: skimage: its defaults (as benchmarks/acdc_2d.py; the grid's best was 0.002 Dice higher, within noise).
#: SimpleITK demons: std 1.0 was best; 50/30/20 iterations (100/50/25: +0.0015 Dice for 1.4x the time).
#: ANTsPy SyN (tuned in a separate environment with antspyx 0.6.3): the grid spanned 0.001 Dice; the fastest kept.
SKIMAGE_PARAMS = {}
DEMONS_PARAMS = dict(iterations=(50, 30, 20), shrink=(4, 2, 1), std=1.0, histogram_matching=True)
ANTS_PARAMS = dict(syn_metric="CC", syn_sampling=2, flow_sigma=3.0, total_sigma=0.0, grad_step=0.2,
                   reg_iterations=(40, 20, 10))


def skimage_tvl1(fixed, moving, spacing=None, device="cpu", **params):
    """scikit-image ``optical_flow_tvl1(fixed, moving)``: already (ndim, *shape), voxels, pull-back."""
    from skimage.registration import optical_flow_tvl1

    return optical_flow_tvl1(fixed, moving, **params).astype(np.float32)


def _sitk_image(a, spacing):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.float32))  # x = last array axis
    img.SetSpacing([float(s) for s in reversed(spacing)])
    return img


def _sitk_shrink(img, factors):
    """Gaussian smoothing (sigma 0.5 sqrt(f^2 - 1) voxels) and resampling to size / f, corners aligned."""
    import SimpleITK as sitk

    sp = img.GetSpacing()
    sig = [0.5 * math.sqrt(f * f - 1.0) * s if f > 1 else 0.0 for f, s in zip(factors, sp)]
    sm = sitk.SmoothingRecursiveGaussian(img, [max(x, 1e-6 * s) for x, s in zip(sig, sp)])
    size = [max(int(n / f + 0.5), 2) for f, n in zip(factors, img.GetSize())]
    spacing = [(n - 1) * s / (m - 1) for n, s, m in zip(img.GetSize(), sp, size)]
    return sitk.Resample(sm, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), spacing,
                         img.GetDirection(), 0.0, img.GetPixelID())


def sitk_demons(fixed, moving, spacing=None, device="cpu", *, iterations=(50, 30, 20), shrink=(4, 2, 1), std=1.0,
                histogram_matching=True, symmetric=False):
    """SimpleITK diffeomorphic demons in a coarse-to-fine scheme, as a varreg displacement.

    The moving image is histogram-matched to the fixed one (1024 levels, 7
    match points, threshold at the mean). Level ``k`` shrinks every axis of at
    least 32 voxels by ``shrink[k]`` (thin axes, such as the few slices of a
    short-axis stack, are kept), runs ``iterations[k]`` demons iterations with
    the displacement field smoothed by a Gaussian of ``std`` voxels, and passes
    its field (resampled linearly) to the next level. ``symmetric`` uses the
    fast symmetric forces filter instead.

    SimpleITK's field is physical, in its (x, y[, z]) order, where
    ``GetImageFromArray`` makes x the *last* array axis: component ``i`` of the
    returned displacement is ``field[..., ndim - 1 - i] / spacing[i]``.
    """
    import SimpleITK as sitk

    nd = fixed.ndim
    sp = tuple(float(s) for s in (spacing or (1.0,) * nd))
    f = _sitk_image(fixed, sp)
    m = _sitk_image(moving, sp)
    if histogram_matching:
        m = sitk.HistogramMatching(m, f, numberOfHistogramLevels=1024, numberOfMatchPoints=7,
                                   thresholdAtMeanIntensity=True)
    flt = sitk.FastSymmetricForcesDemonsRegistrationFilter() if symmetric else sitk.DiffeomorphicDemonsRegistrationFilter()
    flt.SetStandardDeviations(float(std))
    flt.SetSmoothDisplacementField(True)
    field = None
    for its, s in zip(iterations, shrink):
        factors = [s if n >= 32 else 1 for n in f.GetSize()]
        fl, ml = (f, m) if max(factors) == 1 else (_sitk_shrink(f, factors), _sitk_shrink(m, factors))
        if field is None:
            field = sitk.Image(fl.GetSize(), sitk.sitkVectorFloat64)
            field.CopyInformation(fl)
        else:
            field = sitk.Resample(field, fl)  # physical vectors: no rescaling between levels
        flt.SetNumberOfIterations(int(its))
        field = flt.Execute(fl, ml, field)
    d = sitk.GetArrayViewFromImage(field)  # (*shape, nd), components (x, y[, z])
    return np.stack([d[..., nd - 1 - i] / sp[i] for i in range(nd)]).astype(np.float32)


def ants_syn(fixed, moving, spacing=None, device="cpu", **params):
    """ANTsPy SyN (``type_of_transform="SyNOnly"``, no affine stage), as a varreg displacement.

    The forward transforms are composed into one displacement field
    (``apply_transforms(..., compose=)``); ANTsPy keeps the array axis order
    (axis ``i`` of the array is ITK axis ``i``), so component ``i`` is
    ``field[..., i] / spacing[i]`` (checked on shifted images in
    tests/test_bench.py, which skips without antspyx).
    """
    import tempfile

    import ants

    nd = fixed.ndim
    sp = tuple(float(s) for s in (spacing or (1.0,) * nd))
    f = ants.from_numpy(np.ascontiguousarray(fixed, dtype=np.float32), spacing=sp)
    m = ants.from_numpy(np.ascontiguousarray(moving, dtype=np.float32), spacing=sp)
    with tempfile.TemporaryDirectory(prefix="varreg-ants-") as tmp:
        reg = ants.registration(f, m, type_of_transform="SyNOnly", outprefix=os.path.join(tmp, "r"), **params)
        path = ants.apply_transforms(f, m, reg["fwdtransforms"], compose=os.path.join(tmp, "c"))
        d = ants.image_read(path).numpy()  # (*shape, nd)
    if d.shape != (*fixed.shape, nd):
        raise RuntimeError(f"ANTs composed field has shape {d.shape}; expected {(*fixed.shape, nd)}")
    return np.stack([d[..., i] / sp[i] for i in range(nd)]).astype(np.float32)


PEERS = {
    # name: (module to import, label, runner, params, config text)
    "skimage-tvl1": ("skimage", "scikit-image optical_flow_tvl1 (default)", skimage_tvl1, SKIMAGE_PARAMS,
                     "skimage.registration.optical_flow_tvl1 with its defaults (attachment 15, tightness 0.3, "
                     "5 warps x 10 iterations, its own pyramid); no spacing (voxels treated as cubes); defaults "
                     "kept, as benchmarks/acdc_2d.py: on 3 train patients (--tune) the grid's best was 0.002 Dice "
                     "higher"),
    "sitk-demons": ("SimpleITK", "SimpleITK diffeomorphic demons", sitk_demons, DEMONS_PARAMS,
                    "DiffeomorphicDemonsRegistrationFilter, histogram matching, 3 levels (shrink 4, 2, 1 on axes of "
                    ">= 32 voxels), 50/30/20 iterations, field smoothing std 1.0 voxel; iterations and std chosen "
                    "with varreg bench --tune on 3 ACDC train patients; uses the spacing"),
    "ants-syn": ("ants", "ANTsPy SyN", ants_syn, ANTS_PARAMS,
                 "ants.registration SyNOnly, CC radius 2, flow sigma 3, total sigma 0, gradient step 0.2, "
                 "40/20/10 iterations; uses the spacing; flow sigma and iterations checked with --tune on 2 ACDC "
                 "train patients (spread 0.001 Dice; the fastest kept)"),
}


def _peer_method(name):
    module, label, runner, params, cfg = PEERS[name]
    if util.find_spec(module) is None:
        extra = "antspyx" if module == "ants" else ("scikit-image" if module == "skimage" else module)
        return Unavailable(name, label, "peer", f"{extra} is not installed (pip install {extra}, or the 'peers' extra)")

    def run(fixed, moving, spacing=None, device="cpu"):
        return runner(fixed, moving, spacing, device, **params)

    return Method(name, label, "peer", run, (2, 3), ("cpu",), cfg, name != "skimage-tvl1")


def registry(checkpoints=(), refine_warps: int = 5) -> dict:
    """Every known method, in report order: name -> :class:`Method` or :class:`Unavailable`."""
    out = {"unregistered": Method("unregistered", "unregistered", "baseline", _unregistered, (2, 3), ("cpu",),
                                  "zero displacement")}
    for name in VARREG_CONFIGS:
        out[name] = _varreg_method(name)
    out["varreg-slices"] = _varreg_slices_method()
    for m in _vrnet_methods(list(checkpoints), refine_warps):
        out[m.name] = m
    for name in PEERS:
        out[name] = _peer_method(name)
    return out


def default_methods(reg: dict, quick: bool = False) -> list[str]:
    """``--quick``: unregistered, varreg's default, scikit-image's TV-L1; else everything but the extra
    vectorial-TV configuration (VR-Net entries only when a checkpoint was given)."""
    if quick:
        return [n for n in QUICK_METHODS if n in reg]
    return [n for n in reg if n != "varreg-l1-tv-vectorial"]


def select_methods(requested, reg: dict, quick: bool = False) -> tuple[list[Method], list[str]]:
    """``(methods to run, notes)``: unknown names raise ``ValueError``; unavailable ones become notes."""
    names = default_methods(reg, quick) if not requested else list(dict.fromkeys(requested))
    unknown = [n for n in names if n not in reg]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(reg)}")
    methods, notes = [], []
    for n in names:
        m = reg[n]
        if isinstance(m, Unavailable):
            notes.append(f"{n} skipped: {m.reason}")
        else:
            methods.append(m)
    return methods, notes


# =========================================================================== pairs
@dataclass
class Pair:
    """A fixed/moving pair of one suite, with labels (ACDC) or the true displacement (synthetic)."""

    suite: str
    patient: str
    index: int | None
    fixed: np.ndarray
    moving: np.ndarray
    fixed_labels: np.ndarray | None = None
    moving_labels: np.ndarray | None = None
    spacing: tuple | None = None  # given to methods that use it and to the distances
    truth: np.ndarray | None = None

    @property
    def key(self) -> str:
        return self.patient if self.index is None else f"{self.patient}:{self.index}"


def acdc_pairs(root, patients, *, dims=(2, 3), spacing_3d=DEFAULT_SPACING_3D) -> dict:
    """``{"acdc-2d": [Pair], "acdc-3d": [Pair]}`` for ``patients`` (the suites in ``dims``).

    2-D: :func:`varreg.acdc.slice_pairs` (ES slice -> ED slice where LV, Myo, RV
    are in both), in-plane spacing from the header (1 here: pixels), so 2-D
    numbers equal those of ``benchmarks/acdc_2d.py``. 3-D: ES volume -> ED
    volume with ``spacing_3d``.
    """
    out = {f"acdc-{d}d": [] for d in dims}
    for pid in patients:
        case = acdc.load_case(root, pid)
        if 2 in dims:
            sp2 = tuple(case.spacing[:2])
            sp2 = None if all(s == 1.0 for s in sp2) else sp2
            for z, f, m, fl, ml in acdc.slice_pairs(case):
                out["acdc-2d"].append(Pair("acdc-2d", pid, z, f, m, fl, ml, sp2))
        if 3 in dims:
            out["acdc-3d"].append(Pair("acdc-3d", pid, None, case.ed, case.es, case.ed_gt, case.es_gt,
                                       tuple(float(s) for s in spacing_3d)))
    return out


def synthetic_pair(shape=(128, 128, 96), amplitude: float = 3.0, seed: int = 0) -> Pair:
    """A smooth random volume and its copy deformed by a known sinusoidal displacement (``synthetic_3d.py``)."""
    from . import synthetic

    fixed = synthetic.smooth_random_image(tuple(shape), rng=seed)
    truth = synthetic.sinusoidal_displacement(tuple(shape), amplitude=amplitude)
    moving = synthetic.deform(fixed, truth)
    return Pair("synthetic-3d", f"synthetic{tuple(shape)}", None, fixed, moving, truth=truth)


def _crop(pair: Pair, size: int = 64) -> Pair:
    """A centre crop (axes of at least ``size``) for the warm-up call: compiles/imports, costs little."""
    sl = tuple(slice((n - size) // 2, (n - size) // 2 + size) if n > size else slice(None) for n in pair.fixed.shape)
    c = lambda a: None if a is None else np.ascontiguousarray(a[sl])  # noqa: E731
    return Pair(pair.suite, pair.patient, pair.index, c(pair.fixed), c(pair.moving), spacing=pair.spacing)


# =========================================================================== running and scoring
def score(pair: Pair, u) -> dict:
    """Metrics of one displacement on one pair (all from :mod:`varreg.metrics`).

    Labels: ``dice_<S>``, ``hd_<S>``, ``hd95_<S>`` for S in LV, Myo, RV (moving
    labels warped by nearest neighbour; distances with ``pair.spacing``).
    Truth: ``epe``, ``epe_inner`` (without an 8-voxel margin), in voxels.
    Always: ``fold_pct`` (% det(I + ∇u) ≤ 0) and ``jgrad`` (mean |∇det|, per voxel).
    """
    import varreg

    u = np.asarray(to_numpy(u))
    out = {}
    if pair.fixed_labels is not None:
        w = varreg.warp(pair.moving_labels, u, order=0)
        lm = metrics.label_metrics(pair.fixed_labels, w, labels=[k for k, _ in STRUCTURES], spacing=pair.spacing)
        for k, s in STRUCTURES:
            out[f"dice_{s}"] = lm["dice"][k]
            out[f"hd_{s}"] = lm["hd"][k]
            out[f"hd95_{s}"] = lm["hd95"][k]
    if pair.truth is not None:
        inner = (slice(None),) + tuple(slice(8, n - 8) if n > 16 else slice(None) for n in u.shape[1:])
        out["epe"] = metrics.endpoint_error(u, pair.truth)
        out["epe_inner"] = metrics.endpoint_error(u[inner], pair.truth[inner])
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
    warm = pairs[0] if warmup_crop is None or not pairs else _crop(pairs[0], warmup_crop)
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


def _finite(x):
    x = np.asarray(x, dtype=np.float64)
    return x[np.isfinite(x)]


def _mean_std(x):
    x = _finite(x)
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


# =========================================================================== tables
def _ms(mean, std, fmt):
    if mean is None or not math.isfinite(mean):
        return "–"
    return f"{mean:{fmt}} ({std:{fmt}})"


def _md(header, rows):
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
                    + [_ms(r[f"dice_{s}_mean"], r[f"dice_{s}_std"], ".3f") for _, s in STRUCTURES]
                    + [_ms(r["dice_avg_mean"], r["dice_avg_std"], ".3f")]
                    + [_ms(r[f"hd_{s}_mean"], r[f"hd_{s}_std"], ".2f") for _, s in STRUCTURES]
                    + [_ms(r["hd_avg_mean"], r["hd_avg_std"], ".2f"), _ms(r["fold_pct_mean"], r["fold_pct_std"], ".3f"),
                       _ms(r["jgrad_mean"], r["jgrad_std"], ".4f"), _ms(r["hd95_avg_mean"], r["hd95_avg_std"], ".2f"),
                       r["lost"], r["n"]])
    return _md(hdr, rows) + (f"\nDice and Hausdorff distance (HD, {dist_unit}) per structure and averaged; mean "
                             "(standard deviation over pairs); HD over finite values, 'lost' counts (pair, structure) "
                             "cases where the warped structure vanished (HD undefined); det ≤ 0: % voxels with "
                             "det(I + ∇u) ≤ 0; mean abs ∇det: mean |∇ det(I + ∇u)| per voxel.\n")


def epe_table(summary: list, labels: dict) -> str:
    hdr = ["Method", "EPE (voxels)", "EPE without 8-voxel margin", "det ≤ 0 (%)", "mean abs ∇det", "time (s)"]
    rows = [[labels.get(r["method"], r["method"]), f"{r['epe_mean']:.3f}", f"{r['epe_inner_mean']:.3f}",
             f"{r['fold_pct_mean']:.3f}", f"{r['jgrad_mean']:.4f}", f"{r['time_s_mean']:.2f}"] for r in summary]
    return _md(hdr, rows)


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
            cells.append(_ms(r[f"{key}_mean"], r[f"{key}_std"], ".3f"))
        if not seen:
            continue
        w = [warmups.get(s, {}).get(name, {}).get("cpu") for s in ("acdc-2d", "acdc-3d")]
        cells.append(" / ".join("–" if x is None or not math.isfinite(x) else f"{x:.2f}" for x in w))
        rows.append([labels.get(name, name)] + cells)
    return _md(hdr, rows) + ("\nSeconds per pair, mean (standard deviation), after one warm-up call per method "
                             "(its time, which includes compilation and imports, in the last column); methods run "
                             "interleaved pair by pair in one process with the same thread count; '–': not run.\n")


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


# =========================================================================== plots
def boxplots(records: list, order: list, labels: dict, title: str, dist_unit: str):
    """The paper's Fig. 5: box plots of Dice (top row) and HD (bottom row) per structure and averaged."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

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
                    v = [np.nanmean(_finite([r[f"{metric}_{t}"] for _, t in STRUCTURES]))
                         if _finite([r[f"{metric}_{t}"] for _, t in STRUCTURES]).size else np.nan for r in rs]
                else:
                    v = [r[f"{metric}_{s}"] for r in rs]
                data.append(_finite(v))
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


# =========================================================================== machine, versions, threads
def apply_threads(n: int | None, torch_too: bool = False) -> int:
    """Give every method the same CPU threads: numba, SimpleITK/ITK, torch (when used). Returns the count."""
    import numba

    if n is not None:
        numba.set_num_threads(int(n))
    n = int(numba.get_num_threads())
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(n)  # ANTs (read when it loads)
    if util.find_spec("SimpleITK") is not None:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    if torch_too:
        import torch

        torch.set_num_threads(n)
    return n


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gib():
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        return None


def gpu_description() -> str | None:
    """The GPU varreg can use (CuPy), or torch's CUDA device, or ``None``."""
    from .backend import gpu_available

    if gpu_available():
        try:
            import cupy

            return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        except Exception:  # noqa: BLE001
            return "CuPy GPU"
    if util.find_spec("torch") is not None and "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    return None


def header_info(command: str, threads: int, seed: int, extra: dict | None = None) -> dict:
    """Machine, versions, seeds and the command, for the report's header."""
    import varreg

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    vers = {"python": platform.python_version(), "varreg": varreg.__version__}
    for dist in ("numpy", "scipy", "numba", "scikit-image", "SimpleITK", "antspyx", "torch", "cupy-cuda12x", "matplotlib"):
        v = _version(dist)
        if v is not None:
            vers[dist] = v
    info = dict(
        command=command,
        started=time.strftime("%Y-%m-%d %H:%M:%S %z"),
        machine=dict(platform=platform.platform(), cpu=_cpu_model(), cpus_usable=cpus, memory_gib=_mem_gib(),
                     gpu=gpu_description(), load_average_at_start=load),
        threads=threads,
        seeds=dict(synthetic=seed, note="every method is deterministic for a fixed thread count; VR-Net's noise "
                                        "initialisation (if any) uses a fixed seed in evaluation mode"),
        versions=vers,
    )
    info.update(extra or {})
    return info


# =========================================================================== scaling
_SCALING_METHODS = {"varreg": "varreg", "skimage-tvl1": "skimage-tvl1", "sitk-demons": "sitk-demons",
                    "ants-syn": "ants-syn"}


def rss_gib():
    """(current RSS, peak RSS since the last reset) in GiB, from /proc (ru_maxrss elsewhere)."""
    try:
        vals = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS", "VmHWM")):
                    vals[line.split(":")[0]] = int(line.split()[1]) / 2**20
        return vals["VmRSS"], vals["VmHWM"]
    except (OSError, KeyError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return peak, peak


def reset_peak_rss() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS; False where the OS does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _scaling_child(method: str, ndim: int, n: int, threads: int, device: str, seed: int) -> dict:
    """In a fresh process: time and peak memory of one registration of an ``n^ndim`` synthetic pair."""
    import varreg
    from . import synthetic

    reg = registry()
    m = reg[method]
    apply_threads(threads)
    shape = (n,) * ndim
    fixed = synthetic.smooth_random_image(shape, rng=seed)
    w = -synthetic.sinusoidal_displacement(shape, amplitude=2.0)
    moving = np.asarray(varreg.warp(fixed, w))  # moving(x + u) ~ fixed(x) for u ~ -w: a known-size motion
    del w
    small = tuple(slice(0, 16) for _ in shape)
    m.run(np.ascontiguousarray(fixed[small]), np.ascontiguousarray(moving[small]), None, device)  # warm-up
    if device == "gpu":
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
    reset = reset_peak_rss()
    base, _ = rss_gib()
    t0 = time.perf_counter()
    u = m.run(fixed, moving, None, device)
    dt = time.perf_counter() - t0
    cur, peak = rss_gib()
    out = dict(method=method, ndim=ndim, n=n, voxels=n**ndim, device=device, time_s=dt, rss_before_gib=base,
               peak_rss_gib=peak, peak_above_before_gib=(peak - base) if reset else float("nan"),
               pair_gib=2 * fixed.nbytes / 2**30, threads=threads)
    if device == "gpu":
        import cupy

        out["gpu_pool_gib"] = cupy.get_default_memory_pool().total_bytes() / 2**30
    del u
    return out


def scaling_run(methods: list[str], sizes_2d, sizes_3d, *, threads: int, timeout: float, seed: int = 0,
                gpu: bool = False, progress=None) -> list[dict]:
    """Every (method, size) in a fresh Python process (``python -m varreg.bench``); failures/timeouts noted."""
    rows = []
    cases = [(m, 2, n) for m in methods for n in sizes_2d] + [(m, 3, n) for m in methods for n in sizes_3d]
    devs = ["cpu"] + (["gpu"] if gpu else [])
    for m, nd, n in cases:
        for dev in devs:
            if dev == "gpu" and m != "varreg":
                continue
            cmd = [sys.executable, "-m", "varreg.bench", "scaling-child", m, str(nd), str(n), str(threads), dev,
                   str(seed)]
            row = dict(method=m, ndim=nd, n=n, voxels=n**nd, device=dev)
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                if r.returncode == 0:
                    row.update(json.loads(r.stdout.strip().splitlines()[-1]))
                else:
                    tail = (r.stderr.strip().splitlines() or ["?"])[-1]
                    row["note"] = f"failed (exit {r.returncode}): {tail[:200]}"
            except subprocess.TimeoutExpired:
                row["note"] = f"stopped after the {timeout:.0f} s limit"
            rows.append(row)
            if progress is not None:
                progress(1)
    return rows


def scaling_table(rows: list[dict], labels: dict) -> str:
    hdr = ["Method", "device", "size", "voxels", "time (s)", "peak RSS (GiB)", "above start (GiB)", "pair (GiB)", "note"]
    out = []
    for r in rows:
        size = "×".join([str(r["n"])] * r["ndim"])
        f = lambda k, fmt, r=r: (f"{r[k]:{fmt}}" if isinstance(r.get(k), float) and math.isfinite(r[k])  # noqa: E731
                                 else "–")
        note = r.get("note", "")
        if r.get("gpu_pool_gib") is not None:
            note = (note + " " if note else "") + f"GPU pool {r['gpu_pool_gib']:.2f} GiB"
        out.append([labels.get(r["method"], r["method"]), r["device"], size, r["voxels"], f("time_s", ".3f"),
                    f("peak_rss_gib", ".2f"), f("peak_above_before_gib", ".2f"), f("pair_gib", ".3f"), note])
    return _md(hdr, out) + ("\nEach row in a fresh process: synthetic pair (smooth random image, sinusoidal motion "
                            "of 2 voxels), one warm-up call on a 16-voxel crop, then one timed registration. Peak "
                            "RSS: the process's resident memory high-water mark during the registration; 'above "
                            "start': minus the resident memory just before it (pair, libraries).\n")


def scaling_plot(rows: list[dict], labels: dict):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

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


# =========================================================================== tuning of the peers
#: Grids searched by ``varreg bench --tune`` (on the train split): name -> (runner, list of parameter dicts)
TUNING_GRIDS = {
    "skimage-tvl1": (skimage_tvl1, [dict(attachment=a, tightness=t) for a in (5, 10, 15, 30) for t in (0.3, 0.6)]),
    "sitk-demons": (sitk_demons, [dict(DEMONS_PARAMS, iterations=it, std=s)
                                  for it in ((20, 10, 5), (50, 30, 20), (100, 50, 25)) for s in (0.5, 1.0, 1.5)]),
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
        if util.find_spec(PEERS[name][0]) is None:
            notes.append(f"{name} skipped: not installed")
            continue
        runner, points = TUNING_GRIDS[name]
        for k, p in enumerate(points):
            mname = f"{name}#{k}"

            def run(fixed, moving, spacing=None, device="cpu", _r=runner, _p=p):
                return _r(fixed, moving, spacing, device, **_p)

            methods.append(Method(mname, f"{name} {_short_params(p)}", "peer", run, (2, 3), ("cpu",), "", True))
            grid[mname] = (name, p)
    return methods, notes, grid


def _short_params(p: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items() if k not in ("histogram_matching", "shrink", "syn_metric",
                                                                      "syn_sampling", "total_sigma", "grad_step"))


def tuning_table(summary: list, grid: dict) -> str:
    hdr = ["peer", "parameters", "Dice Avg", "HD Avg", "det ≤ 0 (%)", "s / pair", "best Dice"]
    best = {}
    for r in summary:
        peer = grid[r["method"]][0]
        if peer not in best or r["dice_avg_mean"] > best[peer]:
            best[peer] = r["dice_avg_mean"]
    rows = [[grid[r["method"]][0], _short_params(grid[r["method"]][1]), _ms(r["dice_avg_mean"], r["dice_avg_std"], ".4f"),
             _ms(r["hd_avg_mean"], r["hd_avg_std"], ".2f"), f"{r['fold_pct_mean']:.3f}", f"{r['time_s_mean']:.3f}",
             "**best**" if r["dice_avg_mean"] == best[grid[r["method"]][0]] else ""] for r in summary]
    return _md(hdr, rows)


# =========================================================================== child entry (scaling)
def _main(argv):
    if argv and argv[0] == "scaling-child":
        method, nd, n, threads, dev, seed = argv[1:7]
        print(json.dumps(_scaling_child(method, int(nd), int(n), int(threads), dev, int(seed))))
        return 0
    print("usage: python -m varreg.bench scaling-child METHOD NDIM N THREADS DEVICE SEED "
          "(internal; use 'varreg bench')", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
