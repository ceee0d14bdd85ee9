"""The public entry point: :func:`register` and its result."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import backend
from .data_terms import make_data_term
from .denoisers import DENOISERS, make_denoiser
from .engine import solve
from .pyramid import coarse_to_fine, level_shapes
from .resample import warp as _warp

__all__ = ["register", "register_slices", "RegistrationResult", "DEFAULTS", "validate_pair"]

#: Default schedule and weights per data term, chosen on the ACDC *train* split
#: (every 4th train patient, 102 slice pairs; benchmarks/tune_defaults.py prints the grid).
#: theta: penalty of the splitting; lam: weight of the regulariser
#: (the denoiser solves R(v) + |v - u|^2 / (2 lam / theta)).
#: warps and refine are per pyramid level, finest first: at every level ``warps`` warps
#: with the denoiser (TV), then ``refine`` warps with :data:`DEFAULT_REFINE_DENOISER`
#: (quadratic) weighted by ``refine_lam``. For L1 that is a strongly regularised TV pyramid
#: (lam 0.1) that settles the large motion without mapping one structure onto another,
#: then 30 and 10 quadratic warps on the two finest levels that let the smooth expansion
#: of a cavity spread into it: train 0.866 (TV alone, lam 0.04, 5 warps) -> 0.886. The same
#: schedule for L2 (TV lam 0.04, i.e. weight 10): 0.848 (TV alone, lam 0.004, 5 warps) -> 0.884.
DEFAULTS = {
    "l1": dict(theta=0.1, lam=0.1, warps=(2, 5), iterations=3, denoiser_iterations=2, refine=(10, 30),
               refine_lam=0.04),
    "l2": dict(theta=0.004, lam=0.04, warps=(2, 5), iterations=3, denoiser_iterations=2, refine=(10, 30),
               refine_lam=0.004),
}
#: Inner steps per call for denoisers that need more than the data term's default:
#: TGV's primal-dual iteration. ACDC train split, every 4th patient (102 pairs), mean
#: Dice with 2 / 3 / 5 steps: 0.860 / 0.870 / 0.875 (TV defaults: 0.866).
DENOISER_ITERATIONS = {"tgv": 5}
DEFAULT_SCALE = 0.6
DEFAULT_MIN_SIZE = 16
#: Denoiser of the refinement warps (``refine``, after the classical pyramid or VR-Net).
#: After the network the remaining correction is small and smooth: with the shipped checkpoint and 5 warps,
#: mean Dice on the ACDC train split (every 4th patient) quadratic 0.893, TGV 0.892,
#: TV 0.886; on val 0.882 / 0.881 / 0.877, quadratic with the fewest folds (docs/vrnet.md).
DEFAULT_REFINE_DENOISER = "quadratic"


@dataclass
class RegistrationResult:
    """What :func:`register` returns.

    Attributes
    ----------
    displacement : array ``(ndim, *fixed.shape)``, float32, voxel units of the
        fixed grid, pull-back: ``moving(x + displacement(x))`` matches ``fixed(x)``.
    warped : the moving image resampled by ``displacement`` (``fixed.shape``).
    info : run information (options used, pyramid shapes, time in seconds, device).
    """

    displacement: object
    warped: object
    info: dict = field(default_factory=dict)


def _as_array(name, a):
    mod = type(a).__module__
    if mod.startswith("cupy"):
        return a
    if mod.startswith("torch"):
        raise TypeError(f"{name}: torch tensors are not taken by varreg.register; pass a NumPy array (or use varreg_learned)")
    try:
        return np.asarray(a)
    except Exception as exc:
        raise TypeError(f"{name}: cannot be read as an array ({exc})") from None


def validate_pair(fixed, moving):
    """Check a fixed/moving pair; returns them as arrays or raises ``ValueError``/``TypeError``."""
    fixed = _as_array("fixed", fixed)
    moving = _as_array("moving", moving)
    for name, a in (("fixed", fixed), ("moving", moving)):
        kind = a.dtype.kind
        if kind == "b":
            raise TypeError(f"{name} image is boolean; registration needs intensities (convert with .astype(float) if intended)")
        if kind == "c":
            raise TypeError(f"{name} image is complex; register the magnitude (abs) or the real part instead")
        if kind not in "fiu":
            raise TypeError(f"{name} image has dtype {a.dtype}; expected a real numeric array")
        if a.ndim not in (2, 3):
            hint = " (a 4-D series: pick one frame, e.g. image[..., t])" if a.ndim == 4 else ""
            raise ValueError(f"{name} image has {a.ndim} dimension(s), shape {tuple(a.shape)}; varreg registers 2-D or 3-D images{hint}")
        if min(a.shape) < 4:
            raise ValueError(f"{name} image of shape {tuple(a.shape)} is too small: every axis needs at least 4 voxels")
        if kind == "f":
            xp = backend.namespace(a)
            if not bool(xp.all(xp.isfinite(a))):
                raise ValueError(f"{name} image contains NaN or Inf values; replace them (e.g. numpy.nan_to_num) or mask them first")
    if tuple(fixed.shape) != tuple(moving.shape):
        raise ValueError(
            f"fixed and moving images differ in shape: {tuple(fixed.shape)} vs {tuple(moving.shape)}; "
            "resample them onto one grid first (the CLI does this with --resample)"
        )
    return fixed, moving


def _normalise(fixed, moving, xp):
    """Joint min-max scaling of the pair to [0, 1] (float32); a constant pair maps to zeros."""
    f = xp.astype(fixed, xp.float32) if fixed.dtype != xp.float32 else fixed
    m = xp.astype(moving, xp.float32) if moving.dtype != xp.float32 else moving
    lo = min(float(xp.min(f)), float(xp.min(m)))
    hi = max(float(xp.max(f)), float(xp.max(m)))
    scale = 1.0 / (hi - lo) if hi > lo else 1.0
    return (f - lo) * scale, (m - lo) * scale


def register(
    fixed,
    moving,
    *,
    data_term="l1",
    denoiser="tv",
    theta=None,
    lam=None,
    warps=None,
    iterations=None,
    denoiser_iterations=None,
    levels=None,
    scale=DEFAULT_SCALE,
    min_size=DEFAULT_MIN_SIZE,
    spacing=None,
    initial=None,
    normalise=True,
    device="auto",
    checkpoint=None,
    refine=None,
    refine_denoiser=DEFAULT_REFINE_DENOISER,
    refine_lam=None,
    precision="auto",
):
    """Deformable registration of ``moving`` onto ``fixed`` (TV-L1 and its relatives).

    Minimises ``(1/s)|I1(x + u) - I0|^s + lam R(u)`` by Gauss-Newton warps,
    variable splitting (point-wise data step, denoising step) and a
    coarse-to-fine pyramid (Algorithm 1 of the VR-Net paper).

    Parameters
    ----------
    fixed, moving : arrays of one shape, 2-D ``(H, W)`` or 3-D ``(D, H, W)``;
        any real dtype. NumPy arrays run on the CPU; CuPy arrays on their GPU.
    data_term : ``"l1"`` (default, robust) or ``"l2"`` (sum of squared differences).
    denoiser : ``"tv"`` (default), ``"tv-vectorial"``, ``"huber"``, ``"tgv"``, ``"quadratic"``
        or a callable ``denoiser(u, weight) -> v`` (see :mod:`varreg.denoisers`).
    theta, lam : splitting penalty and regularisation weight; defaults per data
        term in :data:`DEFAULTS`, for intensities scaled to [0, 1] (``normalise``).
    warps : Gauss-Newton warps with ``denoiser`` per level: an int for every level, or a
        sequence per level, finest first, whose last entry also serves the coarser levels
        (L1 default ``(2, 5)``: 2 at the finest level, 5 at the others).
    iterations : splitting iterations per warp.
    denoiser_iterations : inner steps of a built-in denoiser per call (default
        2, 5 for ``"tgv"``: :data:`DENOISER_ITERATIONS`).
    levels, scale, min_size : pyramid: number of levels (``None``: down to
        ``min_size`` voxels), shrink factor per level, smallest axis length.
    spacing : voxel size per axis (any unit); only ratios matter: the
        regulariser's differences are scaled by ``spacing / min(spacing)``.
        Stacks of slices several times thicker than their pixels (cine MRI)
        register better slice by slice: :func:`register_slices`.
    initial : optional initial displacement ``(ndim, *fixed.shape)``.
    normalise : scale the pair jointly to [0, 1] first (the defaults assume it).
    device : ``"auto"`` (GPU if CuPy can use one), ``"cpu"`` or ``"gpu"``.
    checkpoint : with ``denoiser="unet"``: the VR-Net checkpoint to run (needs the
        ``learned`` extra); the network replaces the classical schedule, and the
        schedule options and ``spacing`` do not apply (it was trained in pixels).
    refine : further Gauss-Newton warps with ``refine_denoiser`` after the ``warps`` of a level
        (same data term, theta and iterations; regulariser weight ``refine_lam``, in voxel
        units whatever ``spacing``, which keeps thick-slice stacks from folding): an int for
        the finest level, or a sequence per level, finest first (levels beyond it get none);
        0 for none; ``None``: the data term's default (:data:`DEFAULTS`; L1 ``(10, 30)``:
        10 at the finest level, 30 at the next). With VR-Net (``denoiser="unet"``) an int:
        warps at full resolution after the network (default 0). ACDC val, mean Dice:
        the L1 defaults 0.866, the same without refinement 0.806, the previous default
        (lam 0.04, 5 TV warps, no refinement) 0.845; VR-Net 0.873 -> 0.882 with 5 warps.
    refine_denoiser : the classical denoiser of those warps (a name, as ``denoiser``):
        ``"quadratic"`` (default, :data:`DEFAULT_REFINE_DENOISER`), ``"tgv"`` or ``"tv"``;
        after VR-Net with 5 warps on ACDC val 0.882 / 0.881 / 0.877.
    refine_lam : regularisation weight of the refinement warps (default per data term,
        :data:`DEFAULTS`: 0.04 for L1).
    precision : with ``denoiser="unet"``: the U-Nets' arithmetic, ``"auto"`` (bfloat16
        on CPUs that compute it in hardware, float32 elsewhere), ``"float32"`` or
        ``"bfloat16"`` (``varreg_learned.model.resolve_precision``).

    Returns
    -------
    RegistrationResult
        ``.displacement`` ``(ndim, *fixed.shape)`` float32 in voxels, pull-back
        (``moving(x + u(x)) ~ fixed(x)``); ``.warped``; ``.info``. NumPy inputs
        give NumPy results whatever the device; CuPy inputs give CuPy results.

    Examples
    --------
    >>> import numpy as np, varreg
    >>> rng = np.random.default_rng(0)
    >>> fixed = varreg.synthetic.smooth_random_image((64, 64), rng=rng)
    >>> moving = np.roll(fixed, 2, axis=1)
    >>> res = varreg.register(fixed, moving)
    >>> res.displacement.shape
    (2, 64, 64)
    """
    if isinstance(denoiser, str) and denoiser.lower() == "unet":
        if initial is not None:
            raise ValueError("denoiser='unet' computes its own initial displacement; initial= is not taken")
        return _register_unet(fixed, moving, checkpoint, refine, refine_denoiser, refine_lam, device, normalise,
                              precision)
    if checkpoint is not None or precision != "auto":
        raise ValueError("checkpoint and precision go with denoiser='unet' (VR-Net); "
                         "the classical denoisers take neither")
    t0 = time.perf_counter()
    fixed, moving = validate_pair(fixed, moving)
    ndim = fixed.ndim
    dterm = make_data_term(data_term)
    defaults = DEFAULTS.get(getattr(dterm, "name", "l1"), DEFAULTS["l1"])
    theta = defaults["theta"] if theta is None else theta
    lam = defaults["lam"] if lam is None else lam
    warps = _per_level("warps", defaults["warps"] if warps is None else warps, minimum=1)
    refine = _per_level("refine", defaults["refine"] if refine is None else refine, minimum=0)
    refine_lam = defaults["refine_lam"] if refine_lam is None else refine_lam
    _check_refine_denoiser(refine_denoiser)
    iterations = defaults["iterations"] if iterations is None else iterations
    den_iters = _denoiser_steps(denoiser, defaults) if denoiser_iterations is None else denoiser_iterations
    for name, val in (("theta", theta), ("lam", lam), ("refine_lam", refine_lam)):
        if not (np.isscalar(val) and np.isfinite(val) and val > 0):
            raise ValueError(f"{name} must be a positive finite number, got {val!r}")
    for name, val in (("iterations", iterations), ("denoiser_iterations", den_iters), ("min_size", min_size)):
        if not (isinstance(val, (int, np.integer)) and val >= 1):
            raise ValueError(f"{name} must be a positive integer, got {val!r}")
    if levels is not None and not (isinstance(levels, (int, np.integer)) and levels >= 1):
        raise ValueError(f"levels must be a positive integer or None, got {levels!r}")
    if spacing is None:
        spacing = (1.0,) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must hold {ndim} positive numbers, got {spacing}")
    rel_spacing = tuple(s / min(spacing) for s in spacing)

    dev = backend.resolve_device(device)
    host_input = isinstance(fixed, np.ndarray)  # results come back on the caller's side
    if type(fixed).__module__.startswith("cupy") and device == "cpu":
        fixed, moving = backend.to_numpy(fixed), backend.to_numpy(moving)
    fixed_d, moving_d = backend.to_device(fixed, dev), backend.to_device(moving, dev)
    xp = backend.namespace(fixed_d)
    if normalise:
        f32, m32 = _normalise(fixed_d, moving_d, xp)
    else:
        f32, m32 = xp.astype(fixed_d, xp.float32), xp.astype(moving_d, xp.float32)

    u0 = None
    if initial is not None:
        u0 = backend.to_device(np.asarray(backend.to_numpy(initial), dtype=np.float32), dev)
        if tuple(u0.shape) != (ndim, *fixed.shape):
            raise ValueError(f"initial displacement has shape {tuple(u0.shape)}; expected {(ndim, *fixed.shape)}")
        if not bool(xp.all(xp.isfinite(u0))):
            raise ValueError("initial displacement contains NaN or Inf values")

    den = make_denoiser(denoiser, spacing=rel_spacing, n_iter=den_iters)
    shapes = level_shapes(fixed.shape, scale=scale, levels=levels, min_size=min_size)
    warps_at = [_at_level(warps, lvl, repeat_last=True) for lvl in range(len(shapes))]
    refine_at = [_at_level(refine, lvl, repeat_last=False) for lvl in range(len(shapes))]
    # The refinement regularises in voxel units, as det(I + grad u) counts folds: scaled by the spacing, its
    # coupling across 10 mm slices over 1.5 mm pixels would be 1/44 of the in-plane one, and on such stacks
    # (ACDC val volumes) the through-slice component then folds 6 % of the voxels (0.03 % in voxel units).
    rden = make_denoiser(refine_denoiser, n_iter=_denoiser_steps(refine_denoiser, defaults)) if any(refine_at) else None

    def solve_level(f, m, u, lvl):
        u = solve(f, m, u, data_term=dterm, denoiser=den, theta=theta, lam=lam,
                  n_warps=warps_at[lvl], n_iters=iterations, ndim=ndim)
        if refine_at[lvl]:  # then the refinement warps of this level
            u = solve(f, m, u, data_term=dterm, denoiser=rden, theta=theta, lam=refine_lam,
                      n_warps=refine_at[lvl], n_iters=iterations, ndim=ndim)
        return u

    u = coarse_to_fine(f32, m32, solve_level, shapes=shapes, ndim=ndim, scale=scale, u0=u0)
    moving_f = moving_d if moving_d.dtype.kind == "f" else xp.astype(moving_d, xp.float32)
    warped = _warp(moving_f, u)
    info = dict(
        data_term=getattr(dterm, "name", type(dterm).__name__),
        denoiser=denoiser if isinstance(denoiser, str) else getattr(denoiser, "__name__", type(denoiser).__name__),
        theta=theta, lam=lam, warps=tuple(warps_at), iterations=iterations, denoiser_iterations=den_iters,
        scale=scale, levels=len(shapes), shapes=shapes, spacing=spacing, device=dev,
        refine=tuple(refine_at), refine_denoiser=refine_denoiser if any(refine_at) else None,
        refine_lam=refine_lam if any(refine_at) else None,
        time_s=time.perf_counter() - t0,
    )
    if host_input:
        u, warped = backend.to_numpy(u), backend.to_numpy(warped)
    return RegistrationResult(displacement=u, warped=warped, info=info)


def _denoiser_steps(denoiser, defaults) -> int:
    """Inner steps per call of a built-in denoiser by default (:data:`DENOISER_ITERATIONS`, else the data term's)."""
    key = denoiser.lower() if isinstance(denoiser, str) else None
    return DENOISER_ITERATIONS.get(key, defaults["denoiser_iterations"])


def _is_count(val, minimum: int) -> bool:
    return isinstance(val, (int, np.integer)) and not isinstance(val, bool) and val >= minimum


def _per_level(name: str, value, *, minimum: int):
    """An int, or a non-empty sequence of ints (per level, finest first), each ``>= minimum``; as a tuple or int."""
    kind = "positive" if minimum >= 1 else "non-negative"
    if _is_count(value, minimum):
        return int(value)
    if isinstance(value, (list, tuple)) and value and all(_is_count(v, minimum) for v in value):
        return tuple(int(v) for v in value)
    raise ValueError(f"{name} must be a {kind} integer or a sequence of them (one per pyramid level, finest first), "
                     f"got {value!r}")


def _at_level(value, lvl: int, *, repeat_last: bool) -> int:
    """The count of level ``lvl`` (0: finest): an int counts for every level (``warps``) or the finest only
    (``refine``); a sequence past its end repeats its last entry (``warps``) or gives 0 (``refine``)."""
    if isinstance(value, int):
        return value if (repeat_last or lvl == 0) else 0
    if lvl < len(value):
        return value[lvl]
    return value[-1] if repeat_last else 0


def _check_refine_denoiser(refine_denoiser):
    if not (isinstance(refine_denoiser, str) and refine_denoiser.lower() in DENOISERS):
        raise ValueError(f"refine_denoiser must be one of {sorted(DENOISERS)}, got {refine_denoiser!r}")


def _register_unet(fixed, moving, checkpoint, refine, refine_denoiser, refine_lam, device, normalise, precision):
    """``denoiser="unet"``: VR-Net from a checkpoint, through ``varreg_learned``."""
    if checkpoint is None:
        raise ValueError("denoiser='unet' needs checkpoint=PATH (a VR-Net checkpoint, e.g. "
                         "varreg_learned/checkpoints/vrnet2d_acdc.pt)")
    try:
        import torch
        from varreg_learned.inference import register_learned
    except ImportError as exc:
        raise RuntimeError(f"denoiser='unet' needs torch: install the learned extra, pip install 'varreg[learned]' ({exc})") from None
    if device not in backend.DEVICES:
        raise ValueError(f"device must be one of {backend.DEVICES}, got {device!r}")
    if device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("device='gpu' was asked for but torch sees no CUDA device. Use device='cpu' or 'auto'.")
    tdev = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    refine = 0 if refine is None else refine  # register_learned checks it: warps at full resolution
    _check_refine_denoiser(refine_denoiser)
    opts = {"denoiser": refine_denoiser} if refine else {}
    if refine and refine_lam is not None:
        opts["lam"] = refine_lam
    return register_learned(fixed, moving, checkpoint, refine=refine, device=tdev, normalise=normalise,
                            precision=precision, **opts)


def register_slices(fixed, moving, *, axis: int = -1, spacing=None, initial=None, progress=None, **options):
    """Slice-by-slice 2-D registration of two 3-D stacks (thick-slice cine MRI and the like).

    Every 2-D slice of ``moving`` along ``axis`` is registered to the same slice of
    ``fixed`` with :func:`register` (``options`` as there, each slice scaled to
    [0, 1] on its own); the through-slice component of the result is zero. On
    stacks whose slices are much thicker than their pixels (ACDC: 1.5 x 1.5 x
    5-10 mm) this beats a 3-D registration: the intensity gradient across 10 mm
    slices says little about through-slice motion (docs/bench.md, 3-D table).

    Parameters
    ----------
    fixed, moving : 3-D arrays of one shape (NumPy).
    axis : the slice axis (-1: the last, as in NIfTI short-axis stacks).
    spacing : the voxel size of the three axes (only the in-plane two are used) or None.
    initial : optional initial displacement ``(3, *fixed.shape)``; its through-slice
        component is ignored.
    progress : optional wrapper of the slice iterator (``progress(range(n)) -> iterable``),
        e.g. ``tqdm``.

    Returns
    -------
    RegistrationResult with ``displacement`` ``(3, *fixed.shape)`` float32 (voxels,
    pull-back; zero along ``axis``), ``warped`` and ``info`` (``slices``: the per-slice
    run information; ``time_s``: the total).
    """
    t0 = time.perf_counter()
    fixed, moving = _as_array("fixed", fixed), _as_array("moving", moving)
    for name, a in (("fixed", fixed), ("moving", moving)):
        if a.ndim != 3:
            raise ValueError(f"{name} image has {a.ndim} dimension(s), shape {tuple(a.shape)}; register_slices takes "
                             "3-D stacks (use register for 2-D images)")
    if tuple(fixed.shape) != tuple(moving.shape):
        raise ValueError(f"fixed and moving images differ in shape: {tuple(fixed.shape)} vs {tuple(moving.shape)}; "
                         "resample them onto one grid first")  # every slice is checked in full by register
    if not isinstance(axis, (int, np.integer)) or not -3 <= axis < 3:
        raise ValueError(f"axis must be 0, 1, 2 or a negative equivalent, got {axis!r}")
    axis = int(axis) % 3
    fixed, moving = backend.to_numpy(fixed), backend.to_numpy(moving)
    plane = [a for a in range(3) if a != axis]
    if spacing is not None and len(spacing) != 3:
        raise ValueError(f"spacing must hold 3 numbers, got {spacing}")
    sp = None if spacing is None else tuple(float(spacing[a]) for a in plane)
    if initial is not None:
        initial = np.asarray(backend.to_numpy(initial), np.float32)
        if initial.shape != (3, *fixed.shape):
            raise ValueError(f"initial displacement has shape {initial.shape}; expected {(3, *fixed.shape)}")
        initial = initial[plane]  # the in-plane components; the through-slice one is ignored
    n = fixed.shape[axis]
    per, infos = [], []
    for k in progress(range(n)) if progress is not None else range(n):
        init = None if initial is None else np.take(initial, k, axis=axis + 1)
        res = register(np.take(fixed, k, axis=axis), np.take(moving, k, axis=axis), spacing=sp, initial=init,
                       **options)
        per.append(np.asarray(backend.to_numpy(res.displacement), np.float32))
        infos.append(res.info)
    u = np.zeros((3, *fixed.shape), np.float32)
    u[plane] = np.stack(per, axis=axis + 1)  # per[k]: (2, *slice shape), the in-plane components
    moving_f = moving if moving.dtype.kind == "f" else moving.astype(np.float32)
    warped = _warp(moving_f, u)  # u is zero along the slice axis: each slice is warped within itself
    info = dict(infos[0], slices=infos, slice_axis=axis, time_s=time.perf_counter() - t0)
    return RegistrationResult(displacement=u, warped=warped, info=info)
