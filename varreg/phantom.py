"""A synthetic cardiac-like short-axis phantom and a known contraction (demo, tests).

The phantom mimics a cine-MRI short-axis view: a bright left-ventricle (LV)
blood pool, a darker myocardium ring around it, a bright right-ventricle (RV)
crescent wrapped around the septum, mid-grey body tissue with a smooth texture
and dark air outside the body, plus mild Gaussian noise. Labels follow ACDC:
``0`` background, ``1`` RV, ``2`` Myo, ``3`` LV (:data:`LABELS`).

The end-systolic (moving) image is the end-diastolic (fixed) one deformed by a
radial contraction toward the LV centre, so the pull-back displacement that
registers ``moving`` onto ``fixed`` is known (:func:`contraction`).

Arrays use NIfTI's voxel-axis order of a short-axis stack: ``(X, Y)`` in 2-D
and ``(X, Y, slices)`` in 3-D (the slice axis last, as ACDC).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["LABELS", "DemoPair", "cardiac_phantom", "contraction", "demo_pair"]

LABELS = {1: "RV", 2: "Myo", 3: "LV"}

# intensities of a bSSFP cine image (blood bright, muscle dark), before noise
_INTENSITY = {"air": 0.02, "tissue": 0.35, "myo": 0.22, "blood_lv": 0.9, "blood_rv": 0.8}


def _geometry(shape):
    """Centre and radii (voxels) of the structures for an in-plane ``shape``."""
    n = min(shape[0], shape[1])
    c = np.array([shape[0] * 0.55, shape[1] * 0.5])
    return dict(
        centre=c,
        lv=0.14 * n,  # LV cavity radius
        myo=0.21 * n,  # epicardial radius
        rv_centre=c + np.array([-0.19 * n, 0.02 * n]),
        rv=0.2 * n,  # RV outer radius
        body=(0.46 * shape[0], 0.44 * shape[1]),  # body ellipse semi-axes
    )


def cardiac_phantom(shape=(96, 96), *, noise: float = 0.02, rng=None):
    """A short-axis-like image and its label map.

    Parameters
    ----------
    shape : ``(X, Y)`` or ``(X, Y, slices)``; at least 16 voxels in-plane.
        In 3-D the heart narrows from base (slice 0) to apex (last slice).
    noise : standard deviation of the added Gaussian noise (intensities in [0, 1]).
    rng : seed or ``numpy.random.Generator``.

    Returns
    -------
    image : float32 array ``shape``, values in about [0, 1].
    labels : uint8 array ``shape``: 0 background, 1 RV, 2 Myo, 3 LV.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape[:2]) < 16 or (len(shape) == 3 and shape[2] < 1):
        raise ValueError(f"shape must be (X, Y) or (X, Y, slices) with X, Y >= 16, got {shape}")
    rng = np.random.default_rng(rng)
    g = _geometry(shape)
    nz = shape[2] if len(shape) == 3 else 1
    x, y = np.meshgrid(np.arange(shape[0], dtype=np.float64), np.arange(shape[1], dtype=np.float64), indexing="ij")
    images, labels = [], []
    texture = ndimage.gaussian_filter(rng.standard_normal(shape[:2] + (nz,)), (4, 4, 1), mode="wrap")
    texture /= max(np.abs(texture).max(), 1e-12)
    for z in range(nz):
        # the heart tapers toward the apex: radii shrink to 60 % over the stack
        f = 1.0 - 0.4 * (z / max(nz - 1, 1)) if nz > 1 else 1.0
        r_lv, r_myo, r_rv = g["lv"] * f, g["myo"] * f, g["rv"] * f
        d_lv = np.hypot(x - g["centre"][0], y - g["centre"][1])
        d_rv = np.hypot(x - g["rv_centre"][0], y - g["rv_centre"][1])
        body = ((x - shape[0] / 2) / g["body"][0]) ** 2 + ((y - shape[1] / 2) / g["body"][1]) ** 2 <= 1
        lab = np.zeros(shape[:2], np.uint8)
        lab[d_rv <= r_rv] = 1
        lab[d_lv <= r_myo + 0.08 * g["myo"]] = 0  # septum gap between RV and Myo
        lab[d_lv <= r_myo] = 2
        lab[d_lv <= r_lv] = 3
        img = np.where(body, _INTENSITY["tissue"] + 0.08 * texture[..., z], _INTENSITY["air"])
        img = np.where(lab == 1, _INTENSITY["blood_rv"], img)
        img = np.where(lab == 2, _INTENSITY["myo"], img)
        img = np.where(lab == 3, _INTENSITY["blood_lv"], img)
        images.append(ndimage.gaussian_filter(img, 0.7, mode="nearest"))  # partial volume
        labels.append(lab)
    image = np.stack(images, axis=-1)
    label = np.stack(labels, axis=-1)
    if len(shape) == 2:
        image, label = image[..., 0], label[..., 0]
    image = image + noise * rng.standard_normal(image.shape)
    return np.clip(image, 0, 1).astype(np.float32), label


def contraction(shape, *, amplitude: float = 0.25):
    """A radial contraction toward the LV centre, as a pull-back displacement.

    ``u(x) = -amplitude * (x - c) * exp(-r^2 / (2 R^2))`` in the plane (axes 0
    and 1), with ``r = |x - c|``, ``c`` the LV centre and ``R`` the epicardial
    radius; zero along the slice axis. The end-systolic image ``m`` of an
    end-diastolic ``f`` satisfies ``m(x + u(x)) = f(x)``. Peak magnitude about
    ``0.6 * amplitude * R`` voxels (some 3 voxels on a 96x96 phantom).

    Returns
    -------
    float32 array ``(ndim, *shape)`` in voxels.
    """
    shape = tuple(int(s) for s in shape)
    g = _geometry(shape)
    x, y = np.meshgrid(np.arange(shape[0], dtype=np.float64), np.arange(shape[1], dtype=np.float64), indexing="ij")
    dx, dy = x - g["centre"][0], y - g["centre"][1]
    w = -amplitude * np.exp(-(dx * dx + dy * dy) / (2 * g["myo"] ** 2))
    comps = [w * dx, w * dy]
    if len(shape) == 3:
        comps = [np.repeat(c[..., None], shape[2], axis=-1) for c in comps] + [np.zeros(shape)]
    return np.stack(comps).astype(np.float32)


@dataclass
class DemoPair:
    """An ED/ES-like pair: ``fixed`` (ED), ``moving`` (ES), their labels, and the
    true pull-back displacement ``truth`` (voxels) with ``moving(x + truth(x)) ~ fixed(x)``."""

    fixed: np.ndarray
    moving: np.ndarray
    fixed_labels: np.ndarray
    moving_labels: np.ndarray
    truth: np.ndarray


def _inverse(u, n_iter: int = 30):
    from .resample import warp

    w = -u.copy()
    for _ in range(n_iter):
        w = -np.stack([warp(u[i], w) for i in range(u.shape[0])])
    return w


def demo_pair(shape=(96, 96), *, amplitude: float = 0.25, noise: float = 0.02, rng=0) -> DemoPair:
    """A phantom (ED, fixed) and its contracted copy (ES, moving), with labels and the true displacement.

    In 3-D the contraction is applied slice by slice in the plane.
    """
    from .resample import warp

    rng = np.random.default_rng(rng)
    fixed, fixed_labels = cardiac_phantom(shape, noise=0.0, rng=rng)
    truth = contraction(shape, amplitude=amplitude)
    w = _inverse(truth)  # moving(y) = fixed(y + w(y))
    moving = warp(fixed, w)
    moving_labels = warp(fixed_labels, w, order=0)
    fixed = np.clip(fixed + noise * rng.standard_normal(fixed.shape), 0, 1).astype(np.float32)
    moving = np.clip(moving + noise * rng.standard_normal(moving.shape), 0, 1).astype(np.float32)
    return DemoPair(fixed, moving, fixed_labels, moving_labels.astype(np.uint8), truth)
