"""Fused numba kernels for the CPU hot loop (NumPy arrays, float32 or float64).

Each kernel does in one or two passes over memory what the generic array-API
code does with many temporaries; that code is its reference, and
``tests/test_kernels.py`` checks every kernel against it:

=================  ==============================================================
kernel             the operation it speeds up (and the only caller)
=================  ==============================================================
:func:`warp_linear`     :func:`varreg.resample.warp` (linear, unbatched NumPy)
:func:`warp_gradient`   :func:`varreg.data_terms.linearise`
:func:`data_step`       :func:`varreg.data_terms.l1_step` / :func:`~varreg.data_terms.l2_step`
:func:`tv_dual`         :class:`varreg.denoisers.TV` / ``Huber`` (:func:`~varreg.denoisers.tv_dual_steps`)
:func:`tgv_steps`       :class:`varreg.denoisers.TGV` (:func:`~varreg.denoisers.tgv_steps`)
:func:`quadratic_cg`    :class:`varreg.denoisers.Quadratic` (its array-API CG)
:func:`ncc_block_stats` :class:`varreg.data_terms.NCC`: ``block_mean`` of the local fit's products
:func:`ncc_combine`     :class:`varreg.data_terms.NCC`: ``block_upsample`` and the linearisation
:func:`map_moments`     :func:`varreg.data_terms.intensity_map_coefficients`: its normal equations' sums
=================  ==============================================================

This module imports nothing of varreg: the operations call it, never the reverse.

Compiled on first use and cached on disk (``cache=True``); :func:`warm_up`
compiles them ahead of time.
"""
from __future__ import annotations

import functools
import math

import numba
import numpy as np
from numba import njit, prange

# Threading layer: numba's default choice (OpenMP here); the "workqueue" layer
# was much slower on the 2-D ACDC solve (docs/bench.md, implementation notes).
# Note for torch users in the same process: the OpenMP layer shares its runtime
# with torch, so set torch.set_num_threads again after the first classical solve.

__all__ = [
    "warp_linear",
    "warp_gradient",
    "data_step",
    "tv_dual",
    "tgv_steps",
    "quadratic_cg",
    "ncc_block_stats",
    "ncc_combine",
    "warm_up",
]

#: Grids smaller than this run on one thread: for them the cost of waking and
#: synchronising workers exceeds the work, badly so on a loaded machine.
PARALLEL_MIN_VOXELS = 4096


def _run(kernel, nvox, *args):
    """Call a parallel kernel with all numba threads, or one for small grids."""
    if nvox >= PARALLEL_MIN_VOXELS or numba.get_num_threads() == 1:
        return kernel(*args)
    n = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(n)


# Only the fast-math flags that leave a finite result unchanged: no reassociation, FMA
# contraction, approximate reciprocals or square roots, or signed-zero folding. Numba
# optimises a freshly compiled parallel kernel differently from the same kernel loaded
# from its cache; with ``fastmath=True`` the two rounded differently, and the L1
# threshold turned that into displacements up to 0.5 px apart on ACDC between a
# machine's first run and every later one. With these flags the two agree bit for bit
# (tests/test_reproducible.py); the CG's inner products, which needed reassociation to
# vectorise, are summed column-wise over fixed chunks of rows instead (:func:`_add_products`).
_FASTMATH = {"nnan", "ninf"}
_opts = dict(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)


#: Rows per partial sum of the CG's inner products: a fixed split, so the sums do not
#: depend on the thread count.
_CHUNK_ROWS = 16


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _chunk_rows(m, rows):
    """The rows ``[start, stop)`` of chunk ``m`` out of ``rows``."""
    return m * _CHUNK_ROWS, min((m + 1) * _CHUNK_ROWS, rows)


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _add_products(col, a, b):
    """``col += a * b`` (float64 ``col``): point-wise, so it vectorises without reassociation."""
    for j in range(a.shape[0]):
        col[j] += a[j] * b[j]


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _drain(col):
    """``sum(col)`` in eight lanes of a fixed order; ``col`` is zeroed."""
    W = col.shape[0]
    nb = W // 8
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    for q in range(nb):
        j = 8 * q
        s0 += col[j]
        s1 += col[j + 1]
        s2 += col[j + 2]
        s3 += col[j + 3]
        s4 += col[j + 4]
        s5 += col[j + 5]
        s6 += col[j + 6]
        s7 += col[j + 7]
    acc = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    for j in range(8 * nb, W):
        acc += col[j]
    col[:] = 0.0
    return acc


# The TV and TGV kernels spell their constants as np.float32 (``one``, ``zero`` ...): a
# float64 literal promotes every float32 operation it meets, and those loops ran 1.2-1.5x
# slower with them (the values are exact, so float64 arrays lose nothing).


# --------------------------------------------------------------------------- warp
@njit(**_opts)
def _warp2(img, u, out):
    H, W = img.shape
    for i in prange(H):
        for j in range(W):
            y = min(max(i + u[0, i, j], 0.0), H - 1.0)
            x = min(max(j + u[1, i, j], 0.0), W - 1.0)
            y0 = min(int(y), max(H - 2, 0))
            x0 = min(int(x), max(W - 2, 0))
            y1 = min(y0 + 1, H - 1)
            x1 = min(x0 + 1, W - 1)
            fy = y - y0
            fx = x - x0
            a = img[y0, x0] + fx * (img[y0, x1] - img[y0, x0])
            b = img[y1, x0] + fx * (img[y1, x1] - img[y1, x0])
            out[i, j] = a + fy * (b - a)


@njit(**_opts)
def _warp3(img, u, out):
    D, H, W = img.shape
    for k in prange(D):
        for i in range(H):
            for j in range(W):
                z = min(max(k + u[0, k, i, j], 0.0), D - 1.0)
                y = min(max(i + u[1, k, i, j], 0.0), H - 1.0)
                x = min(max(j + u[2, k, i, j], 0.0), W - 1.0)
                z0 = min(int(z), max(D - 2, 0))
                y0 = min(int(y), max(H - 2, 0))
                x0 = min(int(x), max(W - 2, 0))
                z1 = min(z0 + 1, D - 1)
                y1 = min(y0 + 1, H - 1)
                x1 = min(x0 + 1, W - 1)
                fz = z - z0
                fy = y - y0
                fx = x - x0
                a = img[z0, y0, x0] + fx * (img[z0, y0, x1] - img[z0, y0, x0])
                b = img[z0, y1, x0] + fx * (img[z0, y1, x1] - img[z0, y1, x0])
                c = img[z1, y0, x0] + fx * (img[z1, y0, x1] - img[z1, y0, x0])
                d = img[z1, y1, x0] + fx * (img[z1, y1, x1] - img[z1, y1, x0])
                ab = a + fy * (b - a)
                cd = c + fy * (d - c)
                out[k, i, j] = ab + fz * (cd - ab)


def warp_linear(img: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``img(x + u(x))`` by (bi/tri)linear interpolation, border replicated.

    ``img`` shape ``(*spatial)``, ``u`` shape ``(ndim, *spatial)`` in voxels.
    """
    out = np.empty(img.shape, dtype=img.dtype)
    _run(_warp2 if img.ndim == 2 else _warp3, img.size, img, u.astype(img.dtype, copy=False), out)
    return out


# ------------------------------------------------------- gradient + data-term setup
@njit(**_opts)
def _grad_setup2(w, fixed, u, g, rho0, gg, eps):
    H, W = w.shape
    for i in prange(H):
        ip = min(i + 1, H - 1)
        im = max(i - 1, 0)
        for j in range(W):
            jp = min(j + 1, W - 1)
            jm = max(j - 1, 0)
            gy = 0.5 * (w[ip, j] - w[im, j])
            gx = 0.5 * (w[i, jp] - w[i, jm])
            g[0, i, j] = gy
            g[1, i, j] = gx
            rho0[i, j] = w[i, j] - fixed[i, j] - gy * u[0, i, j] - gx * u[1, i, j]
            gg[i, j] = gy * gy + gx * gx + eps


@njit(**_opts)
def _grad_setup3(w, fixed, u, g, rho0, gg, eps):
    D, H, W = w.shape
    for k in prange(D):
        kp = min(k + 1, D - 1)
        km = max(k - 1, 0)
        for i in range(H):
            ip = min(i + 1, H - 1)
            im = max(i - 1, 0)
            for j in range(W):
                jp = min(j + 1, W - 1)
                jm = max(j - 1, 0)
                gz = 0.5 * (w[kp, i, j] - w[km, i, j])
                gy = 0.5 * (w[k, ip, j] - w[k, im, j])
                gx = 0.5 * (w[k, i, jp] - w[k, i, jm])
                g[0, k, i, j] = gz
                g[1, k, i, j] = gy
                g[2, k, i, j] = gx
                rho0[k, i, j] = w[k, i, j] - fixed[k, i, j] - gz * u[0, k, i, j] - gy * u[1, k, i, j] - gx * u[2, k, i, j]
                gg[k, i, j] = gz * gz + gy * gy + gx * gx + eps


def warp_gradient(moving: np.ndarray, fixed: np.ndarray, u: np.ndarray, eps: float):
    """Warp ``moving`` by ``u`` and prepare the linearised data term around ``u``.

    Returns ``(warped, g, rho0, gg)``: the warped image, its central-difference
    gradient ``g`` (shape ``(ndim, *spatial)``), ``rho0 = warped - fixed - g.u``
    (so that ``rho(v) = rho0 + g.v``) and ``gg = |g|^2 + eps``.
    """
    warped = warp_linear(moving, u)
    g = np.empty(u.shape, dtype=moving.dtype)
    rho0 = np.empty(moving.shape, dtype=moving.dtype)
    gg = np.empty(moving.shape, dtype=moving.dtype)
    fn = _grad_setup2 if moving.ndim == 2 else _grad_setup3
    _run(fn, moving.size, warped, fixed, u.astype(moving.dtype, copy=False), g, rho0, gg, moving.dtype.type(eps))
    return warped, g, rho0, gg


# ----------------------------------------------------------------------- data step
@njit(**_opts)
def _data_step(v, g, rho0, gg, theta, l1, out):
    """The components are written out (``three`` and ``l1`` are loop-invariant, so LLVM
    unswitches them): with an inner loop over a run-time ``d`` the pixel loop does not
    vectorise (docs/bench.md, implementation notes), for the same values."""
    d, n = v.shape
    three = d == 3
    inv_theta = 1.0 / theta
    for t in prange(n):
        rho = rho0[t]
        rho += g[0, t] * v[0, t]
        rho += g[1, t] * v[1, t]
        if three:
            rho += g[2, t] * v[2, t]
        if l1:
            thr = gg[t] * inv_theta
            inside = rho / gg[t]
            s = inv_theta if rho > thr else (-inv_theta if rho < -thr else np.float64(inside))
        else:
            s = np.float64(rho / (theta + gg[t]))
        out[0, t] = v[0, t] - s * g[0, t]
        out[1, t] = v[1, t] - s * g[1, t]
        if three:
            out[2, t] = v[2, t] - s * g[2, t]


def data_step(v, g, rho0, gg, theta: float, l1: bool) -> np.ndarray:
    """Point-wise u-step (paper eq. 5 for ``l1``, eqs. 16/17 for L2).

    ``v``, ``g``: shape ``(ndim, *spatial)``; ``rho0``, ``gg``: ``(*spatial)``.
    For L1 ``gg = |g|^2 + eps``; for L2 ``gg = |g|^2``.
    """
    d = v.shape[0]
    if d not in (2, 3):
        raise ValueError(f"data_step takes a displacement (2, H, W) or (3, D, H, W), got shape {v.shape}")
    out = np.empty_like(v)
    _run(
        _data_step, rho0.size, v.reshape(d, -1), g.reshape(d, -1), rho0.reshape(-1), gg.reshape(-1),
        v.dtype.type(theta), bool(l1), out.reshape(d, -1),
    )
    return out


# ------------------------------------------------------------------- TV / Huber dual
# Layout: u, v (d, *spatial); p (d, ndim, *spatial) with p[c, a] the dual of the
# forward difference of component c along axis a. The divergence ignores the
# last sample of p[c, a] along axis a (Neumann boundary), exactly as
# differences.divergence does. Inner loops run over the contiguous last axis
# without branches so that LLVM vectorises them; borders are handled apart.


@njit(**_opts)
def _tv2(u, p, v, mu, tau, alpha, n_iter, hy, hx, coupled):
    d, H, W = u.shape
    one, zero = np.float32(1.0), np.float32(0.0)
    step = tau / mu
    shrink = one / (one + tau * alpha / mu)
    for it in range(n_iter + 1):
        for i in prange(H):
            ty = hy if i < H - 1 else zero
            by = hy if i > 0 else zero
            im = max(i - 1, 0)
            for c in range(d):
                for j in range(1, W - 1):
                    dv = ty * p[c, 0, i, j] - by * p[c, 0, im, j] + hx * (p[c, 1, i, j] - p[c, 1, i, j - 1])
                    v[c, i, j] = u[c, i, j] + mu * dv
                for j in (0, W - 1):
                    dx = (p[c, 1, i, j] if j < W - 1 else zero) - (p[c, 1, i, j - 1] if j > 0 else zero)
                    v[c, i, j] = u[c, i, j] + mu * (ty * p[c, 0, i, j] - by * p[c, 0, im, j] + hx * dx)
        if it == n_iter:
            break
        for i in prange(H):
            ip = min(i + 1, H - 1)
            for c in range(d):
                for j in range(W):
                    p[c, 0, i, j] = (p[c, 0, i, j] + step * hy * (v[c, ip, j] - v[c, i, j])) * shrink
                for j in range(W - 1):
                    p[c, 1, i, j] = (p[c, 1, i, j] + step * hx * (v[c, i, j + 1] - v[c, i, j])) * shrink
                p[c, 1, i, W - 1] *= shrink
            if coupled:
                for j in range(W):
                    tot = zero
                    for c in range(d):
                        tot += p[c, 0, i, j] ** 2 + p[c, 1, i, j] ** 2
                    s = one / max(math.sqrt(tot), one)
                    for c in range(d):
                        p[c, 0, i, j] *= s
                        p[c, 1, i, j] *= s
            else:
                for c in range(d):
                    for j in range(W):
                        s = one / max(math.sqrt(p[c, 0, i, j] ** 2 + p[c, 1, i, j] ** 2), one)
                        p[c, 0, i, j] *= s
                        p[c, 1, i, j] *= s


@njit(**_opts)
def _tv3(u, p, v, mu, tau, alpha, n_iter, hz, hy, hx, coupled):
    d, D, H, W = u.shape
    one, zero = np.float32(1.0), np.float32(0.0)
    step = tau / mu
    shrink = one / (one + tau * alpha / mu)
    for it in range(n_iter + 1):
        for k in prange(D):
            tz = hz if k < D - 1 else zero
            bz = hz if k > 0 else zero
            km = max(k - 1, 0)
            for i in range(H):
                ty = hy if i < H - 1 else zero
                by = hy if i > 0 else zero
                im = max(i - 1, 0)
                for c in range(d):
                    for j in range(1, W - 1):
                        dv = (tz * p[c, 0, k, i, j] - bz * p[c, 0, km, i, j]
                              + ty * p[c, 1, k, i, j] - by * p[c, 1, k, im, j]
                              + hx * (p[c, 2, k, i, j] - p[c, 2, k, i, j - 1]))
                        v[c, k, i, j] = u[c, k, i, j] + mu * dv
                    for j in (0, W - 1):
                        dx = (p[c, 2, k, i, j] if j < W - 1 else zero) - (p[c, 2, k, i, j - 1] if j > 0 else zero)
                        dv = (tz * p[c, 0, k, i, j] - bz * p[c, 0, km, i, j]
                              + ty * p[c, 1, k, i, j] - by * p[c, 1, k, im, j] + hx * dx)
                        v[c, k, i, j] = u[c, k, i, j] + mu * dv
        if it == n_iter:
            break
        for k in prange(D):
            kp = min(k + 1, D - 1)
            for i in range(H):
                ip = min(i + 1, H - 1)
                # ascent step and shrink, one component and axis at a time over the contiguous rows
                for c in range(d):
                    for j in range(W):
                        p[c, 0, k, i, j] = (p[c, 0, k, i, j] + step * hz * (v[c, kp, i, j] - v[c, k, i, j])) * shrink
                        p[c, 1, k, i, j] = (p[c, 1, k, i, j] + step * hy * (v[c, k, ip, j] - v[c, k, i, j])) * shrink
                    for j in range(W - 1):
                        p[c, 2, k, i, j] = (p[c, 2, k, i, j] + step * hx * (v[c, k, i, j + 1] - v[c, k, i, j])) * shrink
                    p[c, 2, k, i, W - 1] *= shrink
                # projection onto the unit ball (per component, or of all components together)
                if coupled:
                    for j in range(W):
                        tot = zero
                        for c in range(d):
                            tot += p[c, 0, k, i, j] ** 2 + p[c, 1, k, i, j] ** 2 + p[c, 2, k, i, j] ** 2
                        s = one / max(math.sqrt(tot), one)
                        for c in range(d):
                            p[c, 0, k, i, j] *= s
                            p[c, 1, k, i, j] *= s
                            p[c, 2, k, i, j] *= s
                else:
                    for c in range(d):
                        for j in range(W):
                            s = one / max(math.sqrt(p[c, 0, k, i, j] ** 2 + p[c, 1, k, i, j] ** 2
                                                    + p[c, 2, k, i, j] ** 2), one)
                            p[c, 0, k, i, j] *= s
                            p[c, 1, k, i, j] *= s
                            p[c, 2, k, i, j] *= s


def tv_dual(u, p, mu: float, tau: float, alpha: float, n_iter: int, spacing, coupled: bool) -> np.ndarray:
    """``n_iter`` projected dual steps of (Huber-)ROF, updating ``p`` in place.

    Minimises ``R(v) + |v - u|^2 / (2 mu)`` with ``R`` the (Huber-)TV of each
    component (``coupled=False``) or the vectorial TV (``coupled=True``);
    ``u`` shape ``(ndim, *spatial)``, ``p`` shape ``(ndim, ndim, *spatial)``.
    Returns ``v = u + mu div p``.
    """
    v = np.empty_like(u)
    f = u.dtype.type  # keep the arithmetic in the arrays' precision
    hinv = [f(1.0 / h) for h in spacing]
    if u.ndim == 3:
        _run(_tv2, v[0].size, u, p, v, f(mu), f(tau), f(alpha), int(n_iter), *hinv, bool(coupled))
    else:
        _run(_tv3, v[0].size, u, p, v, f(mu), f(tau), f(alpha), int(n_iter), *hinv, bool(coupled))
    return v


# --------------------------------------------------------------------------- TGV-ROF
@njit(**_opts)
def _tgv2(u, v, vb, w, wb, p, q, mu, beta, tau, sigma, n_iter, hy, hx):
    # Inner loops shaped for LLVM's vectoriser: columns run in stretches whose difference
    # offsets and factors are loop-invariant (built inside the prange bodies: numba cannot
    # pass tuples into them) instead of clamped indices per column, and each loop updates
    # one variable rather than all at once over ~15 row pointers (docs/bench.md, implementation
    # notes); the kernel is bound by memory traffic beyond that.
    d, H, W = u.shape
    one, half, two, zero = np.float32(1.0), np.float32(0.5), np.float32(2.0), np.float32(0.0)
    t_mu = tau / mu
    inv = one / (one + t_mu)
    binv = one / beta
    x0 = hx - hx  # zero in hx's type: the column stretches below must be tuples of one type
    hx0 = hx if W > 1 else x0
    for it in range(n_iter):
        # dual ascent at the extrapolated primal (vb, wb), then projection
        for i in prange(H):
            ip = min(i + 1, H - 1)
            # forward differences: interior (offset 1), last column (offset 0: they vanish)
            fwd = ((0, W - 1, 1), (W - 1, W, 0))
            for c in range(d):
                vbr, vbp = vb[c, i], vb[c, ip]
                w0, w0p, w1, w1p = wb[c, 0, i], wb[c, 0, ip], wb[c, 1, i], wb[c, 1, ip]
                p0, p1, q0, q1, q2 = p[c, 0, i], p[c, 1, i], q[c, 0, i], q[c, 1, i], q[c, 2, i]
                for j0, j1, dj in fwd:
                    for j in range(j0, j1):
                        a = p0[j] + sigma * (hy * (vbp[j] - vbr[j]) - w0[j])
                        b = p1[j] + sigma * (hx * (vbr[j + dj] - vbr[j]) - w1[j])
                        n = one / max(math.sqrt(a * a + b * b), one)
                        p0[j] = a * n
                        p1[j] = b * n
                    for j in range(j0, j1):
                        a = q0[j] + sigma * hy * (w0p[j] - w0[j])
                        b = q1[j] + sigma * hx * (w1[j + dj] - w1[j])
                        e = q2[j] + sigma * half * (hx * (w0[j + dj] - w0[j]) + hy * (w1p[j] - w1[j]))
                        n = one / max(math.sqrt(a * a + b * b + two * e * e) * binv, one)
                        q0[j] = a * n
                        q1[j] = b * n
                        q2[j] = e * n
        # primal descent and extrapolation; backward differences of the duals, whose factors
        # ty/by (rows) and tx/bx (columns) vanish where the Neumann rule of
        # differences.divergence drops a term
        for i in prange(H):
            ty = hy if i < H - 1 else zero
            by = hy if i > 0 else zero
            im = max(i - 1, 0)
            # first column, interior, last column: (start, stop, tx, bx, offset of j - 1)
            bwd = ((0, 1, hx0, x0, 0), (1, W - 1, hx, hx, 1), (max(W - 1, 1), W, x0, hx, 1))
            for c in range(d):
                ur, vr, vbr = u[c, i], v[c, i], vb[c, i]
                pr0, pm0, pr1 = p[c, 0, i], p[c, 0, im], p[c, 1, i]
                for j0, j1, tx, bx, dm in bwd:
                    for j in range(j0, j1):
                        divp = ty * pr0[j] - by * pm0[j] + tx * pr1[j] - bx * pr1[j - dm]
                        vn = (vr[j] + tau * divp + t_mu * ur[j]) * inv
                        vbr[j] = two * vn - vr[j]
                        vr[j] = vn
                # row a of the symmetrised divergence of q = [[q0, q2], [q2, q1]]:
                # D_y^- q[a, 0] + D_x^- q[a, 1]
                for a in range(2):
                    wr, wbr, pr = w[c, a, i], wb[c, a, i], p[c, a, i]
                    qy, qym = q[c, 2 * a, i], q[c, 2 * a, im]
                    qx = q[c, 2 - a, i]
                    for j0, j1, tx, bx, dm in bwd:
                        for j in range(j0, j1):
                            dq = ty * qy[j] - by * qym[j] + tx * qx[j] - bx * qx[j - dm]
                            na = wr[j] + tau * (pr[j] + dq)
                            wbr[j] = two * na - wr[j]
                            wr[j] = na


@njit(**_opts)
def _tgv3(u, v, vb, w, wb, p, q, mu, beta, tau, sigma, n_iter, hz, hy, hx):
    # Four sweeps per step (p, q, v, w) rather than two: one sweep over all ~40 row
    # streams thrashed the cache on power-of-two volumes (docs/bench.md, implementation notes).
    d, D, H, W = u.shape
    one, half, two, zero = np.float32(1.0), np.float32(0.5), np.float32(2.0), np.float32(0.0)
    t_mu = tau / mu
    inv = one / (one + t_mu)
    binv = one / beta
    for it in range(n_iter):
        # dual p: ascent on grad vb - wb, projection per component
        for k in prange(D):
            kp = min(k + 1, D - 1)
            for i in range(H):
                ip = min(i + 1, H - 1)
                for c in range(d):
                    vr, vz, vy = vb[c, k, i], vb[c, kp, i], vb[c, k, ip]
                    w0, w1, w2 = wb[c, 0, k, i], wb[c, 1, k, i], wb[c, 2, k, i]
                    p0, p1, p2 = p[c, 0, k, i], p[c, 1, k, i], p[c, 2, k, i]
                    for j in range(W):
                        jp = min(j + 1, W - 1)
                        a0 = p0[j] + sigma * (hz * (vz[j] - vr[j]) - w0[j])
                        a1 = p1[j] + sigma * (hy * (vy[j] - vr[j]) - w1[j])
                        a2 = p2[j] + sigma * (hx * (vr[jp] - vr[j]) - w2[j])
                        n = one / max(math.sqrt(a0 * a0 + a1 * a1 + a2 * a2), one)
                        p0[j] = a0 * n
                        p1[j] = a1 * n
                        p2[j] = a2 * n
        # dual q: ascent on E(wb), stored (zz, yy, xx, zy, zx, yx) as denoisers.symmetrised_gradient
        for k in prange(D):
            kp = min(k + 1, D - 1)
            for i in range(H):
                ip = min(i + 1, H - 1)
                for c in range(d):
                    w0, w0z, w0y = wb[c, 0, k, i], wb[c, 0, kp, i], wb[c, 0, k, ip]
                    w1, w1z, w1y = wb[c, 1, k, i], wb[c, 1, kp, i], wb[c, 1, k, ip]
                    w2, w2z, w2y = wb[c, 2, k, i], wb[c, 2, kp, i], wb[c, 2, k, ip]
                    q0, q1, q2, q3, q4, q5 = q[c, 0, k, i], q[c, 1, k, i], q[c, 2, k, i], q[c, 3, k, i], q[c, 4, k, i], q[c, 5, k, i]
                    for j in range(W):
                        jp = min(j + 1, W - 1)
                        b0 = q0[j] + sigma * hz * (w0z[j] - w0[j])
                        b1 = q1[j] + sigma * hy * (w1y[j] - w1[j])
                        b2 = q2[j] + sigma * hx * (w2[jp] - w2[j])
                        b3 = q3[j] + sigma * half * (hy * (w0y[j] - w0[j]) + hz * (w1z[j] - w1[j]))
                        b4 = q4[j] + sigma * half * (hx * (w0[jp] - w0[j]) + hz * (w2z[j] - w2[j]))
                        b5 = q5[j] + sigma * half * (hx * (w1[jp] - w1[j]) + hy * (w2y[j] - w2[j]))
                        n = one / max(math.sqrt(b0 * b0 + b1 * b1 + b2 * b2 + two * (b3 * b3 + b4 * b4 + b5 * b5)) * binv, one)
                        q0[j] = b0 * n
                        q1[j] = b1 * n
                        q2[j] = b2 * n
                        q3[j] = b3 * n
                        q4[j] = b4 * n
                        q5[j] = b5 * n
        # primal v: proximal step of |v - u|^2 / (2 mu) after the divergence of p, then extrapolation
        for k in prange(D):
            tz = hz if k < D - 1 else zero
            bz = hz if k > 0 else zero
            km = max(k - 1, 0)
            for i in range(H):
                ty = hy if i < H - 1 else zero
                by = hy if i > 0 else zero
                im = max(i - 1, 0)
                for c in range(d):
                    ur, vr, vbr = u[c, k, i], v[c, k, i], vb[c, k, i]
                    pr0, pz0, pr1, py1, pr2 = p[c, 0, k, i], p[c, 0, km, i], p[c, 1, k, i], p[c, 1, k, im], p[c, 2, k, i]
                    for j in range(W):
                        jm = max(j - 1, 0)
                        tx = hx if j < W - 1 else zero
                        bx = hx if j > 0 else zero
                        divp = tz * pr0[j] - bz * pz0[j] + ty * pr1[j] - by * py1[j] + tx * pr2[j] - bx * pr2[jm]
                        vn = (vr[j] + tau * divp + t_mu * ur[j]) * inv
                        vbr[j] = two * vn - vr[j]
                        vr[j] = vn
        # primal w: w + tau (p + symmetrised divergence of q), row j of which is sum_k D_k^- Q_jk
        for k in prange(D):
            tz = hz if k < D - 1 else zero
            bz = hz if k > 0 else zero
            km = max(k - 1, 0)
            for i in range(H):
                ty = hy if i < H - 1 else zero
                by = hy if i > 0 else zero
                im = max(i - 1, 0)
                for c in range(d):
                    qr0, qz0 = q[c, 0, k, i], q[c, 0, km, i]
                    qr1, qy1 = q[c, 1, k, i], q[c, 1, k, im]
                    qr2 = q[c, 2, k, i]
                    qr3, qz3, qy3 = q[c, 3, k, i], q[c, 3, km, i], q[c, 3, k, im]
                    qr4, qz4 = q[c, 4, k, i], q[c, 4, km, i]
                    qr5, qy5 = q[c, 5, k, i], q[c, 5, k, im]
                    for a in range(3):
                        wr, wbr, pr = w[c, a, k, i], wb[c, a, k, i], p[c, a, k, i]
                        for j in range(W):
                            jm = max(j - 1, 0)
                            tx = hx if j < W - 1 else zero
                            bx = hx if j > 0 else zero
                            if a == 0:
                                dq = tz * qr0[j] - bz * qz0[j] + ty * qr3[j] - by * qy3[j] + tx * qr4[j] - bx * qr4[jm]
                            elif a == 1:
                                dq = tz * qr3[j] - bz * qz3[j] + ty * qr1[j] - by * qy1[j] + tx * qr5[j] - bx * qr5[jm]
                            else:
                                dq = tz * qr4[j] - bz * qz4[j] + ty * qr5[j] - by * qy5[j] + tx * qr2[j] - bx * qr2[jm]
                            na = wr[j] + tau * (pr[j] + dq)
                            wbr[j] = two * na - wr[j]
                            wr[j] = na


def tgv_steps(u, state: dict, mu: float, beta: float, tau: float, sigma: float, n_iter: int, spacing) -> None:
    """``n_iter`` primal-dual steps of TGV-ROF (2-D or 3-D), updating ``state`` in place.

    The fused form of :func:`varreg.denoisers.tgv_steps`, same state dict: for
    ``u`` of shape ``(d, *spatial)``, ``v``, ``vb`` like ``u``; ``w``, ``wb``, ``p``
    of shape ``(d, d, *spatial)``; ``q`` of shape ``(d, d (d + 1) / 2, *spatial)``;
    all C-contiguous, of ``u``'s dtype.
    """
    d = u.ndim - 1
    if d not in (2, 3) or u.shape[0] != d:
        raise ValueError(f"tgv_steps takes a displacement (2, H, W) or (3, D, H, W), got shape {u.shape}")
    f = u.dtype.type
    a = [state[k] for k in ("v", "vb", "w", "wb", "p", "q")]
    if not all(x.flags.c_contiguous and x.dtype == u.dtype for x in a):
        raise ValueError("tgv_steps needs C-contiguous state arrays of the displacement's dtype")
    hinv = [f(1.0 / h) for h in spacing]
    _run(_tgv2 if d == 2 else _tgv3, u[0].size, u, *a, f(mu), f(beta), f(tau), f(sigma), int(n_iter), *hinv)


# ------------------------------------------------------------ quadratic (diffusion)
@njit(**_opts)
def _helmholtz(x, out, w, cz, cy, cx, cols, partial):
    """``out = x - w lap(x)`` for ``x`` of shape ``(d, D, H, W)`` (the Neumann Laplacian of
    differences.laplacian; ``cz``, ``cy``, ``cx``: 1/h^2); ``partial[m]`` gets
    ``sum(x * out)`` over rows ``[m * _CHUNK_ROWS, (m + 1) * _CHUNK_ROWS)`` (rows in C
    order), accumulated in ``cols[m]`` (zeros, ``(n_chunks, W)`` float64), so that the
    caller's sum does not depend on threads. The row loops are written out here: a helper
    function called per row is not inlined, and is much slower (docs/bench.md)."""
    d, D, H, W = x.shape
    rows = d * D * H
    zero = cx - cx
    for m in prange(partial.shape[0]):
        col = cols[m]
        for n in range(*_chunk_rows(m, rows)):
            c, k, i = n // (D * H), (n // H) % D, n % H
            kp, km, ip, im = min(k + 1, D - 1), max(k - 1, 0), min(i + 1, H - 1), max(i - 1, 0)
            tz = cz if k < D - 1 else zero
            bz = cz if k > 0 else zero
            ty = cy if i < H - 1 else zero
            by = cy if i > 0 else zero
            xr, xyp, xym, xzp, xzm, o = x[c, k, i], x[c, k, ip], x[c, k, im], x[c, kp, i], x[c, km, i], out[c, k, i]
            for j in range(W):  # the terms across rows and slices (ty ... bz vanish at the borders)
                o[j] = xr[j] - w * (ty * (xyp[j] - xr[j]) - by * (xr[j] - xym[j]) + tz * (xzp[j] - xr[j])
                                    - bz * (xr[j] - xzm[j]))
            if W > 1:  # along the row: one-sided at both ends
                o[0] -= w * cx * (xr[1] - xr[0])
                for j in range(1, W - 1):
                    o[j] -= w * cx * ((xr[j + 1] - xr[j]) - (xr[j] - xr[j - 1]))
                o[W - 1] += w * cx * (xr[W - 1] - xr[W - 2])
            _add_products(col, xr, o)
        partial[m] = _drain(col)


# The point-wise passes of the CG see the fields as (rows, W): no neighbours needed. Their
# sums go by chunks of _CHUNK_ROWS rows as in _helmholtz.
@njit(**_opts)
def _cg_start(u, ad, r, dv, cols, partial, partial_u):
    """``r = dv = u - ad``; ``partial[m]``, ``partial_u[m]``: chunk m's ``sum(r * r)``, ``sum(u * u)``."""
    rows = u.shape[0]
    for m in prange(partial.shape[0]):
        col = cols[m]
        for n in range(*_chunk_rows(m, rows)):
            ur, ar, rr, dr = u[n], ad[n], r[n], dv[n]
            for j in range(u.shape[1]):
                e = ur[j] - ar[j]
                rr[j] = e
                dr[j] = e
                col[j] += e * e
        partial[m] = _drain(col)
        for n in range(*_chunk_rows(m, rows)):
            _add_products(col, u[n], u[n])
        partial_u[m] = _drain(col)


@njit(**_opts)
def _cg_update(x, r, dv, ad, alpha, cols, partial):
    """``x += alpha dv``, ``r -= alpha ad``; ``partial[m]`` = chunk m's ``sum(r * r)``."""
    rows = x.shape[0]
    for m in prange(partial.shape[0]):
        col = cols[m]
        for n in range(*_chunk_rows(m, rows)):
            xr, rr, dr, ar = x[n], r[n], dv[n], ad[n]
            for j in range(x.shape[1]):
                xr[j] += alpha * dr[j]
                e = rr[j] - alpha * ar[j]
                rr[j] = e
                col[j] += e * e
        partial[m] = _drain(col)


@njit(**_opts)
def _cg_direction(dv, r, beta):
    """``dv = r + beta dv``."""
    for n in prange(dv.shape[0]):
        dr, rr = dv[n], r[n]
        for j in range(dv.shape[1]):
            dr[j] = rr[j] + beta * dr[j]


def quadratic_cg(u: np.ndarray, x: np.ndarray, weight: float, n_iter: int, spacing, tol: float) -> np.ndarray:
    """Conjugate gradients for ``(I - weight lap) v = u`` from ``x``, which is updated in
    place and returned: the fused form of :class:`varreg.denoisers.Quadratic` (same
    steps and stopping rule).

    ``u``, ``x``: ``(d, *spatial)`` (2-D or 3-D), C-contiguous, of one float dtype. Dot
    products sum in float64 by fixed chunks of rows, then over the chunks in order: the
    result does not depend on the thread count.
    """
    nd = u.ndim - 1
    if nd not in (2, 3) or x.shape != u.shape:
        raise ValueError(f"quadratic_cg takes u and x of one shape (d, H, W) or (d, D, H, W), got {u.shape}, {x.shape}")
    if not (x.flags.c_contiguous and x.dtype == u.dtype):
        raise ValueError("quadratic_cg needs a C-contiguous x of u's dtype (it is updated in place)")
    f = u.dtype.type
    shape4 = u.shape if nd == 3 else (u.shape[0], 1, *u.shape[1:])
    u4 = np.ascontiguousarray(u).reshape(shape4)
    x4 = x.reshape(shape4)
    c = [f(1.0 / h**2) for h in spacing]
    cz, cy, cx = ([f(0.0)] + c) if nd == 2 else c
    ad, r, dv = np.empty_like(u4), np.empty_like(u4), np.empty_like(u4)
    rows = shape4[0] * shape4[1] * shape4[2]
    flat = lambda a: a.reshape(rows, shape4[3])  # noqa: E731  (rows, W) views for the point-wise passes
    chunks = -(-rows // _CHUNK_ROWS)
    cols = np.zeros((chunks, shape4[3]), np.float64)  # each kernel leaves it zeroed
    partial, partial_u = np.empty(chunks, np.float64), np.empty(chunks, np.float64)
    nvox = u[0].size
    _run(_helmholtz, nvox, x4, ad, f(weight), cz, cy, cx, cols, partial)
    _run(_cg_start, nvox, flat(u4), flat(ad), flat(r), flat(dv), cols, partial, partial_u)
    rr = partial.sum()
    stop = tol**2 * partial_u.sum() + 1e-30
    for _ in range(int(n_iter)):
        if rr <= stop:
            break
        _run(_helmholtz, nvox, dv, ad, f(weight), cz, cy, cx, cols, partial)
        alpha = rr / partial.sum()
        _run(_cg_update, nvox, flat(x4), flat(r), flat(dv), flat(ad), f(alpha), cols, partial)
        rr_new = partial.sum()
        _run(_cg_direction, nvox, flat(dv), flat(r), f(rr_new / rr))
        rr = rr_new
    return x


# --------------------------------------------------------- NCC: local affine fit after a global map
@njit(fastmath=_FASTMATH, cache=True, nogil=True)
def _map_moments(fixed, warped, coef, cutoff, low, sz, sy, sx, zpow, ypow, xpow, exps, inner, degree, moments,
                 cross):
    npow = moments.shape[0]
    ne = xpow.shape[1]
    row = np.empty((npow, ne))  # sum over a row of xpow[x, e] w^p, and of f xpow[x, e] w^p
    rowf = np.empty((degree + 1, ne))
    crow = np.empty((degree + 1, ne))
    for iz in range(zpow.shape[0]):
        for iy in range(ypow.shape[0]):
            row[:] = 0.0
            rowf[:] = 0.0
            if cutoff > 0.0:  # the map's coefficients along this row, per power of x
                crow[:] = 0.0
                for i in range(inner.shape[0]):
                    j = inner[i]
                    zy = zpow[iz, exps[j, 0]] * ypow[iy, exps[j, 1]]
                    for k in range(degree + 1):
                        crow[k, exps[j, 2]] += coef[k, i] * zy
            for ix in range(xpow.shape[0]):
                w = np.float64(warped[iz * sz, iy * sy, ix * sx])
                f = np.float64(fixed[iz * sz, iy * sy, ix * sx])
                pw = 1.0
                if cutoff > 0.0:  # Tukey's biweight of the residual of the map ``coef``
                    mapped = 0.0
                    for k in range(degree, -1, -1):
                        ck = 0.0
                        for e in range(ne):
                            ck += crow[k, e] * xpow[ix, e]
                        mapped = mapped * w + ck
                    r = (f - mapped) / cutoff
                    t = 1.0 - r * r
                    pw = max(t * t if t > 0.0 else 0.0, low)
                for p in range(npow):
                    for e in range(ne):
                        row[p, e] += xpow[ix, e] * pw
                    if p <= degree:
                        for e in range(ne):
                            rowf[p, e] += f * xpow[ix, e] * pw
                    pw *= w
            for j in range(exps.shape[0]):
                zy = zpow[iz, exps[j, 0]] * ypow[iy, exps[j, 1]]
                for p in range(npow):
                    moments[p, j] += zy * row[p, exps[j, 2]]
            for i in range(inner.shape[0]):
                j = inner[i]
                zy = zpow[iz, exps[j, 0]] * ypow[iy, exps[j, 1]]
                for p in range(degree + 1):
                    cross[p, i] += zy * rowf[p, exps[j, 2]]


def map_moments(fixed: np.ndarray, warped: np.ndarray, strides, pows, exps: np.ndarray, inner: np.ndarray,
                degree: int, coef: np.ndarray | None = None, cutoff: float = 0.0, low: float = 0.0):
    """The sums that the normal equations of :func:`varreg.data_terms.intensity_map_coefficients` need,
    over the voxels ``[::strides[0], ::strides[1], ::strides[2]]`` of ``fixed``, ``warped`` (``(*spatial)``
    float32, 2-D or 3-D, taken as ``(1, ny, nx)`` in 2-D), in one serial pass (a fixed order:
    reproducible): ``moments[p, j] = sum s m_j w^p`` for ``p <= 2 degree`` and ``cross[p, i] = sum s f
    m_inner[i] w^p`` for ``p <= degree``, float64. ``m_j = pows[0][iz, exps[j, 0]] pows[1][iy, exps[j, 1]]
    pows[2][ix, exps[j, 2]]``: ``pows`` the powers of each axis' coordinate at the sampled voxels
    (``(n_sampled, max_exponent + 1)`` float64), ``exps`` ``(n_mono, 3)`` int64. ``s``: 1, or with a
    ``cutoff > 0`` Tukey's biweight ``max((1 - (r / cutoff)^2)_+^2, low)`` of the residual ``r = f - p(x,
    w)`` of the map ``coef`` (``(degree + 1, len(inner))``, as the fit returns it)."""
    f3 = fixed.reshape((1,) * (3 - fixed.ndim) + fixed.shape)
    coef = np.zeros((degree + 1, len(inner))) if coef is None else np.ascontiguousarray(coef, np.float64)
    moments = np.zeros((2 * degree + 1, exps.shape[0]))
    cross = np.zeros((degree + 1, len(inner)))
    _map_moments(f3, warped.reshape(f3.shape), coef, float(cutoff), float(low), *strides, *pows, exps, inner,
                 int(degree), moments, cross)
    return moments, cross


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _map_row(rows, xs, z, y, cb):
    """The map's coefficients ``c_k`` along row ``(z, y)`` into ``cb`` ``(degree + 1, nx)``: ``c_k(x) = sum_e
    rows[k, e, z, y] xs[x]^e`` (Horner, independent across x)."""
    n, m, nx = rows.shape[0], rows.shape[1], cb.shape[1]
    for k in range(n):
        top = rows[k, m - 1, z, y]
        for x in range(nx):
            cb[k, x] = top
        for e in range(m - 2, -1, -1):
            r = rows[k, e, z, y]
            for x in range(nx):
                cb[k, x] = cb[k, x] * xs[x] + r


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _map_value(cb, x, w):
    """``p = sum_k cb[k, x] w^k`` and ``dp/dw`` (Horner)."""
    n = cb.shape[0]
    p = cb[n - 1, x]
    dp = np.float32(0.0)
    for k in range(n - 2, -1, -1):
        dp = dp * w + p
        p = p * w + cb[k, x]
    return p, dp


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _blend_rows(ab, z0, z1, wz, y0, y1, wy, row):
    """``row[c, :]``: the coarse ``ab[c]`` blended linearly along z, then y (the first two axes of the
    separable upsampling)."""
    for c in range(row.shape[0]):
        for cx in range(row.shape[1]):
            v0 = ab[c, z0, y0, cx] + wy * (ab[c, z0, y1, cx] - ab[c, z0, y0, cx])
            v1 = ab[c, z1, y0, cx] + wy * (ab[c, z1, y1, cx] - ab[c, z1, y0, cx])
            row[c, cx] = v0 + wz * (v1 - v0)


@njit(**_opts)
def _ncc_block_stats(fixed, warped, rows, xs, kz, ky, kx, prior, lz, hz, fz, ly, hy, fy, lx, hx, fx,
                     cutoff, floor, out):
    nz, ny, nx = fixed.shape
    nc, ncz, ncy, ncx = out.shape
    inv = 1.0 / (kz * ky * kx)
    weighted = cutoff > 0.0
    inv_cut = 1.0 / cutoff if weighted else 0.0
    for b in prange(ncz * ncy):
        cz = b // ncy
        cy = b - cz * ncy
        acc = np.zeros((nc, ncx))
        cb = np.empty((rows.shape[0], nx), np.float32)
        row = np.empty((2, prior.shape[3]), np.float32)
        for tz in range(kz):
            z = min(cz * kz + tz, nz - 1)
            for ty in range(ky):
                y = min(cy * ky + ty, ny - 1)
                _map_row(rows, xs, z, y, cb)
                if weighted:
                    _blend_rows(prior, lz[z], hz[z], fz[z], ly[y], hy[y], fy[y], row)
                for cx in range(ncx):
                    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = s8 = 0.0  # this row's part of the block
                    for tx in range(kx):
                        x = min(cx * kx + tx, nx - 1)
                        f = fixed[z, y, x]
                        m, _ = _map_value(cb, x, warped[z, y, x])
                        s0 += f
                        s1 += m
                        s2 += f * m
                        s3 += m * m
                        if weighted:  # Tukey's biweight of the prior local fit's residual, floored
                            x0, x1, wx = lx[x], hx[x], fx[x]
                            a = row[0, x0] + wx * (row[0, x1] - row[0, x0])
                            r = (a * m + row[1, x0] + wx * (row[1, x1] - row[1, x0]) - f) * inv_cut
                            t = max(1.0 - r * r, 0.0)
                            wt = max(t * t, floor)
                            s4 += wt * f
                            s5 += wt * m
                            s6 += wt * f * m
                            s7 += wt * m * m
                            s8 += wt
                    acc[0, cx] += s0
                    acc[1, cx] += s1
                    acc[2, cx] += s2
                    acc[3, cx] += s3
                    if weighted:
                        acc[4, cx] += s4
                        acc[5, cx] += s5
                        acc[6, cx] += s6
                        acc[7, cx] += s7
                        acc[8, cx] += s8
        for c in range(nc):
            for cx in range(ncx):
                out[c, cz, cy, cx] = acc[c, cx] * inv


def ncc_block_stats(fixed: np.ndarray, warped: np.ndarray, rows: np.ndarray, xs: np.ndarray, k,
                    prior: np.ndarray | None = None, cutoff: float = 0.0, floor: float = 0.0) -> np.ndarray:
    """Block means of ``F``, ``P``, ``F P`` and ``P P`` with ``P = p(x, warped)`` (``rows``, ``xs``: the map as
    :func:`varreg.data_terms.map_rows`): ``(4, *coarse)`` float32 over blocks of ``k`` voxels per axis, the last one
    completed by the border voxel; :func:`varreg.resample.block_mean` of the four products, in one pass.
    ``fixed``, ``warped``: ``(*spatial)`` float32, 2-D or 3-D. With ``prior`` (``(2, *coarse)``, a local fit
    ``a``, ``b`` on this grid, upsampled as :func:`ncc_combine` does) and ``cutoff > 0``: ``(9, *coarse)``, the
    four block means, then the same four with each voxel weighted by
    :func:`varreg.data_terms.local_fit_weights` of that fit's residual ``a P + b - F``, and the weight itself.
    """
    nd = fixed.ndim
    lead = (1,) * (3 - nd)
    k = lead + (int(k),) * nd
    f3 = fixed.reshape(lead + fixed.shape)
    w3 = warped.reshape(f3.shape)
    coarse = tuple(-(-n // kk) for n, kk in zip(f3.shape, k))
    weighted = prior is not None and cutoff > 0
    # unweighted: placeholders of the right types, unused
    prior3, idx = _coarse_upsampling(prior if weighted else np.zeros((2,) + (1,) * nd, np.float32), f3.shape,
                                     k if weighted else (1, 1, 1))
    nc = 9 if weighted else 4
    out = np.empty((nc, *coarse), np.float32)
    _run(_ncc_block_stats, fixed.size, f3, w3, rows, xs, *k, prior3, *idx,
         float(cutoff) if weighted else 0.0, float(floor), out)
    return out.reshape((nc, *coarse[3 - nd:]))


@njit(**_opts)
def _ncc_combine(ab, lz, hz, fz, ly, hy, fy, lx, hx, fx, fixed, warped, rows, xs, g, rho0, gg, eps, fitted):
    nz, ny, nx = fixed.shape
    nd = g.shape[0]
    ncx = ab.shape[3]
    for b in prange(nz * ny):
        z = b // ny
        y = b - z * ny
        z0, z1, wz = lz[z], hz[z], fz[z]
        y0, y1, wy = ly[y], hy[y], fy[y]
        row = np.empty((2, ncx), np.float32)  # the coarse row blended along z, then y (separable)
        cb = np.empty((rows.shape[0], nx), np.float32)
        _map_row(rows, xs, z, y, cb)
        _blend_rows(ab, z0, z1, wz, y0, y1, wy, row)
        for x in range(nx):
            x0, x1, wx = lx[x], hx[x], fx[x]
            a = row[0, x0] + wx * (row[0, x1] - row[0, x0])
            w = warped[z, y, x]
            f = fixed[z, y, x]
            m, dm = _map_value(cb, x, w)
            gain = a * dm
            fit = a * m + row[1, x0] + wx * (row[1, x1] - row[1, x0])
            fitted[z, y, x] = fit
            rho0[z, y, x] = fit - f - gain * (w - f - rho0[z, y, x])
            gg[z, y, x] = gain * gain * (gg[z, y, x] - eps) + eps
            for c in range(nd):
                g[c, z, y, x] = g[c, z, y, x] * gain


def _coarse_upsampling(ab: np.ndarray, shape3: tuple, ks: tuple):
    """A coarse fit ``(2, *coarse)`` as the kernels read it, ``(2, cz, cy, cx)`` float32, and the nine
    per-axis index arrays of its linear upsampling onto ``shape3`` (blocks of ``ks`` voxels)."""
    ab3 = np.ascontiguousarray(ab.reshape((2,) + (1,) * (len(shape3) + 1 - ab.ndim) + ab.shape[1:]), dtype=np.float32)
    return ab3, [t for n, nc, kk in zip(shape3, ab3.shape[1:], ks) for t in _upsample_index(n, nc, kk)]


@functools.lru_cache(maxsize=256)
def _upsample_index(n: int, nc: int, k: int):
    """Per output voxel along an axis of ``n``: the coarse neighbours and the blend weight (cached; read only by the kernels)."""
    pos = np.clip((np.arange(n, dtype=np.float64) + 0.5) / k - 0.5, 0.0, nc - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), nc - 1)
    return lo, np.minimum(lo + 1, nc - 1), (pos - lo).astype(np.float32)


def ncc_combine(ab: np.ndarray, k, fixed, warped, rows, xs, g, rho0, gg, eps: float) -> np.ndarray:
    """NCC's linearisation from the coarse local fit ``ab`` ``(2, *coarse)`` (``a``, ``b`` on
    :func:`ncc_block_stats`'s grid), upsampled linearly as :func:`varreg.resample.block_upsample`:
    ``fitted = a p + b`` (returned), and **in place** ``g *= a p'``, ``rho0 = fitted - F - a p' (W - F -
    rho0)``, ``gg = (a p')^2 (gg - eps) + eps``, with ``p = p(x, W)`` and ``p' = dp/dw`` the map of
    :func:`varreg.data_terms.map_rows` (``rows``, ``xs``). ``fixed``, ``warped``, ``rho0``, ``gg``: ``(*spatial)``; ``g``:
    ``(ndim, *spatial)``; float32."""
    nd = fixed.ndim
    lead = (1,) * (3 - nd)
    shape3 = lead + fixed.shape
    ab3, idx = _coarse_upsampling(ab, shape3, lead + (int(k),) * nd)
    fitted = np.empty(shape3, np.float32)
    _run(_ncc_combine, fixed.size, ab3, *idx, fixed.reshape(shape3), warped.reshape(shape3),
         rows, xs, g.reshape((nd,) + shape3), rho0.reshape(shape3), gg.reshape(shape3),
         np.float32(eps), fitted)
    return fitted.reshape(fixed.shape)


def warm_up() -> float:
    """Compile (or load from the cache) every kernel for float32 2D and 3D; returns seconds."""
    import time

    t0 = time.perf_counter()
    for shape in ((8, 8), (4, 4, 4)):
        d = len(shape)
        rng = np.random.default_rng(0)
        a = rng.random(shape, dtype=np.float32)
        u = np.zeros((d, *shape), np.float32)
        w, g, rho0, gg = warp_gradient(a, a, u, 1e-6)
        data_step(u, g, rho0, gg, 0.5, True)
        tv_dual(u, np.zeros((d, d, *shape), np.float32), 0.3, 0.2, 0.0, 1, (1.0,) * d, False)
        z = lambda k: np.zeros((d, k, *shape), np.float32)  # noqa: E731  (as denoisers.tgv_initial_state)
        tgv_steps(u, dict(v=u.copy(), vb=u.copy(), w=z(d), wb=z(d), p=z(d), q=z(d * (d + 1) // 2)),
                  0.3, 2.0, 0.2, 0.2, 1, (1.0,) * d)
        quadratic_cg(u + a, u.copy(), 0.3, 1, (1.0,) * d, 1e-6)
        rows = np.zeros((2, 1) + ((1,) * (3 - d) + shape)[:2], np.float32)
        rows[1] = 1.0  # p(x, w) = w
        xs = np.zeros(shape[-1], np.float32)
        map_moments(a, a, (1, 1, 1), (np.ones((1, 1)), np.ones((shape[-2], 1)), np.ones((shape[-1], 1))),
                    np.zeros((1, 3), np.int64), np.zeros(1, np.int64), 1)
        ab = ncc_block_stats(a, a, rows, xs, 2)[:2]
        ncc_block_stats(a, a, rows, xs, 2, ab, 0.5, 1e-3)
        ncc_combine(ab, 2, a, w, rows, xs, g, rho0, gg, 1e-6)
    return time.perf_counter() - t0

