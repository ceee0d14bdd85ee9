"""Coarse-to-fine driver: Gaussian pyramid of the pair, displacement carried up by linear upsampling."""
from __future__ import annotations

import math

from array_api_compat import device

from .backend import namespace
from .resample import gaussian_smooth, resize, resize_displacement

__all__ = ["level_shapes", "coarse_to_fine", "smoothing_sigma", "mask_pyramid"]


def smoothing_sigma(scale: float) -> float:
    """Gaussian sigma (voxels of the finer level) applied before shrinking by ``scale``.

    ``sqrt(1/scale^2 - 1) / 2``: 0.87 for scale 0.5, 0.38 for scale 0.8.
    """
    return 0.5 * math.sqrt(max(1.0 / scale**2 - 1.0, 0.0))


def level_shapes(shape, *, scale: float = 0.5, levels: int | None = None, min_size: int = 16):
    """Grid shapes of the pyramid, finest first.

    Axes shorter than ``min_size`` (few slices of a 3D stack) are never shrunk;
    the others shrink by ``scale`` per level down to ``min_size``. ``levels``
    caps the count (``None``: as many as fit).
    """
    if not 0 < scale < 1:
        raise ValueError(f"scale must be in (0, 1), got {scale}")
    shape = tuple(int(n) for n in shape)
    scalable = [n for n in shape if n >= min_size]
    shapes = [shape]
    lvl = 1
    while scalable and (levels is None or len(shapes) < levels):
        if min(n * scale**lvl for n in scalable) < min_size:
            break
        shapes.append(tuple(max(int(round(n * scale**lvl)), min(n, min_size)) for n in shape))
        lvl += 1
    return shapes


def coarse_to_fine(fixed, moving, solve_level, *, shapes, ndim: int, scale: float, u0=None):
    """Run ``solve_level(fixed_l, moving_l, u_l, level) -> u_l`` from the coarsest level up.

    ``fixed``/``moving``: ``(*batch, *spatial)``; ``u0``: optional initial
    displacement ``(*batch, ndim, *spatial)`` at the finest level; ``level`` 0 is
    the finest. Returns the finest-level displacement.
    """
    sigma = smoothing_sigma(scale)
    fixed_l, moving_l = [fixed], [moving]
    for s in shapes[1:]:
        fixed_l.append(resize(gaussian_smooth(fixed_l[-1], sigma, ndim), s, ndim))
        moving_l.append(resize(gaussian_smooth(moving_l[-1], sigma, ndim), s, ndim))
    u = None
    for lvl in range(len(shapes) - 1, -1, -1):
        if u is None:
            if u0 is not None:
                u = resize_displacement(u0, shapes[lvl], ndim)
            else:
                xp = namespace(fixed)
                u = xp.zeros((*fixed.shape[: fixed.ndim - ndim], ndim, *shapes[lvl]), dtype=fixed.dtype, device=device(fixed))
        else:
            u = resize_displacement(u, shapes[lvl], ndim)
        u = solve_level(fixed_l[lvl], moving_l[lvl], u, lvl)
    return u


def mask_pyramid(mask, *, shapes, ndim: int, scale: float) -> dict:
    """``{shape: mask}`` for every level: the binary ``mask`` smoothed and resized as the images are,
    then 1 where at least half of a coarse voxel was inside (float32 0/1)."""
    xp = namespace(mask)
    sigma = smoothing_sigma(scale)
    m = xp.astype(mask, xp.float32)
    out = {tuple(shapes[0]): m}
    for s in shapes[1:]:
        m = resize(gaussian_smooth(m, sigma, ndim), s, ndim)
        out[tuple(s)] = xp.astype(m >= 0.5, xp.float32)
    return out
