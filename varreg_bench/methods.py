"""The methods the benchmark compares: the baseline, varreg's configurations, VR-Net, the peers.

Every method is a function ``run(fixed, moving, spacing, device) -> u``
returning a NumPy displacement ``(ndim, *fixed.shape)`` float32 in voxels of
the fixed grid, pull-back (``moving(x + u(x)) ~ fixed(x)``), the convention of
:func:`varreg.register`.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import util
from pathlib import Path
from typing import Callable

import numpy as np

from varreg.backend import gpu_available, to_numpy

from .peers import PEERS

__all__ = ["Method", "Unavailable", "VARREG_CONFIGS", "QUICK_METHODS", "registry", "default_methods",
           "select_methods"]

QUICK_METHODS = ("unregistered", "varreg", "skimage-tvl1")


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


def _devices():
    return ("cpu", "gpu") if gpu_available() else ("cpu",)


# --------------------------------------------------------------------------- varreg
#: name -> (data term, denoiser, label[, other SolverOptions fields]); each at the SolverOptions
#: defaults of its data term
VARREG_CONFIGS = {
    "varreg": ("l1", "tv", "varreg L1-TV (default)"),
    "varreg-l1-huber": ("l1", "huber", "varreg L1-Huber"),
    "varreg-l1-quadratic": ("l1", "quadratic", "varreg L1-quadratic"),
    "varreg-l2-tv": ("l2", "tv", "varreg L2-TV"),
    "varreg-l2-huber": ("l2", "huber", "varreg L2-Huber"),
    "varreg-l2-quadratic": ("l2", "quadratic", "varreg L2-quadratic"),
    "varreg-l1-tv-vectorial": ("l1", "tv-vectorial", "varreg L1-vectorial TV"),
    "varreg-l1-tgv": ("l1", "tgv", "varreg L1-TGV"),
    "varreg-ncc": ("ncc", "tv", "varreg NCC-TV"),
    "varreg-affine": ("l1", "tv", "varreg affine + L1-TV", {"affine": "affine"}),
}


def _varreg_method(name):
    import varreg
    from varreg.options import SolverOptions

    data_term, denoiser, label, *rest = VARREG_CONFIGS[name]
    extra = rest[0] if rest else {}

    def run(fixed, moving, spacing=None, device="cpu"):
        res = varreg.register(fixed, moving, data_term=data_term, denoiser=denoiser, spacing=spacing, device=device,
                              **extra)
        return np.asarray(to_numpy(res.displacement), dtype=np.float32)

    o = SolverOptions(data_term=data_term, denoiser=denoiser, **extra).resolved()
    args = "".join(f", {k}={v!r}" for k, v in extra.items())
    cfg = (f"varreg.register(data_term={data_term!r}, denoiser={denoiser!r}{args}): theta {o.theta}, lam {o.lam}, "
           f"warps {o.warps} per level (finest first) x {o.iterations} iterations x {o.denoiser_iterations} "
           f"denoiser steps, then refine {o.refine} {o.refine_denoiser} warps per level (lam {o.refine_lam}), "
           f"scale {o.scale}"
           " (the SolverOptions defaults of the data term, chosen for TV on the ACDC train split; not retuned per "
           "denoiser)")
    return Method(name, label, "varreg", run, (2, 3), _devices(), cfg, True)


def _varreg_slices_method():
    import varreg

    def run(fixed, moving, spacing=None, device="cpu"):
        res = varreg.register_slices(fixed, moving, axis=-1, spacing=spacing, device=device)
        return np.asarray(res.displacement, dtype=np.float32)

    cfg = ("varreg.register_slices(axis=-1): varreg's default L1-TV on every 2-D slice of the last axis, "
           "no through-slice motion; for stacks of thick slices")
    return Method("varreg-slices", "varreg L1-TV slice by slice", "varreg", run, (3,), _devices(), cfg, True)


# --------------------------------------------------------------------------- VR-Net
_VRNET_NAMES = ("vrnet", "vrnet+refine", "vrnet+refine-tgv")


def _vrnet_methods(checkpoints, refine_warps):
    """``vrnet`` (the network alone), ``vrnet+refine`` (then ``refine_warps`` classical warps with
    VR-Net's default post denoiser, quadratic) and ``vrnet+refine-tgv`` (TGV warps) per checkpoint
    (named ``vrnet[stem]`` ... when there are several)."""
    if not checkpoints:
        return [Unavailable(name, name, "learned", "no --checkpoint given (the package ships "
                                                   "varreg_learned/checkpoints/vrnet2d_acdc.pt, 2-D)")
                for name in _VRNET_NAMES]
    import torch

    from varreg_learned import load_model, register_learned
    from varreg_learned.model import resolve_precision
    from varreg_learned.options import VRNetOptions

    variants = tuple(zip(_VRNET_NAMES, (0, refine_warps, refine_warps), (None, VRNetOptions().post_denoiser, "tgv")))
    out = []
    for ck in checkpoints:
        model, meta, path = load_model(ck)  # errors propagate: the CLI names the file
        ndim = model.config.ndim
        tag = "" if len(checkpoints) == 1 else f"[{Path(ck).stem}]"
        cuda = torch.cuda.is_available()
        for base, warps, denoiser in variants:
            def run(fixed, moving, spacing=None, device="cpu", _ck=ck, _warps=warps, _den=denoiser):
                post = dict(post_warps=_warps, post_denoiser=_den) if _warps else dict(post_warps=0)
                res = register_learned(fixed, moving, _ck, spacing=spacing,
                                       device="cuda" if device == "gpu" else "cpu", **post)
                return np.asarray(to_numpy(res.displacement), dtype=np.float32)

            cfg = (f"checkpoint {path} ({ndim}-D, {model.config.data_term}, {model.config.n_warps}x"
                   f"{model.config.n_iters} cascades, {meta.get('steps', '?')} training steps; U-Nets in "
                   f"{resolve_precision('auto', 'cpu')} on the CPU, precision='auto')")
            if warps:
                cfg += (f", then {warps} classical warps at full resolution "
                        f"(register_learned(post_warps={warps}, post_denoiser={denoiser!r}))")
            den_name = {"tv": "TV", "tgv": "TGV"}.get(denoiser, denoiser)
            label = ("VR-Net" if warps == 0 else f"VR-Net + {warps} classical {den_name} warps") + tag
            devices = ("cpu", "gpu") if cuda else ("cpu",)
            out.append(Method(f"{base}{tag}", label, "learned", run, (ndim,), devices, cfg, bool(warps)))
            if ndim == 2 and denoiser != "tgv":  # the 3-D suite: the 2-D network on every slice
                out.append(_sliced(f"{base}-slices{tag}", f"{label} slice by slice", run, cfg, devices, bool(warps)))
    return out


def _sliced(name, label, run2d, cfg, devices, refines):
    """A 2-D method on every slice of the last axis of a 3-D stack (``varreg.register_slices``)."""
    import varreg

    class _Result:  # what register_slices reads of a per-slice method's result
        def __init__(self, u):
            self.displacement, self.info = u, {"time_s": 0.0}

    def one(fixed, moving, spacing=None, initial=None, device="cpu"):
        return _Result(run2d(fixed, moving, spacing=spacing, device=device))

    def run(fixed, moving, spacing=None, device="cpu"):
        res = varreg.register_slices(fixed, moving, axis=-1, spacing=spacing, method=one, device=device)
        return np.asarray(res.displacement, dtype=np.float32)

    return Method(name, label, "learned", run, (3,), devices, cfg + "; varreg.register_slices(axis=-1) over the "
                  "stack's slices, no through-slice motion", refines)


# --------------------------------------------------------------------------- peers
#: the pip package of each peer's module, where the names differ
PIP_NAMES = {"ants": "antspyx", "skimage": "scikit-image", "itk.ElastixPython": "itk-elastix"}


def installed(module: str) -> bool:
    """Whether ``module`` (dotted names too) can be imported here, without importing it when top-level."""
    try:
        return util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package of a dotted name is absent
        return False


def _peer_method(name):
    module, label, runner, params, cfg = PEERS[name]
    if not installed(module):
        extra = PIP_NAMES.get(module, module)
        return Unavailable(name, label, "peer", f"{extra} is not installed (pip install {extra}, or the 'peers' extra)")

    def run(fixed, moving, spacing=None, device="cpu"):
        return runner(fixed, moving, spacing, device, **params)

    return Method(name, label, "peer", run, (2, 3), ("cpu",), cfg, name != "skimage-tvl1")


# --------------------------------------------------------------------------- registry
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
    from .voxelmorph import voxelmorph_methods

    for m in voxelmorph_methods():  # the shipped VoxelMorph checkpoints (varreg_bench/checkpoints/)
        out[m.name] = m
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
