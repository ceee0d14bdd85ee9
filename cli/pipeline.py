"""What the ``varreg`` commands do; imported lazily by :mod:`varreg_cli.main`.

Every input problem raises :class:`varreg.io.InputError`; every output goes
through :class:`varreg.io.OutputSet` (checked before any work, written to
temporary files, renamed together at the end).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np

import varreg
from varreg import io as vio
from varreg.io import InputError

from . import progress

SOLVER_KEYS = ("data_term", "denoiser", "theta", "lam", "warps", "iterations", "denoiser_iterations",
               "levels", "scale", "min_size", "normalise", "device", "checkpoint", "refine", "refine_denoiser",
               "refine_lam", "precision")


def echo(msg: str, quiet: bool) -> None:
    if not quiet:
        import click

        click.echo(msg)


# --------------------------------------------------------------------------- registration core
@dataclass
class Solved:
    """A registration on the fixed grid: ``u`` ``(3, X, Y, Z)`` voxels, how to warp with it, timings."""

    u: np.ndarray
    mode: str  # "3d" | "2d" | "slices"
    solver_s: float
    info: dict

    def warp_same_grid(self, vol: np.ndarray, order: int) -> np.ndarray:
        """Warp a volume on the fixed grid exactly as the API would (2-D per slice, 2-D or 3-D)."""
        if self.mode == "3d":
            return np.asarray(varreg.warp(vol, self.u, order=order))
        if self.mode == "2d":
            c = [i for i, n in enumerate(vol.shape) if n == 1][0]
            act = [i for i in range(3) if i != c]
            v2 = np.take(vol, 0, axis=c)
            u2 = np.stack([np.take(self.u[i], 0, axis=c) for i in act])
            return np.expand_dims(np.asarray(varreg.warp(v2, u2, order=order)), c)
        out = np.empty(vol.shape, dtype=(vol.dtype if (order == 0 or vol.dtype.kind == "f") else np.float32))
        for z in range(vol.shape[2]):
            out[..., z] = np.asarray(varreg.warp(vol[..., z], self.u[:2, :, :, z], order=order))
        return out


def _spacing(fixed: vio.Image, axes, isotropic: bool):
    if isotropic:
        return None
    sp = fixed.spacing
    return tuple(sp[i] for i in axes)


def solve(fixed: vio.Image, fixed_arr, moving_arr, *, slices: bool, solver: dict, isotropic: bool,
          quiet: bool, initial=None) -> Solved:
    """Register ``moving_arr`` onto ``fixed_arr`` (both ``fixed.shape``) in 3-D, 2-D or slice by slice."""
    from varreg.backend import to_numpy

    shape = fixed.shape
    active = fixed.active_axes
    on = progress.enabled(quiet)
    if len(active) < 2:
        raise InputError(fixed.path, f"has shape {shape}: at least two axes need more than one voxel")
    u = np.zeros((3, *shape), np.float32)
    if slices and len(active) == 3:
        nz = shape[2]
        res = varreg.register_slices(fixed_arr, moving_arr, axis=2, spacing=_spacing(fixed, (0, 1, 2), isotropic),
                                     initial=initial, progress=lambda it: progress.loop(it, nz, "slices", on),
                                     **solver)
        u[:] = res.displacement
        return Solved(u, "slices", sum(i["time_s"] for i in res.info["slices"]), res.info["slices"][-1])
    if len(active) == 3:
        sp = _spacing(fixed, (0, 1, 2), isotropic)
        text = f"registering 3-D {'x'.join(map(str, shape))}"
        with progress.Spinner(text, on):
            res = varreg.register(fixed_arr, moving_arr, spacing=sp, initial=initial, **solver)
        u[:] = np.asarray(to_numpy(res.displacement), np.float32)
        return Solved(u, "3d", res.info["time_s"], res.info)
    c = [i for i in range(3) if i not in active][0]
    sp = _spacing(fixed, active, isotropic)
    init = None if initial is None else np.stack([np.take(initial[i], 0, axis=c) for i in active])
    res = varreg.register(np.take(fixed_arr, 0, axis=c), np.take(moving_arr, 0, axis=c), spacing=sp, initial=init, **solver)
    u2 = np.asarray(to_numpy(res.displacement), np.float32)
    for k, i in enumerate(active):
        u[i] = np.expand_dims(u2[k], c)
    return Solved(u, "2d", res.info["time_s"], res.info)


def warp_onto_fixed(solved: Solved | None, fixed: vio.Image, src: vio.Image, data, order: int, same: bool):
    """``src`` (an image or label map, data ``data``) at ``x + u(x)`` of the fixed grid (u = 0 if ``solved`` is None)."""
    if same:
        if solved is None:
            return data.copy()
        return solved.warp_same_grid(data, order)
    coords = vio.sample_coords(fixed.shape, fixed.affine, src.affine, None if solved is None else solved.u)
    return vio.sample(data, coords, order)


# --------------------------------------------------------------------------- metrics
def _finite(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _by_label(d: dict) -> dict:
    return {str(k): _finite(v) for k, v in d.items()}


def _mean(vals):
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def hd_pair(a, b, label, spacing):
    """``(HD, HD95)`` of one label, equal to ``varreg.metrics.hausdorff(..., 100)`` and ``hd95``.

    The surfaces and distance transforms are computed once for both, on the
    bounding box of the two masks (plus one voxel), which holds every surface
    voxel and so gives the same distances as the whole grid.
    """
    from scipy import ndimage

    ma, mb = a == label, b == label
    na, nb = bool(ma.any()), bool(mb.any())
    if not na and not nb:
        return float("nan"), float("nan")
    if na != nb:
        return float("inf"), float("inf")
    both = ma | mb
    box = []
    for ax in range(both.ndim):
        other = tuple(i for i in range(both.ndim) if i != ax)
        idx = np.flatnonzero(both.any(axis=other))
        box.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, both.shape[ax])))
    box = tuple(box)
    ma, mb = ma[box], mb[box]
    st = ndimage.generate_binary_structure(ma.ndim, 1)
    # a crop edge is either a grid edge (outside = outside the mask, as in varreg.metrics) or one voxel
    # away from every mask voxel, so the surfaces are those of the whole grid
    sa = ma & ~ndimage.binary_erosion(ma, structure=st, iterations=1, border_value=0)
    sb = mb & ~ndimage.binary_erosion(mb, structure=st, iterations=1, border_value=0)
    d_ab = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    d_ba = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    return float(max(d_ab.max(), d_ba.max())), float(np.percentile(np.concatenate([d_ab, d_ba]), 95))


def label_metrics(fl, wl, labels, spacing) -> dict:
    """Dice, HD, HD95 per label (as :func:`varreg.metrics.label_metrics`, one distance pass per label)."""
    from varreg import metrics as M

    d = M.dice(fl, wl, labels=labels)
    hd, h95 = {}, {}
    for k in d:
        hd[k], h95[k] = hd_pair(fl, wl, k, spacing)
    return {"dice": d, "hd": hd, "hd95": h95}


def _disp_metrics(u_active, spacing):
    from varreg import metrics as M

    det = M.jacobian_determinant(u_active)
    grad = M.jacobian_gradient_magnitude(u_active, spacing=spacing)
    return 100.0 * float(np.count_nonzero(det <= 0)) / det.size, float(grad)


def compute_metrics(fixed_labels, warped_labels, u=None, *, spacing, mode: str, moving_labels=None,
                    label_names=None) -> dict:
    """Dice, HD and HD95 (mm) per label, folds and mean |grad det| of ``u``; per slice in ``slices`` mode.

    Arrays are 3-D on one grid (``spacing`` its voxel sizes in mm); ``u`` ``(3, X, Y, Z)`` voxels or None.
    ``mode``: ``"3d"`` (volume), ``"2d"`` (one axis of length 1), ``"slices"`` (volume metrics plus
    per-slice 2-D metrics along the last axis and their mean over the slices where every label is
    present in the fixed and the moving (else warped) labels: the ACDC 2-D protocol).
    """
    from varreg import metrics as M

    fl, wl = np.asarray(fixed_labels), np.asarray(warped_labels)
    ml = None if moving_labels is None else np.asarray(moving_labels)
    present = np.union1d(np.unique(fl), np.unique(wl if ml is None else ml))
    labels = [int(v) for v in present if v != 0]
    sp = tuple(float(s) for s in spacing)
    if mode == "2d":
        c = [i for i, n in enumerate(fl.shape) if n == 1][0]
        act = [i for i in range(3) if i != c]
        sq = lambda a: np.take(a, 0, axis=c)  # noqa: E731
        fl_e, wl_e, ml_e = sq(fl), sq(wl), (None if ml is None else sq(ml))
        sp_e = tuple(sp[i] for i in act)
        u_e = None if u is None else np.stack([sq(u[i]) for i in act])
    else:
        fl_e, wl_e, ml_e, sp_e = fl, wl, ml, sp
        u_e = u
    lm = label_metrics(fl_e, wl_e, labels, sp_e)
    out = {
        "labels": labels,
        "dice": _by_label(lm["dice"]),
        "hd_mm": _by_label(lm["hd"]),
        "hd95_mm": _by_label(lm["hd95"]),
        "mean_dice": _mean(lm["dice"].values()),
    }
    if label_names:
        out["label_names"] = {str(k): v for k, v in label_names.items() if k in labels}
    if ml_e is not None:
        before = M.dice(fl_e, ml_e, labels=labels)
        out["dice_before"] = _by_label(before)
        out["mean_dice_before"] = _mean(before.values())
    if u_e is not None and mode != "slices":
        fold, grad = _disp_metrics(u_e, sp_e)
        out["folding_percent"] = fold
        out["mean_grad_jacobian_per_mm"] = grad
    if mode == "slices":
        per, folds_n, grads = [], 0, []
        ref = ml if ml is not None else wl
        for z in range(fl.shape[2]):
            a, b = fl[..., z], wl[..., z]
            entry = {"index": z}
            s_lm = label_metrics(a, b, labels, sp[:2])
            entry["dice"] = _by_label(s_lm["dice"])
            entry["hd_mm"] = _by_label(s_lm["hd"])
            entry["hd95_mm"] = _by_label(s_lm["hd95"])
            if ml is not None:
                entry["dice_before"] = _by_label(M.dice(a, ml[..., z], labels=labels))
            entry["all_labels_present"] = bool(labels) and all(
                bool((a == k).any()) and bool((ref[..., z] == k).any()) for k in labels)
            if u is not None:
                uz = u[:2, :, :, z]
                det = M.jacobian_determinant(uz)
                folds_n += int(np.count_nonzero(det <= 0))
                entry["folding_percent"] = 100.0 * float(np.count_nonzero(det <= 0)) / det.size
                g = float(M.jacobian_gradient_magnitude(uz, spacing=sp[:2]))
                grads.append(g)
                entry["mean_grad_jacobian_per_mm"] = g
            per.append(entry)
        if u is not None:
            out["folding_percent"] = 100.0 * folds_n / fl.size
            out["mean_grad_jacobian_per_mm"] = float(np.mean(grads))
        chosen = [e for e in per if e["all_labels_present"]]
        summ = {"axis": 2, "rule": "slices where every label is present in the fixed and the moving labels",
                "n_slices": len(per), "n_evaluated": len(chosen), "indices": [e["index"] for e in chosen]}
        for key in ("dice", "hd_mm", "hd95_mm", "dice_before"):
            if chosen and key in chosen[0]:
                summ[key] = {str(k): _mean_or_none([e[key][str(k)] for e in chosen]) for k in labels}
        if chosen and "dice" in summ:
            summ["mean_dice"] = _mean(summ["dice"].values())
            if "dice_before" in summ:
                summ["mean_dice_before"] = _mean(summ["dice_before"].values())
        if chosen and u is not None:
            summ["folding_percent"] = float(np.mean([e["folding_percent"] for e in chosen]))
            summ["mean_grad_jacobian_per_mm"] = float(np.mean([e["mean_grad_jacobian_per_mm"] for e in chosen]))
        summ["per_slice"] = per
        out["slices"] = summ
    return out


def _mean_or_none(vals):
    """Mean of per-slice values; None if any is None (an infinite distance) or none are given."""
    if not vals or any(v is None for v in vals):
        return None
    return float(np.mean(vals))


def summary_line(m: dict, label_names=None) -> str:
    """``Dice RV 0.80→0.91  Myo ...  mean 0.61→0.83 | folds 0.00 % | ...``."""
    names = {int(k): v for k, v in (m.get("label_names") or label_names or {}).items()}
    src, where = m, ""
    if "slices" in m and m["slices"].get("n_evaluated"):
        src = m["slices"]
        where = f" (mean of {src['n_evaluated']} slices)"
    parts = []
    for k in m["labels"]:
        after = src.get("dice", {}).get(str(k))
        before = src.get("dice_before", {}).get(str(k)) if "dice_before" in src else None
        name = names.get(k, str(k))
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        parts.append(f"{name} {fmt(before)}→{fmt(after)}" if "dice_before" in src else f"{name} {fmt(after)}")
    mean_a, mean_b = src.get("mean_dice"), src.get("mean_dice_before")
    line = f"Dice{where} " + "  ".join(parts)
    if mean_a is not None:
        line += f"  mean {mean_b:.3f}→{mean_a:.3f}" if mean_b is not None else f"  mean {mean_a:.3f}"
    if "folding_percent" in m:
        line += f" | folds {m['folding_percent']:.2f} %"
    return line


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


def check_solver_options(solver: dict) -> None:
    """Names of the data term and denoiser, before any file is read."""
    from varreg.data_terms import DATA_TERMS
    from varreg.denoisers import DENOISERS

    dt = solver.get("data_term")
    if dt is not None and dt.lower() not in DATA_TERMS:
        raise InputError("--data-term", f"unknown data term {dt!r}; choose one of {', '.join(sorted(DATA_TERMS))}")
    dn = solver.get("denoiser")
    if dn is not None and dn.lower() not in (*DENOISERS, "unet"):
        raise InputError("--denoiser", f"unknown denoiser {dn!r}; choose one of {', '.join(DENOISERS)}, unet")
    unet = dn is not None and dn.lower() == "unet"
    ckpt = solver.get("checkpoint")
    if unet and ckpt is None:
        raise InputError("--denoiser", "unet (VR-Net) needs --ckpt PATH")
    if not unet:
        given = [opt for opt, key in (("--ckpt", "checkpoint"), ("--precision", "precision"))
                 if solver.get(key) is not None]
        if given:
            raise InputError(given[0], "--ckpt and --precision go with --denoiser unet")
    rd = solver.get("refine_denoiser")
    if rd is not None and rd.lower() not in DENOISERS:
        raise InputError("--refine-denoiser", f"unknown denoiser {rd!r}; choose one of {', '.join(DENOISERS)}")
    refine = solver.get("refine")
    if unet and isinstance(refine, tuple):
        raise InputError("--refine", "after VR-Net it takes one count N (warps at full resolution)")
    no_refine = refine == 0 or (refine is None and unet)  # VR-Net refines only when asked
    for opt, key in (("--refine-denoiser", "refine_denoiser"), ("--refine-lam", "refine_lam")):
        if solver.get(key) is not None and no_refine:
            raise InputError(opt, "it sets the --refine warps, and there are none: give --refine N too")
    if ckpt is not None and not os.path.isfile(ckpt):
        raise InputError(ckpt, "checkpoint file not found")


REGISTER_OUTPUTS = ("warped.nii.gz", "displacement.nii.gz")


def _qc_path(qc, outdir):
    if qc is None:
        return None
    return os.path.join(outdir, qc) if os.path.dirname(qc) == "" else qc


def run_register(fixed_path, moving_path, outdir, *, fixed_labels=None, moving_labels=None, qc=None,
                 resample=False, slices=False, frame=None, fixed_frame=None, moving_frame=None,
                 force=False, quiet=False, isotropic=False, initial=None, solver=None,
                 label_names=None, truth=None, t0=None, prefix="", threads=None) -> dict:
    """``varreg register``: returns the metrics dict (also when no labels are given: then not written)."""
    t0 = time.perf_counter() if t0 is None else t0
    set_threads(threads)
    solver = {k: v for k, v in (solver or {}).items() if v is not None}
    check_solver_options(solver)
    if fixed_labels is not None and moving_labels is None:
        raise InputError(fixed_labels, "--fixed-labels needs --moving-labels as well (the labels to warp and compare)")
    ff = fixed_frame if fixed_frame is not None else frame
    mf = moving_frame if moving_frame is not None else frame

    with vio.OutputSet(force=force) as outs:
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
        fixed = vio.load_image(fixed_path, frame=ff, frame_option="--frame (or --fixed-frame)")
        moving = vio.load_image(moving_path, frame=mf, frame_option="--frame (or --moving-frame)")
        p_warped_plain = None
        if moving.fmt not in ("nifti", ".npy") and moving.shape[2] == 1 and fixed.shape[2] == 1:
            p_warped_plain = outs.plan(os.path.join(outdir, f"warped{moving.fmt}"))
        same = vio.same_grid(fixed, moving)
        if not same and not resample:
            raise InputError(moving_path, f"is on a different grid than the fixed image ({vio.describe_grid(moving)} vs "
                             f"{vio.describe_grid(fixed)}); pass --resample to resample it onto the fixed grid")
        mlab = flab = None
        if moving_labels:
            mlab = vio.load_image(moving_labels, frame=mf, labels=True, frame_option="--frame (or --moving-frame)")
            if not vio.same_grid(mlab, moving) and not resample:
                raise InputError(moving_labels, f"is not on the moving image's grid ({vio.describe_grid(mlab)} vs "
                                 f"{vio.describe_grid(moving)}); pass --resample to sample it in world coordinates")
        if fixed_labels:
            flab = vio.load_image(fixed_labels, frame=ff, labels=True, frame_option="--frame (or --fixed-frame)")
            if not vio.same_grid(flab, fixed):
                if not resample:
                    raise InputError(fixed_labels, f"is not on the fixed image's grid ({vio.describe_grid(flab)} vs "
                                     f"{vio.describe_grid(fixed)}); pass --resample to resample it onto the fixed grid")
                flab = vio.Image(data=warp_onto_fixed(None, fixed, flab, flab.data, 0, False), affine=fixed.affine,
                                 path=flab.path, header=flab.header, disk_dtype=flab.disk_dtype)
        if slices and len(fixed.active_axes) == 3 and min(fixed.shape[:2]) < 4:
            raise InputError(fixed_path, f"slices of shape {fixed.shape[:2]} are too small for --slices")
        u_init = None
        if initial:
            u_init, igrid = vio.load_displacement(initial)
            if not vio.same_grid(igrid, fixed):
                raise InputError(initial, f"displacement grid ({vio.describe_grid(igrid)}) does not match the fixed image ({vio.describe_grid(fixed)})")

        # 3. register on the fixed grid
        moving_arr = moving.data if same else warp_onto_fixed(None, fixed, moving, moving.data, 1, False)
        try:
            solved = solve(fixed, fixed.data, moving_arr, slices=slices, solver=solver, isotropic=isotropic,
                           quiet=quiet, initial=u_init)
        except InputError:
            raise
        except (ValueError, TypeError) as exc:
            raise InputError(fixed_path, str(exc)) from None
        except RuntimeError as exc:  # --device gpu without a usable GPU
            if solver.get("device") != "gpu":
                raise
            raise InputError("--device gpu", str(exc)) from None

        ratio = fixed.spacing[2] / min(fixed.spacing[:2])
        if solved.mode == "3d" and ratio >= 3 and not quiet:
            import click

            click.echo(f"note: the slices are {ratio:.1f}x thicker than the pixels; such stacks usually register "
                       "better slice by slice (--slices)", err=True)

        # 4. outputs in memory, then staged
        warped = warp_onto_fixed(solved, fixed, moving, moving.data, 1, same).astype(np.float32, copy=False)
        outs.save_nifti(vio.image_nifti(warped, fixed, np.float32), p_warped)
        outs.save_nifti(vio.displacement_nifti(solved.u, fixed), p_disp)
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
            metrics = compute_metrics(flab.data, wl, solved.u, spacing=fixed.spacing, mode=solved.mode,
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
            "solver": {k: _jsonable(v) for k, v in solved.info.items() if k not in ("time_s",)},
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


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v if not (isinstance(v, float) and not math.isfinite(v)) else None
    return str(v)


# --------------------------------------------------------------------------- apply
def run_apply(disp_path, image_path, out_path, *, labels=False, resample=False, frame=None, force=False,
              quiet=False) -> str:
    """``varreg apply``: ``image(x + u(x))`` on the displacement's grid, written to ``out_path``."""
    t0 = time.perf_counter()
    with vio.OutputSet(force=force) as outs:
        out = outs.plan(out_path)
        _, ext = vio.split_ext(out)
        if ext not in vio.NIFTI_EXTS[:2] and ext not in vio.PLAIN_EXTS:
            raise InputError(out_path, f"unknown output type {ext or '(no extension)'!r}; use .nii.gz, .nii, .png, .tif or .npy")
        u, grid = vio.load_displacement(disp_path)
        img = vio.load_image(image_path, frame=frame, labels=labels)
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
        solved = Solved(u, mode, 0.0, {})

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
    with vio.OutputSet(force=force) as outs:
        out = outs.plan(output) if output else None
        fl = vio.load_image(fixed_labels, frame=frame, labels=True)
        wl = vio.load_image(warped_labels, frame=frame, labels=True)
        if not vio.same_grid(fl, wl):
            raise InputError(warped_labels, f"is not on the grid of {fixed_labels} ({vio.describe_grid(wl)} vs {vio.describe_grid(fl)})")
        ml = None
        if moving_labels:
            mlab = vio.load_image(moving_labels, frame=frame, labels=True)
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
        m = compute_metrics(fl.data, wl.data, u, spacing=fl.spacing, mode=mode, moving_labels=ml)
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
    check = vio.OutputSet(force=force)
    for n in names:
        check.plan(os.path.join(outdir, n))
    if dim == 2:
        truth = np.zeros((3,) + shape3, np.float32)
        truth[0, :, :, 0], truth[1, :, :, 0] = pair.truth[0], pair.truth[1]
    else:
        truth = pair.truth
    with vio.OutputSet(force=True) as outs:
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
