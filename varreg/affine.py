"""An affine stage before the deformable solver: rigid, similarity or full affine, on its own pyramid.

The transform maps fixed points to moving points (pull-back, like the
displacement): in physical coordinates centred on the fixed grid,
``Y = A X + t`` with ``X = S (x - c)``, ``x`` a voxel index of the fixed grid,
``S = diag(spacing)`` and ``c`` the grid's centre; so rotations are physical
rotations on anisotropic grids. :func:`voxel_matrix` gives the same map as a
homogeneous ``(ndim + 1, ndim + 1)`` matrix on voxel indices (fixed -> moving
grid, the two grids being one), :func:`world_matrix` on world coordinates
given the images' affines.

Estimation: Gauss-Newton on the robust (Huber) difference of the locally
standardised images (:func:`varreg.data_terms.local_standardise`, as the NCC
data term), so an intensity change between the images does not bias it; a
Levenberg-Marquardt damping keeps every accepted step a decrease. Rigid and
similarity transforms are kept so by projecting ``A`` after each step onto the
nearest rotation (times the mean of its singular values, for similarity): a
projected Gauss-Newton. Coarse to fine on a Gaussian pyramid of its own
(down to ``min_size`` voxels), the sum over at most ``max_samples`` voxels
(a regular subgrid) at every level.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data_terms import local_standardise
from .differences import central_gradient
from .pyramid import level_shapes, smoothing_sigma
from .resample import gaussian_smooth, resize, warp

__all__ = ["KINDS", "Affine", "estimate_affine", "voxel_matrix", "world_matrix", "displacement_of",
           "residual_displacement"]

KINDS = ("rigid", "similarity", "affine")


@dataclass
class Affine:
    """An estimated transform: ``Y = A X + t`` in centred physical coordinates of the fixed grid.

    ``A`` ``(ndim, ndim)``, ``t`` ``(ndim,)`` in the units of ``spacing``; ``shape``
    and ``spacing`` of the fixed grid; ``kind``; ``info`` (per level: iterations, cost).
    """

    A: np.ndarray
    t: np.ndarray
    shape: tuple
    spacing: tuple
    kind: str
    info: dict


def _centre(shape):
    return (np.asarray(shape, np.float64) - 1.0) / 2.0


def voxel_matrix(aff: Affine) -> np.ndarray:
    """The transform on voxel indices, ``(ndim + 1, ndim + 1)``: ``y = M[:d, :d] x + M[:d, d]``."""
    d = len(aff.shape)
    S = np.diag(aff.spacing)
    Si = np.diag(1.0 / np.asarray(aff.spacing))
    c = _centre(aff.shape)
    lin = Si @ aff.A @ S
    M = np.eye(d + 1)
    M[:d, :d] = lin
    M[:d, d] = c - lin @ c + Si @ aff.t
    return M


def world_matrix(voxel: np.ndarray, fixed_affine: np.ndarray, moving_affine: np.ndarray) -> np.ndarray:
    """A voxel-index transform (fixed grid -> moving grid) as a map of world points: ``W = B_m M B_f^-1``
    with ``B`` the images' voxel-to-world affines (4 x 4 for 3-D, (d + 1) square in general)."""
    return moving_affine @ voxel @ np.linalg.inv(fixed_affine)


def displacement_of(M: np.ndarray, shape) -> np.ndarray:
    """The displacement ``(ndim, *shape)`` float32 (voxels) of a voxel transform ``M``: ``u(x) = M x - x``."""
    d = len(shape)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    x = np.stack(grids)
    y = np.tensordot(M[:d, :d], x, axes=1) + M[:d, d].reshape((d,) + (1,) * d)
    return (y - x).astype(np.float32)


def compose_affine(M: np.ndarray, a, v):
    """The displacement of the affine ``M`` after the field ``v``: ``x -> M (x + v(x))``.

    ``M``: ``(ndim + 1)`` square voxel matrix; ``a``: its displacement (:func:`displacement_of`);
    ``v`` ``(ndim, *shape)`` voxels. ``moving(M (x + v(x)))`` is ``moving_a(x + v(x))`` for
    ``moving_a = moving o M``, and since ``a`` is affine, ``a(x + v) = a(x) + (A - I) v``: the
    result ``a + A v`` (``A`` the linear part) is exact. float32, on ``v``'s backend."""
    from .backend import namespace

    xp = namespace(v)
    d = v.shape[0]
    A = xp.asarray(np.asarray(M, np.float64)[:d, :d], dtype=v.dtype)
    Av = xp.reshape(A @ xp.reshape(v, (d, -1)), v.shape)
    return xp.astype(a + Av, xp.float32)


def residual_displacement(u, M: np.ndarray) -> np.ndarray:
    """The deformable part ``r`` of a whole displacement ``u`` ``(ndim, *shape)`` (voxels) after the
    affine ``M`` (a voxel transform, ``(ndim + 1)`` square): ``x + u(x) = M (x + r(x))``, so
    ``r(x) = M^-1 (x + u(x)) - x``; float32, the shape of ``u``. An ITK composite transform
    [affine ``M``, field ``r``] (the field applied first) is then the whole transform."""
    u = np.asarray(u, np.float64)
    d = u.shape[0]
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in u.shape[1:]], indexing="ij")
    y = np.stack(grids) + u
    Mi = np.linalg.inv(np.asarray(M, np.float64))
    x = np.tensordot(Mi[:d, :d], y, axes=1) + Mi[:d, d].reshape((d,) + (1,) * d)
    return (x - np.stack(grids)).astype(np.float32)


def _project(A: np.ndarray, kind: str) -> np.ndarray:
    if kind == "affine":
        return A
    U, s, Vt = np.linalg.svd(A)
    R = U @ Vt
    if np.linalg.det(R) < 0:  # the nearest proper rotation
        U[:, -1] *= -1
        R = U @ Vt
    return R * (float(np.mean(s)) if kind == "similarity" else 1.0)


def _huber(r, delta):
    a = np.abs(r)
    w = np.where(a <= delta, 1.0, delta / np.maximum(a, 1e-12))
    cost = np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
    return w, float(cost.mean())


def estimate_affine(fixed, moving, *, kind: str = "affine", spacing=None, min_size: int = 16, scale: float = 0.5,
                    iterations: int = 40, window: float = 41.0, max_samples: int = 200_000,
                    delta: float = 1.0, finest: int | None = None) -> Affine:
    """Estimate the transform mapping ``fixed`` onto ``moving`` (NumPy arrays of one shape, 2-D or 3-D).

    Parameters
    ----------
    kind : ``"rigid"``, ``"similarity"`` or ``"affine"``.
    spacing : voxel size per axis (rotations are physical); default 1.
    min_size, scale : the pyramid (coarsest axis length, shrink factor per level).
    iterations : Gauss-Newton steps at most per level.
    window : local window of the standardisation (voxels of each level, clipped to its shortest axis).
    max_samples : voxels summed over at most per level (a regular subgrid).
    delta : Huber threshold on the standardised difference.
    finest : the finest pyramid level that iterates (0: full resolution). None: the finest level
        whose next coarser one has fewer than ``max_samples / 4`` voxels, i.e. a level is skipped when
        the coarser one already gives a quarter of the samples at a fraction of the cost (3-D volumes
        of about 10^6 voxels stop at half resolution; 2-D slices keep full resolution).
    """
    if kind not in KINDS:
        raise ValueError(f"affine must be one of {KINDS} (or True for 'affine'), got {kind!r}")
    fixed = np.asarray(fixed, np.float64)
    moving = np.asarray(moving, np.float64)
    d = fixed.ndim
    shape = fixed.shape
    spacing = (1.0,) * d if spacing is None else tuple(float(s) for s in spacing)
    thin = [n for n in shape if n < 2]
    if thin:
        raise ValueError(f"an affine needs at least 2 voxels along every axis; the image has shape {shape}")
    shapes = level_shapes(shape, scale=scale, min_size=min_size)
    sigma = smoothing_sigma(scale)
    fl, ml = [fixed], [moving]
    for s in shapes[1:]:
        fl.append(resize(gaussian_smooth(fl[-1], sigma, d), s, d))
        ml.append(resize(gaussian_smooth(ml[-1], sigma, d), s, d))
    if finest is None:
        finest = 0
        while finest + 1 < len(shapes) and np.prod(shapes[finest + 1]) >= max_samples / 4:
            finest += 1
    A, t = np.eye(d), np.zeros(d)
    sp = np.asarray(spacing)
    c0 = _centre(shape)
    log = []
    for lvl in range(len(shapes) - 1, min(finest, len(shapes) - 1) - 1, -1):
        s_l = shapes[lvl]
        f_fac = np.array([(n0 - 1) / max(n - 1, 1) for n0, n in zip(shape, s_l)])  # level voxel -> finest voxel
        win = min(window, min(s_l))
        f_s = local_standardise(fl[lvl], d, win, 0.1)
        m_s = local_standardise(ml[lvl], d, win, 0.1)
        step = max(1, int(np.ceil((np.prod(s_l) / max_samples) ** (1.0 / d))))
        sub = tuple(slice(0, n, step) for n in s_l)
        grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in s_l], indexing="ij")
        x_l = np.stack(grids)  # (d, *s_l) level voxel indices
        X = (x_l * f_fac.reshape((d,) + (1,) * d) - c0.reshape((d,) + (1,) * d)) * sp.reshape((d,) + (1,) * d)
        Xs = X[(slice(None),) + sub].reshape(d, -1)
        f_sub = f_s[sub].ravel()

        def residual(A, t):
            Y = np.tensordot(A, X, axes=1) + t.reshape((d,) + (1,) * d)
            y0 = Y / sp.reshape((d,) + (1,) * d) + c0.reshape((d,) + (1,) * d)
            y_l = y0 / f_fac.reshape((d,) + (1,) * d)
            u = (y_l - x_l).astype(np.float32)
            w_img = warp(m_s.astype(np.float32), u).astype(np.float64)
            return w_img, w_img[sub].ravel() - f_sub

        w_img, r = residual(A, t)
        wts, cost = _huber(r, delta)
        mu = 1e-3
        it = 0
        for it in range(iterations):
            g_x = central_gradient(w_img, d)[(slice(None),) + sub].reshape(d, -1)
            g_phys = np.linalg.inv(A).T @ (g_x / (sp * f_fac).reshape(d, 1))  # gradient in moving physical coords
            # columns: dr/dA_ij = g_i X_j, dr/dt_i = g_i
            J = np.concatenate([(g_phys[:, None, :] * Xs[None, :, :]).reshape(d * d, -1), g_phys], axis=0)
            Jw = J * wts
            H = Jw @ J.T / r.size
            b = Jw @ r / r.size
            improved = False
            for _ in range(8):
                try:
                    delta_p = -np.linalg.solve(H + mu * np.diag(np.diag(H) + 1e-12), b)
                except np.linalg.LinAlgError:
                    mu *= 10
                    continue
                A_new = _project(A + delta_p[: d * d].reshape(d, d), kind)
                t_new = t + delta_p[d * d:]
                w_new, r_new = residual(A_new, t_new)
                wts_new, cost_new = _huber(r_new, delta)
                if cost_new < cost:
                    A, t, w_img, r, wts, cost = A_new, t_new, w_new, r_new, wts_new, cost_new
                    mu = max(mu / 3, 1e-7)
                    improved = True
                    break
                mu *= 10
            if not improved or np.abs(delta_p).max() < 1e-5:
                break
        log.append(dict(shape=tuple(s_l), iterations=it + 1, cost=cost, samples=int(r.size)))
    return Affine(A=A, t=t, shape=tuple(shape), spacing=spacing, kind=kind, info=dict(levels=log))
