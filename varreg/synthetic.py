"""Synthetic images and displacements with known ground truth (tests, examples, demos)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .resample import warp

__all__ = ["smooth_random_image", "sinusoidal_displacement", "deform", "bias_field", "contrast_change"]


def smooth_random_image(shape, *, sigma: float = 3.0, rng=None) -> np.ndarray:
    """White noise smoothed by a Gaussian of ``sigma`` voxels, scaled to [0, 1]; float32, ``shape``."""
    rng = np.random.default_rng(rng)
    img = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    img = (img - img.min()) / (img.max() - img.min())
    return img.astype(np.float32)


def sinusoidal_displacement(shape, *, amplitude: float = 2.0, periods: float = 1.0) -> np.ndarray:
    """A smooth displacement ``(ndim, *shape)`` in voxels: component i is
    ``amplitude * sin(2 pi periods x_{i+1} / n_{i+1})`` (next axis, cyclically), so every
    component varies across the grid. Peak magnitude ``amplitude`` voxels."""
    ndim = len(shape)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    comps = []
    for i in range(ndim):
        j = (i + 1) % ndim
        comps.append(amplitude * np.sin(2 * np.pi * periods * grids[j] / shape[j]))
    return np.stack(comps).astype(np.float32)


def deform(image: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The moving image ``m`` with ``m(x + u(x)) ~ image(x)``: ``image`` warped by the inverse of ``u``.

    The inverse ``w`` of the pull-back map (``w(x) = -u(x + w(x))``) is found
    by fixed-point iteration, so registering ``(image, m)`` should recover ``u``.
    """
    w = -u.copy()
    for _ in range(30):
        w = -np.stack([warp(u[i], w) for i in range(u.shape[0])])
    return warp(image.astype(np.float32), w)


def bias_field(shape, *, low: float = 0.6, high: float = 1.4, rng=None) -> np.ndarray:
    """A smooth multiplicative bias field ``shape`` (float32) spanning ``[low, high]``.

    A random quadratic polynomial of the normalised coordinates (what coil
    sensitivity and B1 inhomogeneity look like over a slice or a small volume),
    scaled so that its minimum is ``low`` and its maximum ``high``.
    """
    rng = np.random.default_rng(rng)
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    grids = np.meshgrid(*axes, indexing="ij")
    field = np.zeros(shape)
    for i, gi in enumerate(grids):
        field += rng.normal() * gi
        for gj in grids[i:]:
            field += 0.5 * rng.normal() * gi * gj
    lo, hi = field.min(), field.max()
    field = (field - lo) / (hi - lo) if hi > lo else np.zeros(shape)
    return (low + (high - low) * field).astype(np.float32)


def contrast_change(image: np.ndarray, *, gamma: float, bias=None) -> np.ndarray:
    """``image`` (any range) scaled to [0, 1], raised to ``gamma`` and multiplied by ``bias``: the
    intensity change between two scans (sequence, coil) that a same-contrast data term cannot absorb."""
    a = np.asarray(image, np.float64)
    lo, hi = a.min(), a.max()
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    out = a ** float(gamma)
    if bias is not None:
        out = out * bias
    return out.astype(np.float32)
