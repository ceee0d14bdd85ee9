"""The intensity-consistency step (u-step): point-wise, closed form, any backend.

With the image linearised around the current warp ``u_w`` (paper eq. 4),
``rho(u) = I1w + g.(u - u_w) - I0 = rho0 + g.u`` where ``g = grad I1w``, the
u-step minimises, independently at every voxel,

    (1/s) |rho(u)|^s + (theta / 2) |v - u|^2 .

A data term (the :class:`varreg.engine.DataTerm` protocol) owns its
linearisation and its step; L1 and L2 share the linearisation of the
intensity difference (:func:`linearise`), held in a :class:`Linearised`.

* s = 1 (:func:`l1_step`, paper eq. 5 / appendix 1): thresholding,
  ``u = v - g * z / (max(|z|, 1) theta)`` with ``z = theta rho(v) / (|g|^2 + eps)``.
* s = 2 (:func:`l2_step`, paper eqs. 15-17 / appendix 2): Sherman-Morrison,
  ``(g g^T + theta I)(u - u_w) = theta (v - u_w) - g (I1w - I0)``, which
  simplifies to ``u = v - g rho(v) / (theta + |g|^2)``.

Shapes: ``v``, ``g`` are ``(..., ndim, *spatial)``; ``rho0``, ``gg`` are
``(..., *spatial)``. ``theta`` may be a Python float or a 0-d tensor (VR-Net
learns it). The numba kernels (:func:`varreg.kernels.warp_gradient`,
:func:`varreg.kernels.data_step`) take unbatched NumPy arrays; the array-API
code here is their reference.

A new data term is a class here with ``name``, ``weights``, ``linearise`` and
``step``, added to :data:`DATA_TERMS`.
"""
from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from array_api_compat import device as array_device

from .backend import host_float, is_numpy, namespace, spatial_ndim, takes_kernel, to_numpy
from .differences import central_gradient
from .engine import Weights
from .resample import gaussian_smooth, warp

__all__ = ["Linearised", "linearise", "l1_step", "l2_step", "local_standardise", "map_basis", "map_coordinates",
           "intensity_map_coefficients", "intensity_map_fields", "map_rows", "apply_intensity_map", "global_intensity_map", "L1", "L2", "NCC", "Masked", "DATA_TERMS", "make_data_term"]


class Linearised(NamedTuple):
    """The intensity difference linearised around ``u_w``: ``rho(u) = rho0 + g.u``.

    ``warped``, ``rho0``, ``gg``: ``(*batch, *spatial)``; ``g``: ``(*batch, ndim, *spatial)``.
    """

    warped: Any
    g: Any
    rho0: Any
    gg: Any


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


def l1_step(v, g, rho0, gg, theta):
    """Minimiser of ``|rho(u)| + theta/2 |v - u|^2`` (paper eq. 5); ``gg = |g|^2 + eps``."""
    return _pointwise_step(v, g, rho0, gg, theta, l1=True)


def l2_step(v, g, rho0, gg, theta):
    """Minimiser of ``rho(u)^2 / 2 + theta/2 |v - u|^2`` (paper eqs. 16, 17); ``gg = |g|^2``."""
    return _pointwise_step(v, g, rho0, gg, theta, l1=False)


def _pointwise_step(v, g, rho0, gg, theta, *, l1: bool):
    """``u = v - s g`` with the step ``s`` of the L1 (thresholding) or L2 (Sherman-Morrison) u-step."""
    theta = host_float(theta)
    ndim = spatial_ndim(v, like=rho0)
    if takes_kernel(v, ndim, theta):
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


@dataclass(frozen=True)
class L1:
    """L1 data term (s = 1), robust to outliers. ``eps`` keeps flat regions finite."""

    eps: float = 1e-6
    name = "l1"
    weights = Weights(theta=0.1, lam=0.1, refine_lam=0.04)

    def linearise(self, fixed, moving, u, ndim: int) -> Linearised:
        return Linearised(*linearise(fixed, moving, u, ndim, self.eps))

    def step(self, v, lin: Linearised, theta):
        return l1_step(v, lin.g, lin.rho0, lin.gg, theta)


@dataclass(frozen=True)
class L2:
    """L2 data term (s = 2): sum of squared differences, Sherman-Morrison step."""

    eps: float = 0.0
    name = "l2"
    weights = Weights(theta=0.004, lam=0.04, refine_lam=0.004)

    def linearise(self, fixed, moving, u, ndim: int) -> Linearised:
        return Linearised(*linearise(fixed, moving, u, ndim, self.eps))

    def step(self, v, lin: Linearised, theta):
        return l2_step(v, lin.g, lin.rho0, lin.gg, theta)


def local_standardise(image, ndim: int, window: float, floor: float):
    """``(I - mu) / sqrt(var + f)``: ``image`` ``(*batch, *spatial)`` standardised in a local window
    (the affine stage's criterion, :func:`varreg.affine.estimate_affine`).

    ``mu`` and ``var`` are the image's mean and variance in a Gaussian window
    with the variance of a box of ``window`` voxels (standard deviation
    ``window / sqrt(12)``), border replicated. ``f = (floor * s)^2`` with ``s``
    the image's global standard deviation keeps flat regions (background
    noise) from being blown up to unit variance; a constant image maps to
    zeros. A positive affine change ``a I + b`` of the image leaves the result
    unchanged.
    """
    xp = namespace(image)
    sigma = float(window) / 12.0**0.5
    axes = tuple(range(image.ndim - ndim, image.ndim))
    mu = gaussian_smooth(image, sigma, ndim)
    second = gaussian_smooth(image * image, sigma, ndim)
    centred = image - xp.mean(image, axis=axes, keepdims=True)
    glob = xp.mean(centred * centred, axis=axes, keepdims=True)
    var = xp.maximum(second - mu * mu, xp.zeros_like(mu))
    # relative to the image's own scale; the absolute term only guards a constant image (then image == mu)
    return (image - mu) / xp.sqrt(var + floor * floor * glob + 1e-20)


def local_affine_fit(fixed, warped, ndim: int, window: float, ridge: float, support=None):
    """Per-voxel ``(a, b)`` of the local least-squares fit ``fixed ~ a * warped + b``, ``a >= 0``.

    ``fixed``, ``warped``: ``(*batch, *spatial)``. The local means, variance and covariance are
    Gaussian-weighted (standard deviation ``window / sqrt(12)``, the variance of a box of ``window``
    voxels), computed on a grid of blocks of ``k ~ sigma / 2`` voxels and interpolated back
    linearly: the guided filter's local linear model (He, Sun and Tang, "Guided image filtering",
    TPAMI 2013; subsampled as in He and Sun, "Fast guided filter", 2015), with ``a = cov / (var +
    ridge)``. ``support`` (``(*spatial)`` of 0/1, or per-voxel weights ``>= 0`` of ``fixed``'s shape, as
    :func:`local_fit_weights`) weights the statistics voxel by voxel (normalised convolution: a weighted
    least-squares fit in each window). The best affine fit's residual is what local correlation measures:
    ``1 - CC^2 = min_ab sum (F - aW - b)^2 / sum (F - mean F)^2`` in each window (Roche et al.,
    "Unifying maximum likelihood approaches in medical image registration", IJIST 2000).
    """
    from .resample import block_mean, block_upsample

    xp = namespace(fixed, warped)
    sigma, k = _fit_scale(window)
    spatial = tuple(fixed.shape[fixed.ndim - ndim:])
    parts = [fixed, warped, fixed * warped, warped * warped]
    if support is not None:
        s = xp.astype(support, fixed.dtype)
        parts = [p * s for p in parts] + [xp.broadcast_to(s, fixed.shape)]
    ab = block_upsample(_coarse_fit(block_mean(xp.stack(parts), k, ndim), sigma / k, ndim, ridge), spatial, k, ndim)
    return ab[0, ...], ab[1, ...]


def local_fit_weights(fixed, fitted, cutoff: float, support=None):
    """Tukey's biweight ``max((1 - (r / cutoff)^2)_+^2, floor)`` of a local fit's residual ``r = fitted -
    fixed``, times ``support`` where given: the weights of :class:`NCC`'s robust refit of
    :func:`local_affine_fit`, so that a structure the motion has not aligned yet does not bend the local
    fit towards it (its ``a``, ``b`` come from the consistent voxels around it, and its residual stays
    to move the field). ``fixed``, ``fitted``: ``(*batch, *spatial)``; ``cutoff``: intensity units of
    ``fixed``; ``floor`` = ``_ROBUST_FLOOR`` keeps every window's statistics defined."""
    xp = namespace(fixed, fitted)
    r = (fitted - fixed) / cutoff
    t = xp.maximum(1.0 - r * r, xp.zeros_like(r))
    w = xp.maximum(t * t, xp.full_like(t, _ROBUST_FLOOR))
    return w if support is None else w * xp.astype(support, w.dtype)


def _fit_scale(window: float):
    """The local fit's Gaussian standard deviation (voxels) and its block size."""
    sigma = float(window) / 12.0**0.5
    return sigma, max(1, int(sigma // 2))


def _coarse_fit(blocks, sigma: float, ndim: int, ridge: float):
    """``(a, b)`` ``(2, *coarse)`` from the block means ``(4 or 5, *coarse)`` of ``F, W, F W, W W`` (and
    the support or weights): Gaussian-smoothed with ``sigma`` blocks, then the least-squares slope, ``a >=
    0``. Nine channels (the plain four, then the weighted five, as :func:`varreg.kernels.ncc_block_stats`
    gives them): both fits, ``(2, 2, *coarse)``, plain first, from one smoothing."""
    xp = namespace(blocks)
    stats = gaussian_smooth(blocks, sigma, ndim)
    if stats.shape[0] == 9:
        return xp.stack([_slope_offset(stats[:4, ...], ridge), _slope_offset(stats[4:, ...], ridge)])
    return _slope_offset(stats, ridge)


def _slope_offset(stats, ridge: float):
    """``(a, b)`` from smoothed means ``(4 or 5, *coarse)`` (the fifth: the weight, dividing the others)."""
    xp = namespace(stats)
    if stats.shape[0] == 5:
        w = xp.maximum(stats[4, ...], xp.full_like(stats[4, ...], 1e-6))
        stats = stats[:4, ...] / w
    mf, mw, fw, ww = (stats[i, ...] for i in range(4))
    zero = xp.zeros_like(mf)
    a = xp.maximum(fw - mf * mw, zero) / (xp.maximum(ww - mw * mw, zero) + ridge)
    return xp.stack([a, mf - a * mw])


#: voxels at least in the regular subsample that :func:`intensity_map_coefficients` fits on
_MAP_SAMPLES = 2048
#: reweighted refits of :func:`intensity_map_coefficients` with a ``cutoff``, and the weight floor that
#: keeps its normal equations regular where every sample is an outlier (then: least squares again)
_ROBUST_REFITS, _WARM_REFITS, _ROBUST_FLOOR = 3, 1, 1e-3


@functools.lru_cache(maxsize=None)
def map_basis(ndim: int, order: int) -> tuple:
    """The exponents ``(e_1, ..., e_ndim)`` (axes in array order) of the monomials ``x_1^e_1 ... x_ndim^e_ndim``
    of total degree ``<= order`` in the normalised coordinates (:func:`map_coordinates`), constant
    first: the spatial basis of :func:`intensity_map_coefficients` (6 terms in 2-D and 10 in 3-D for
    order 2)."""
    out = [()]
    for _ in range(ndim):
        out = [e + (k,) for e in out for k in range(order + 1)]
    return tuple(sorted((e for e in out if sum(e) <= order), key=lambda e: (sum(e), [-k for k in e])))


def map_coordinates(n: int) -> np.ndarray:
    """The normalised coordinates of an axis of ``n`` voxels: ``n`` float64 values spaced evenly from -1
    to 1 (a single voxel: 0)."""
    return np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)


@functools.lru_cache(maxsize=256)
def _axis_powers(n: int, stride: int, count: int) -> np.ndarray:
    """``(ceil(n / stride), count)`` float64, read-only and cached: the powers ``0 .. count - 1`` of
    :func:`map_coordinates` ``(n)`` at every ``stride``-th voxel. Every monomial of the map is a product
    of one column per axis."""
    out = np.power.outer(map_coordinates(n)[::stride], np.arange(count))
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=64)
def _basis_images(shape: tuple, ndim: int, exponents: tuple, stride: int) -> np.ndarray:
    """``(n_basis, *sub)`` float64, read-only and cached: the monomials of ``exponents`` at every
    ``stride``-th voxel of the spatial ``shape`` (the fit's subsample, a few thousand voxels)."""
    top = max(max(ex, default=0) for ex in exponents) + 1
    pows = [_axis_powers(n, stride, top) for n in shape[len(shape) - ndim:]]
    out = np.stack([math.prod((p[:, e].reshape((1,) * i + (-1,) + (1,) * (ndim - i - 1))
                               for i, (p, e) in enumerate(zip(pows, ex))), start=np.ones((1,) * ndim))
                    for ex in exponents])
    out.flags.writeable = False
    return out


def intensity_map_coefficients(fixed, warped, ndim: int, degree: int, support=None, order: int = 0,
                               cutoff: float | None = None, start=None) -> np.ndarray:
    """The least-squares map ``p(x, w) = sum_k c_k(x) w^k`` with ``fixed ~ p(x, warped)``: a polynomial
    of degree ``degree`` in the intensity whose coefficients ``c_k`` are polynomials of total degree
    ``order`` in the normalised coordinates (:func:`map_basis`; ``order=0``: one global polynomial).

    ``fixed``, ``warped``: ``(*batch, *spatial)``; returns ``(*batch, degree + 1, n_basis)`` float64 on
    the host, ``[..., k, j]`` the coefficient of ``basis_j(x) w^k``. For ``order=0`` this is the
    regression of the fixed intensities on the warped ones, the conditional-mean intensity map of the
    correlation ratio (Roche, Malandain, Pennec and Ayache, "The correlation ratio as a new similarity
    measure for multimodal image registration", MICCAI 1998) restricted to polynomials as in Guimond,
    Roche, Ayache and Meunier, "Three-dimensional multimodal brain warping using the demons algorithm
    and adaptive intensity corrections", IEEE TMI 2001. The coordinate polynomials add a smooth
    multiplicative and additive bias field, a low-order polynomial as in Styner, Brechbuehler, Szekely
    and Gerig, "Parametric estimate of intensity inhomogeneities applied to MRI", IEEE TMI 2000. Fitted
    on a regular subsample of at least ``_MAP_SAMPLES`` voxels (inside ``support``, ``(*spatial)`` of
    0/1, where given), copied to the host and solved there in float64 with a small ridge; an image of
    zeros (a constant one after :class:`NCC`'s standardisation) gives ``p`` constant in ``w``.

    ``cutoff`` (intensity units of ``fixed``): then the least-squares fit is refitted ``_ROBUST_REFITS``
    times with Tukey's biweight ``(1 - (r / cutoff)^2)^2`` of its residuals ``r`` (zero beyond the cutoff;
    iteratively reweighted least squares, Holland and Welsch, "Robust regression using iteratively
    reweighted least-squares", Commun. Statist. 1977), so that structures that are not aligned yet (a
    large motion) do not bend the map towards them; ``None``: least squares. ``start`` (with a cutoff): the
    coefficients of an earlier fit (as returned), whose residuals weight one refit only
    (``_WARM_REFITS``), the least-squares pass and the rest skipped (:class:`NCC` passes the previous
    warp's map: the reweighting then runs across the warps).
    """
    lead = warped.ndim - ndim
    spatial = tuple(warped.shape[lead:])
    stride = max(1, int((math.prod(spatial) / _MAP_SAMPLES) ** (1.0 / ndim)))
    grid = (...,) + (slice(None, None, stride),) * ndim
    pair, inner = _moment_index(ndim, order)
    fused = takes_kernel(warped, ndim - 1) and support is None and warped.dtype == np.float32 == fixed.dtype
    k = np.arange(degree + 1)
    nb = len(inner)
    n = (degree + 1) * nb

    def solve(moments, cross):
        gram = moments[..., k[:, None, None, None] + k[None, None, :, None], pair[None, :, None, :]]
        gram = gram.reshape(gram.shape[:-4] + (n, n))
        diag = np.einsum("...ii->...i", gram)
        gram = gram + np.eye(n) * (1e-10 * diag.max(axis=-1, keepdims=True)[..., None] + 1e-30)
        coef = np.linalg.solve(gram, cross.reshape(cross.shape[:-2] + (n, 1)))[..., 0]
        return coef.reshape(cross.shape[:-2] + (degree + 1, nb))

    # the cutoff of each pass (None: unweighted); a warm start needs no least-squares pass first
    warm = cutoff is not None and start is not None
    passes = [cutoff] * _WARM_REFITS if warm else [None] + [cutoff] * (0 if cutoff is None else _ROBUST_REFITS)
    coef = np.asarray(start, np.float64) if warm else None
    if fused:  # the numba pass; with a cutoff it weights each sample by the previous map's residual
        from . import kernels

        strides, pows, exps = _kernel_grid(spatial, ndim, order, stride)
        f, w = np.ascontiguousarray(fixed), np.ascontiguousarray(warped)
        for cut in passes:  # cutoff 0: unweighted
            coef = solve(*kernels.map_moments(f, w, strides, pows, exps, inner, degree, coef,
                                              0.0 if cut is None else cut, _ROBUST_FLOOR))
        return coef
    # the reference: any backend, batched, with a support
    w = to_numpy(warped[grid]).astype(np.float64)  # (*batch, *sub)
    f = to_numpy(fixed[grid]).astype(np.float64)
    batch, m = w.shape[:lead], math.prod(w.shape[lead:])
    w, f = w.reshape(batch + (1, m)), f.reshape(batch + (1, m))
    # normal equations from moments, sums only (no BLAS, whose threads stall on a busy machine):
    # gram[(k, i), (l, j)] = sum s basis_i basis_j w^(k + l), the moment of the monomial basis_i basis_j
    mono = _basis_images(spatial, ndim, map_basis(ndim, 2 * order), stride).reshape(-1, m)  # (n_mono, m)
    basis = mono[inner]  # (nb, m): the map's spatial basis at the samples
    s = np.ones((1, m)) if support is None else to_numpy(support[grid]).astype(np.float64).reshape(1, m)
    powers = [np.ones_like(w)]
    for _ in range(2 * degree):
        powers.append(powers[-1] * w)
    powers = np.concatenate(powers, axis=-2)  # (*batch, 2 degree + 1, m)
    fpowers = f * powers[..., :degree + 1, :]
    weight = s
    for cut in passes:
        if cut is not None:  # Tukey's biweight of the previous map's residuals
            c = coef @ basis  # (*batch, degree + 1, m): c_k at the samples
            p = (c * powers[..., :degree + 1, :]).sum(-2, keepdims=True)
            t = np.clip(1.0 - np.square((f - p) / cut), 0.0, None)
            weight = np.maximum(t * t, _ROBUST_FLOOR) * s
        moments = ((powers * weight)[..., :, None, :] * mono).sum(-1)  # (*batch, 2 degree + 1, n_mono)
        cross = ((fpowers * weight)[..., :, None, :] * basis).sum(-1)  # (*batch, degree + 1, nb)
        coef = solve(moments, cross)
    return coef


@functools.lru_cache(maxsize=64)
def _kernel_grid(spatial: tuple, ndim: int, order: int, stride: int):
    """:func:`varreg.kernels.map_moments`' sampling of a ``spatial`` grid: per-axis strides and coordinate
    powers (up to ``2 order``) of ``(1, ny, nx)`` in 2-D or ``(nz, ny, nx)``, and the exponents of
    ``map_basis(ndim, 2 order)`` padded to 3 axes."""
    shape3 = (1,) * (3 - ndim) + spatial
    strides = (1,) * (3 - ndim) + (stride,) * ndim
    pows = tuple(_axis_powers(n, s, 2 * order + 1) for n, s in zip(shape3, strides))
    exps = np.zeros((len(map_basis(ndim, 2 * order)), 3), np.int64)
    exps[:, 3 - ndim:] = map_basis(ndim, 2 * order)
    return strides, pows, exps


@functools.lru_cache(maxsize=None)
def _moment_index(ndim: int, order: int):
    """For :func:`map_basis` ``(ndim, order)``: ``pair[i, j]``, the index of the monomial ``basis_i
    basis_j`` in ``map_basis(ndim, 2 order)``, and ``inner[i]``, that of ``basis_i`` there."""
    basis, products = map_basis(ndim, order), map_basis(ndim, 2 * order)
    where = {e: i for i, e in enumerate(products)}
    pair = np.array([[where[tuple(a + b for a, b in zip(ei, ej))] for ej in basis] for ei in basis])
    return pair, np.array([where[e] for e in basis])


def intensity_map_fields(coef: np.ndarray, like, ndim: int, order: int = 0):
    """The coefficient images ``c_k(x)``, ``(*batch, degree + 1, *spatial)`` on ``like``'s backend, device
    and dtype (``like``: ``(*batch, *spatial)``), from :func:`intensity_map_coefficients`' ``coef`` for
    ``order``. Built there from the per-axis coordinate powers (small vectors): no full-size array
    crosses from the host."""
    xp = namespace(like)
    dev = array_device(like)
    spatial = tuple(like.shape[like.ndim - ndim:])
    pows = [xp.asarray(_axis_powers(n, 1, order + 1), dtype=like.dtype, device=dev) for n in spatial]
    c = xp.asarray(coef, dtype=like.dtype, device=dev)  # (*batch, degree + 1, n_basis)
    fields = xp.zeros(tuple(c.shape[:-1]) + spatial, dtype=like.dtype, device=dev)
    for j, ex in enumerate(map_basis(ndim, order)):
        term = xp.reshape(c[..., j], tuple(c.shape[:-1]) + (1,) * ndim)
        for i, (p, e) in enumerate(zip(pows, ex)):
            if e:
                term = term * xp.reshape(p[:, e], (1,) * i + (spatial[i],) + (1,) * (ndim - i - 1))
        fields = fields + term
    return fields


def map_rows(coef: np.ndarray, shape, order: int):
    """The intensity map ``p(x, w) = sum_k c_k(x) w^k`` of :func:`intensity_map_coefficients` (``coef``
    ``(degree + 1, n_basis)`` for ``order``, one image of spatial ``shape``, 2-D or 3-D) as the kernels
    :func:`varreg.kernels.ncc_block_stats` and :func:`varreg.kernels.ncc_combine` take it: ``rows``
    ``(degree + 1, order + 1, nz, ny)`` float32, the coefficients of ``c_k`` as a polynomial of the last
    axis' coordinate on every row (``nz = 1`` in 2-D), and that coordinate ``xs`` ``(nx,)`` float32
    (normalised as :func:`map_coordinates`)."""
    factors, xs = _row_factors(tuple(shape), order)
    rows = np.tensordot(np.asarray(coef, np.float64), factors, axes=([-1], [0]))  # (degree + 1, order + 1, nz, ny)
    return rows.astype(np.float32), xs


@functools.lru_cache(maxsize=64)
def _row_factors(shape: tuple, order: int):
    """``(n_basis, order + 1, nz, ny)`` float64: basis function ``j`` split into its factor ``z^ez y^ey`` at
    the power ``ex`` of the last coordinate (zero at the other powers); and ``xs`` (see :func:`map_rows`)."""
    shape3 = (1,) * (3 - len(shape)) + shape
    zp, yp = (_axis_powers(n, 1, order + 1) for n in shape3[:2])
    basis = map_basis(len(shape), order)
    factors = np.zeros((len(basis), order + 1) + shape3[:2])
    for j, ex in enumerate(basis):
        ez, ey, e = (0,) * (3 - len(ex)) + tuple(ex)
        factors[j, e] = zp[:, ez, None] * yp[None, :, ey]
    xs = _axis_powers(shape3[2], 1, 2)[:, 1].astype(np.float32)
    factors.flags.writeable = False
    return factors, xs


def global_intensity_map(fixed, warped, ndim: int, degree: int, support=None, order: int = 0):
    """``p(x, warped)`` and ``dp/dw(x, warped)`` (both ``(*batch, *spatial)``) for the map ``p`` of
    :func:`intensity_map_coefficients`."""
    coef = intensity_map_coefficients(fixed, warped, ndim, degree, support, order)
    return apply_intensity_map(intensity_map_fields(coef, warped, ndim, order), warped, ndim)


def apply_intensity_map(fields, warped, ndim: int):
    """``sum_k fields_k w^k`` and its derivative in ``w`` (Horner), both ``(*batch, *spatial)``; ``fields``
    ``(*batch, degree + 1, *spatial)`` as :func:`intensity_map_fields`, ``warped`` ``(*batch, *spatial)``."""
    kaxis = warped.ndim - ndim
    take = lambda k: fields[(slice(None),) * kaxis + (k, ...)]  # noqa: E731
    mapped, slope = take(fields.shape[kaxis] - 1) + 0 * warped, 0 * warped
    for k in range(fields.shape[kaxis] - 2, -1, -1):
        slope = slope * warped + mapped
        mapped = mapped * warped + take(k)
    return mapped, slope


@dataclass(frozen=True)
class NCC:
    """Local normalised cross-correlation as L1 after an intensity fit, refitted every warp.

    Local correlation is invariant to a gain and an offset in every window; its
    residual is that of the best local affine map between the images (Roche et
    al. 2000). So at every warp the warped moving image ``W`` is mapped onto the
    fixed one, first by a global map ``p(x, W)`` (:func:`global_intensity_map`): a
    polynomial of degree ``degree`` in the intensity (a gamma or another smooth
    global change, which a local affine map only approximates) whose coefficients
    are polynomials of order ``bias_order`` in the coordinates (a smooth bias
    field, coil shading); then by the local least-squares fit ``a p + b``
    (:func:`local_affine_fit`, the guided filter's model, with a window of
    ``window`` voxels: what the global map leaves). The robust L1 term compares
    ``a p + b`` with the fixed image. The maps are frozen within the warp, so the
    linearisation is L1's with the gradient ``a p'(x, W) grad W`` and the u-step
    stays point-wise and closed form (paper eq. 5), on any backend (on NumPy the
    fit and the linearisation run as two fused numba passes,
    :func:`varreg.kernels.ncc_block_stats` and :func:`varreg.kernels.ncc_combine`).
    A positive affine change of either image's intensities leaves the displacement
    unchanged: :meth:`prepare` standardises each image globally (to a standard
    deviation of 0.25, that of a typical [0, 1] image, so that L1's weights carry
    over), and the maps absorb the moving image's gain and offset. Where the
    moving image is flat the local fit has no slope (a = 0) and the data term is
    absent, as local correlation is undefined there.

    The defaults (window, degree, bias order, robust cutoff, weights) were chosen on ACDC train
    slices with and without a contrast change (``benchmarks/contrast_change.py
    --grid``; figures in docs/bench.md).

    Parameters
    ----------
    window : the local window, voxels of each pyramid level (a Gaussian with the variance of a box
        this wide); ``None``: :attr:`default_window`, or a level's shortest axis where that is shorter.
    degree : the degree in the intensity of the global map (:func:`intensity_map_coefficients`): 2
        absorbs a global nonlinear change such as a gamma; 1: an affine one only.
    bias_order : the total degree of the global map's coefficients as polynomials of the normalised
        coordinates: 2 absorbs a smooth (quadratic) bias field; 0: one map for the whole image.
    floor : the local fit's ridge, as a fraction of the images' standard deviation (flat regions give a -> 0).
    robust : the global map's fit is reweighted by Tukey's biweight with this cutoff, a fraction of the
        images' standard deviation (:func:`intensity_map_coefficients`' ``cutoff``; 0.4, chosen on ACDC
        train slices in docs/bench.md): residuals beyond it (a structure not aligned yet, a large motion) do
        not pull the map. On a level's first warp the fit is refitted three times, on each later warp once,
        reweighted by the previous warp's map (the reweighting runs across the warps, at one extra pass of
        the fit per warp); ``None``: least squares.
    local_robust : the local fit's statistics are weighted by Tukey's biweight with this cutoff (the same
        units) of the residual (:func:`local_fit_weights`) of the previous warp's least-squares local fit
        (a level's first warp: of its own; its sums come from the same numba pass), so that a structure
        not aligned yet does not bend the local fit and its residual stays to move the field. ``None``
        (the default): least squares. 0.2 helps ACDC pairs with a large motion but costs accuracy on
        textured images and ~8 % time (docs/bench.md), so it is not the default.
    eps : as :class:`L1`, keeps flat regions finite in the step.
    """

    window: float | None = None
    degree: int = 2
    bias_order: int = 2
    floor: float = 0.1
    robust: float | None = 0.4
    local_robust: float | None = None
    eps: float = 1e-6
    #: each thread's last fits as ``((grid shape, fused), map coefficients, least-squares local fit)``
    #: (with ``robust`` or ``local_robust``: the next warp's reweightings start from them; per thread, so
    #: that one instance serves concurrent registrations); dropped by :meth:`reset`, which
    #: :func:`varreg.engine.solve` calls once per pyramid level
    _maps: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    name = "ncc"
    weights = Weights(theta=0.1, lam=0.14, refine_lam=0.04)
    default_window = 121
    scale = 0.25
    linearise_takes_support = True

    def __post_init__(self):
        if self.window is not None and not (isinstance(self.window, (int, float)) and self.window >= 2):
            raise ValueError(f"ncc window must be a number of voxels >= 2, got {self.window!r}")
        for name, lo, hi in (("degree", 1, 4), ("bias_order", 0, 3)):
            val = getattr(self, name)
            if not (isinstance(val, int) and not isinstance(val, bool) and lo <= val <= hi):
                raise ValueError(f"ncc {name} must be an integer {lo}..{hi}, got {val!r}")
        if not (isinstance(self.floor, (int, float)) and self.floor >= 0):
            raise ValueError(f"ncc floor must be >= 0, got {self.floor!r}")
        for name in ("robust", "local_robust"):
            val = getattr(self, name)
            if val is not None and not (isinstance(val, (int, float)) and not isinstance(val, bool) and val > 0):
                raise ValueError(f"ncc {name} must be a positive fraction of the standard deviation or None, "
                                 f"got {val!r}")

    def reset(self):
        """Drop this thread's previous warp's fits: its next ones are cold."""
        self._maps.pop(threading.get_ident(), None)

    def _remember(self, key, coef, least):
        """Keep this warp's fits for the next warp's reweightings (with ``robust`` or ``local_robust``)."""
        if self.robust is not None or self.local_robust is not None:
            self._maps[threading.get_ident()] = (key, coef, least)

    def prepare(self, fixed, moving, ndim: int):
        """Each image standardised globally to mean 0 and standard deviation :attr:`scale` (a constant
        image becomes zeros)."""
        return _standardise(fixed, ndim, self.scale), _standardise(moving, ndim, self.scale)

    def linearise(self, fixed, moving, u, ndim: int, support=None) -> Linearised:
        """L1's linearisation of ``a p(x, W) + b - fixed`` around ``u`` (``p``, ``a``, ``b`` frozen; ``W`` =
        warped)."""
        warped, g, rho0, gg = linearise(fixed, moving, u, ndim, self.eps)
        shortest = min(fixed.shape[fixed.ndim - ndim:])
        window = min(self.default_window if self.window is None else self.window, shortest)
        ridge = (self.floor * self.scale) ** 2
        cutoff = None if self.robust is None else self.robust * self.scale
        local = None if self.local_robust is None else self.local_robust * self.scale
        # the previous warp's map and least-squares local fit (same level, same thread, same path)
        fused = takes_kernel(g, ndim) and support is None and warped.dtype == np.float32
        key = (warped.shape, fused)
        last, start, prior = self._maps.get(threading.get_ident(), (None, None, None))
        if last != key:
            start = prior = None
        coef = intensity_map_coefficients(fixed, warped, ndim, self.degree, support, self.bias_order, cutoff, start)
        least = None
        if fused:
            # fused: the block statistics of p(x, W) (with local_robust: also weighted by the prior local
            # fit's residual), and the combination below, each one numba pass
            from . import kernels

            fixed = np.ascontiguousarray(fixed)
            rows, xs = map_rows(coef, fixed.shape, self.bias_order)
            sigma, k = _fit_scale(window)
            # least squares; with local_robust the prior of the weighted fit: the previous warp's least-squares
            # fit, or on a level's first warp this one
            ab = prior if prior is not None else _coarse_fit(kernels.ncc_block_stats(fixed, warped, rows, xs, k),
                                                             sigma / k, ndim, ridge)
            if local is not None:  # this warp's least-squares fit (the plain sums of the same pass): the next prior
                stats = kernels.ncc_block_stats(fixed, warped, rows, xs, k, ab, local, _ROBUST_FLOOR)
                least, ab = _coarse_fit(stats, sigma / k, ndim, ridge)
            self._remember(key, coef, least)
            fitted = kernels.ncc_combine(ab, k, fixed, warped, rows, xs, g, rho0, gg, self.eps)
            return Linearised(fitted, g, rho0, gg)
        xp = namespace(warped)
        mapped, slope = apply_intensity_map(intensity_map_fields(coef, warped, ndim, self.bias_order), warped, ndim)
        a, b = local_affine_fit(fixed, mapped, ndim, window, ridge, support)  # least squares
        if local is not None:  # refitted, weighted by the previous warp's least-squares fit (or this one's)
            least = (a, b)
            pa, pb = least if prior is None else prior
            weights = local_fit_weights(fixed, pa * mapped + pb, local, support)
            a, b = local_affine_fit(fixed, mapped, ndim, window, ridge, weights)
        self._remember(key, coef, least)
        gain = a * slope
        fitted = a * mapped + b
        # residual a p + b - F, linearised: its gradient is a p' g, and g.u = W - F - rho0
        return Linearised(fitted, g * xp.expand_dims(gain, axis=g.ndim - ndim - 1),
                          fitted - fixed - gain * (warped - fixed - rho0), gain * gain * (gg - self.eps) + self.eps)

    step = L1.step


def _standardise(image, ndim: int, scale: float):
    xp = namespace(image)
    axes = tuple(range(image.ndim - ndim, image.ndim))
    centred = image - xp.mean(image, axis=axes, keepdims=True)
    std = xp.sqrt(xp.mean(centred * centred, axis=axes, keepdims=True))
    return centred * (scale / xp.maximum(std, xp.full_like(std, 1e-12)))


class _Wrapper:
    """What a data term wrapping ``self.term`` passes through: its name, weights, ``prepare`` and step."""

    @property
    def name(self):
        return self.term.name

    @property
    def weights(self):
        return getattr(self.term, "weights", None)

    def prepare(self, fixed, moving, ndim: int):
        prepare = getattr(self.term, "prepare", None)
        return (fixed, moving) if prepare is None else prepare(fixed, moving, ndim)

    def step(self, v, lin, theta):
        return self.term.step(v, lin, theta)

    def reset(self):
        reset = getattr(self.term, "reset", None)
        if reset is not None:
            reset()


@dataclass(frozen=True)
class Masked(_Wrapper):
    """A data term that counts only inside masks; elsewhere the regulariser alone shapes the field.

    ``fixed_masks`` / ``moving_masks``: ``{level shape: mask}`` with masks
    ``(*spatial)`` of 0 and 1 on that level's grid (the fixed one for both; the
    moving mask is in the moving image's frame and is warped by the current
    displacement at every warp). Where the product is 0 the image gradient of
    the linearisation is set to zero, so that the u-step returns ``v`` there
    (the data term is absent); the wrapped term must return a :class:`Linearised`.
    """

    term: Any
    fixed_masks: dict
    moving_masks: dict

    def linearise(self, fixed, moving, u, ndim: int) -> Linearised:
        shape = tuple(fixed.shape[fixed.ndim - ndim:])
        m = self.fixed_masks.get(shape)
        mm = self.moving_masks.get(shape)
        if mm is not None:
            xp = namespace(mm)
            mw = xp.astype(warp(mm, u) >= 0.5, mm.dtype)
            m = mw if m is None else m * mw
        if m is not None and getattr(self.term, "linearise_takes_support", False):
            # local statistics inside the support only: what a mask leaves out does not leak into them
            lin = self.term.linearise(fixed, moving, u, ndim, support=m)
        else:
            lin = self.term.linearise(fixed, moving, u, ndim)
        if not isinstance(lin, Linearised):
            raise TypeError(f"masks need a data term whose linearisation is a varreg.data_terms.Linearised; "
                            f"{type(self.term).__name__} returns {type(lin).__name__}")
        if m is None:
            return lin
        xp = namespace(lin.g)
        m = xp.astype(m, lin.g.dtype)
        g = lin.g * xp.expand_dims(m, axis=lin.g.ndim - ndim - 1)
        # outside, g = 0 makes the step return v whatever gg is; 1 keeps its division finite
        gg = m * lin.gg + (1 - m)
        return Linearised(lin.warped, g, lin.rho0, gg)


@dataclass(frozen=True)
class InPlane(_Wrapper):
    """A data term that moves the field within the planes normal to ``axis`` only.

    The ``axis`` component of the image gradient is taken out of the linearisation
    (``rho0`` re-expanded around the same ``u``, ``gg`` without its square), so the
    u-step leaves that component to the regulariser; started from zero, it stays
    zero. Meant for stacks of thick slices (``axis`` the slice axis), where the
    gradient across 5-10 mm slices says little about through-slice motion and the
    regulariser still couples neighbouring slices. The wrapped term must return a
    :class:`Linearised` whose ``gg`` is ``|g|^2 + eps`` (every built-in term does).
    """

    term: Any
    axis: int

    @property
    def linearise_takes_support(self):
        return getattr(self.term, "linearise_takes_support", False)

    def linearise(self, fixed, moving, u, ndim: int, **kw) -> Linearised:
        lin = self.term.linearise(fixed, moving, u, ndim, **kw)
        xp = namespace(lin.g)
        caxis = lin.g.ndim - ndim - 1
        pick = (slice(None),) * caxis + (self.axis,)
        gz = lin.g[pick]
        keep = xp.reshape(xp.asarray([0.0 if k == self.axis else 1.0 for k in range(ndim)], dtype=lin.g.dtype),
                          (ndim,) + (1,) * ndim)
        return Linearised(lin.warped, lin.g * keep, lin.rho0 + gz * u[pick], lin.gg - gz * gz)


DATA_TERMS = {"l1": L1, "l2": L2, "ncc": NCC}


def make_data_term(spec):
    """A name in :data:`DATA_TERMS` or an object following :class:`varreg.engine.DataTerm`."""
    if isinstance(spec, str):
        try:
            return DATA_TERMS[spec.lower()]()
        except KeyError:
            raise ValueError(f"unknown data_term {spec!r}; choose one of {sorted(DATA_TERMS)}") from None
    if not (callable(getattr(spec, "linearise", None)) and callable(getattr(spec, "step", None))):
        raise TypeError(f"data_term must be one of {sorted(DATA_TERMS)} or an object with "
                        ".linearise(fixed, moving, u, ndim) and .step(v, lin, theta) (varreg.engine.DataTerm)")
    return spec
