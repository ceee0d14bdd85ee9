"""Algorithm 1 of the paper, written once: Gauss-Newton warps around variable-splitting iterations,
and the two plug-in protocols it runs on, :class:`DataTerm` and :class:`Denoiser`.

One scale of the solver (the coarse-to-fine driver lives in :mod:`varreg.pyramid`)::

    for w in warps:                              # outer loop: warping layer (WL)
        lin = data_term.linearise(I0, I1, u_w)   # warp I1 by u_w, linearise the data term around u_w
        for k in iterations:                     # inner loop, one "cascade" each
            u = data_term.step(v, lin, theta_c)  # intensity-consistency layer (ICL), point-wise
            v = denoiser_c(u, lam / theta_c)     # denoising layer (DL / GDL)
        u_w = v

The same function serves the classical solver (NumPy with numba kernels, CuPy)
and VR-Net (torch tensors, learned per-cascade ``theta`` and U-Net denoisers).
The denoised ``v`` is both the next linearisation point and the result: it is
the regularised field.

Shapes and units
----------------
Images ``fixed`` (I0) and ``moving`` (I1) are ``(*batch, *spatial)`` with 2 or
3 spatial axes (no batch axes for NumPy/CuPy, a leading batch axis for VR-Net's
tensors). Displacements ``u``, ``v`` are ``(*batch, ndim, *spatial)`` in voxels of
the fixed grid, pull-back: ``moving(x + u(x))`` is compared with ``fixed(x)``.
Everything stays in the arrays' own namespace (NumPy, CuPy, torch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = ["solve", "DataTerm", "Denoiser", "Weights"]


@dataclass(frozen=True)
class Weights:
    """Default weights of a data term, for intensities scaled to [0, 1] (``normalise=True``).

    theta : penalty of the splitting, ``theta/2 |u - v|^2``.
    lam : weight of the regulariser of the pyramid's warps; the denoiser gets ``lam / theta``.
    refine_lam : weight of the refinement warps (``refine`` in :class:`varreg.options.SolverOptions`).
    """

    theta: float
    lam: float
    refine_lam: float


@runtime_checkable
class DataTerm(Protocol):
    """A similarity measure in the splitting: its linearisation and its point-wise u-step.

    ``name``: a short name (recorded in the run information). ``weights``: its
    default :class:`Weights`, or ``None`` (then ``theta`` and ``lam`` must be
    given). The engine never looks inside the linearisation: a data term may
    keep there whatever its step needs (the warped image, its gradient, local
    statistics).

    May also define ``prepare(fixed, moving, ndim) -> (fixed', moving')``: the images
    the linearisation works on, computed once per call of :func:`solve` (per
    pyramid level), e.g. locally standardised intensities (:class:`varreg.data_terms.NCC`), and
    ``reset()``, called with it: to drop what one warp left for the next (:class:`varreg.data_terms.NCC`'s
    previous intensity map), as a :class:`Denoiser`'s.
    """

    name: str
    weights: Weights | None

    def linearise(self, fixed, moving, u, ndim: int) -> Any:
        """Warp ``moving`` by ``u`` and linearise the data term around ``u``.

        ``fixed``, ``moving``: ``(*batch, *spatial)``; ``u``: ``(*batch, ndim, *spatial)``, voxels.
        Returns an object that :meth:`step` takes.
        """

    def step(self, v, lin, theta):
        """The u-step: ``argmin_u rho_lin(u) + theta/2 |v - u|^2``, point-wise, closed form.

        ``v``: ``(*batch, ndim, *spatial)``, voxels; ``lin``: what :meth:`linearise` returned;
        ``theta``: a positive float or a 0-d tensor. Returns ``u`` of the shape of ``v``.
        """


@runtime_checkable
class Denoiser(Protocol):
    """The v-step: ``v = argmin_v R(v) + |v - u|^2 / (2 weight)``, ``weight = lam / theta``.

    ``u`` and ``v`` are displacements ``(ndim, *spatial)`` (or ``(*batch, ndim,
    *spatial)`` on torch) in voxels, on the array's own backend; ``weight`` is a
    positive float (or a 0-d tensor). A plain function is a denoiser. An object
    may also define ``reset()``, which :func:`solve` calls before its first
    cascade (once per pyramid level), to drop warm-start state.
    """

    def __call__(self, u, weight): ...


def _per_cascade(value, n: int, what: str):
    """A length-``n`` list from one value (float, 0-d array, callable) or a sequence of ``n``
    (list, tuple, 1-D array or tensor, ``nn.ModuleList``)."""
    if getattr(value, "ndim", None) == 0 or not hasattr(value, "__len__"):
        return [value] * n
    items = list(value)
    if len(items) != n:
        raise ValueError(f"{what}: got {len(items)} values for {n} cascades (warps x iterations)")
    return items


def solve(fixed, moving, u, *, data_term: DataTerm, denoiser, theta, lam: float, n_warps: int, n_iters: int,
          ndim: int, callback=None):
    """Run Algorithm 1 at one scale and return the displacement.

    Parameters
    ----------
    fixed, moving : arrays ``(*batch, *spatial)``, one backend.
    u : initial displacement ``(*batch, ndim, *spatial)``, voxel units.
    data_term : a :class:`DataTerm` (:mod:`varreg.data_terms`).
    denoiser : a :class:`Denoiser`, or one per cascade (sequence of ``n_warps * n_iters``).
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
    if hasattr(data_term, "reset"):
        data_term.reset()
    prepare = getattr(data_term, "prepare", None)
    if prepare is not None:
        fixed, moving = prepare(fixed, moving, ndim)
    v = u
    c = 0
    for w in range(n_warps):
        lin = data_term.linearise(fixed, moving, v, ndim)
        for k in range(n_iters):
            th = thetas[c]
            u = data_term.step(v, lin, th)
            v = denoisers[c](u, lam / th)
            if callback is not None:
                callback(w, k, u, v)
            c += 1
    return v
