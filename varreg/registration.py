"""The public entry points: :func:`register`, :func:`register_slices`, :func:`register_images`.

:func:`register` runs the classical solver on two arrays; :func:`register_slices`
and :func:`register_images` (two :class:`varreg.io.Image` on one grid: 3-D, one
2-D slice, or a stack slice by slice) take any *method* with the signature of
:func:`register`, ``method(fixed, moving, *, spacing, initial) -> RegistrationResult``
(VR-Net's :func:`varreg_learned.register_learned` with a checkpoint bound, say).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass, field

import numpy as np

from . import backend
from .affine import compose_affine, displacement_of, estimate_affine, voxel_matrix
from .data_terms import InPlane, Masked, make_data_term
from .denoisers import make_denoiser
from .engine import solve
from .options import SolverOptions, at_level, weights_of
from .pyramid import coarse_to_fine, level_shapes, mask_pyramid
from .resample import warp as _warp

__all__ = ["register", "register_slices", "register_images", "RegistrationResult", "ImageRegistration",
           "validate_pair", "normalise_pair", "registration_mode", "check_mask"]


@dataclass
class RegistrationResult:
    """What :func:`register` returns.

    Attributes
    ----------
    displacement : array ``(ndim, *fixed.shape)``, float32, voxel units of the
        fixed grid, pull-back: ``moving(x + displacement(x))`` matches ``fixed(x)``.
    warped : the moving image resampled by ``displacement`` (``fixed.shape``).
    info : run information (options used, pyramid shapes, time in seconds, device).
    affine : with ``affine=...``: the affine stage's transform on voxel indices, a homogeneous
        ``(ndim + 1, ndim + 1)`` matrix mapping a fixed voxel to a moving one
        (:func:`varreg.affine.voxel_matrix`; :func:`varreg.affine.world_matrix` for world
        coordinates); ``displacement`` is the whole transform, the affine included. Else None.
    """

    displacement: object
    warped: object
    info: dict = field(default_factory=dict)
    affine: object = None


def _as_array(name, a):
    """``a`` as a NumPy array (CuPy arrays are kept); a ``TypeError`` naming ``name`` otherwise."""
    mod = type(a).__module__
    if mod.startswith("cupy"):
        return a
    if mod.startswith("torch"):
        raise TypeError(f"{name}: torch tensors are not taken by varreg.register; pass a NumPy or CuPy array")
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


def normalise_pair(fixed, moving):
    """Joint min-max scaling of the pair to [0, 1] as float32, on the arrays' own backend; a constant
    pair maps to zeros. The defaults' weights assume it (``normalise=True``)."""
    xp = backend.namespace(fixed, moving)
    f = xp.astype(fixed, xp.float32) if fixed.dtype != xp.float32 else fixed
    m = xp.astype(moving, xp.float32) if moving.dtype != xp.float32 else moving
    lo = min(float(xp.min(f)), float(xp.min(m)))
    hi = max(float(xp.max(f)), float(xp.max(m)))
    scale = 1.0 / (hi - lo) if hi > lo else 1.0
    return (f - lo) * scale, (m - lo) * scale


def register(fixed, moving, *, spacing=None, initial=None, fixed_mask=None, moving_mask=None,
             options: SolverOptions | None = None, **fields):
    """Deformable registration of ``moving`` onto ``fixed`` (TV-L1 and its relatives).

    Minimises ``(1/s)|I1(x + u) - I0|^s + lam R(u)`` by Gauss-Newton warps,
    variable splitting (point-wise data step, denoising step) and a
    coarse-to-fine pyramid (Algorithm 1 of the VR-Net paper): at every level
    ``warps`` warps with ``denoiser``, then ``refine`` warps with
    ``refine_denoiser`` weighted by ``refine_lam``.

    Parameters
    ----------
    fixed, moving : arrays of one shape, 2-D ``(H, W)`` or 3-D ``(D, H, W)``;
        any real dtype. NumPy arrays run on the CPU; CuPy arrays on their GPU.
    spacing : voxel size per axis (any unit); only ratios matter: the
        regulariser's differences are scaled by ``spacing / min(spacing)``.
        Stacks of slices several times thicker than their pixels (cine MRI)
        register better slice by slice: :func:`register_slices`.
    initial : optional initial displacement ``(ndim, *fixed.shape)``, voxels.
    fixed_mask, moving_mask : optional binary masks of ``fixed.shape`` (bool or 0/1), the
        moving one in the moving image's frame: the data term counts only where both are 1
        (the moving mask taken at ``x + u(x)``); elsewhere the regulariser alone shapes the
        field (an artefact, a lesion, a structure present in one image only).
    options : a :class:`varreg.options.SolverOptions` (default: all defaults).
    **fields : solver options by name, overriding ``options``: ``data_term``,
        ``denoiser``, ``theta``, ``lam``, ``warps``, ``iterations``,
        ``denoiser_iterations``, ``levels``, ``scale``, ``min_size``, ``refine``,
        ``refine_denoiser``, ``refine_lam``, ``normalise``, ``device``; each is
        documented once, in :class:`varreg.options.SolverOptions` (``FIELDS``).

    Returns
    -------
    RegistrationResult
        ``.displacement`` ``(ndim, *fixed.shape)`` float32 in voxels, pull-back
        (``moving(x + u(x)) ~ fixed(x)``); ``.warped``; ``.info``. NumPy inputs
        give NumPy results whatever the device; CuPy inputs give CuPy results.

    Raises
    ------
    varreg.options.OptionError (a ``ValueError``) for a wrong option; ``ValueError``
    or ``TypeError`` for images that cannot be registered.

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
    opts = (options or SolverOptions()).replace(**fields) if fields else (options or SolverOptions())
    t0 = time.perf_counter()
    fixed, moving = validate_pair(fixed, moving)
    ndim = fixed.ndim
    dterm = make_data_term(opts.data_term)
    if opts.window is not None:
        dterm = dataclasses.replace(dterm, window=opts.window)
    if opts.slice_axis is not None:
        if ndim != 3:
            raise ValueError(f"slice_axis={opts.slice_axis} needs a 3-D image; this one is {ndim}-D (a 2-D image, "
                             "or one slice of a slice-by-slice registration, already moves in-plane only)")
        dterm = InPlane(dterm, int(opts.slice_axis))
    window = getattr(dterm, "window", None)
    if window is not None and window > min(fixed.shape):
        raise ValueError(f"{dterm.name} window of {window:g} voxels is larger than the image (shape "
                         f"{tuple(fixed.shape)}); choose a window smaller than its shortest axis")
    w = weights_of(dterm, given=opts)
    theta, lam, refine_lam = w.theta, w.lam, w.refine_lam
    if spacing is None:
        spacing = (1.0,) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must hold {ndim} positive numbers, got {spacing}")
    rel_spacing = tuple(s / min(spacing) for s in spacing)

    dev = backend.resolve_device(opts.device)
    host_input = isinstance(fixed, np.ndarray)  # results come back on the caller's side
    if type(fixed).__module__.startswith("cupy") and opts.device == "cpu":
        fixed, moving = backend.to_numpy(fixed), backend.to_numpy(moving)
    fixed_d, moving_d = backend.to_device(fixed, dev), backend.to_device(moving, dev)
    xp = backend.namespace(fixed_d)
    if opts.normalise:
        f32, m32 = normalise_pair(fixed_d, moving_d)
    else:
        f32, m32 = xp.astype(fixed_d, xp.float32), xp.astype(moving_d, xp.float32)

    u0, affine_m, affine_info, a = None, None, None, None
    if opts.affine:
        if initial is not None:
            raise ValueError("affine= and initial= exclude each other: the affine stage computes the start")
        affine_m, affine_info = _affine_stage(backend.to_numpy(f32), backend.to_numpy(m32), opts.affine, spacing,
                                              opts.min_size)
        # the deformable solver then works on the moving image resampled by the affine, from zero: the
        # regulariser sees the deformable part v alone, and u = a + A v is the whole transform
        a = backend.to_device(displacement_of(affine_m, fixed.shape), dev)
        m32 = _warp(m32, a)
        if moving_mask is not None:  # the moving mask follows the moving image (nearest neighbour)
            moving_mask = _warp(backend.to_device(check_mask("moving_mask", moving_mask, fixed.shape), dev), a,
                                order=0)
    if initial is not None:
        u0 = backend.to_device(np.asarray(backend.to_numpy(initial), dtype=np.float32), dev)
        if tuple(u0.shape) != (ndim, *fixed.shape):
            raise ValueError(f"initial displacement has shape {tuple(u0.shape)}; expected {(ndim, *fixed.shape)}")
        if not bool(xp.all(xp.isfinite(u0))):
            raise ValueError("initial displacement contains NaN or Inf values")

    den = make_denoiser(opts.denoiser, spacing=rel_spacing, n_iter=opts.denoiser_iterations)
    shapes = level_shapes(fixed.shape, scale=opts.scale, levels=opts.levels, min_size=opts.min_size)
    masks = {}
    for name, mask in (("fixed_mask", fixed_mask), ("moving_mask", moving_mask)):
        if mask is not None:
            masks[name] = mask_pyramid(backend.to_device(check_mask(name, mask, fixed.shape), dev), shapes=shapes,
                                       ndim=ndim, scale=opts.scale)
    if masks:
        dterm = Masked(dterm, masks.get("fixed_mask", {}), masks.get("moving_mask", {}))
    warps_at = [at_level(opts.warps, lvl, repeat_last=True) for lvl in range(len(shapes))]
    refine_at = [at_level(opts.refine, lvl, repeat_last=False) for lvl in range(len(shapes))]
    # the refinement regularises in voxel units, as det(I + grad u) counts folds: scaled by the spacing, its
    # coupling across thick slices would be a small fraction of the in-plane one, and folds follow (README)
    rden = make_denoiser(opts.refine_denoiser) if any(refine_at) else None
    iterations = opts.iterations

    def solve_level(f, m, u, lvl):
        u = solve(f, m, u, data_term=dterm, denoiser=den, theta=theta, lam=lam,
                  n_warps=warps_at[lvl], n_iters=iterations, ndim=ndim)
        if refine_at[lvl]:  # then the refinement warps of this level
            u = solve(f, m, u, data_term=dterm, denoiser=rden, theta=theta, lam=refine_lam,
                      n_warps=refine_at[lvl], n_iters=iterations, ndim=ndim)
        return u

    # on the CPU, the kernels' threads follow the cores that other processes leave free (backend.fair_threads)
    with backend.fair_threads() if dev == "cpu" else contextlib.nullcontext() as threads:
        u = coarse_to_fine(f32, m32, solve_level, shapes=shapes, ndim=ndim, scale=opts.scale, u0=u0)
    if a is not None:
        u = compose_affine(affine_m, a, u)
    moving_f = moving_d if moving_d.dtype.kind == "f" else xp.astype(moving_d, xp.float32)
    warped = _warp(moving_f, u)
    den_iters = getattr(den, "n_iter", opts.denoiser_iterations)
    denoiser = opts.denoiser
    info = dict(
        data_term=getattr(dterm, "name", type(dterm).__name__),
        denoiser=denoiser if isinstance(denoiser, str) else getattr(denoiser, "__name__", type(denoiser).__name__),
        theta=theta, lam=lam, warps=tuple(warps_at), iterations=iterations, denoiser_iterations=den_iters,
        scale=opts.scale, levels=len(shapes), shapes=shapes, spacing=spacing, device=dev,
        refine=tuple(refine_at), refine_denoiser=opts.refine_denoiser if any(refine_at) else None,
        refine_lam=refine_lam if any(refine_at) else None, threads=threads, affine=affine_info,
        time_s=time.perf_counter() - t0,
    )
    if host_input:
        u, warped = backend.to_numpy(u), backend.to_numpy(warped)
    return RegistrationResult(displacement=u, warped=warped, info=info, affine=affine_m)


def check_mask(name: str, mask, shape) -> np.ndarray:
    """A binary mask of ``shape`` as float32 0/1; a ``ValueError`` naming ``name`` for another shape,
    values other than 0 and 1, NaN, or an empty mask."""
    m = np.asarray(backend.to_numpy(mask))
    if m.shape != tuple(shape):
        raise ValueError(f"{name} has shape {m.shape}; expected the image's shape {tuple(shape)}")
    if m.dtype.kind not in "biuf":
        raise ValueError(f"{name} has dtype {m.dtype}; expected a binary (0/1 or bool) array")
    if m.dtype.kind == "f" and not np.isfinite(m).all():
        raise ValueError(f"{name} contains NaN or Inf values; expected 0 and 1 only")
    values = np.unique(m)
    if not np.isin(values, (0, 1)).all():
        raise ValueError(f"{name} is not binary: it holds values other than 0 and 1 (e.g. {values[~np.isin(values, (0, 1))][0]!r})")
    if not values.any():
        raise ValueError(f"{name} is empty (all 0): the data term would count nowhere")
    return m.astype(np.float32)


def register_slices(fixed, moving, *, axis: int = -1, spacing=None, initial=None, progress=None, method=None,
                    fixed_mask=None, moving_mask=None, **options):
    """Slice-by-slice 2-D registration of two 3-D stacks (thick-slice cine MRI and the like).

    Every 2-D slice of ``moving`` along ``axis`` is registered to the same slice of
    ``fixed`` with ``method`` (default :func:`register`; ``options`` as there, each
    slice scaled to [0, 1] on its own); the through-slice component of the result is zero. On
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
    method : ``method(fixed2d, moving2d, *, spacing, initial, **options) -> RegistrationResult``;
        default :func:`register`.
    fixed_mask, moving_mask : optional binary masks of the stacks' shape (see :func:`register`),
        passed slice by slice; a slice whose mask is empty has no data term and keeps a zero
        displacement.
    options : as in :func:`register`. An ``affine`` option (a keyword, in ``options=``, or bound in a
        ``functools.partial`` of ``method``) is one 3-D affine stage of the whole stack
        (:func:`varreg.affine.estimate_affine`, with ``spacing``), not one per slice: the moving
        stack is resampled by it, its slices are registered in 2-D, and the two compose exactly,
        ``u(x) = a(x) + A v(x)`` for the affine ``x -> A x + t`` (``a`` its displacement) and the
        slices' field ``v``. Patient motion between scans moves the whole stack, through the slices too.

    Returns
    -------
    RegistrationResult with ``displacement`` ``(3, *fixed.shape)`` float32 (voxels,
    pull-back; zero along ``axis`` unless an affine stage ran), ``warped``, ``info``
    (``slices``: the per-slice run information; ``affine``: the stage's; ``time_s``: the total)
    and ``affine`` (the stage's ``(4, 4)`` voxel matrix, or None).
    """
    t0 = time.perf_counter()
    method = register if method is None else method
    kind, stage_opts, method, options = _stack_affine(method, options)
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
    masks = {name: check_mask(name, m, fixed.shape) for name, m in (("fixed_mask", fixed_mask),
                                                                   ("moving_mask", moving_mask)) if m is not None}
    moving_in, M, affine_info = moving, None, None
    if kind:  # one affine of the whole stack, then the slices of the moving stack resampled by it
        if initial is not None:
            raise ValueError("affine= and initial= exclude each other: the affine stage computes the start")
        M, affine_info = _affine_stage(*normalise_pair(*validate_pair(fixed, moving)), kind, spacing,
                                       stage_opts.min_size)
        a = displacement_of(M, fixed.shape)
        moving = np.asarray(_warp(moving if moving.dtype.kind == "f" else moving.astype(np.float32), a))
        if "moving_mask" in masks:  # the moving mask follows the moving image (nearest neighbour)
            masks["moving_mask"] = np.asarray(_warp(masks["moving_mask"], a, order=0))
    n = fixed.shape[axis]
    per, infos = [], []
    for k in progress(range(n)) if progress is not None else range(n):
        init = None if initial is None else np.take(initial, k, axis=axis + 1)
        kw = {name: np.take(m, k, axis=axis) for name, m in masks.items()}
        if any(not m.any() for m in kw.values()):  # no data term in this slice: the regulariser keeps zero
            per.append(np.zeros((2, *np.take(fixed, k, axis=axis).shape), np.float32) if init is None
                       else np.asarray(init, np.float32))
            infos.append(dict(infos[-1] if infos else {}, time_s=0.0, empty_mask=True))
            continue
        res = method(np.take(fixed, k, axis=axis), np.take(moving, k, axis=axis), spacing=sp, initial=init,
                     **kw, **options)
        per.append(np.asarray(backend.to_numpy(res.displacement), np.float32))
        infos.append(res.info)
    u = np.zeros((3, *fixed.shape), np.float32)
    u[plane] = np.stack(per, axis=axis + 1)  # per[k]: (2, *slice shape), the in-plane components
    if M is not None:  # moving(M(x + v) + t) = moving(x + a(x) + M[:3, :3] v(x)): one displacement, exactly
        u = compose_affine(M, a, u)
        moving = moving_in
    moving_f = moving if moving.dtype.kind == "f" else moving.astype(np.float32)
    warped = _warp(moving_f, u)  # without an affine, u is zero along the slice axis: slices stay within themselves
    info = dict(infos[0], slices=infos, slice_axis=axis, affine=affine_info, time_s=time.perf_counter() - t0)
    return RegistrationResult(displacement=u, warped=warped, info=info, affine=M)


def _affine_stage(f32, m32, kind: str, spacing, min_size: int):
    """The affine stage on a normalised float32 NumPy pair: its voxel matrix ``(ndim + 1)`` square and
    the run information (kind, matrix, levels, seconds) that ``info["affine"]`` carries."""
    t0 = time.perf_counter()
    est = estimate_affine(f32, m32, kind=kind, spacing=spacing, min_size=min_size)
    M = voxel_matrix(est)
    return M, dict(kind=kind, matrix=M.tolist(), levels=est.info["levels"], time_s=time.perf_counter() - t0)


def _stack_affine(method, options: dict):
    """Take the ``affine`` option off a slice-by-slice call: ``(kind or False, SolverOptions, method, options)``.

    The option may come as a keyword (``affine="rigid"``), inside ``options=SolverOptions(...)``, or
    bound in ``method`` as ``functools.partial(register, options=SolverOptions(...))`` (the CLI's
    form). The stack then gets one 3-D affine stage and each slice none."""
    options = dict(options)
    base = options.get("options")
    bound = method.keywords.get("options") if isinstance(method, functools.partial) else None
    opts = next((o for o in (base, bound) if isinstance(o, SolverOptions)), SolverOptions())
    kind = SolverOptions(affine=options.pop("affine")).affine if "affine" in options else opts.affine
    if isinstance(base, SolverOptions) and base.affine:
        options["options"] = base.replace(affine=False)
    if isinstance(bound, SolverOptions) and bound.affine:
        method = functools.partial(method.func, *method.args, **dict(method.keywords, options=bound.replace(affine=False)))
    return kind, opts, method, options


def registration_mode(fixed_img, slices: bool = False) -> str:
    """How :func:`register_images` registers an image of ``fixed_img``'s grid: ``"3d"``, ``"2d"`` (one
    axis of length 1) or ``"slices"`` (a 3-D stack slice by slice along its last axis, when ``slices``)."""
    from .io import InputError

    active = fixed_img.active_axes
    if len(active) < 2:
        raise InputError(fixed_img.path, f"has shape {fixed_img.shape}: at least two axes need more than one voxel")
    if len(active) == 2:
        return "2d"
    return "slices" if slices else "3d"


@dataclass
class ImageRegistration:
    """A registration on a fixed image's grid (:func:`register_images`).

    ``u``: ``(3, X, Y, Z)`` float32 in voxels of the fixed grid along its array axes
    (a zero component on an axis of length 1, and along the slice axis in
    ``"slices"`` mode); ``mode``: ``"3d"``, ``"2d"`` or ``"slices"``; ``solver_s``:
    seconds in the solver; ``info``: the run information of the (last) registration;
    ``affine``: with an affine stage, its ``(4, 4)`` transform on the fixed grid's voxel indices
    (identity on a length-1 axis; ``u`` includes it), else None. In ``"slices"`` mode the stage is
    one 3-D affine of the stack, so ``u`` then has a through-slice component.
    """

    u: np.ndarray
    mode: str
    solver_s: float
    info: dict
    affine: np.ndarray | None = None

    def in_plane_field(self) -> np.ndarray:
        """The field whose 2-D Jacobians count folds per slice in ``"slices"`` mode: ``u``, or with an
        affine stage the slices' own field ``v`` (``det(I + grad u) = det(A) det(I + grad v)``, ``det(A) > 0``)."""
        if self.mode == "slices" and self.affine is not None:
            from .affine import residual_displacement

            return residual_displacement(self.u, self.affine)
        return self.u

    def warp(self, vol: np.ndarray, order: int) -> np.ndarray:
        """Warp a volume ``(X, Y, Z)`` on the fixed grid as the registration did (2-D per slice, 2-D or 3-D)."""
        if self.mode == "3d" or (self.mode == "slices" and self.affine is not None):
            return np.asarray(_warp_checked(vol, self.u, order))
        if self.mode == "2d":
            c = [i for i, n in enumerate(vol.shape) if n == 1][0]
            act = [i for i in range(3) if i != c]
            v2 = np.take(vol, 0, axis=c)
            u2 = np.stack([np.take(self.u[i], 0, axis=c) for i in act])
            return np.expand_dims(np.asarray(_warp_checked(v2, u2, order)), c)
        out = np.empty(vol.shape, dtype=(vol.dtype if (order == 0 or vol.dtype.kind == "f") else np.float32))
        for z in range(vol.shape[2]):
            out[..., z] = np.asarray(_warp_checked(vol[..., z], self.u[:2, :, :, z], order))
        return out


def _warp_checked(image, u, order):
    from . import warp

    return warp(image, u, order=order)


def register_images(fixed_img, moving, *, slices: bool = False, isotropic: bool = False, initial=None, method=None,
                    progress=None, fixed_mask=None, moving_mask=None, **options) -> ImageRegistration:
    """Register ``moving`` onto the grid of ``fixed_img`` (a :class:`varreg.io.Image`), by its geometry.

    A 3-D volume in 3-D (``spacing`` from the affine), a single slice (one axis
    of length 1) in 2-D, or, with ``slices``, a stack slice by slice along its
    last axis (:func:`register_slices`).

    Parameters
    ----------
    fixed_img : :class:`varreg.io.Image`.
    moving : an :class:`varreg.io.Image` on the same grid, or an array of ``fixed_img.shape``
        (an image already resampled onto the fixed grid).
    slices : register a 3-D stack slice by slice (with an ``affine`` option: one 3-D affine of the
        stack first, see :func:`register_slices`).
    isotropic : ignore the voxel sizes (treat voxels as cubes).
    initial : optional initial displacement ``(3, X, Y, Z)`` in voxels of the fixed grid.
    method : as in :func:`register_slices` (default :func:`register`); ``options`` go to it.
    progress : wrapper of the slice iterator in ``"slices"`` mode.
    fixed_mask, moving_mask : optional binary masks on the fixed grid ``(X, Y, Z)`` (the moving
        one resampled there with the moving image); see :func:`register`.

    Returns
    -------
    :class:`ImageRegistration`.
    """
    from .io import Image, same_grid

    method = register if method is None else method
    if isinstance(moving, Image):
        if not same_grid(fixed_img, moving):
            raise ValueError(f"{moving.path} is not on the fixed image's grid; resample it onto the fixed grid first")
        moving = moving.data
    moving = np.asarray(moving)
    shape = fixed_img.shape
    if moving.shape != shape:
        raise ValueError(f"moving data of shape {moving.shape} do not fit the fixed grid {shape}")
    mode = registration_mode(fixed_img, slices)
    active = fixed_img.active_axes
    masks = {name: check_mask(name, m, shape) for name, m in (("fixed_mask", fixed_mask),
                                                              ("moving_mask", moving_mask)) if m is not None}
    sp = None if isotropic else tuple(fixed_img.spacing[i] for i in (active if mode == "2d" else (0, 1, 2)))
    u = np.zeros((3, *shape), np.float32)
    if mode == "slices":
        res = register_slices(fixed_img.data, moving, axis=2, spacing=sp, initial=initial, progress=progress,
                              method=method, **masks, **options)
        u[:] = res.displacement
        affine_s = (res.info.get("affine") or {}).get("time_s", 0.0)
        info = dict(res.info["slices"][-1], affine=res.info.get("affine"))
        return ImageRegistration(u, mode, affine_s + sum(i["time_s"] for i in res.info["slices"]), info, res.affine)
    if mode == "3d":
        res = method(fixed_img.data, moving, spacing=sp, initial=initial, **masks, **options)
        u[:] = np.asarray(backend.to_numpy(res.displacement), np.float32)
        return ImageRegistration(u, mode, res.info["time_s"], res.info, getattr(res, "affine", None))
    c = [i for i in range(3) if i not in active][0]
    init = None if initial is None else np.stack([np.take(initial[i], 0, axis=c) for i in active])
    masks2 = {name: np.take(m, 0, axis=c) for name, m in masks.items()}
    res = method(np.take(fixed_img.data, 0, axis=c), np.take(moving, 0, axis=c), spacing=sp, initial=init,
                 **masks2, **options)
    u2 = np.asarray(backend.to_numpy(res.displacement), np.float32)
    for k, i in enumerate(active):
        u[i] = np.expand_dims(u2[k], c)
    M = None
    if getattr(res, "affine", None) is not None:  # (3, 3) on the active axes -> (4, 4) on all three
        M = np.eye(4)
        idx = [*active, 3]
        M[np.ix_(idx, idx)] = res.affine
    return ImageRegistration(u, mode, res.info["time_s"], res.info, M)
