"""Finite differences on the last ``ndim`` axes of an array, for any array-API backend.

Boundary rules (stated once, used everywhere):

* :func:`central_gradient` -- central differences ``(f[i+1] - f[i-1]) / 2`` with the
  indices clamped to the grid (replicated border, as the warp), so the first and
  last samples get half a one-sided difference. Used for image gradients in the
  data term and for the Jacobian of a displacement.
* :func:`forward_difference` / :func:`divergence` -- forward differences with a
  zero at the last sample (Neumann boundary) and the divergence that is minus
  their adjoint, as in Chambolle (2004). Used by the TV family of denoisers.

Leading axes before the last ``ndim`` are batch/channel axes and are carried along.
"""
from __future__ import annotations

from .backend import namespace

__all__ = ["central_gradient", "forward_difference", "divergence", "laplacian"]


def _take(f, axis, sl):
    idx = [slice(None)] * f.ndim
    idx[axis] = sl
    return f[tuple(idx)]


def _shift_plus(xp, f, axis):
    """f[i+1] with the last sample replicated."""
    return xp.concat([_take(f, axis, slice(1, None)), _take(f, axis, slice(-1, None))], axis=axis)


def _shift_minus(xp, f, axis):
    """f[i-1] with the first sample replicated."""
    return xp.concat([_take(f, axis, slice(0, 1)), _take(f, axis, slice(None, -1))], axis=axis)


def central_gradient(f, ndim: int, spacing=None):
    """Central-difference gradient of ``f`` over its last ``ndim`` axes.

    Parameters
    ----------
    f : array, shape ``(..., *spatial)``
    ndim : number of spatial axes (2 or 3).
    spacing : per-axis grid step (same units as the result's denominator), default 1.

    Returns
    -------
    array, shape ``(..., ndim, *spatial)``; component ``j`` is the derivative along
    spatial axis ``j``.
    """
    xp = namespace(f)
    comps = []
    for j in range(ndim):
        axis = f.ndim - ndim + j
        d = (_shift_plus(xp, f, axis) - _shift_minus(xp, f, axis)) * 0.5
        if spacing is not None and spacing[j] != 1:
            d = d / spacing[j]
        comps.append(d)
    return xp.stack(comps, axis=f.ndim - ndim)


def forward_difference(f, ndim: int, spacing=None):
    """Forward differences over the last ``ndim`` axes, zero at the last sample.

    ``f`` of shape ``(..., *spatial)`` gives shape ``(..., ndim, *spatial)``.
    """
    xp = namespace(f)
    comps = []
    for j in range(ndim):
        axis = f.ndim - ndim + j
        d = _take(f, axis, slice(1, None)) - _take(f, axis, slice(None, -1))
        d = xp.concat([d, xp.zeros_like(_take(f, axis, slice(0, 1)))], axis=axis)
        if spacing is not None and spacing[j] != 1:
            d = d / spacing[j]
        comps.append(d)
    return xp.stack(comps, axis=f.ndim - ndim)


def divergence(p, ndim: int, spacing=None):
    """Divergence, minus the adjoint of :func:`forward_difference`.

    ``p`` of shape ``(..., ndim, *spatial)`` gives shape ``(..., *spatial)``.
    """
    xp = namespace(p)
    out = None
    caxis = p.ndim - ndim - 1
    for j in range(ndim):
        pj = _take(p, caxis, j)
        axis = pj.ndim - ndim + j
        # p_j with its last sample treated as zero, then a backward difference
        pz = xp.concat([_take(pj, axis, slice(None, -1)), xp.zeros_like(_take(pj, axis, slice(0, 1)))], axis=axis)
        d = pz - xp.concat([xp.zeros_like(_take(pj, axis, slice(0, 1))), _take(pz, axis, slice(None, -1))], axis=axis)
        if spacing is not None and spacing[j] != 1:
            d = d / spacing[j]
        out = d if out is None else out + d
    return out


def laplacian(f, ndim: int, spacing=None):
    """``div(grad f)`` with the Neumann forward/backward pair (negative semi-definite)."""
    return divergence(forward_difference(f, ndim, spacing), ndim, spacing)
