"""What the ``varreg`` commands do; imported lazily by :mod:`varreg_cli.main`.

Every input problem raises :class:`varreg.io.InputError`; every output goes
through :class:`varreg_cli.outputs.OutputSet` (checked before any work, written to
temporary files, renamed together at the end).
"""
from __future__ import annotations

import os
import time

import numpy as np

import varreg
from varreg import io as vio
from varreg.evaluation import evaluate_labels, summary_line
from varreg.io import InputError
from varreg.registration import ImageRegistration, register_images, registration_mode

from . import progress
from .options import method_from_flags
from .outputs import OutputSet, jsonable

def load_image(path, *, frame=None, labels=False, frame_flag="--frame"):
    """:func:`varreg.io.load_image`, its frame errors naming the flag that picks a frame."""
    try:
        return vio.load_image(path, frame=frame, labels=labels)
    except InputError as exc:
        if exc.option != "frame":
            raise
        problem = exc.problem.replace("choose one frame (", f"choose one frame with {frame_flag} N (")
        problem = problem.replace("; frame ", f"; {frame_flag} ")
        raise InputError(exc.path, problem) from None


def echo(msg: str, quiet: bool) -> None:
    if not quiet:
        import click

        click.echo(msg)


# --------------------------------------------------------------------------- registration
def warp_onto_fixed(solved: ImageRegistration | None, fixed: vio.Image, src: vio.Image, data, order: int, same: bool):
    """``src`` (an image or label map, data ``data``) at ``x + u(x)`` of the fixed grid (u = 0 if ``solved`` is None)."""
    if same:
        if solved is None:
            return data.copy()
        return solved.warp(data, order)
    coords = vio.sample_coords(fixed.shape, fixed.affine, src.affine, None if solved is None else solved.u)
    return vio.sample(data, coords, order)


# --------------------------------------------------------------------------- metrics
def _register_images(fixed: vio.Image, moving_arr, *, slices, method, isotropic, quiet, initial, masks):
    """:func:`varreg.register_images` with the command line's progress: a bar over slices, a spinner in 3-D."""
    mode = registration_mode(fixed, slices)
    on = progress.enabled(quiet)
    nz = fixed.shape[2]
    kw = dict(slices=slices, isotropic=isotropic, initial=initial, method=method,
              progress=lambda it: progress.loop(it, nz, "slices", on), **masks)
    if mode == "3d":
        with progress.Spinner(f"registering 3-D {'x'.join(map(str, fixed.shape))}", on):
            return register_images(fixed, moving_arr, **kw)
    return register_images(fixed, moving_arr, **kw)


# --------------------------------------------------------------------------- register
def set_threads(threads) -> None:
    """``--threads N``: the number of threads of the solver's numba kernels on the CPU."""
    if threads is None:
        return
    import numba

    top = int(numba.config.NUMBA_NUM_THREADS)
    if not 1 <= threads <= top:
        raise InputError("--threads", f"{threads} is out of range 1..{top} (the CPU threads numba can use here)")
    numba.set_num_threads(int(threads))


REGISTER_OUTPUTS = ("warped.nii.gz", "displacement.nii.gz")
AFFINE_OUTPUTS = ("affine.tfm", "residual.nii.gz")


def load_masks(fixed: vio.Image, moving: vio.Image, paths: dict, *, resample: bool, frames: dict) -> dict:
    """``--fixed-mask`` / ``--moving-mask`` files as 0/1 float32 arrays on the fixed grid.

    ``paths``: ``{"fixed_mask": path or None, "moving_mask": ...}``. A mask lies on its image's
    grid (the moving one is resampled onto the fixed grid with MOVING, nearest neighbour, under
    ``--resample``). Raises :class:`InputError` naming the file for another grid, a mask that is
    not binary, or an empty one."""
    from varreg.registration import check_mask

    out = {}
    for name, ref in (("fixed_mask", fixed), ("moving_mask", moving)):
        path = paths.get(name)
        if not path:
            continue
        flag = "--" + name.replace("_", "-")
        img = load_image(path, frame=frames[name], labels=True, frame_flag=f"--frame (for {flag})")
        side = name.split("_")[0]
        if not vio.same_grid(img, ref) and not resample:
            raise InputError(path, f"{flag} is not on the {side} image's grid ({vio.describe_grid(img)} vs "
                                   f"{vio.describe_grid(ref)}); pass --resample to sample it in world coordinates")
        data = img.data if vio.same_grid(img, fixed) else warp_onto_fixed(None, fixed, img, img.data, 0, False)
        try:
            out[name] = check_mask(flag, data, fixed.shape)
        except ValueError as exc:
            raise InputError(path, str(exc)) from None
    return out


def save_affine(outs: OutputSet, paths, solved: ImageRegistration, fixed: vio.Image) -> None:
    """``affine.tfm`` (ITK) and ``residual.nii.gz``: the composite [affine, residual field] that ITK,
    SimpleITK and ANTs apply (the field first) equals ``displacement.nii.gz``."""
    from varreg.affine import residual_displacement

    r = residual_displacement(solved.u, solved.affine)
    two_d = vio.is_two_d_field(solved.u, fixed) and vio.is_two_d_field(r, fixed)
    outs.save_text(vio.itk_affine_text(solved.affine, fixed, two_d=two_d), paths[0])
    outs.save_nifti(vio.displacement_nifti(r, fixed), paths[1])


def _check_not_constant(img, path):
    """An image to register with one value everywhere holds no structure to align: :class:`InputError`
    (the Python API instead returns a zero field for it, :func:`varreg.register`)."""
    lo, hi = float(img.data.min()), float(img.data.max())
    if lo == hi:
        raise InputError(path, f"is constant (every voxel is {lo:g}): it holds no structure to register; "
                               "check that it is the right file (and frame)")


def _qc_path(qc, outdir):
    if qc is None:
        return None
    return os.path.join(outdir, qc) if os.path.dirname(qc) == "" else qc


def run_register(fixed_path, moving_path, outdir, *, fixed_labels=None, moving_labels=None, qc=None,
                 resample=False, slices=False, frame=None, fixed_frame=None, moving_frame=None,
                 force=False, quiet=False, isotropic=False, initial=None, solver=None,
                 label_names=None, truth=None, t0=None, prefix="", threads=None, fixed_mask=None,
                 moving_mask=None) -> dict:
    """``varreg register``: returns the metrics dict (also when no labels are given: then not written)."""
    t0 = time.perf_counter() if t0 is None else t0
    set_threads(threads)
    solver = {k: v for k, v in (solver or {}).items() if v is not None}
    method, kind = method_from_flags(solver)  # every solver option checked before any file is read
    if initial and kind == "vrnet":
        raise InputError("--initial", "goes with the classical solver; VR-Net computes its own initial displacement")
    if (fixed_mask or moving_mask) and kind == "vrnet":
        raise InputError("--fixed-mask" if fixed_mask else "--moving-mask",
                         "goes with the classical solver (the network sees whole images); drop it or the --denoiser unet")
    if fixed_labels is not None and moving_labels is None:
        raise InputError(fixed_labels, "--fixed-labels needs --moving-labels as well (the labels to warp and compare)")
    ff = fixed_frame if fixed_frame is not None else frame
    mf = moving_frame if moving_frame is not None else frame

    with OutputSet(force=force) as outs:
        # 1. outputs: refuse existing ones before any work
        if os.path.exists(outdir) and not os.path.isdir(outdir):
            raise InputError(outdir, "exists and is not a directory (OUTDIR must be a folder)")
        p_warped = outs.plan(os.path.join(outdir, "warped.nii.gz"))
        p_disp = outs.plan(os.path.join(outdir, "displacement.nii.gz"))
        p_wlab = outs.plan(os.path.join(outdir, "warped_labels.nii.gz")) if moving_labels else None
        p_metrics = outs.plan(os.path.join(outdir, "metrics.json")) if fixed_labels else None
        p_qc = outs.plan(_qc_path(qc, outdir)) if qc else None
        if p_qc is not None and vio.split_ext(p_qc)[1] not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
            raise InputError(p_qc, "the QC figure must be .png, .pdf, .svg or .jpg")

        # 2. inputs
        fixed = load_image(fixed_path, frame=ff, frame_flag="--frame (or --fixed-frame)")
        moving = load_image(moving_path, frame=mf, frame_flag="--frame (or --moving-frame)")
        for img, path in ((fixed, fixed_path), (moving, moving_path)):
            _check_not_constant(img, path)
        p_warped_plain = None
        if moving.fmt not in ("nifti", ".npy") and moving.shape[2] == 1 and fixed.shape[2] == 1:
            p_warped_plain = outs.plan(os.path.join(outdir, f"warped{moving.fmt}"))
        same = vio.same_grid(fixed, moving)
        if not same and not resample:
            raise InputError(moving_path, f"is on a different grid than the fixed image ({vio.describe_grid(moving)} vs "
                             f"{vio.describe_grid(fixed)}); pass --resample to resample it onto the fixed grid")
        mlab = flab = None
        if moving_labels:
            mlab = load_image(moving_labels, frame=mf, labels=True, frame_flag="--frame (or --moving-frame)")
            if not vio.same_grid(mlab, moving) and not resample:
                raise InputError(moving_labels, f"is not on the moving image's grid ({vio.describe_grid(mlab)} vs "
                                 f"{vio.describe_grid(moving)}); pass --resample to sample it in world coordinates")
        if fixed_labels:
            flab = load_image(fixed_labels, frame=ff, labels=True, frame_flag="--frame (or --fixed-frame)")
            if not vio.same_grid(flab, fixed):
                if not resample:
                    raise InputError(fixed_labels, f"is not on the fixed image's grid ({vio.describe_grid(flab)} vs "
                                     f"{vio.describe_grid(fixed)}); pass --resample to resample it onto the fixed grid")
                flab = vio.Image(data=warp_onto_fixed(None, fixed, flab, flab.data, 0, False), affine=fixed.affine,
                                 path=flab.path, header=flab.header, disk_dtype=flab.disk_dtype)
        if slices and len(fixed.active_axes) == 3 and min(fixed.shape[:2]) < 4:
            raise InputError(fixed_path, f"slices of shape {fixed.shape[:2]} are too small for --slices")
        masks = load_masks(fixed, moving, {"fixed_mask": fixed_mask, "moving_mask": moving_mask}, resample=resample,
                           frames={"fixed_mask": ff, "moving_mask": mf})
        p_affine = None
        if solver.get("affine"):
            p_affine = [outs.plan(os.path.join(outdir, n)) for n in AFFINE_OUTPUTS]
        u_init = None
        if initial:
            u_init, igrid = vio.load_displacement(initial)
            if not vio.same_grid(igrid, fixed):
                raise InputError(initial, f"displacement grid ({vio.describe_grid(igrid)}) does not match the fixed image ({vio.describe_grid(fixed)})")

        # 3. register on the fixed grid
        moving_arr = moving.data if same else warp_onto_fixed(None, fixed, moving, moving.data, 1, False)
        try:
            solved = _register_images(fixed, moving_arr, slices=slices, method=method, isotropic=isotropic,
                                      quiet=quiet, initial=u_init, masks=masks)
        except InputError:
            raise
        except (ValueError, TypeError) as exc:
            raise InputError(fixed_path, str(exc)) from None
        except RuntimeError as exc:  # --device gpu without a usable GPU
            if solver.get("device") != "gpu":
                raise
            raise InputError("--device gpu", str(exc)) from None

        ratio = fixed.spacing[2] / min(fixed.spacing[:2])
        if solved.mode == "3d" and ratio >= 3 and not quiet and solver.get("slice_axis") is None:
            import click

            click.echo(f"note: the slices are {ratio:.1f}x thicker than the pixels; such stacks usually register "
                       "better slice by slice (--slices) or within the slices (--slice-axis 2)", err=True)

        # 4. outputs in memory, then staged
        warped = warp_onto_fixed(solved, fixed, moving, moving.data, 1, same).astype(np.float32, copy=False)
        outs.save_nifti(vio.image_nifti(warped, fixed, np.float32), p_warped)
        outs.save_nifti(vio.displacement_nifti(solved.u, fixed), p_disp)
        if p_affine is not None and solved.affine is not None:
            save_affine(outs, p_affine, solved, fixed)
        if p_warped_plain is not None:
            if moving.colour is not None:
                chans = [warp_onto_fixed(solved, fixed, moving, np.ascontiguousarray(moving.colour[..., k])[:, :, None].astype(np.float32), 1, same)[:, :, 0]
                         for k in range(moving.colour.shape[-1])]
                plain = vio.to_plain_dtype(np.stack(chans, -1), moving.colour.dtype, moving.fmt)
            else:
                plain = vio.to_plain_dtype(warped[:, :, 0] if warped.shape[2] == 1 else warped, moving.disk_dtype, moving.fmt)
            outs.save_plain(plain, p_warped_plain)
        wl = None
        if mlab is not None:
            same_l = same and vio.same_grid(mlab, fixed)
            wl = warp_onto_fixed(solved, fixed, mlab, mlab.data, 0, same_l)
            outs.save_nifti(vio.image_nifti(wl, fixed, mlab.disk_dtype), p_wlab)
        metrics = {}
        if flab is not None:
            before = warp_onto_fixed(None, fixed, mlab, mlab.data, 0, same and vio.same_grid(mlab, fixed))
            metrics = evaluate_labels(flab.data, wl, solved.in_plane_field(), spacing=fixed.spacing, mode=solved.mode,
                                      moving_labels=before, label_names=label_names)
        if truth is not None:
            from varreg import metrics as M

            mask = (flab.data > 0) if flab is not None else None
            metrics["endpoint_error_mm"] = M.endpoint_error(solved.u, truth, spacing=fixed.spacing, mask=mask)
        summary = summary_line(metrics, label_names) if flab is not None else None
        if p_qc is not None:
            from varreg.qc import qc_figure

            title = summary or f"{os.path.basename(str(moving_path))} → {os.path.basename(str(fixed_path))}"
            fig = qc_figure(fixed.data, moving_arr, warped, solved.u, spacing=fixed.spacing, title=title,
                            layout="image" if fixed.fmt != "nifti" else "nifti",
                            unit="px" if fixed.fmt != "nifti" else "mm")
            outs.save_figure(fig, p_qc)
        total = time.perf_counter() - t0
        record = {
            "varreg_version": varreg.__version__,
            "command": "register",
            "inputs": {"fixed": str(fixed_path), "moving": str(moving_path), "fixed_labels": fixed_labels,
                       "moving_labels": moving_labels},
            "mode": solved.mode,
            "spacing_mm": list(fixed.spacing),
            "solver": {k: jsonable(v) for k, v in solved.info.items() if k not in ("time_s",)},
            **metrics,
            "time_s": {"solver": solved.solver_s, "total": total, "overhead": total - solved.solver_s},
        }
        if p_metrics is not None:
            outs.save_json(record, p_metrics)
        written = outs.commit()

    n = "x".join(map(str, fixed.shape if solved.mode != "2d" else [fixed.shape[i] for i in fixed.active_axes]))
    head = f"{prefix}{solved.mode.upper() if solved.mode != 'slices' else f'{fixed.shape[2]} slices'} {n}"
    tail = f"solver {solved.solver_s:.2f} s, total {time.perf_counter() - t0:.2f} s → {outdir}"
    if summary:
        echo(f"{head}: {summary} | {tail}", quiet)
    else:
        from varreg import metrics as M

        # det(I + grad u) of the 3-D field equals the 2-D one per slice (zero component, no variation
        # along a length-1 axis), so one call covers every mode
        echo(f"{head}: folds {100 * M.folding_fraction(solved.u):.2f} % | {tail}", quiet)
    record["written"] = written
    return record


# --------------------------------------------------------------------------- apply
def run_apply(disp_path, image_path, out_path, *, labels=False, resample=False, frame=None, force=False,
              quiet=False) -> str:
    """``varreg apply``: ``image(x + u(x))`` on the displacement's grid, written to ``out_path``."""
    t0 = time.perf_counter()
    with OutputSet(force=force) as outs:
        out = outs.plan(out_path)
        _, ext = vio.split_ext(out)
        if ext not in vio.NIFTI_EXTS[:2] and ext not in vio.PLAIN_EXTS:
            raise InputError(out_path, f"unknown output type {ext or '(no extension)'!r}; use .nii.gz, .nii, .png, .tif or .npy")
        u, grid = vio.load_displacement(disp_path)
        img = load_image(image_path, frame=frame, labels=labels)
        same = vio.same_grid(img, grid)
        if not same and not resample:
            raise InputError(image_path, f"does not match the displacement's grid ({vio.describe_grid(img)} vs "
                             f"{vio.describe_grid(grid)} in {disp_path}); pass --resample to sample it in world coordinates")
        order = 0 if labels else 1
        active = grid.active_axes
        if len(active) < 2:
            raise InputError(disp_path, f"has grid shape {grid.shape}: at least two axes need more than one voxel")
        # the warp register used: 2-D for one slice, per slice for a field with no through-slice component
        if len(active) == 2:
            mode = "2d"
        elif np.abs(u[2]).max() < 1e-4:
            mode = "slices"
        else:
            mode = "3d"
        if mode == "slices":
            u = u.copy()
            u[2] = 0.0
        solved = ImageRegistration(u, mode, 0.0, {})

        def warp_data(data, order):
            return warp_onto_fixed(solved, grid, img, data, order, same)

        ref = img if same and img.header is not None else grid
        if ext in vio.PLAIN_EXTS:
            if len(active) != 2 or grid.shape[2] != 1:
                if ext != ".npy":
                    raise InputError(out_path, f"a {grid.shape} volume cannot be written as {ext}; use .nii.gz or .npy")
            if img.colour is not None and not labels:
                chans = [warp_data(np.ascontiguousarray(img.colour[..., k])[:, :, None].astype(np.float32), 1)[:, :, 0]
                         for k in range(img.colour.shape[-1])]
                arr = vio.to_plain_dtype(np.stack(chans, -1), img.colour.dtype, ext)
            else:
                w = warp_data(img.data, order)
                w = w[:, :, 0] if w.shape[2] == 1 else w
                if labels:
                    arr = w.astype(img.disk_dtype)
                elif img.fmt != "nifti":
                    arr = vio.to_plain_dtype(w, img.disk_dtype, ext)
                else:
                    arr = w.astype(np.float32)
                if arr.dtype.kind == "f" and ext in (".png", ".jpg", ".jpeg", ".bmp"):
                    raise InputError(out_path, f"floating-point intensities cannot be written as {ext}; use .tif, .npy or .nii.gz")
            outs.save_plain(arr, out)
        else:
            w = warp_data(img.data, order)
            outs.save_nifti(vio.image_nifti(w, ref, img.disk_dtype if labels else np.float32), out)
        outs.commit()
    echo(f"applied {os.path.basename(str(disp_path))} to {image_path} ({'labels, nearest' if labels else 'linear'}, "
         f"{mode}) in {time.perf_counter() - t0:.2f} s → {out_path}", quiet)
    return out


# --------------------------------------------------------------------------- evaluate
def run_evaluate(fixed_labels, warped_labels, *, displacement=None, moving_labels=None, slices=False,
                 output="metrics.json", force=False, quiet=False, frame=None) -> dict:
    """``varreg evaluate``: metrics of a result made by any tool; prints a line, writes JSON."""
    t0 = time.perf_counter()
    with OutputSet(force=force) as outs:
        out = outs.plan(output) if output else None
        fl = load_image(fixed_labels, frame=frame, labels=True)
        wl = load_image(warped_labels, frame=frame, labels=True)
        if not vio.same_grid(fl, wl):
            raise InputError(warped_labels, f"is not on the grid of {fixed_labels} ({vio.describe_grid(wl)} vs {vio.describe_grid(fl)})")
        ml = None
        if moving_labels:
            mlab = load_image(moving_labels, frame=frame, labels=True)
            if not vio.same_grid(mlab, fl):
                raise InputError(moving_labels, f"is not on the grid of {fixed_labels} ({vio.describe_grid(mlab)} vs {vio.describe_grid(fl)})")
            ml = mlab.data
        u = None
        if displacement:
            u, grid = vio.load_displacement(displacement)
            if grid.shape != fl.shape:
                raise InputError(displacement, f"displacement of grid shape {grid.shape} does not match the label maps' shape {fl.shape}")
            if not vio.same_grid(grid, fl):
                raise InputError(displacement, f"displacement grid ({vio.describe_grid(grid)}) does not match {fixed_labels} ({vio.describe_grid(fl)})")
        active = fl.active_axes
        if len(active) < 2:
            raise InputError(fixed_labels, f"has shape {fl.shape}: at least two axes need more than one voxel")
        mode = "2d" if len(active) == 2 else ("slices" if slices else "3d")
        if mode == "slices" and u is not None:
            u = u.copy()
            u[2] = 0.0
        m = evaluate_labels(fl.data, wl.data, u, spacing=fl.spacing, mode=mode, moving_labels=ml)
        record = {
            "varreg_version": varreg.__version__,
            "command": "evaluate",
            "inputs": {"fixed_labels": str(fixed_labels), "warped_labels": str(warped_labels),
                       "displacement": displacement, "moving_labels": moving_labels},
            "mode": mode,
            "spacing_mm": list(fl.spacing),
            **m,
            "time_s": {"evaluate": time.perf_counter() - t0},
        }
        if out:
            outs.save_json(record, out)
        outs.commit()
    echo(summary_line(m) + (f" → {out}" if out else ""), quiet)
    return record


# --------------------------------------------------------------------------- demo
def demo_affine(shape3, spacing):
    """An LPS-like affine (x and y flipped), centred at the origin: what DICOM converters write."""
    a = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    centre = (np.asarray(shape3, float) - 1) / 2
    a[:3, 3] = -a[:3, :3] @ centre
    return a


def run_demo(outdir, *, dim=2, slices=False, qc=True, seed=0, force=False, quiet=False, solver=None,
             threads=None) -> dict:
    """``varreg demo``: write a phantom pair and register it with the ``register`` code path."""
    import nibabel as nib

    from varreg import phantom

    t0 = time.perf_counter()
    if dim == 2:
        shape, spacing = (96, 96), (1.5, 1.5, 8.0)
    else:
        shape, spacing = (64, 64, 10), (1.5, 1.5, 6.0)
    pair = phantom.demo_pair(shape, rng=seed)
    shape3 = shape if dim == 3 else shape + (1,)
    aff = demo_affine(shape3, spacing)
    inputs = {
        "fixed.nii.gz": (pair.fixed, np.float32),
        "moving.nii.gz": (pair.moving, np.float32),
        "fixed_labels.nii.gz": (pair.fixed_labels, np.uint8),
        "moving_labels.nii.gz": (pair.moving_labels, np.uint8),
    }
    names = list(inputs) + list(REGISTER_OUTPUTS) + ["warped_labels.nii.gz", "metrics.json"] + (["qc.png"] if qc else [])
    check = OutputSet(force=force)
    for n in names:
        check.plan(os.path.join(outdir, n))
    if dim == 2:
        truth = np.zeros((3,) + shape3, np.float32)
        truth[0, :, :, 0], truth[1, :, :, 0] = pair.truth[0], pair.truth[1]
    else:
        truth = pair.truth
    with OutputSet(force=True) as outs:
        for n, (arr, dt) in inputs.items():
            a3 = arr.reshape(shape3)
            img = nib.Nifti1Image(a3.astype(dt), aff)
            img.set_sform(aff, code=1)
            img.set_qform(aff, code=1)
            img.header.set_xyzt_units("mm", "sec")
            outs.save_nifti(img, os.path.join(outdir, n))
        outs.commit()
    j = lambda n: os.path.join(outdir, n)  # noqa: E731
    return run_register(j("fixed.nii.gz"), j("moving.nii.gz"), outdir, fixed_labels=j("fixed_labels.nii.gz"),
                        moving_labels=j("moving_labels.nii.gz"), qc="qc.png" if qc else None, slices=slices,
                        force=True, quiet=quiet, solver=solver, label_names=phantom.LABELS, truth=truth, t0=t0,
                        prefix="demo: ", threads=threads)
