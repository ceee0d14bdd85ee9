"""Denoisers for the v-step, and the plug-in protocol for new regularisers.

The v-step of the splitting (paper eq. 7) minimises
``lambda R(v) + theta/2 |v - u|^2``; dividing by ``lambda`` it is the denoising
problem

    v = argmin_v  R(v) + |v - u|^2 / (2 weight),     weight = lambda / theta.

Plug-in protocol (:class:`varreg.engine.Denoiser`)
---------------------------------------------------
A denoiser is any callable ``denoiser(u, weight) -> v`` where ``u`` and ``v``
are displacements of shape ``(ndim, *spatial)`` (or ``(*batch, ndim, *spatial)``
on torch), in voxel units, on the array's own backend, and ``weight`` is the
positive float above. That is all a plain function needs. An object may also
define ``reset()``, which the engine calls at the start of every pyramid level,
to drop warm-start state (the TV family keeps its dual variable between calls).
A new built-in regulariser is a class here, added to :data:`DENOISERS`; its
``default_iterations`` is the step count the solver gives it per call.

Built-in: :class:`TV` (ROF by Chambolle's dual projection, per component or
vectorial), :class:`Huber` (Huber-ROF), :class:`TGV` (second-order total
generalised variation, which does not penalise affine motion) and
:class:`Quadratic` (diffusion, ``R = |grad v|^2 / 2``, solved by conjugate
gradients).
"""
from __future__ import annotations

import numpy as np
from array_api_compat import device as array_device

from .backend import host_float, namespace, spatial_ndim, takes_kernel
from .differences import _take, divergence, forward_difference, laplacian

__all__ = ["TV", "VectorialTV", "Huber", "TGV", "Quadratic", "DENOISERS", "make_denoiser"]


class TV:
    """ROF denoiser: ``R(v) = sum |grad v_c|`` (or the vectorial ``|grad v|_F``).

    Chambolle's dual projection (Chambolle 2004; the projected form used by
    Zach et al. 2007): ``v = u + weight div p``, ``p <- proj(p + tau/weight grad v)``.
    The dual ``p`` is kept between calls (warm start) and dropped by :meth:`reset`.

    Parameters
    ----------
    n_iter : dual steps per call (default :attr:`default_iterations`).
    coupled : False for the TV of each component (TV-L1 of Zach et al.),
        True for the vectorial TV that couples the components (:class:`VectorialTV`).
    spacing : relative grid step per axis (anisotropic voxels), default 1.
    tau : dual step; default ``0.99 / (2 sum 1/h^2)``, the convergence bound.
    """

    alpha = 0.0
    default_iterations = 2

    def __init__(self, n_iter: int | None = None, *, coupled: bool = False, spacing=None, tau: float | None = None):
        n_iter = self.default_iterations if n_iter is None else n_iter
        if n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {n_iter}")
        self.n_iter = int(n_iter)
        self.coupled = bool(coupled)
        self.spacing = None if spacing is None else tuple(float(h) for h in spacing)
        self.tau = tau
        self._p = None

    def reset(self):
        self._p = None

    def _tau(self, ndim, spacing):
        if self.tau is not None:
            return float(self.tau)
        return 0.99 / (2.0 * sum(1.0 / h**2 for h in spacing))

    def __call__(self, u, weight):
        weight = host_float(weight)
        ndim = spatial_ndim(u)
        spacing = self.spacing or (1.0,) * ndim
        xp = namespace(u)
        shape = (*u.shape[: u.ndim - ndim], ndim, *u.shape[u.ndim - ndim:])
        if self._p is None or tuple(self._p.shape) != shape or namespace(self._p) is not xp:
            self._p = xp.zeros(shape, dtype=u.dtype, device=array_device(u))
        tau = self._tau(ndim, spacing)
        if takes_kernel(u, ndim, weight):
            from . import kernels

            return kernels.tv_dual(np.ascontiguousarray(u), self._p, float(weight), tau, self.alpha, self.n_iter, spacing, self.coupled)
        v, self._p = tv_dual_steps(u, self._p, weight, tau, self.alpha, self.n_iter, spacing, self.coupled)
        return v


def tv_dual_steps(u, p, weight, tau, alpha, n_iter, spacing, coupled):
    """Generic (array-API) (Huber-)ROF dual steps; the reference for the numba kernel.

    ``u`` shape ``(..., d, *spatial)``, ``p`` shape ``(..., d, ndim, *spatial)``.
    Returns ``(v, p)``.
    """
    xp = namespace(u, p)
    ndim = spatial_ndim(u)
    h = tuple(spacing)
    step = tau / weight
    shrink = 1.0 / (1.0 + tau * alpha / weight)
    v = u + weight * divergence(p, ndim, h)
    daxis = u.ndim - ndim  # the ndim (direction) axis of p
    for _ in range(n_iter):
        p = (p + step * forward_difference(v, ndim, h)) * shrink
        sq = xp.sum(p * p, axis=daxis, keepdims=True)
        if coupled:
            sq = xp.sum(sq, axis=daxis - 1, keepdims=True)
        p = p / xp.maximum(xp.sqrt(sq), xp.ones_like(sq))
        v = u + weight * divergence(p, ndim, h)
    return v, p


class VectorialTV(TV):
    """Vectorial TV, ``R(v) = |grad v|_F``: :class:`TV` with the components coupled."""

    def __init__(self, n_iter: int | None = None, *, spacing=None, tau: float | None = None):
        super().__init__(n_iter, coupled=True, spacing=spacing, tau=tau)


class Huber(TV):
    """Huber-ROF denoiser: TV with the corner rounded off, quadratic below ``alpha``.

    ``R(v) = sum H_alpha(|grad v_c|)``, ``H_alpha(t) = t^2/(2 alpha)`` for
    ``t <= alpha`` and ``t - alpha/2`` above (Chambolle & Pock 2011, sec. 6.2.2):
    its dual adds ``alpha/2 |p|^2``, a shrink of the dual step. Reduces the
    staircasing of TV. ``alpha`` is in voxel units of displacement per voxel.
    """

    def __init__(self, alpha: float = 0.05, n_iter: int | None = None, *, coupled: bool = False, spacing=None,
                 tau=None):
        super().__init__(n_iter, coupled=coupled, spacing=spacing, tau=tau)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)


class TGV:
    """TGV-ROF denoiser: second-order total generalised variation of each component.

    ``R(v) = sum_c min_w |grad v_c - w_c| + beta |E(w_c)|_F`` with ``E`` the
    symmetrised gradient (Bredies, Kunisch & Pock 2010). Piecewise *affine*
    fields cost nothing inside their pieces, where TV charges every slope: a
    contracting or expanding ventricle is close to affine, and TGV-L1 optical
    flow recovers such motion better than TV-L1 (Ranftl, Bredies & Pock 2014).
    For piecewise-constant fields it equals TV, so ``lam`` keeps its meaning.

    Solved by the primal-dual algorithm of Chambolle & Pock (2011, Alg. 1) with
    dual ``p`` (``|p_c| <= 1``) and ``q`` (``|q_c|_F <= beta``), warm-started
    between calls (all state dropped by :meth:`reset`). Steps
    ``tau = sigma = 1 / sqrt(1 + 8 sum 1/h^2)``, from ``|K|^2 <= 2 |grad|^2 + 1``
    and ``|grad|^2 <= 4 sum 1/h^2``.

    Parameters
    ----------
    beta : weight of the second-order term relative to the first (``alpha0 /
        alpha1`` in Bredies et al.), in voxels; larger is closer to TV.
    n_iter : primal-dual steps per call (default :attr:`default_iterations`: with
        few steps per call TGV lags behind the warps more than TV does).
    spacing : relative grid step per axis, default 1.
    ratio : split of the step between primal and dual, ``tau = step / ratio``,
        ``sigma = step * ratio`` (``tau sigma |K|^2 <= 1`` holds for any ratio).
        With few steps per call it changes the result, like a weight.
    """

    default_iterations = 5

    def __init__(self, beta: float = 2.0, n_iter: int | None = None, *, spacing=None, ratio: float = 1.0):
        n_iter = self.default_iterations if n_iter is None else n_iter
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {n_iter}")
        if not ratio > 0:
            raise ValueError(f"ratio must be > 0, got {ratio}")
        self.beta, self.n_iter, self.ratio = float(beta), int(n_iter), float(ratio)
        self.spacing = None if spacing is None else tuple(float(h) for h in spacing)
        self._state = None

    def reset(self):
        self._state = None

    def __call__(self, u, weight):
        weight = host_float(weight)
        ndim = spatial_ndim(u)
        h = self.spacing or (1.0,) * ndim
        xp = namespace(u)
        fused = takes_kernel(u, ndim, weight)
        if fused:
            u = np.ascontiguousarray(u)
        st = self._state
        if st is None or tuple(st["v"].shape) != tuple(u.shape) or namespace(st["v"]) is not xp:
            st = self._state = tgv_initial_state(u, ndim)
        step = 1.0 / float(np.sqrt(1.0 + 8.0 * sum(1.0 / hh**2 for hh in h)))
        tau, sigma = step / self.ratio, step * self.ratio
        if fused:
            from . import kernels

            kernels.tgv_steps(u, st, float(weight), self.beta, tau, sigma, self.n_iter, h)
            return st["v"].copy()
        self._state = tgv_steps(u, st, weight, self.beta, tau, sigma, self.n_iter, h)
        return xp.asarray(self._state["v"], copy=True)


def tgv_initial_state(u, ndim: int) -> dict:
    """Primal ``v`` (= ``u``), ``w``, their extrapolations ``vb``, ``wb``, and duals ``p``, ``q`` (zeros).

    Shapes for ``u`` of shape ``(..., d, *spatial)``: ``v``, ``vb`` like ``u``;
    ``w``, ``wb``, ``p``: ``(..., d, ndim, *spatial)``; ``q``: ``(..., d, ndim (ndim + 1) / 2, *spatial)``.
    """
    xp = namespace(u)
    lead, spatial = tuple(u.shape[: u.ndim - ndim]), tuple(u.shape[u.ndim - ndim:])
    z = lambda k: xp.zeros((*lead, k, *spatial), dtype=u.dtype, device=array_device(u))  # noqa: E731
    return dict(v=xp.asarray(u, copy=True), vb=xp.asarray(u, copy=True), w=z(ndim), wb=z(ndim), p=z(ndim), q=z(ndim * (ndim + 1) // 2))


def _sym_pairs(ndim):
    """Index pairs ``(j, k)`` of the stored entries of a symmetric matrix: the diagonal, then ``j < k``."""
    return [(j, j) for j in range(ndim)] + [(j, k) for j in range(ndim) for k in range(j + 1, ndim)]


def symmetrised_gradient(w, ndim: int, spacing=None):
    """``E(w) = (grad w + grad w^T) / 2`` by forward differences.

    ``w`` shape ``(..., ndim, *spatial)`` gives ``(..., ndim (ndim + 1) / 2, *spatial)``:
    the diagonal ``d_j w_j``, then ``(d_k w_j + d_j w_k) / 2`` for ``j < k``.
    """
    xp = namespace(w)
    caxis = w.ndim - ndim - 1
    g = forward_difference(w, ndim, spacing)  # (..., ndim [component j], ndim [derivative k], *spatial)
    entry = lambda j, k: _take(_take(g, caxis, j), caxis, k)  # noqa: E731  d_k w_j
    out = [entry(j, j) if j == k else 0.5 * (entry(j, k) + entry(k, j)) for j, k in _sym_pairs(ndim)]
    return xp.stack(out, axis=caxis)


def symmetrised_divergence(q, ndim: int, spacing=None):
    """Minus the adjoint of :func:`symmetrised_gradient` under the Frobenius pairing.

    ``q`` shape ``(..., ndim (ndim + 1) / 2, *spatial)`` (as that function returns)
    gives ``(..., ndim, *spatial)``: component ``j`` is ``sum_k D_k^- Q_jk``.
    """
    xp = namespace(q)
    caxis = q.ndim - ndim - 1
    index = {}
    for n, (j, k) in enumerate(_sym_pairs(ndim)):
        index[j, k] = index[k, j] = n
    rows = [xp.stack([_take(q, caxis, index[j, k]) for k in range(ndim)], axis=caxis) for j in range(ndim)]
    return xp.stack([divergence(r, ndim, spacing) for r in rows], axis=caxis)


def tgv_steps(u, state, weight, beta, tau, sigma, n_iter, spacing):
    """Generic (array-API) primal-dual steps of TGV-ROF; the reference for the numba kernel.

    ``state`` as :func:`tgv_initial_state` makes it; returns the updated state
    (a new dict). Dual ascent with the extrapolated primal, projection of
    ``p_c`` onto the unit ball and of ``q_c`` onto the ``beta`` ball of the
    Frobenius norm (off-diagonal entries counted twice), then the primal steps:
    the proximal step of ``|v - u|^2 / (2 weight)`` for ``v`` and a plain step
    for ``w``.
    """
    xp = namespace(u)
    ndim = spatial_ndim(u)
    h = tuple(spacing)
    v, vb, w, wb, p, q = (state[k] for k in ("v", "vb", "w", "wb", "p", "q"))
    caxis = u.ndim - ndim  # component axis of p, w, q
    off = xp.asarray([1.0] * ndim + [2.0] * (ndim * (ndim - 1) // 2), dtype=u.dtype, device=array_device(u))
    off = xp.reshape(off, (-1,) + (1,) * ndim)
    one = 1.0 + tau / weight
    for _ in range(n_iter):
        p = p + sigma * (forward_difference(vb, ndim, h) - wb)
        npn = xp.sqrt(xp.sum(p * p, axis=caxis, keepdims=True))
        p = p / xp.maximum(npn, xp.ones_like(npn))
        q = q + sigma * symmetrised_gradient(wb, ndim, h)
        nq = xp.sqrt(xp.sum(off * q * q, axis=caxis, keepdims=True)) / beta
        q = q / xp.maximum(nq, xp.ones_like(nq))
        v_new = (v + tau * divergence(p, ndim, h) + (tau / weight) * u) / one
        w_new = w + tau * (p + symmetrised_divergence(q, ndim, h))
        vb, wb = 2.0 * v_new - v, 2.0 * w_new - w
        v, w = v_new, w_new
    return dict(v=v, vb=vb, w=w, wb=wb, p=p, q=q)


class Quadratic:
    """Diffusion regulariser ``R(v) = |grad v|^2 / 2``: solves ``(I - weight Lap) v = u``.

    Conjugate gradients on the Neumann Laplacian, warm-started from the last
    solution (dropped by :meth:`reset`); ``n_iter`` CG steps per call (default
    :attr:`default_iterations`; warm starts across the warps make a few enough).
    """

    default_iterations = 2

    def __init__(self, n_iter: int | None = None, *, spacing=None, tol: float = 1e-6):
        n_iter = self.default_iterations if n_iter is None else n_iter
        if n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {n_iter}")
        self.n_iter = int(n_iter)
        self.spacing = None if spacing is None else tuple(float(h) for h in spacing)
        self.tol = float(tol)
        self._v = None

    def reset(self):
        self._v = None

    def __call__(self, u, weight):
        weight = host_float(weight)
        ndim = spatial_ndim(u)
        xp = namespace(u)
        h = self.spacing or (1.0,) * ndim
        warm = self._v is not None and tuple(self._v.shape) == tuple(u.shape) and namespace(self._v) is xp
        if takes_kernel(u, ndim, weight):
            from . import kernels

            u = np.ascontiguousarray(u)
            # the kernel updates its start in place: our own state, or a copy of the input
            x = np.array(self._v, dtype=u.dtype, order="C", copy=None) if warm else u.copy()
            self._v = kernels.quadratic_cg(u, x, float(weight), self.n_iter, h, self.tol)
            return self._v.copy()

        def apply(x):
            return x - weight * laplacian(x, ndim, h)

        x = self._v if warm else u
        r = u - apply(x)
        d = r
        rr = xp.sum(r * r)
        stop = self.tol**2 * xp.sum(u * u) + 1e-30
        for _ in range(self.n_iter):
            if float(rr) <= float(stop):
                break
            ad = apply(d)
            alpha = rr / xp.sum(d * ad)
            x = x + alpha * d
            r = r - alpha * ad
            rr_new = xp.sum(r * r)
            d = r + (rr_new / rr) * d
            rr = rr_new
        self._v = x
        return x


#: name -> class; ``cls(n_iter=None, spacing=...)`` builds one with its defaults
DENOISERS = {"tv": TV, "tv-vectorial": VectorialTV, "huber": Huber, "tgv": TGV, "quadratic": Quadratic}


def make_denoiser(spec, *, spacing=None, n_iter=None):
    """A denoiser from a name in :data:`DENOISERS` (``n_iter``: steps per call, ``None`` for the
    class's ``default_iterations``) or a callable following the protocol (returned as is)."""
    if isinstance(spec, str):
        key = spec.lower()
        if key not in DENOISERS:
            raise ValueError(f"unknown denoiser {spec!r}; choose one of {sorted(DENOISERS)} or pass a callable")
        return DENOISERS[key](n_iter=n_iter, spacing=spacing)
    if not callable(spec):
        raise TypeError(f"denoiser must be a name or a callable denoiser(u, weight) -> v, got {type(spec).__name__}")
    return spec
