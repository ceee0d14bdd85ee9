"""Algorithm 1 of the paper, written once: Gauss-Newton warps around variable-splitting iterations.

One scale of the solver (the coarse-to-fine driver lives in :mod:`varreg.pyramid`)::

    for w in warps:                         # outer loop: warping layer (WL)
        I1w, g = warp(I1, u_w), grad(I1w)   # linearise the data term around u_w
        for k in iterations:                # inner loop, one "cascade" each
            u = data_step(v, ...; theta_c)  # intensity-consistency layer (ICL)
            v = denoiser_c(u, lam/theta_c)  # denoising layer (DL / GDL)
        u_w = v

The same function serves the classical solver (NumPy with numba kernels, CuPy)
and VR-Net (torch tensors, learned per-cascade ``theta`` and U-Net denoisers).
The denoised ``v`` is both the next linearisation point and the result: it is
the regularised field.
"""
from __future__ import annotations

from .data_terms import linearise

__all__ = ["solve"]


def _per_cascade(value, n: int, what: str):
    """A length-``n`` list from one value (float, 0-d array, callable) or a sequence of ``n``
    (list, tuple, 1-D array or tensor, ``nn.ModuleList``)."""
    if getattr(value, "ndim", None) == 0 or not hasattr(value, "__len__"):
        return [value] * n
    items = list(value)
    if len(items) != n:
        raise ValueError(f"{what}: got {len(items)} values for {n} cascades (warps x iterations)")
    return items


def solve(fixed, moving, u, *, data_term, denoiser, theta, lam: float, n_warps: int, n_iters: int, ndim: int,
          callback=None):
    """Run Algorithm 1 at one scale and return the displacement.

    Parameters
    ----------
    fixed, moving : arrays ``(*batch, *spatial)``, one backend.
    u : initial displacement ``(*batch, ndim, *spatial)``, voxel units.
    data_term : object with ``eps`` and ``step(v, g, rho0, gg, theta)`` (:mod:`varreg.data_terms`).
    denoiser : ``denoiser(u, weight) -> v``, or one per cascade (sequence of ``n_warps * n_iters``).
    theta : penalty weight ``theta > 0``, or one per cascade.
    lam : regularisation weight ``lambda``; the denoiser gets ``weight = lam / theta``.
    n_warps, n_iters : outer (Gauss-Newton) and inner (splitting) iteration counts.
    ndim : 2 or 3 spatial axes.
    callback : optional ``callback(warp_index, iter_index, u, v)``.

    Returns
    -------
    ``v``, shape of ``u``: the denoised displacement after the last cascade.
    """
    n = n_warps * n_iters
    thetas = _per_cascade(theta, n, "theta")
    denoisers = _per_cascade(denoiser, n, "denoiser")
    for d in {id(d): d for d in denoisers}.values():
        if hasattr(d, "reset"):
            d.reset()
    v = u
    c = 0
    for w in range(n_warps):
        _, g, rho0, gg = linearise(fixed, moving, v, ndim, data_term.eps)
        for k in range(n_iters):
            th = thetas[c]
            u = data_term.step(v, g, rho0, gg, th)
            v = denoisers[c](u, lam / th)
            if callback is not None:
                callback(w, k, u, v)
            c += 1
    return v
