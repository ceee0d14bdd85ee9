"""Evaluation metrics for deformable registration: label overlap, surface distances
and the regularity of a displacement field.

Conventions (as in the rest of :mod:`varreg`):

* a displacement ``u`` has shape ``(ndim, *spatial)`` with ``ndim`` 2 or 3, is given
  in voxel units, and component ``i`` lies along array axis ``i``; it pulls back:
  ``warped(x) = moving(x + u(x))``;
* label maps are integer arrays of shape ``spatial``; label 0 is background;
* ``spacing`` is a per-axis tuple of physical voxel sizes (default all 1.0), used
  wherever a result is a physical distance.

Every function is pure and computes on the CPU: NumPy, CuPy and torch inputs are
accepted and converted with :func:`varreg.backend.to_numpy` at the entry. Scalars
come back as Python ``float``; the Jacobian determinant comes back as a NumPy array.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .backend import to_numpy
from .differences import central_gradient

__all__ = [
    "dice",
    "hausdorff",
    "hd95",
    "jacobian_determinant",
    "folding_fraction",
    "jacobian_gradient_magnitude",
    "endpoint_error",
    "label_metrics",
    "displacement_metrics",
]


# --------------------------------------------------------------------------- helpers
def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}")


def _as_labels(a, name: str) -> np.ndarray:
    """A label map as an integer (or bool) NumPy array; integral floats are accepted."""
    a = to_numpy(a)
    a = np.asarray(a)
    if a.dtype == bool or np.issubdtype(a.dtype, np.integer):
        return a
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ValueError(f"{name} must be an integer label map; got dtype {a.dtype} with non-integer values")
        return a.astype(np.int64)
    raise ValueError(f"{name} must be an integer label map, got dtype {a.dtype}")


def _check_spacing(spacing, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    try:
        sp = tuple(float(s) for s in spacing)
    except TypeError:
        raise ValueError(f"spacing must be a sequence of {ndim} positive numbers, got {spacing!r}") from None
    if len(sp) != ndim:
        raise ValueError(f"spacing must have one entry per spatial axis ({ndim}), got {len(sp)}: {sp}")
    if not all(s > 0 and math.isfinite(s) for s in sp):
        raise ValueError(f"spacing entries must be finite and positive, got {sp}")
    return sp


def _as_displacement(u, name: str = "u") -> np.ndarray:
    """A displacement as a float NumPy array of shape ``(ndim, *spatial)``."""
    u = np.asarray(to_numpy(u))
    if u.ndim < 1 or u.shape[0] not in (2, 3) or u.ndim != u.shape[0] + 1:
        raise ValueError(
            f"{name} must have shape (ndim, *spatial) with ndim 2 or 3 spatial axes, got shape {u.shape}"
        )
    if not np.issubdtype(u.dtype, np.floating):
        u = u.astype(np.float64)
    return u


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of ``mask``: voxels of the mask with a face neighbour outside it.

    Outside the grid counts as outside the mask, so mask voxels on the grid's
    border are surface voxels.
    """
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, iterations=1, border_value=0)
    return mask & ~eroded


# --------------------------------------------------------------------------- labels
def dice(a, b, labels=None) -> dict[int, float]:
    """Per-label Dice coefficient of two label maps.

    Parameters
    ----------
    a, b : array of int, shape ``spatial``
        Label maps (0 is background). Floating arrays are accepted when their
        values are integral.
    labels : iterable of int, optional
        Labels to score. Default: every nonzero label present in ``a`` or ``b``,
        in increasing order.

    Returns
    -------
    dict[int, float]
        ``{label: 2 |A ∩ B| / (|A| + |B|)}`` with ``A = (a == label)`` and
        ``B = (b == label)``; ``nan`` for a label absent from both maps, ``0.0``
        for a label present in only one.

    Raises
    ------
    ValueError
        If ``a`` and ``b`` differ in shape.
    """
    a = _as_labels(a, "a")
    b = _as_labels(b, "b")
    _check_same_shape(a, b, "a", "b")
    if labels is None:
        present = np.union1d(np.unique(a), np.unique(b))
        labels = [int(v) for v in present if v != 0]
    out: dict[int, float] = {}
    for lab in labels:
        lab = int(lab)
        ma = a == lab
        mb = b == lab
        total = int(np.count_nonzero(ma)) + int(np.count_nonzero(mb))
        if total == 0:
            out[lab] = float("nan")
        else:
            out[lab] = 2.0 * int(np.count_nonzero(ma & mb)) / total
    return out


def hausdorff(a, b, label, spacing=None, percentile=100) -> float:
    """Symmetric (percentile) Hausdorff distance between the surfaces of one label.

    The surface of a mask is the set of its voxels with a face neighbour
    (4-connectivity in 2-D, 6-connectivity in 3-D) outside the mask; the grid's
    outside counts as outside. Distances are Euclidean between voxel centres in
    physical units, from :func:`scipy.ndimage.distance_transform_edt` with
    ``sampling=spacing``.

    Parameters
    ----------
    a, b : array, shape ``spatial``
        Label maps (or binary masks).
    label : int or None
        The label compared: masks ``a == label`` and ``b == label``. ``None``
        uses ``a != 0`` and ``b != 0`` (binary masks).
    spacing : sequence of float, length ``ndim``, optional
        Physical voxel size per axis; default 1 (distances in voxels).
    percentile : float in [0, 100], default 100
        100 gives the Hausdorff distance (max of both directed maxima). Otherwise
        the percentile of the pooled directed distances, i.e. of the
        concatenation of the distances from every surface voxel of ``a`` to the
        surface of ``b`` and from every surface voxel of ``b`` to the surface of
        ``a`` (as MedPy's ``hd95`` for ``percentile=95``).

    Returns
    -------
    float
        Distance in the units of ``spacing``; ``nan`` when both masks are empty,
        ``inf`` when exactly one is.

    Raises
    ------
    ValueError
        If ``a`` and ``b`` differ in shape, ``spacing`` does not match their
        number of axes, or ``percentile`` is outside [0, 100].
    """
    a = np.asarray(to_numpy(a))
    b = np.asarray(to_numpy(b))
    _check_same_shape(a, b, "a", "b")
    if a.ndim == 0:
        raise ValueError(f"a and b must have at least one spatial axis, got shape {a.shape}")
    sp = _check_spacing(spacing, a.ndim)
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must lie in [0, 100], got {percentile}")
    if label is None:
        ma, mb = a != 0, b != 0
    else:
        ma, mb = a == label, b == label
    return _hausdorff_masks(ma, mb, sp, (percentile,))[0]


def _hausdorff_masks(ma: np.ndarray, mb: np.ndarray, sp, percentiles) -> list[float]:
    """Symmetric Hausdorff distances of two boolean masks, one per entry of ``percentiles`` (100: the maximum).

    The surfaces and distance transforms are computed once, on the bounding box
    of the two masks plus one voxel: it holds every surface voxel, and a crop
    edge is either a grid edge (outside counts as outside, as on the whole grid)
    or one voxel away from every mask voxel, so the distances equal those of
    the whole grid.
    """
    na, nb = bool(ma.any()), bool(mb.any())
    if not na and not nb:
        return [float("nan")] * len(percentiles)
    if na != nb:
        return [float("inf")] * len(percentiles)
    both = ma | mb
    box = []
    for ax in range(both.ndim):
        other = tuple(i for i in range(both.ndim) if i != ax)
        idx = np.flatnonzero(both.any(axis=other)) if other else np.flatnonzero(both)
        box.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, both.shape[ax])))
    box = tuple(box)
    sa, sb = _surface(ma[box]), _surface(mb[box])
    # distance from every surface voxel to the nearest surface voxel of the other mask
    d_ab = ndimage.distance_transform_edt(~sb, sampling=sp)[sa]
    d_ba = ndimage.distance_transform_edt(~sa, sampling=sp)[sb]
    out = []
    for q in percentiles:
        if q == 100:
            out.append(float(max(d_ab.max(), d_ba.max())))
        else:
            out.append(float(np.percentile(np.concatenate([d_ab, d_ba]), q)))
    return out


def hd95(a, b, label, spacing=None) -> float:
    """95th-percentile symmetric Hausdorff distance: ``hausdorff(a, b, label, spacing, 95)``.

    See :func:`hausdorff` for shapes, units and the empty-mask cases.
    """
    return hausdorff(a, b, label, spacing=spacing, percentile=95)


# --------------------------------------------------------------------------- displacements
def jacobian_determinant(u, spacing=None) -> np.ndarray:
    """Determinant of the Jacobian of the map ``x -> x + u(x)``.

    ``J = det(I + ∇u)`` with ``(∇u)_ij = ∂u_i/∂x_j`` from
    :func:`varreg.differences.central_gradient`: central differences
    ``(f[i+1] - f[i-1]) / 2`` with indices clamped to the grid, so the first and
    last samples along an axis get half a one-sided difference.

    Parameters
    ----------
    u : array, shape ``(ndim, *spatial)``, ndim 2 or 3
        Displacement in voxel units.
    spacing : sequence of float, length ``ndim``, optional
        Accepted for symmetry with the other metrics and checked, but it does not
        change the result: with ``u`` in voxels, the Jacobian in physical
        coordinates is ``S (I + ∇u) S⁻¹`` for the diagonal spacing matrix ``S``,
        which has the same determinant.

    Returns
    -------
    numpy.ndarray, shape ``spatial``
        Dimensionless determinant (float64 unless ``u`` is float32); 1 for no
        local volume change, ``<= 0`` where the map folds.

    Raises
    ------
    ValueError
        If ``u`` does not have shape ``(ndim, *spatial)`` with ndim 2 or 3, or
        ``spacing`` has the wrong length.
    """
    u = _as_displacement(u)
    ndim = u.shape[0]
    _check_spacing(spacing, ndim)
    g = central_gradient(u, ndim)  # (ndim, ndim, *spatial): g[i, j] = du_i/dx_j
    j = [[g[r, c] + (1.0 if r == c else 0.0) for c in range(ndim)] for r in range(ndim)]
    if ndim == 2:
        return j[0][0] * j[1][1] - j[0][1] * j[1][0]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


def folding_fraction(u, spacing=None) -> float:
    """Fraction of voxels where the map folds, ``det(I + ∇u) <= 0``.

    Parameters
    ----------
    u : array, shape ``(ndim, *spatial)``, voxel units.
    spacing : optional, accepted for symmetry; no effect (see :func:`jacobian_determinant`).

    Returns
    -------
    float in [0, 1].
    """
    det = jacobian_determinant(u, spacing=spacing)
    return float(np.count_nonzero(det <= 0) / det.size)


def jacobian_gradient_magnitude(u, spacing=None) -> float:
    """Mean over voxels of ``|∇ det(I + ∇u)|``, a smoothness measure ("mean |∇J|").

    The gradient of the determinant uses the same clamped central differences as
    :func:`jacobian_determinant`; the norm is Euclidean over the spatial axes.

    Parameters
    ----------
    u : array, shape ``(ndim, *spatial)``, voxel units.
    spacing : sequence of float, length ``ndim``, optional
        Default (``None``): the gradient is per voxel. Given: per physical unit
        (the determinant itself does not depend on spacing).

    Returns
    -------
    float, in 1/voxel (or 1/physical unit with ``spacing``); 0 for an affine
    field away from the border and for ``u = 0``.
    """
    u = _as_displacement(u)
    ndim = u.shape[0]
    sp = None if spacing is None else _check_spacing(spacing, ndim)
    det = jacobian_determinant(u)
    g = central_gradient(det, ndim, spacing=sp)  # (ndim, *spatial)
    return float(np.mean(np.sqrt(np.sum(g * g, axis=0))))


def endpoint_error(u, u_true, spacing=None, mask=None) -> float:
    """Mean endpoint error: the mean Euclidean norm of ``u - u_true``.

    Parameters
    ----------
    u, u_true : array, shape ``(ndim, *spatial)``
        Displacements in voxel units.
    spacing : sequence of float, length ``ndim``, optional
        When given, component ``i`` of the difference is scaled by ``spacing[i]``
        and the error is in physical units; default: voxels.
    mask : array of bool, shape ``spatial``, optional
        Average only over voxels where ``mask`` is true.

    Returns
    -------
    float
        Mean error; ``nan`` if ``mask`` selects no voxel.

    Raises
    ------
    ValueError
        If ``u`` and ``u_true`` differ in shape, ``mask`` does not match the
        spatial shape, or ``spacing`` has the wrong length.
    """
    u = _as_displacement(u, "u")
    u_true = _as_displacement(u_true, "u_true")
    _check_same_shape(u, u_true, "u", "u_true")
    ndim = u.shape[0]
    diff = u.astype(np.float64) - u_true.astype(np.float64)
    if spacing is not None:
        sp = _check_spacing(spacing, ndim)
        diff = diff * np.asarray(sp, dtype=np.float64).reshape((ndim,) + (1,) * ndim)
    err = np.sqrt(np.sum(diff * diff, axis=0))
    if mask is not None:
        mask = np.asarray(to_numpy(mask))
        if mask.shape != err.shape:
            raise ValueError(f"mask must have the spatial shape {err.shape} of u, got {mask.shape}")
        mask = mask.astype(bool)
        if not mask.any():
            return float("nan")
        err = err[mask]
    return float(np.mean(err))


# --------------------------------------------------------------------------- bundles
def label_metrics(fixed_labels, warped_labels, labels=None, spacing=None) -> dict:
    """Dice, Hausdorff and HD95 per label between a fixed and a warped label map.

    Parameters
    ----------
    fixed_labels, warped_labels : array of int, shape ``spatial``.
    labels : iterable of int, optional
        Default: every nonzero label present in either map.
    spacing : sequence of float, length ``ndim``, optional
        Physical voxel size for the distances.

    Returns
    -------
    dict
        ``{"dice": {label: float}, "hd": {label: float}, "hd95": {label: float}}``;
        distances in the units of ``spacing`` (see :func:`dice`, :func:`hausdorff`
        for ``nan``/``inf``).
    """
    a = _as_labels(fixed_labels, "fixed_labels")
    b = _as_labels(warped_labels, "warped_labels")
    _check_same_shape(a, b, "fixed_labels", "warped_labels")
    sp = _check_spacing(spacing, a.ndim)
    d = dice(a, b, labels=labels)
    hd, h95 = {}, {}
    for lab in d:
        hd[lab], h95[lab] = _hausdorff_masks(a == lab, b == lab, sp, (100, 95))
    return {"dice": d, "hd": hd, "hd95": h95}


def displacement_metrics(u, spacing=None) -> dict:
    """Regularity of a displacement ``u`` of shape ``(ndim, *spatial)`` (voxel units).

    Returns
    -------
    dict
        ``{"folding_fraction": float, "jacobian_grad": float}`` from
        :func:`folding_fraction` and :func:`jacobian_gradient_magnitude`.
    """
    u = _as_displacement(u)
    return {
        "folding_fraction": folding_fraction(u, spacing=spacing),
        "jacobian_grad": jacobian_gradient_magnitude(u, spacing=spacing),
    }
