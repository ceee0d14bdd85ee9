"""Register a pair with a trained VR-Net, optionally refined by the classical solver."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import torch

import varreg
from varreg.options import OptionError, weights_of
from varreg.registration import RegistrationResult, normalise_pair, validate_pair

from .checkpoint import load_checkpoint
from .model import VRNet, resolve_precision, unet_precision
from .options import VRNetOptions, check_checkpoint

__all__ = ["register_learned", "load_model"]

#: Loaded models by (path, mtime, size, device), most recent last; a few are kept so that
#: alternating between checkpoints (a benchmark of several) does not reload one each call.
_CACHE: dict = {}
_CACHE_SIZE = 4


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


def torch_device(device: str) -> str:
    """A torch device for ``"auto"`` (CUDA when torch sees one, else the CPU), ``"cpu"``, ``"gpu"`` (CUDA or a
    ``RuntimeError``) or a torch device name."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("device='gpu' was asked for but torch sees no CUDA device. Use device='cpu' or 'auto'.")
        return "cuda"
    return device


def register_learned(fixed, moving, checkpoint, *, spacing=None, initial=None, options: VRNetOptions | None = None,
                     post_solver=None, **fields) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with a trained VR-Net, optionally followed by classical warps.

    Parameters
    ----------
    fixed, moving : NumPy arrays of one shape, 2-D or 3-D (the checkpoint's dimension).
    checkpoint : path of a VR-Net checkpoint, or a :class:`VRNet`.
    spacing : voxel size per axis; only the post warps use it (the network was trained in pixels).
    initial : not taken (the network computes its own start); present so that this function
        is a method of :func:`varreg.register_slices` and :func:`varreg.register_images`.
    options : a :class:`varreg_learned.options.VRNetOptions` (default: all defaults).
    post_solver : a :class:`varreg.SolverOptions` for the post warps' other settings
        (``theta``, ``iterations``, ``denoiser_iterations`` ...); its data term is the network's,
        and its ``denoiser``, ``lam``, ``normalise``, ``device``, ``levels``, ``warps`` and
        ``refine`` are set by the post warps (``post_denoiser``, ``post_lam`` else its ``refine_lam``).
    **fields : VR-Net options by name, overriding ``options``: ``post_warps``,
        ``post_denoiser``, ``post_lam``, ``precision``, ``normalise``, ``device``
        (documented once, in :class:`~varreg_learned.options.VRNetOptions`).
        The post warps are ``varreg.register(..., initial=network, levels=1,
        warps=post_warps, refine=0, denoiser=post_denoiser, lam=post_lam)``.

    Returns
    -------
    varreg.RegistrationResult with NumPy ``displacement`` ``(ndim, *fixed.shape)`` float32
    (voxels, pull-back), ``warped`` and ``info`` (checkpoint, config, timings).
    """
    opts = (options or VRNetOptions()).replace(**fields) if fields else (options or VRNetOptions())
    if initial is not None:
        raise OptionError("initial", "VR-Net computes its own initial displacement; initial= is not taken")
    check_checkpoint(checkpoint)
    t0 = time.perf_counter()
    fixed, moving = validate_pair(fixed, moving)
    fixed = varreg.backend.to_numpy(fixed)
    moving = varreg.backend.to_numpy(moving)
    device = torch_device(opts.device)
    precision = resolve_precision(opts.precision, device)
    model, meta, name = load_model(checkpoint, ndim=fixed.ndim, device=device)
    if opts.normalise:
        f32, m32 = normalise_pair(fixed, moving)
    else:
        f32, m32 = fixed.astype(np.float32), moving.astype(np.float32)
    was_training = model.training
    model.eval()
    cpu = torch.device(device).type == "cpu"
    try:
        # on the CPU, torch's threads follow the cores that other processes leave free
        with torch.no_grad(), unet_precision(model, precision), \
                (varreg.backend.fair_threads(torch_too=True) if cpu else contextlib.nullcontext()):
            u = model(torch.from_numpy(np.ascontiguousarray(f32)).to(device)[None],
                       torch.from_numpy(np.ascontiguousarray(m32)).to(device)[None])[0]
    finally:
        model.train(was_training)
    u = u.detach().cpu().numpy().astype(np.float32)
    t_net = time.perf_counter() - t0
    info = dict(method="vrnet", checkpoint=name, config=model.config.to_dict(), network_time_s=t_net,
                post_warps=opts.post_warps, checkpoint_steps=meta.get("steps"), device=device, precision=precision)
    if opts.post_warps > 0:
        base = post_solver if post_solver is not None else varreg.SolverOptions()
        base = base.replace(data_term=model.config.data_term)
        w = weights_of(base.data_term, given=base)
        # the refinement warps of the classical defaults: theta, refine_lam, the post denoiser, at full resolution
        solver = base.replace(denoiser=opts.post_denoiser, theta=w.theta,
                              lam=opts.post_lam if opts.post_lam is not None else w.refine_lam,
                              normalise=opts.normalise, device="cpu", levels=1, warps=opts.post_warps, refine=0)
        n_threads = torch.get_num_threads()
        try:
            res = varreg.register(fixed, moving, spacing=spacing, initial=u, options=solver)
        finally:
            # numba's OpenMP pool shares torch's libgomp; its first launch resets the thread count
            torch.set_num_threads(n_threads)
        post = {k: getattr(solver, k) for k in ("data_term", "denoiser", "theta", "lam", "iterations", "normalise")}
        res.info = {**res.info, "post_options": post, **info, "time_s": time.perf_counter() - t0}
        return res
    if post_solver is not None:
        raise OptionError("post_solver", "post_solver= sets the post warps, and there are none: give post_warps too")
    moving_f = moving if moving.dtype.kind == "f" else moving.astype(np.float32)
    warped = varreg.warp(moving_f, u)
    info["time_s"] = time.perf_counter() - t0
    return RegistrationResult(displacement=u, warped=warped, info=info)
