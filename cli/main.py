"""``varreg`` command line entry point.

Only click is imported here, so ``varreg --help`` is quick; the solver, nibabel
and matplotlib are imported when a command runs (:mod:`varreg_cli.pipeline`).
Every error ends as one line ``error: <file>: <problem>`` on stderr and exit
code 2 (1 for an unexpected internal error; set ``VARREG_DEBUG=1`` for its
traceback).
"""
from __future__ import annotations

import os
import sys

import click

from .options import SolverCommand

EXIT_INPUT = 2
EXIT_INTERNAL = 1


def _fail(msg: str, code: int) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


class VarregGroup(click.Group):
    """A group whose errors (usage, input, internal) are one ``error:`` line, never a traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name or "varreg", complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:  # click turns Ctrl-C into Abort
            _fail("interrupted; no output was written", 130)
        except click.ClickException as exc:  # usage errors, bad option values
            msg = exc.format_message().replace("\n", " ")
            hint = ""
            ctx = getattr(exc, "ctx", None)
            if ctx is not None:
                hint = f" (see '{ctx.command_path} --help')"
            _fail(f"{msg}{hint}", exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; no output was written", 130)
        except Exception as exc:  # noqa: BLE001
            from varreg.io import InputError

            if isinstance(exc, InputError):
                _fail(str(exc), EXIT_INPUT)
            if os.environ.get("VARREG_DEBUG"):
                raise
            _fail(f"internal error ({type(exc).__name__}: {exc}); rerun with VARREG_DEBUG=1 for the traceback", EXIT_INTERNAL)
        if isinstance(rv, int) and not isinstance(rv, bool):
            sys.exit(rv)
        sys.exit(0)


CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=100)


@click.group(cls=VarregGroup, context_settings=CONTEXT)
@click.version_option(package_name="varreg")
def main():
    """varreg: variational deformable image registration (TV-L1 and relatives) on NIfTI and 2-D images.

    \b
    varreg demo -o demo_out                      synthetic cardiac pair, registered, with qc.png
    varreg register FIXED MOVING -o OUT          warped.nii.gz + displacement.nii.gz (ITK/ANTs)
    varreg apply OUT/displacement.nii.gz IMG -o W.nii.gz [--labels]
    varreg evaluate FIXED_LABELS WARPED_LABELS [--displacement D]
    varreg bench --data ACDC_DIR -o REPORT [--quick]   compare methods (tables, plots)
    varreg train --data ACDC_DIR -o RUN_DIR [options]  train the VR-Net (needs torch), resumable
    varreg batch MANIFEST.csv -o OUT [options]   a cohort of pairs on Dask, resumable

    Errors print one line 'error: <file>: <problem>' and exit with code 2.
    """


@main.command(cls=SolverCommand, context_settings=CONTEXT)
@click.argument("fixed", metavar="FIXED")
@click.argument("moving", metavar="MOVING")
@click.option("-o", "--outdir", required=True, metavar="OUTDIR",
              help="Folder for the outputs (created if missing): warped.nii.gz, displacement.nii.gz, "
                   "and with labels warped_labels.nii.gz and metrics.json.")
@click.option("--moving-labels", metavar="L", default=None,
              help="Label map of MOVING: warped with nearest neighbour (dtype kept) to warped_labels.nii.gz.")
@click.option("--fixed-labels", metavar="L", default=None,
              help="Label map of FIXED (needs --moving-labels): metrics.json with per-label Dice, HD and HD95 "
                   "(mm), % det ≤ 0, mean |∇det| (1/mm), run time; and a one-line summary.")
@click.option("--qc", metavar="FILE", default=None,
              help="Write a QC figure (.png/.pdf/.svg): images, differences before/after, deformation grid and "
                   "colour, Jacobian determinant with folds. A bare file name goes into OUTDIR.")
@click.option("--resample", is_flag=True,
              help="Resample MOVING (and its labels) onto the fixed grid when the grids (shape, affine) differ; "
                   "without it, different grids are refused.")
@click.option("--slices", is_flag=True,
              help="Register a (X, Y, slices) stack slice by slice in 2-D (last axis = slice axis, as ACDC "
                   "short-axis stacks; the paper's 2-D protocol); the displacement has no through-slice part.")
@click.option("--frame", type=click.IntRange(min=0), default=None, metavar="N",
              help="For 4-D series: use frame N (0-based) of FIXED and MOVING (and their labels).")
@click.option("--fixed-frame", type=click.IntRange(min=0), default=None, metavar="N",
              help="Frame of a 4-D FIXED (overrides --frame).")
@click.option("--moving-frame", type=click.IntRange(min=0), default=None, metavar="N",
              help="Frame of a 4-D MOVING (overrides --frame).")
@click.option("--initial", metavar="D", default=None,
              help="Initial displacement: a displacement.nii.gz on the fixed grid (as written by this command).")
@click.option("--fixed-mask", metavar="M", default=None,
              help="Binary mask (0/1) on the fixed grid: the data term counts only inside it; outside, the "
                   "displacement follows the regulariser (e.g. leave out an artefact or the field of view's edge).")
@click.option("--moving-mask", metavar="M", default=None,
              help="Binary mask (0/1) on the moving grid, carried with MOVING: the data term ignores points that "
                   "map outside it.")
@click.option("--isotropic", is_flag=True,
              help="Ignore the voxel sizes in the regulariser (treat voxels as cubes); outputs stay in mm.")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="CPU threads of the solver's kernels. Default: numba's (all cores, or NUMBA_NUM_THREADS).")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing outputs (default: refuse, write nothing).")
@click.option("-q", "--quiet", is_flag=True, help="No progress and no summary line (errors still go to stderr).")
def register(fixed, moving, outdir, moving_labels, fixed_labels, qc, resample, slices, frame, fixed_frame,
             moving_frame, initial, fixed_mask, moving_mask, isotropic, threads, force, quiet, **solver):
    """Register MOVING onto FIXED (NIfTI, or 2-D PNG/TIFF/NPY) in physical space.

    \b
    Writes into OUTDIR:
      warped.nii.gz         MOVING resampled onto the fixed grid, with the fixed header
      displacement.nii.gz   the deformation as a world-space (mm) vector field, ITK convention
                            (5-D (X,Y,Z,1,3), intent vector, LPS components): SimpleITK,
                            ITK and ANTs apply it as-is (DisplacementFieldTransform) to get
                            warped.nii.gz; 'varreg apply' applies it to other images
      warped_labels.nii.gz  with --moving-labels
      metrics.json          with --fixed-labels and --moving-labels
      warped.<ext>          for PNG/TIFF inputs, in the input's format
      affine.tfm            with --affine: the affine stage as an ITK transform file
                            (LPS mm; SimpleITK ReadTransform, antsApplyTransforms -t); with
                            --slices, one 3-D affine of the stack before the 2-D slices
      residual.nii.gz       with --affine: the field after it; the ITK composite
                            [affine.tfm, residual.nii.gz] equals displacement.nii.gz

    The voxel sizes of FIXED (from its affine) reach the solver; images are
    read with their affine (orientation, spacing, origin). The solver flags
    below are the fields of varreg.SolverOptions (classical) and, with
    --denoiser unet, varreg_learned.VRNetOptions (VR-Net).
    """
    import time

    t0 = time.perf_counter()
    from . import pipeline

    pipeline.run_register(
        fixed, moving, outdir, fixed_labels=fixed_labels, moving_labels=moving_labels, qc=qc, resample=resample,
        slices=slices, frame=frame, fixed_frame=fixed_frame, moving_frame=moving_frame, force=force, quiet=quiet,
        isotropic=isotropic, initial=initial, t0=t0, threads=threads, solver=solver, fixed_mask=fixed_mask,
        moving_mask=moving_mask,
    )


@main.command(context_settings=CONTEXT)
@click.argument("displacement", metavar="DISPLACEMENT")
@click.argument("image", metavar="IMAGE")
@click.option("-o", "--output", "out", required=True, metavar="OUT",
              help="Output file: .nii.gz/.nii (header of IMAGE, or the displacement's grid), or .png/.tif/.npy for 2-D.")
@click.option("--labels", is_flag=True, help="IMAGE is a label map: nearest neighbour, integer check, dtype kept.")
@click.option("--resample", is_flag=True,
              help="Allow IMAGE on another grid than the displacement: sample it in world coordinates (mm).")
@click.option("--frame", type=click.IntRange(min=0), default=None, metavar="N", help="Frame of a 4-D IMAGE.")
@click.option("-f", "--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No summary line.")
def apply(displacement, image, out, labels, resample, frame, force, quiet):
    """Apply a saved DISPLACEMENT (varreg, ITK or ANTs .nii.gz) to IMAGE or a label map.

    The output lies on the displacement's grid: OUT(x) = IMAGE(x + u(x)), linear
    interpolation (nearest with --labels), border values replicated. IMAGE must
    be on the displacement's grid unless --resample is given.
    """
    from . import pipeline

    pipeline.run_apply(displacement, image, out, labels=labels, resample=resample, frame=frame, force=force,
                       quiet=quiet)


@main.command(context_settings=CONTEXT)
@click.argument("fixed_labels", metavar="FIXED_LABELS")
@click.argument("warped_labels", metavar="WARPED_LABELS")
@click.option("--displacement", "disp", metavar="D", default=None,
              help="Displacement (varreg/ITK/ANTs .nii.gz on the fixed grid): adds % det ≤ 0 and mean |∇det| (1/mm).")
@click.option("--moving-labels", metavar="L", default=None,
              help="Unregistered moving labels on the fixed grid: adds Dice before registration.")
@click.option("--slices", is_flag=True,
              help="Also 2-D metrics per slice (last axis) and their mean over slices with every label present.")
@click.option("-o", "--output", default="metrics.json", show_default=True, metavar="FILE",
              help="Where to write the metrics (JSON).")
@click.option("-f", "--force", is_flag=True, help="Overwrite FILE if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="Do not print the summary line.")
def evaluate(fixed_labels, warped_labels, disp, moving_labels, slices, output, force, quiet):
    """Metrics of a registration result made by any tool: per-label Dice, HD and HD95 in mm.

    Distances use the voxel sizes of FIXED_LABELS; both label maps must share its grid.
    """
    from . import pipeline

    pipeline.run_evaluate(fixed_labels, warped_labels, displacement=disp, moving_labels=moving_labels,
                          slices=slices, output=output, force=force, quiet=quiet)


@main.command(context_settings=CONTEXT)
@click.option("-o", "--outdir", default="varreg_demo", show_default=True, metavar="OUTDIR",
              help="Folder for the phantom pair and the results.")
@click.option("--dim", type=click.Choice(["2", "3"]), default="2", show_default=True,
              help="2: one 96x96 slice (1.5 mm pixels); 3: a 64x64x10 short-axis stack (1.5x1.5x6 mm voxels).")
@click.option("--slices", is_flag=True, help="With --dim 3: register slice by slice.")
@click.option("--qc/--no-qc", default=True, show_default=True, help="Write qc.png.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the phantom's texture and noise.")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default=None, help="Solver device (default: auto).")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N", help="CPU threads of the solver.")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing files in OUTDIR.")
@click.option("-q", "--quiet", is_flag=True, help="No progress and no summary line.")
def demo(outdir, dim, slices, qc, seed, device, threads, force, quiet):
    """Register a synthetic cardiac-like pair (no data, no network needed).

    \b
    A short-axis phantom (labels 1 RV, 2 Myo, 3 LV as in ACDC) and a copy
    deformed by a known contraction toward the LV centre are written to OUTDIR
    (fixed.nii.gz, moving.nii.gz, fixed_labels.nii.gz, moving_labels.nii.gz),
    then registered by the same code as 'varreg register' with labels:
    warped.nii.gz, displacement.nii.gz, warped_labels.nii.gz, metrics.json, qc.png.
    Prints Dice before → after.
    """
    from . import pipeline

    pipeline.run_demo(outdir, dim=int(dim), slices=slices, qc=qc, seed=seed, force=force, quiet=quiet,
                      solver={"device": device}, threads=threads)


@main.command(cls=SolverCommand, context_settings=CONTEXT)
@click.argument("manifest", metavar="MANIFEST.csv")
@click.option("-o", "--outdir", required=True, metavar="OUT",
              help="Folder for the results: OUT/<id>/ per pair (what 'varreg register' writes) and OUT/results.csv.")
@click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
              help="Worker processes of the local cluster. Default: the usable cores / --threads-per-worker.")
@click.option("--threads-per-worker", type=click.IntRange(min=1), default=None, metavar="T",
              help="Solver threads of each local worker (numba, torch); each worker registers one pair at a time. "
                   "Default: the usable cores / --workers (N x T <= cores; with neither: T = 1, N = cores).")
@click.option("--scheduler", metavar="ADDRESS", default=None,
              help="Run on an existing Dask cluster (e.g. tcp://127.0.0.1:8786) instead of a local one; its "
                   "workers must see the input and output paths.")
@click.option("--connect-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              metavar="S", help="Seconds to wait for --scheduler before giving up.")
@click.option("--retries", type=click.IntRange(min=0), default=3, show_default=True, metavar="N",
              help="Retries of a pair whose task raised an unexpected error; on the local cluster also the worker "
                   "deaths a pair may survive (a dead worker is replaced, its pair run again).")
@click.option("--qc", metavar="FILE", default=None,
              help="Write a QC figure of every pair under this bare file name (.png/.pdf/.svg) in its folder.")
@click.option("--resample", is_flag=True, help="As 'varreg register --resample', for every pair.")
@click.option("--slices", is_flag=True,
              help="As 'varreg register --slices': stacks slice by slice in 2-D; the Dice and HD95 columns of "
                   "results.csv are then the means over the slices with every label present.")
@click.option("--frame", type=click.IntRange(min=0), default=None, metavar="N", help="Frame of 4-D inputs.")
@click.option("--fixed-frame", type=click.IntRange(min=0), default=None, metavar="N", help="Frame of 4-D FIXED inputs.")
@click.option("--moving-frame", type=click.IntRange(min=0), default=None, metavar="N", help="Frame of 4-D MOVING inputs.")
@click.option("--isotropic", is_flag=True, help="As 'varreg register --isotropic', for every pair.")
@click.option("-f", "--force", is_flag=True,
              help="Recompute pairs done with other inputs or options, and write over files the batch did not make.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary table (errors still go to stderr).")
def batch(manifest, outdir, workers, threads_per_worker, scheduler, connect_timeout, retries, qc, resample, slices,
          frame, fixed_frame, moving_frame, isotropic, force, quiet, **solver):
    """Register every pair of MANIFEST.csv on Dask (a local cluster, or --scheduler), resumably.

    \b
    MANIFEST.csv columns: id, fixed, moving [, fixed_labels, moving_labels]; paths
    relative to the manifest's folder. Every option of 'varreg register' applies to
    every pair. Writes OUT/<id>/ per pair and OUT/results.csv: id, status, error,
    mean_dice, dice_<label>..., hd95 (mm, mean over labels), hd95_<label>...,
    folding_percent, seconds. A rerun skips the pairs already done with the same
    inputs and options. Exit code 0: every pair ok; 1: some pairs failed (their
    rows say why; the others are done); 2: bad manifest, options, OUT or scheduler.
    """
    from . import batch as batch_mod

    return batch_mod.run_cli(
        manifest, outdir, workers=workers, threads_per_worker=threads_per_worker, scheduler=scheduler,
        connect_timeout=connect_timeout, retries=retries, force=force, quiet=quiet, qc=qc, resample=resample,
        slices=slices, frame=frame, fixed_frame=fixed_frame, moving_frame=moving_frame, isotropic=isotropic,
        **solver)


from .bench import bench as _bench  # noqa: E402  (imports click only; the work loads when it runs)
from .train import train as _train  # noqa: E402  (imports click only; torch loads when it runs)

main.add_command(_bench)
main.add_command(_train)

if __name__ == "__main__":
    main()
