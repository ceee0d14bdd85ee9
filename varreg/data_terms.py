"""The intensity-consistency step (u-step): point-wise, closed form, any backend.

With the image linearised around the current warp ``u_w`` (paper eq. 4),
``rho(u) = I1w + g.(u - u_w) - I0 = rho0 + g.u`` where ``g = grad I1w``, the
u-step minimises, independently at every voxel,

    (1/s) |rho(u)|^s + (theta / 2) |v - u|^2 .

* s = 1 (:func:`l1_step`, paper eq. 5 / appendix 1): thresholding,
  ``u = v - g * z / (max(|z|, 1) theta)`` with ``z = theta rho(v) / (|g|^2 + eps)``.
* s = 2 (:func:`l2_step`, paper eqs. 15-17 / appendix 2): Sherman-Morrison,
  ``(g g^T + theta I)(u - u_w) = theta (v - u_w) - g (I1w - I0)``, which
  simplifies to ``u = v - g rho(v) / (theta + |g|^2)``.

Shapes: ``v``, ``g`` are ``(..., ndim, *spatial)``; ``rho0``, ``gg`` are
``(..., *spatial)``. ``theta`` may be a Python float or a 0-d tensor (VR-Net
learns it). The numba path (:mod:`varreg.kernels`) is used for unbatched NumPy
arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import is_numpy, namespace
from .differences import central_gradient
from .resample import warp

__all__ = ["linearise", "l1_step", "l2_step", "L1", "L2", "DATA_TERMS", "make_data_term"]


def linearise(fixed, moving, u, ndim: int, eps: float):
    """Warp ``moving`` by ``u`` and linearise the data term around ``u``.

    Returns ``(warped, g, rho0, gg)`` with ``g = grad(warped)`` (central
    differences), ``rho0 = warped - fixed - g.u`` and ``gg = |g|^2 + eps``.
    """
    xp = namespace(fixed, moving, u)
    if is_numpy(xp) and u.ndim == ndim + 1 and isinstance(u, np.ndarray) and moving.dtype == u.dtype:
        from . import kernels

        return kernels.warp_gradient(np.ascontiguousarray(moving), np.ascontiguousarray(fixed), np.ascontiguousarray(u), eps)
    warped = warp(moving, u)
    g = central_gradient(warped, ndim)
    caxis = g.ndim - ndim - 1
    rho0 = warped - fixed - xp.sum(g * u, axis=caxis)
    gg = xp.sum(g * g, axis=caxis) + eps
    return warped, g, rho0, gg


def _as_float(theta):
    """A NumPy scalar or 0-d NumPy array as a Python float: NumPy would promote float32 data to its
    (float64) dtype, and a Python float also selects the fused kernel. Tensors are left alone."""
    if isinstance(theta, (np.generic, np.ndarray)) and np.ndim(theta) == 0:
        return float(theta)
    return theta


def _fused(v, ndim):
    return isinstance(v, np.ndarray) and is_numpy(namespace(v)) and v.ndim == ndim + 1


def l1_step(v, g, rho0, gg, theta):
    """Minimiser of ``|rho(u)| + theta/2 |v - u|^2`` (paper eq. 5); ``gg = |g|^2 + eps``."""
    return _pointwise_step(v, g, rho0, gg, theta, l1=True)


def l2_step(v, g, rho0, gg, theta):
    """Minimiser of ``rho(u)^2 / 2 + theta/2 |v - u|^2`` (paper eqs. 16, 17); ``gg = |g|^2``."""
    return _pointwise_step(v, g, rho0, gg, theta, l1=False)


def _pointwise_step(v, g, rho0, gg, theta, *, l1: bool):
    """``u = v - s g`` with the step ``s`` of the L1 (thresholding) or L2 (Sherman-Morrison) u-step."""
    theta = _as_float(theta)
    ndim = _nd(v, rho0)
    if _fused(v, ndim) and not hasattr(theta, "shape"):
        from . import kernels

        return kernels.data_step(v, g, rho0, gg, float(theta), l1)
    xp = namespace(v, g)
    caxis = v.ndim - ndim - 1
    rho = rho0 + xp.sum(g * v, axis=caxis)
    if l1:
        z = theta * rho / gg
        s = z / (xp.maximum(xp.abs(z), xp.ones_like(z)) * theta)
    else:
        s = rho / (theta + gg)
    return v - xp.expand_dims(s, axis=caxis) * g


def _nd(v, rho0) -> int:
    """Spatial dimension: ``v`` is ``(*batch, ndim, *spatial)``, ``rho0`` is ``(*batch, *spatial)``."""
    for k in (2, 3):
        if v.ndim >= k + 1 and v.shape[v.ndim - k - 1] == k and tuple(v.shape[v.ndim - k:]) == tuple(rho0.shape[rho0.ndim - k:]):
            return k
    raise ValueError(f"displacement of shape {tuple(v.shape)} does not fit data of shape {tuple(rho0.shape)}")


@dataclass(frozen=True)
class L1:
    """L1 data term (s = 1), robust to outliers. ``eps`` keeps flat regions finite."""

    eps: float = 1e-6
    name = "l1"

    def step(self, v, g, rho0, gg, theta):
        return l1_step(v, g, rho0, gg, theta)


@dataclass(frozen=True)
class L2:
    """L2 data term (s = 2): sum of squared differences, Sherman-Morrison step."""

    eps: float = 0.0
    name = "l2"

    def step(self, v, g, rho0, gg, theta):
        return l2_step(v, g, rho0, gg, theta)


DATA_TERMS = {"l1": L1, "l2": L2}


def make_data_term(spec):
    """``"l1"``, ``"l2"`` or an object with ``eps`` and ``step(v, g, rho0, gg, theta)``."""
    if isinstance(spec, str):
        try:
            return DATA_TERMS[spec.lower()]()
        except KeyError:
            raise ValueError(f"unknown data_term {spec!r}; choose one of {sorted(DATA_TERMS)}") from None
    if not (hasattr(spec, "step") and hasattr(spec, "eps")):
        raise TypeError("data_term must be 'l1', 'l2' or an object with .eps and .step(v, g, rho0, gg, theta)")
    return spec
