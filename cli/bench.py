"""``varreg bench``: the comparison report of issue #5 (ACDC 2-D/3-D, synthetic 3-D, scaling).

The click command, its options and their checks. Only click is imported at
module level (``varreg --help`` stays quick); the work is
:mod:`varreg_bench.report`, imported when the command runs.
"""
from __future__ import annotations

import os
import shlex
import sys

import click

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=100)


def _csv_list(ctx, param, value):
    if value is None:
        return None
    items = [v.strip() for part in value for v in part.split(",") if v.strip()]
    return items or None


def _floats(n, name):
    def conv(ctx, param, value):
        if value is None:
            return None
        try:
            vals = tuple(float(v) for v in value.replace("x", ",").split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"expected {n} numbers separated by commas, got {value!r}") from None
        if len(vals) != n or not all(v > 0 for v in vals):
            raise click.BadParameter(f"expected {n} positive numbers separated by commas, got {value!r}")
        return vals
    return conv


def _ints(ctx, param, value):
    if value is None:
        return None
    try:
        vals = tuple(int(v) for v in value.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected whole numbers separated by commas, got {value!r}") from None
    if not vals or not all(v >= 8 for v in vals):
        raise click.BadParameter(f"expected sizes of at least 8 voxels, got {value!r}")
    return vals


def _command_line() -> str | None:
    """The command as typed, when this process is the ``varreg`` program (not a test runner)."""
    argv = list(sys.argv)
    prog = os.path.basename(argv[0]) if argv else ""
    parent = os.path.basename(os.path.dirname(os.path.abspath(argv[0]))) if argv else ""
    if (prog == "varreg" or (prog == "main.py" and parent in ("cli", "varreg_cli"))) and "bench" in argv[1:]:
        return "varreg " + shlex.join(argv[1:])
    return None


#: the patient splits of varreg.acdc.SPLITS (kept here so that --help imports no numpy; tested equal)
SPLITS = ("train", "val", "val-select", "val-test", "all")


def _quick_split(data, echo) -> str:
    """``--quick``'s split: val when the folder holds val patients, else all (any ACDC-layout folder)."""
    import os

    from varreg import acdc

    if not os.path.isdir(data) or acdc.patients(data, "val"):
        return "val"
    n = len(acdc.patients(data, "all"))
    echo(f"--quick: {data} holds no patient of the val split ({acdc.split_rule('val')}); using the first 2 of "
         f"its {n} patients (--split all)")
    return "all"


@click.command(context_settings=CONTEXT)
@click.option("--data", metavar="DIR", default=None,
              help="ACDC folder (patientNNN_{ED,ES}[_gt].nii.gz), e.g. ../shared/data/acdc. Needed for the "
                   "acdc-2d and acdc-3d suites; read in place, never copied.")
@click.option("-o", "--outdir", default=None, metavar="REPORT_DIR",
              help="Report folder (created): report.md, header.json, results_*.md/.csv, per_pair_*.csv, "
                   "runtime.md/.csv, boxplots_*.png, and scaling.* / tuning.* with --scaling / --tune.")
@click.option("--split", type=click.Choice(list(SPLITS)), default=None,
              help="Patients by the ACDC number rule: train n % 5 in {1,2,3}, val n % 5 == 4 (its halves "
                   "val-select n % 10 == 4 and val-test n % 10 == 9), all. Default: all (with --quick: val, or "
                   "all when the folder holds no val patient; train with --tune).")
@click.option("--methods", multiple=True, callback=_csv_list, metavar="LIST",
              help="Comma-separated methods (see --list-methods). Default: unregistered, varreg's seven "
                   "configurations (L1/L2 x TV/Huber/quadratic, L1-TGV), vrnet, vrnet+refine and vrnet+refine-tgv (with "
                   "--checkpoint), "
                   "and every installed peer (skimage-tvl1, sitk-demons, ants-syn). A method that cannot run "
                   "here (peer not installed, no checkpoint) is skipped with a note in the report.")
@click.option("--list-methods", is_flag=True, help="Print every method, whether it can run here and its "
                                                   "configuration, then exit.")
@click.option("--quick", is_flag=True,
              help="CI subset: the first 2 patients of the split (val by default), acdc-2d only, methods "
                   "unregistered, varreg, skimage-tvl1 (unless --methods/--suites/--max-patients say otherwise).")
@click.option("--suites", multiple=True, callback=_csv_list, metavar="LIST",
              help="Comma-separated: acdc-2d, acdc-3d, synthetic-3d. Default: all three (acdc-2d with --quick).")
@click.option("--patients", multiple=True, callback=_csv_list, metavar="LIST",
              help="Only these patients (ids like patient004 or numbers), within the split.")
@click.option("--max-patients", type=click.IntRange(min=1), default=None, metavar="N",
              help="Only the first N patients of the split (2 with --quick).")
@click.option("--spacing-3d", callback=_floats(3, "spacing"), default="1.5,1.5,10", show_default=True,
              metavar="H,W,S",
              help="Voxel size (mm) assumed for the ACDC volumes' (H, W, slice) axes in the acdc-3d suite: the "
                   "data's affine is the identity (no spacing kept). Given to methods that use a spacing and to "
                   "the 3-D Hausdorff distances.")
@click.option("--synthetic-shape", callback=_ints, default="128,128,96", show_default=True, metavar="D,H,W",
              help="Grid of the synthetic 3-D pair (sinusoidal displacement, known end-point error).")
@click.option("--synthetic-amplitude", type=click.FloatRange(min=0, min_open=True), default=3.0, show_default=True,
              metavar="X", help="Peak of the synthetic displacement (voxels).")
@click.option("--checkpoint", "checkpoints", multiple=True, metavar="PATH",
              help="A trained VR-Net checkpoint (repeatable): adds vrnet, vrnet+refine and vrnet+refine-tgv (used in the suites of "
                   "its dimension). Without it those methods are skipped with a note.")
@click.option("--refine-warps", type=click.IntRange(min=1), default=5, show_default=True, metavar="N",
              help="Classical warps at the finest level after the network in vrnet+refine (the default refinement "
                   "denoiser, quadratic) and vrnet+refine-tgv (TGV).")
@click.option("--gpu/--no-gpu", default=None,
              help="Also time GPU-capable methods on a GPU (Table VI's GPU columns). Default: when one is usable.")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="CPU threads for every method (numba, SimpleITK/ITK, torch). Default: numba's "
                   "(NUMBA_NUM_THREADS or all cores).")
@click.option("--scaling", is_flag=True,
              help="Also time and measure peak memory of varreg's solver and the peers as the image grows "
                   "(each size in a fresh process): scaling.md/.csv and a log-log scaling.png. Never in --quick.")
@click.option("--scaling-sizes-2d", callback=_ints, default="128,256,512,1024", show_default=True, metavar="N,...",
              help="Square 2-D sizes for --scaling.")
@click.option("--scaling-sizes-3d", callback=_ints, default="64,128,256", show_default=True, metavar="N,...",
              help="Cubic 3-D sizes for --scaling.")
@click.option("--scaling-methods", multiple=True, callback=_csv_list, metavar="LIST",
              help="Methods for --scaling (varreg and peers). Default: varreg and the installed peers.")
@click.option("--scaling-timeout", type=click.FloatRange(min=1), default=900, show_default=True, metavar="S",
              help="Limit per --scaling case (seconds); a case over it is reported as stopped.")
@click.option("--tune", is_flag=True,
              help="Instead of the comparison: grid-search the peers' parameters (skimage-tvl1, sitk-demons, "
                   "ants-syn, or those in --methods) on the acdc-2d pairs of the split (train by default): "
                   "tuning.md/.csv.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic images.")
@click.option("-f", "--force", is_flag=True, help="Overwrite report files that exist (default: refuse, write nothing).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary lines.")
def bench(**opts):
    """Compare registration methods on the same pairs and write a report folder.

    \b
    varreg bench --data ../shared/data/acdc --split val -o report     # the full comparison
    varreg bench --data ../shared/data/acdc --quick -o report_quick    # CI subset (< 1 min)
    varreg bench --suites synthetic-3d --scaling -o report_scaling     # no data needed

    \b
    The report (REPORT_DIR/report.md) has a header (machine, versions,
    seeds, the exact command), a table per suite in the layout of the
    VR-Net paper's Tables III-V (Dice and Hausdorff per structure and
    averaged, % det <= 0, mean |grad det|, mean (std)), a runtime table
    as Table VI (2-D and 3-D, CPU and GPU, per pair after warm-up), box
    plots of Dice and HD per method (Fig. 5), and the notes (skipped
    methods, configurations). Protocol: ES slice -> ED slice where LV,
    Myo and RV are in both phases (as benchmarks/acdc_2d.py); ES labels
    warped by nearest neighbour.
    """
    return _run(opts, _command_line())


def _run(opts, typed):
    """Check the options that need no data, resolve the defaults of --quick/--tune, run the report."""
    from varreg.io import InputError
    from varreg_bench import report
    from varreg_bench.pairs import SUITES

    if opts.pop("list_methods"):
        return report.list_methods(opts["checkpoints"], opts["refine_warps"], opts["threads"], echo=click.echo)
    if not opts["outdir"]:
        raise click.UsageError("Missing option '-o' / '--outdir'.")
    quick, tune = opts["quick"], opts["tune"]
    suites = opts["suites"] or (["acdc-2d"] if (quick or tune) else list(SUITES))
    bad = [s for s in suites if s not in SUITES]
    if bad:
        raise InputError("--suites", f"unknown suite(s) {', '.join(bad)}; choose from {', '.join(SUITES)}")
    if tune and suites != ["acdc-2d"]:
        raise InputError("--tune", "tunes on the acdc-2d pairs only; leave out --suites")
    acdc_suites = [s for s in suites if s.startswith("acdc")]
    if acdc_suites and not opts["data"]:
        raise InputError("--data", f"the {', '.join(acdc_suites)} suite(s) need the ACDC folder "
                                   "(e.g. --data ../shared/data/acdc), or choose --suites synthetic-3d")
    if opts["scaling"] and quick:
        raise InputError("--scaling", "is never part of --quick (it takes minutes to hours); run it on its own")
    split = opts["split"] or ("train" if tune else "all")
    if quick and not opts["split"]:
        split = _quick_split(opts["data"], click.echo) if acdc_suites else "val"
    opts.update(suites=suites, split=split,
                max_patients=opts["max_patients"] or (2 if quick else None))
    return report.run(report.BenchOptions(**opts), command=typed, echo=click.echo)
