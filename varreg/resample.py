"""Interpolation, Gaussian smoothing and resizing: the operations outside the array API.

Each function dispatches on the array's namespace: NumPy (numba kernel or
``scipy.ndimage``), CuPy (``cupyx.scipy.ndimage``) and torch
(``torch.nn.functional``). :func:`warp` also runs on any other array-API
namespace (e.g. ``array_api_strict``) through a pure array-API gather
(:func:`_warp_generic`), and so does :func:`resize`; :func:`gaussian_smooth`
(used only by the pyramid) stays NumPy/CuPy/torch only. All paths share one convention:

* coordinates are voxel indices of the last ``ndim`` axes; a displacement ``u``
  of shape ``(..., ndim, *spatial)`` pulls back: ``warp(f, u)(x) = f(x + u(x))``;
* linear interpolation, border values replicated (coordinates clamped);
* resizing maps corner voxel centres onto each other ("align corners"):
  ``x_out * (n_in - 1) / (n_out - 1) = x_in``.
"""
from __future__ import annotations

import math

import numpy as np
from array_api_compat import device as array_device

from .backend import is_cupy, is_numpy, is_torch, namespace, spatial_ndim

__all__ = ["warp", "gaussian_smooth", "resize", "resize_displacement"]


def _ndimage(xp):
    if is_cupy(xp):
        import cupyx.scipy.ndimage as ndi
    else:
        import scipy.ndimage as ndi
    return ndi


# --------------------------------------------------------------------------- warp
def warp(image, u, *, order: int = 1):
    """Resample ``image`` at ``x + u(x)``.

    Parameters
    ----------
    image : array, shape ``(*batch, *spatial)``; ``spatial`` has ``ndim = u.shape[-ndim-1]`` axes.
    u : array, shape ``(*batch, ndim, *spatial)``, voxel units.
    order : 1 for (bi/tri)linear, 0 for nearest neighbour (labels; dtype kept).

    Returns
    -------
    array of ``image``'s shape; floating images keep their dtype, integer
    images come back as float32 with ``order=1`` and unchanged with ``order=0``.
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order!r}")
    xp = namespace(image, u)
    ndim = spatial_ndim(u, like=image)
    if is_torch(xp):
        return _warp_torch(image, u, ndim, order)
    batch = image.shape[: image.ndim - ndim]
    if batch:
        flat_img = xp.reshape(image, (-1, *image.shape[-ndim:]))
        flat_u = xp.reshape(u, (-1, ndim, *image.shape[-ndim:]))
        out = [warp(flat_img[b, ...], flat_u[b, ...], order=order) for b in range(flat_img.shape[0])]
        return xp.reshape(xp.stack(out), image.shape)
    if is_numpy(xp) and order == 1:
        from . import kernels

        img = image if image.dtype.kind == "f" else image.astype(np.float32)
        return kernels.warp_linear(np.ascontiguousarray(img), np.ascontiguousarray(u))
    if is_numpy(xp) or is_cupy(xp):
        return _warp_ndimage(xp, image, u, order)
    return _warp_generic(xp, image, u, order)


def _warp_ndimage(xp, image, u, order):
    ndi = _ndimage(xp)
    ndim = image.ndim
    grid = xp.meshgrid(*[xp.arange(n, dtype=u.dtype) for n in image.shape], indexing="ij")
    coords = xp.stack([grid[i] + u[i, ...] for i in range(ndim)])
    img = image if (order == 0 or image.dtype.kind == "f") else image.astype(xp.float32)
    if order == 0:
        # round half up, then clamp: the same rule as the torch path below
        coords = xp.stack([xp.clip(xp.floor(coords[i] + 0.5), 0, n - 1) for i, n in enumerate(image.shape)])
    return ndi.map_coordinates(img, coords, order=order, mode="nearest")


def _warp_generic(xp, image, u, order):
    """Array-API-only warp of an unbatched ``image`` ``(*spatial)`` by ``u`` ``(ndim, *spatial)``.

    The reference implementation for namespaces without an interpolation
    routine (e.g. ``array_api_strict``); uses only standard functions
    (``floor``, ``clip``, ``astype``, ``reshape``, ``take`` on the flattened
    image). Same conventions as the other paths: coordinates ``x + u`` clamped
    to ``[0, n - 1]`` (border replicated); ``order=0`` rounds half up
    (``floor(c + 0.5)``) and keeps the image dtype; ``order=1`` interpolates
    along the last axis first, as the numba kernel does, and returns a
    floating image (integer images become float32).
    """
    ndim = image.ndim
    shape = tuple(int(n) for n in image.shape)
    dev = array_device(image)
    if order == 1 and not xp.isdtype(image.dtype, "real floating"):
        image = xp.astype(image, xp.float32)
    if order == 1 and u.dtype != image.dtype:
        u = xp.astype(u, image.dtype)
    elif not xp.isdtype(u.dtype, "real floating"):
        u = xp.astype(u, xp.float32)
    flat = xp.reshape(image, (-1,))
    strides = [math.prod(shape[i + 1:]) for i in range(ndim)]
    lo, frac = [], []
    for i, n in enumerate(shape):
        grid = xp.reshape(xp.arange(n, dtype=u.dtype, device=dev), tuple(n if k == i else 1 for k in range(ndim)))
        c = grid + u[i, ...]
        if order == 0:
            c = xp.floor(c + 0.5)
        c = xp.clip(c, 0.0, float(n - 1))
        i0 = xp.floor(c)
        if order == 1:
            # the upper neighbour must stay inside: the last sample is reached with weight 1
            i0 = xp.clip(i0, 0.0, float(max(n - 2, 0)))
            frac.append(c - i0)
        lo.append(xp.astype(i0, xp.int64))
    if order == 0:
        idx = sum(lo[i] * strides[i] for i in range(ndim))
        return xp.reshape(xp.take(flat, xp.reshape(idx, (-1,))), shape)
    hi = [xp.clip(lo[i] + 1, 0, shape[i] - 1) for i in range(ndim)]

    def corner(bits):
        idx = sum((hi[i] if b else lo[i]) * strides[i] for i, b in enumerate(bits))
        return xp.reshape(xp.take(flat, xp.reshape(idx, (-1,))), shape)

    def interp(prefix):
        # linear interpolation over axes len(prefix).., last axis innermost: a + f (b - a)
        if len(prefix) == ndim:
            return corner(prefix)
        a = interp(prefix + (0,))
        b = interp(prefix + (1,))
        return a + frac[len(prefix)] * (b - a)

    return interp(())


def _warp_torch(image, u, ndim, order):
    import torch
    import torch.nn.functional as F

    spatial = tuple(image.shape[-ndim:])
    batch = tuple(image.shape[: image.ndim - ndim])
    img = image.reshape(-1, 1, *spatial)
    disp = u.reshape(-1, ndim, *spatial)
    dtype = img.dtype if img.is_floating_point() else torch.float32
    grids = torch.meshgrid(*[torch.arange(n, device=u.device, dtype=disp.dtype) for n in spatial], indexing="ij")
    coords = []
    for i, n in enumerate(spatial):
        c = grids[i] + disp[:, i]
        if order == 0:
            c = torch.floor(c + 0.5)
        c = c.clamp(0, n - 1)
        coords.append(c * (2.0 / max(n - 1, 1)) - 1.0)
    # grid_sample wants (x, y[, z]) = reversed axis order in the last dimension
    grid = torch.stack(coords[::-1], dim=-1)
    mode = "nearest" if order == 0 else ("bilinear")
    out = F.grid_sample(img.to(dtype), grid.to(dtype), mode=mode, padding_mode="border", align_corners=True)
    out = out.reshape(*batch, *spatial)
    if order == 0:
        out = out.to(image.dtype)
    return out


# ------------------------------------------------------------------- smoothing
def gaussian_smooth(image, sigma: float, ndim: int):
    """Gaussian filter of standard deviation ``sigma`` voxels over the last ``ndim`` axes (border replicated)."""
    if sigma <= 0:
        return image
    xp = namespace(image)
    if is_torch(xp):
        return _gaussian_torch(image, sigma, ndim)
    if not (is_numpy(xp) or is_cupy(xp)):
        return _gaussian_generic(xp, image, sigma, ndim)
    ndi = _ndimage(xp)
    sig = [0.0] * (image.ndim - ndim) + [float(sigma)] * ndim
    return ndi.gaussian_filter(image, sig, mode="nearest", truncate=3.0)


def _gaussian_generic(xp, image, sigma, ndim):
    """Array-API-only separable Gaussian, border replicated, with scipy's kernel (radius
    ``int(3 sigma + 0.5)``, weights normalised): the reference for namespaces without a filter."""
    radius = int(3.0 * sigma + 0.5)
    x = [math.exp(-0.5 * (k / sigma) ** 2) for k in range(-radius, radius + 1)]
    total = sum(x)
    weights = [w / total for w in x]
    out = image
    for axis in range(image.ndim - ndim, image.ndim):
        n = out.shape[axis]
        idx = xp.asarray([min(max(i, 0), n - 1) for i in range(-radius, n + radius)], device=array_device(out))
        padded = xp.take(out, idx, axis=axis)
        acc = None
        for k, w in enumerate(weights):
            sl = [slice(None)] * out.ndim
            sl[axis] = slice(k, k + n)
            term = w * padded[tuple(sl)]
            acc = term if acc is None else acc + term
        out = acc
    return out


def _gaussian_torch(image, sigma, ndim):
    import torch
    import torch.nn.functional as F

    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    spatial = tuple(image.shape[-ndim:])
    out = image.reshape(-1, 1, *spatial)
    conv = (F.conv1d, F.conv2d, F.conv3d)[ndim - 1]
    for axis in range(ndim):
        shape = [1, 1] + [1] * ndim
        shape[2 + axis] = -1
        pad = [0, 0] * ndim
        pad[2 * (ndim - 1 - axis)] = radius
        pad[2 * (ndim - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), k.reshape(shape))
    return out.reshape(image.shape)


# ------------------------------------------------------------- block statistics
def _host_to(xp, a, like):
    return xp.asarray(a, device=array_device(like))


def _linear_along(xp, x, axis: int, pos: np.ndarray):
    """``x`` sampled linearly along ``axis`` at the host positions ``pos`` (in ``[0, n - 1]``): two
    ``take``s and a blend. Indices and weights are small: made on the host, moved to ``x``'s device."""
    n_in = x.shape[axis]
    lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (pos - lo).reshape([len(pos) if a == axis else 1 for a in range(x.ndim)])
    w = _host_to(xp, frac.astype(np.float32 if x.dtype == xp.float32 else np.float64), x)
    a = xp.take(x, _host_to(xp, lo, x), axis=axis)
    b = xp.take(x, _host_to(xp, hi, x), axis=axis)
    return a + w * (b - a)


def block_mean(image, k: int, ndim: int):
    """Means of ``image`` ``(*batch, *spatial)`` over blocks of ``k`` voxels per spatial axis.

    ``ceil(n / k)`` blocks per axis; a last, shorter block is completed by replicating the border
    voxel (as edge padding would). Sums of ``k`` strided ``take``s: any array-API namespace, no
    matrix products (BLAS threads stall on a busy machine)."""
    if k <= 1:
        return image
    xp = namespace(image)
    out = image
    for axis in range(image.ndim - ndim, image.ndim):
        n = out.shape[axis]
        nc = -(-n // k)
        acc = None
        for t in range(k):
            idx = _host_to(xp, np.minimum(np.arange(nc) * k + t, n - 1), out)
            part = xp.take(out, idx, axis=axis)
            acc = part if acc is None else acc + part
        out = acc / k
    return out


def block_upsample(coarse, shape, k: int, ndim: int):
    """:func:`block_mean`'s grid back to ``shape``: linear between the block centres ``(j + 1/2) k - 1/2``,
    clamped beyond the first and the last (two ``take``s and a blend per axis)."""
    if k <= 1:
        return coarse
    xp = namespace(coarse)
    out = coarse
    for d, n in enumerate(shape):
        axis = coarse.ndim - ndim + d
        pos = np.clip((np.arange(n, dtype=np.float64) + 0.5) / k - 0.5, 0.0, out.shape[axis] - 1)
        out = _linear_along(xp, out, axis, pos)
    return out


# -------------------------------------------------------------------- resizing
def resize(image, shape, ndim: int):
    """Linear resize of the last ``ndim`` axes to ``shape`` with corners aligned.

    One axis at a time: each output sample blends its two input neighbours
    (``take`` of the floor and ceiling index). Any array-API namespace; torch
    goes through ``F.interpolate``. On NumPy it replaced ``scipy.ndimage.zoom`` of order 1,
    with the same values and a fraction of its time (docs/bench.md, implementation notes).
    """
    shape = tuple(int(s) for s in shape)
    if tuple(image.shape[-ndim:]) == shape:
        return image
    xp = namespace(image)
    if is_torch(xp):
        import torch.nn.functional as F

        batch = tuple(image.shape[: image.ndim - ndim])
        mode = "bilinear" if ndim == 2 else "trilinear"
        out = F.interpolate(image.reshape(-1, 1, *image.shape[-ndim:]), size=shape, mode=mode, align_corners=True)
        return out.reshape(*batch, *shape)
    out = image
    for k, n_out in enumerate(shape):
        axis = image.ndim - ndim + k
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        pos = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / max(n_out - 1, 1))
        out = _linear_along(xp, out, axis, pos)
    return out


def resize_displacement(u, shape, ndim: int):
    """Resize a displacement ``(..., ndim, *spatial)`` to ``shape``, rescaling its voxel values."""
    old = tuple(u.shape[-ndim:])
    if old == tuple(shape):
        return u
    xp = namespace(u)
    out = resize(u, shape, ndim)
    caxis = u.ndim - ndim - 1
    factors = [(s - 1) / max(n - 1, 1) for s, n in zip(shape, old)]
    comps = [out[(slice(None),) * caxis + (i,)] * factors[i] for i in range(ndim)]
    return xp.stack(comps, axis=caxis)
