"""Register a pair with a trained VR-Net, optionally refined by the classical solver."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

import varreg
from varreg.registration import DEFAULT_REFINE_DENOISER, RegistrationResult, validate_pair

from .checkpoint import load_checkpoint
from .model import VRNet, resolve_precision, unet_precision

__all__ = ["register_learned", "load_model"]

#: Loaded models by (path, mtime, size, device), most recent last; a few are kept so that
#: alternating between checkpoints (a benchmark of several) does not reload one each call.
_CACHE: dict = {}
_CACHE_SIZE = 4


def _normalise(fixed, moving):
    """Joint min-max scaling of the pair to [0, 1], float32 (as ``varreg.register``)."""
    f, m = fixed.astype(np.float32), moving.astype(np.float32)
    lo, hi = min(f.min(), m.min()), max(f.max(), m.max())
    scale = 1.0 / (hi - lo) if hi > lo else 1.0
    return (f - lo) * scale, (m - lo) * scale


def load_model(checkpoint, *, ndim: int | None = None, device: str = "cpu") -> tuple[VRNet, dict, str]:
    """``(model, meta, name)`` from a path (the last few cached by path, mtime and size) or a ``VRNet``."""
    if isinstance(checkpoint, VRNet):
        cfg = checkpoint.config
        if ndim is not None and cfg.ndim != ndim:
            raise ValueError(f"this VR-Net is {cfg.ndim}-D; it cannot register {ndim}-D images")
        return checkpoint, {}, "<VRNet object>"
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path or a VRNet, got {type(checkpoint).__name__}")
    path = Path(checkpoint)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size, device)
    except OSError:
        key = None
    if key is not None and key in _CACHE:
        model, meta = _CACHE[key] = _CACHE.pop(key)
    else:
        model, meta = load_checkpoint(path, map_location=device)
        if key is not None:
            for stale in [k for k in _CACHE if k[0] == key[0]]:  # the same file before it was rewritten
                del _CACHE[stale]
            while len(_CACHE) >= _CACHE_SIZE:
                del _CACHE[next(iter(_CACHE))]  # the least recently used
            _CACHE[key] = (model, meta)
    if ndim is not None and model.config.ndim != ndim:
        raise ValueError(f"{path} is a {model.config.ndim}-D VR-Net checkpoint; it cannot register {ndim}-D images "
                         f"(train or pick a {ndim}-D checkpoint)")
    return model, meta, str(path)


def register_learned(fixed, moving, checkpoint, refine: int = 0, *, device: str = "cpu", normalise: bool = True,
                     precision: str = "auto", **refine_options) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with a trained VR-Net.

    Parameters
    ----------
    fixed, moving : NumPy arrays of one shape, 2-D or 3-D (the checkpoint's dimension).
    checkpoint : path of a VR-Net checkpoint, or a :class:`VRNet`.
    refine : extra Gauss-Newton warps of the classical solver started from the
        network's displacement (``varreg.register(..., initial=u, levels=1, warps=refine,
        refine=0)`` with the quadratic regulariser, ``theta`` and ``lam = refine_lam`` of
        ``varreg.DEFAULTS``); 0 for the network alone.
    device : torch device for the network (``"cpu"``, ``"cuda"``).
    normalise : scale the pair jointly to [0, 1] first (as in training and ``varreg.register``).
    precision : ``"auto"`` (bfloat16 U-Nets on CPUs that compute it in hardware,
        float32 elsewhere), ``"float32"`` or ``"bfloat16"``; see
        :func:`varreg_learned.model.resolve_precision`. Warps and data steps stay float32.
    refine_options : further keywords for :func:`varreg.register` in the refinement
        (``theta``, ``lam``, ``iterations``, ``denoiser`` ...); the data term defaults to the network's,
        the denoiser to ``varreg.registration.DEFAULT_REFINE_DENOISER``.

    Returns
    -------
    varreg.RegistrationResult with NumPy ``displacement`` ``(ndim, *fixed.shape)`` float32
    (voxels, pull-back), ``warped`` and ``info`` (checkpoint, config, timings).
    """
    t0 = time.perf_counter()
    fixed, moving = validate_pair(fixed, moving)
    fixed = varreg.backend.to_numpy(fixed)
    moving = varreg.backend.to_numpy(moving)
    if not (isinstance(refine, (int, np.integer)) and refine >= 0):
        raise ValueError(f"refine must be a non-negative integer, got {refine!r}")
    precision = resolve_precision(precision, device)
    model, meta, name = load_model(checkpoint, ndim=fixed.ndim, device=device)
    if normalise:
        f32, m32 = _normalise(fixed, moving)
    else:
        f32, m32 = fixed.astype(np.float32), moving.astype(np.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), unet_precision(model, precision):
            u = model(torch.from_numpy(np.ascontiguousarray(f32)).to(device)[None],
                       torch.from_numpy(np.ascontiguousarray(m32)).to(device)[None])[0]
    finally:
        model.train(was_training)
    u = u.detach().cpu().numpy().astype(np.float32)
    t_net = time.perf_counter() - t0
    info = dict(method="vrnet", checkpoint=name, config=model.config.to_dict(), network_time_s=t_net, refine=int(refine),
                checkpoint_steps=meta.get("steps"), device=device, precision=precision)
    if refine > 0:
        d = varreg.DEFAULTS[model.config.data_term]
        # the refinement warps of the classical defaults: theta, refine_lam, the quadratic regulariser
        opts = dict(data_term=model.config.data_term, denoiser=DEFAULT_REFINE_DENOISER, theta=d["theta"],
                    lam=d["refine_lam"], normalise=normalise, device="cpu")
        opts.update(refine_options)
        opts["refine"] = 0  # these warps are the refinement
        n_threads = torch.get_num_threads()
        try:
            res = varreg.register(fixed, moving, initial=u, levels=1, warps=int(refine), **opts)
        finally:
            # numba's OpenMP pool shares torch's libgomp; its first launch resets the thread count
            torch.set_num_threads(n_threads)
        res.info = {**res.info, "refine_options": opts, **info, "time_s": time.perf_counter() - t0}
        return res
    if refine_options:
        raise TypeError(f"refinement options {sorted(refine_options)} given but refine=0")
    moving_f = moving if moving.dtype.kind == "f" else moving.astype(np.float32)
    warped = varreg.warp(moving_f, u)
    info["time_s"] = time.perf_counter() - t0
    return RegistrationResult(displacement=u, warped=warped, info=info)
