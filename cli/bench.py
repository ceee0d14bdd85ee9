"""``varreg bench``: the comparison report of issue #5 (ACDC 2-D/3-D, synthetic 3-D, scaling).

Only click is imported at module level (``varreg --help`` stays quick); the
work is :mod:`varreg.bench`, imported when the command runs.
"""
from __future__ import annotations

import os
import shlex
import sys

import click

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=100)
SUITE_NAMES = ("acdc-2d", "acdc-3d", "synthetic-3d")


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


@click.command(context_settings=CONTEXT)
@click.option("--data", metavar="DIR", default=None,
              help="ACDC folder (patientNNN_{ED,ES}[_gt].nii.gz), e.g. ../shared/data/acdc. Needed for the "
                   "acdc-2d and acdc-3d suites; read in place, never copied.")
@click.option("-o", "--outdir", default=None, metavar="REPORT_DIR",
              help="Report folder (created): report.md, header.json, results_*.md/.csv, per_pair_*.csv, "
                   "runtime.md/.csv, boxplots_*.png, and scaling.* / tuning.* with --scaling / --tune.")
@click.option("--split", type=click.Choice(["train", "val", "all"]), default=None,
              help="Patients by the ACDC number rule: train n % 5 in {1,2,3}, val n % 5 == 4, all. "
                   "Default: all (val with --quick; train with --tune).")
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


# --------------------------------------------------------------------------- the work (lazy imports)
def _echo(msg, quiet):
    if not quiet:
        click.echo(msg)


def _patients(data, split, wanted, max_patients):
    from varreg import acdc
    from varreg.io import InputError

    if not os.path.isdir(data):
        raise InputError(data, "no such folder (give the ACDC folder with --data)")
    ids = acdc.patients(data, split)
    if not ids:
        raise InputError(data, f"no patientNNN_ED.nii.gz files of the {split} split in this folder")
    if wanted:
        norm = {}
        for w in wanted:
            key = f"patient{int(w):03d}" if w.isdigit() else w
            norm[key] = w
        missing = [w for k, w in norm.items() if k not in ids]
        if missing:
            raise InputError("--patients", f"{', '.join(missing)} not among the {len(ids)} patients of the {split} split")
        ids = [i for i in ids if i in norm]
    if max_patients:
        ids = ids[:max_patients]
    return ids


def _outputs(outdir, suites, scaling, tune):
    names = ["report.md", "header.json"]
    if tune:
        return names + ["tuning.md", "tuning.csv", "per_pair_tuning.csv"]
    for s in suites:
        t = s.replace("-", "_")
        names += [f"results_{t}.md", f"results_{t}.csv", f"per_pair_{t}.csv"]
        if s != "synthetic-3d":
            names.append(f"boxplots_{t}.png")
    if any(s.startswith("acdc") for s in suites):
        names += ["runtime.md", "runtime.csv"]
    if scaling:
        names += ["scaling.md", "scaling.csv", "scaling.png"]
    return [os.path.join(outdir, n) for n in names]


def _canonical(opts, *, split, patients, suites, methods, threads) -> str:
    """The command with every choice explicit (what --quick and the defaults resolved to), to rerun it exactly."""
    parts = ["varreg", "bench"]
    if patients:
        parts += ["--data", opts["data"], "--split", split, "--patients", ",".join(patients)]
    parts += ["--suites", ",".join(suites), "--methods", ",".join(methods)]
    if opts["tune"]:
        parts.append("--tune")
    if "acdc-3d" in suites:
        parts += ["--spacing-3d", ",".join(f"{v:g}" for v in opts["spacing_3d"])]
    if "synthetic-3d" in suites:
        parts += ["--synthetic-shape", ",".join(map(str, opts["synthetic_shape"])),
                  "--synthetic-amplitude", f"{opts['synthetic_amplitude']:g}"]
    for c in opts["checkpoints"]:
        parts += ["--checkpoint", c]
    if opts["checkpoints"]:
        parts += ["--refine-warps", str(opts["refine_warps"])]
    if opts["gpu"] is not None:
        parts.append("--gpu" if opts["gpu"] else "--no-gpu")
    parts += ["--threads", str(threads)]
    if opts["scaling"]:
        parts += ["--scaling", "--scaling-sizes-2d", ",".join(map(str, opts["scaling_sizes_2d"])),
                  "--scaling-sizes-3d", ",".join(map(str, opts["scaling_sizes_3d"])),
                  "--scaling-timeout", f"{opts['scaling_timeout']:g}"]
        if opts["scaling_methods"]:
            parts += ["--scaling-methods", ",".join(opts["scaling_methods"])]
    parts += ["--seed", str(opts["seed"]), "-o", opts["outdir"]]
    return shlex.join(parts)


def _methods_md(methods, reg, labels):
    from varreg.bench import Unavailable

    rows = ["| name | method | kind | configuration |", "|---|---|---|---|"]
    for m in methods:
        rows.append(f"| `{m.name}` | {labels.get(m.name, m.name)} | {m.kind} | {m.config} |")
    for name, m in reg.items():
        if isinstance(m, Unavailable):
            rows.append(f"| `{name}` | {m.label} | {m.kind} | not run here: {m.reason} |")
    return "\n".join(rows) + "\n"


def _run(opts, typed):
    import json
    import time

    from varreg import bench as B
    from varreg import io as vio
    from varreg.io import InputError

    from . import progress as P

    t_start = time.perf_counter()
    quiet = opts["quiet"]
    threads = B.apply_threads(opts["threads"], torch_too=bool(opts["checkpoints"]))
    try:
        reg = B.registry(opts["checkpoints"], opts["refine_warps"])
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        bad = opts["checkpoints"][0] if len(opts["checkpoints"]) == 1 else "--checkpoint"
        raise InputError(bad, f"cannot be used as a VR-Net checkpoint ({exc})") from None
    labels = {n: m.label for n, m in reg.items()}

    if opts["list_methods"]:
        defaults = set(B.default_methods(reg))
        for n, m in reg.items():
            state = "ok " if isinstance(m, B.Method) else "n/a"
            cfg = m.config if isinstance(m, B.Method) else m.reason
            click.echo(f"{state} {n:24s} {'default' if n in defaults else '       '}  {m.label}: {cfg}")
        return 0

    if not opts["outdir"]:
        raise click.UsageError("Missing option '-o' / '--outdir'.")
    quick, tune = opts["quick"], opts["tune"]
    suites = opts["suites"] or (["acdc-2d"] if (quick or tune) else list(SUITE_NAMES))
    bad = [s for s in suites if s not in SUITE_NAMES]
    if bad:
        raise InputError("--suites", f"unknown suite(s) {', '.join(bad)}; choose from {', '.join(SUITE_NAMES)}")
    if tune and suites != ["acdc-2d"]:
        raise InputError("--tune", "tunes on the acdc-2d pairs only; leave out --suites")
    split = opts["split"] or ("val" if quick else "train" if tune else "all")
    acdc_suites = [s for s in suites if s.startswith("acdc")]
    patients = []
    if acdc_suites:
        if not opts["data"]:
            raise InputError("--data", f"the {', '.join(acdc_suites)} suite(s) need the ACDC folder "
                                       "(e.g. --data ../shared/data/acdc), or choose --suites synthetic-3d")
        patients = _patients(opts["data"], split, opts["patients"],
                             opts["max_patients"] or (2 if quick else None))

    notes = []
    if tune:
        names = opts["methods"] or list(B.TUNING_GRIDS)
        unknown = [n for n in names if n not in reg]
        if unknown:
            raise InputError("--methods", f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(reg)}")
        methods, tnotes, grid = B.tune_methods(names)
        notes += tnotes
        labels.update({m.name: m.label for m in methods})
        if not methods:
            raise InputError("--methods", "nothing to tune here: " + "; ".join(tnotes))
        if split != "train":
            notes.append(f"tuned on the {split} split: numbers chosen here are not independent of that split")
    else:
        try:
            methods, snotes = B.select_methods(opts["methods"], reg, quick)
        except ValueError as exc:
            raise InputError("--methods", str(exc)) from None
        notes += snotes
        if not methods:
            raise InputError("--methods", "no method can run here: " + "; ".join(snotes))
    if opts["scaling"] and quick:
        raise InputError("--scaling", "is never part of --quick (it takes minutes to hours); run it on its own")

    gpu_ok = any("gpu" in m.devices for m in methods)
    gpu = gpu_ok if opts["gpu"] is None else opts["gpu"]
    if gpu and not gpu_ok:
        notes.append("--gpu: no method can use a GPU here (no CuPy GPU for varreg, no CUDA for torch); "
                     "GPU columns stay empty")
        gpu = False

    outdir = opts["outdir"]
    outs = vio.OutputSet(force=opts["force"], background=False)
    files = _outputs(outdir, suites, opts["scaling"], tune)
    for f in files:
        outs.plan(f)

    canonical = _canonical(opts, split=split, patients=patients, suites=suites,
                           methods=names if tune else [m.name for m in methods], threads=threads)
    command = typed or canonical
    extra = dict(command_canonical=canonical, data=opts["data"], split=split if acdc_suites else None,
                 patients=patients, suites=suites, spacing_3d_mm=list(opts["spacing_3d"]), gpu_timing=gpu,
                 methods=[m.name for m in methods])
    if "synthetic-3d" in suites:
        extra["synthetic"] = dict(shape=list(opts["synthetic_shape"]), amplitude=opts["synthetic_amplitude"])
    head = B.header_info(command, threads, opts["seed"], extra)

    # ---------------------------------------------------------------- pairs
    pairs = {}
    if acdc_suites:
        dims = tuple(int(s[5]) for s in acdc_suites)
        with P.Spinner(f"reading {len(patients)} ACDC patients", P.enabled(quiet)):
            pairs.update(B.acdc_pairs(opts["data"], patients, dims=dims, spacing_3d=opts["spacing_3d"]))
    if "synthetic-3d" in suites:
        with P.Spinner(f"making the synthetic pair {opts['synthetic_shape']}", P.enabled(quiet)):
            pairs["synthetic-3d"] = [B.synthetic_pair(opts["synthetic_shape"], opts["synthetic_amplitude"],
                                                      opts["seed"])]
    for s in suites:
        nd = 2 if s == "acdc-2d" else 3
        for m in methods:
            if nd not in m.dims:
                notes.append(f"{m.name} not run in {s}: it registers {'/'.join(map(str, m.dims))}-D images only")
        if not pairs.get(s):
            notes.append(f"{s}: no pairs")

    # ---------------------------------------------------------------- run
    order = [m.name for m in methods]
    total = sum(len(pairs.get(s, [])) for s in suites)
    bar = None
    if P.enabled(quiet):
        from tqdm import tqdm

        bar = tqdm(total=total, desc="bench", unit="pair", file=sys.stderr, dynamic_ncols=True)
    results, warmups, summaries = {}, {}, {}
    try:
        for s in suites:
            if not pairs.get(s):
                continue
            if bar is not None:
                bar.set_description(f"{s} ({len(methods)} methods)")
            recs, warm = B.run_suite(pairs[s], methods, gpu=gpu, progress=(bar.update if bar else None),
                                     warmup_crop=None if s == "acdc-2d" else 64)
            results[s], warmups[s] = recs, warm
            for name in order:
                errs = [r for r in recs if r["method"] == name and r.get("error")]
                if errs:
                    notes.append(f"{name} failed on {len(errs)} of {len(pairs[s])} {s} pair(s) (left out of its "
                                 f"means), first: {errs[0]['pair']}: {errs[0]['error']}")
            summaries[s] = B.summarise(recs, order)
    finally:
        if bar is not None:
            bar.close()

    scaling_rows = []
    if opts["scaling"]:
        sm = opts["scaling_methods"] or [n for n in ("varreg", "skimage-tvl1", "sitk-demons", "ants-syn")
                                         if isinstance(reg.get(n), B.Method)]
        badm = [n for n in sm if n not in B._SCALING_METHODS]
        if badm:
            raise InputError("--scaling-methods", f"{', '.join(badm)}: choose from {', '.join(B._SCALING_METHODS)}")
        for n in sm:
            if not isinstance(reg.get(n), B.Method):
                notes.append(f"scaling: {n} skipped: {reg[n].reason}")
        sm = [n for n in sm if isinstance(reg.get(n), B.Method)]
        ncase = len(sm) * (len(opts["scaling_sizes_2d"]) + len(opts["scaling_sizes_3d"]))
        sbar = None
        if P.enabled(quiet):
            from tqdm import tqdm

            sbar = tqdm(total=ncase, desc="scaling", unit="case", file=sys.stderr, dynamic_ncols=True)
        try:
            scaling_rows = B.scaling_run(sm, opts["scaling_sizes_2d"], opts["scaling_sizes_3d"], threads=threads,
                                         timeout=opts["scaling_timeout"], seed=opts["seed"],
                                         gpu=gpu and isinstance(reg.get("varreg"), B.Method)
                                         and "gpu" in reg["varreg"].devices,
                                         progress=sbar.update if sbar else None)
        finally:
            if sbar is not None:
                sbar.close()

    # ---------------------------------------------------------------- report
    head["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    head["wall_s"] = round(time.perf_counter() - t_start, 2)
    try:
        head["machine"]["load_average_at_end"] = os.getloadavg()
    except OSError:
        pass
    head["notes"] = notes
    head["pairs"] = {s: len(pairs.get(s, [])) for s in suites}
    head["warmup_s"] = warmups
    units = {"acdc-2d": "px" if all(p.spacing is None for p in pairs.get("acdc-2d", [])) else "mm", "acdc-3d": "mm"}
    titles = {"acdc-2d": "ACDC 2D (ES slice → ED slice)", "acdc-3d": "ACDC 3D (ES volume → ED volume)",
              "synthetic-3d": "Synthetic 3D pair, known displacement"}
    md = ["# varreg bench report", "",
          f"- command: `{command}`",
          f"- every option: `{head['command_canonical']}`" if typed else None,
          f"- started {head['started']}, finished {head['finished']}, wall time {head['wall_s']:.1f} s",
          f"- machine: {head['machine']['cpu']}, {head['machine']['cpus_usable']} usable CPUs, "
          f"{head['machine']['memory_gib']} GiB, GPU: {head['machine']['gpu'] or 'none'}; {head['machine']['platform']}",
          f"- load average (1, 5, 15 min) at start {_fmt_load(head['machine'].get('load_average_at_start'))}, "
          f"at end {_fmt_load(head['machine'].get('load_average_at_end'))} (a shared machine slows every method)",
          f"- threads per method: {threads}",
          "- versions: " + ", ".join(f"{k} {v}" for k, v in head["versions"].items()),
          f"- seeds: synthetic images {opts['seed']}; {head['seeds']['note']}",
          (f"- data: `{opts['data']}`, split {split}, {len(patients)} patient(s): {', '.join(patients)}"
           if acdc_suites else "- data: synthetic only"),
          ""]
    md = [x for x in md if x is not None]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if tune:
        recs = results.get("acdc-2d", [])
        md += ["## Tuning of the peers (acdc-2d pairs of the " + split + " split)", "",
               B.tuning_table(summaries.get("acdc-2d", []), grid),
               "Best by mean Dice; the chosen values go into varreg/bench.py (documented in docs/bench.md).", ""]
        _write(outs, outdir, "tuning.md", B.tuning_table(summaries.get("acdc-2d", []), grid))
        rows = [dict(r, peer=grid[r["method"]][0], params=json.dumps(grid[r["method"]][1]))
                for r in summaries.get("acdc-2d", [])]
        _write(outs, outdir, "tuning.csv", B.csv_text(rows))
        _write(outs, outdir, "per_pair_tuning.csv", B.csv_text(recs))
    else:
        for s in suites:
            if s not in results:
                continue
            t = s.replace("-", "_")
            n_p = len(pairs[s])
            if s == "synthetic-3d":
                table = B.epe_table(summaries[s], labels)
                md += [f"## {titles[s]}", "", f"Grid {tuple(opts['synthetic_shape'])}, sinusoidal displacement, peak "
                       f"{opts['synthetic_amplitude']} voxels; end-point error in voxels.", "", table]
            else:
                table = B.results_table(summaries[s], labels, units[s])
                where = (f"{n_p} slice pairs from {len(patients)} patient(s)" if s == "acdc-2d"
                         else f"{n_p} volume pairs, spacing {tuple(opts['spacing_3d'])} mm assumed for (H, W, slice)")
                md += [f"## {titles[s]}", "", where + ".", "", table, f"![Dice and HD per method](boxplots_{t}.png)", ""]
                fig = B.boxplots(results[s], order, labels, f"{titles[s]}: {where}", units[s])
                outs.save_figure(fig, os.path.join(outdir, f"boxplots_{t}.png"), dpi=110)
                import matplotlib.pyplot as plt

                plt.close(fig)
            _write(outs, outdir, f"results_{t}.md", f"# {titles[s]}\n\n" + table)
            _write(outs, outdir, f"results_{t}.csv", B.csv_text(
                [dict(r, label=labels.get(r["method"], r["method"])) for r in summaries[s]]))
            _write(outs, outdir, f"per_pair_{t}.csv", B.csv_text(results[s]))
        if any(s in results for s in ("acdc-2d", "acdc-3d")):
            rt = B.runtime_table(summaries, labels, warmups, order)
            md += ["## Runtime (layout of Table VI)", "", rt]
            rows = []
            for s in ("acdc-2d", "acdc-3d"):
                for r in summaries.get(s, []):
                    rows.append(dict(suite=s, method=r["method"], label=labels.get(r["method"]), n=r["n"],
                                     cpu_s_mean=r["time_s_mean"], cpu_s_std=r["time_s_std"],
                                     gpu_s_mean=r["time_gpu_s_mean"], gpu_s_std=r["time_gpu_s_std"],
                                     warmup_cpu_s=warmups[s].get(r["method"], {}).get("cpu", float("nan")),
                                     warmup_gpu_s=warmups[s].get(r["method"], {}).get("gpu", float("nan"))))
            _write(outs, outdir, "runtime.md", "# Runtime (layout of Table VI)\n\n" + rt)
            _write(outs, outdir, "runtime.csv", B.csv_text(rows))
        if opts["scaling"]:
            st = B.scaling_table(scaling_rows, labels)
            md += ["## Scaling of time and memory", "", st, "![time and memory against size](scaling.png)", ""]
            _write(outs, outdir, "scaling.md", "# Scaling\n\n" + st)
            _write(outs, outdir, "scaling.csv", B.csv_text(scaling_rows))
            fig = B.scaling_plot(scaling_rows, labels)
            outs.save_figure(fig, os.path.join(outdir, "scaling.png"), dpi=110)
            import matplotlib.pyplot as plt

            plt.close(fig)
        md += ["## Methods and configurations", "", _methods_md(methods, reg, labels)]
    _write(outs, outdir, "report.md", "\n".join(md) + "\n")
    outs.save_json(_jsonable(head), os.path.join(outdir, "header.json"))
    outs.commit()

    for s in suites:
        for r in summaries.get(s, []):
            if "dice_avg_mean" in r:
                _echo(f"{s}: {labels.get(r['method'], r['method'])}: Dice {r['dice_avg_mean']:.4f}, "
                      f"HD {r['hd_avg_mean']:.2f} {units.get(s, '')}, {1000 * r['time_s_mean']:.0f} ms/pair", quiet)
            elif "epe_mean" in r:
                _echo(f"{s}: {labels.get(r['method'], r['method'])}: EPE {r['epe_mean']:.3f} voxels, "
                      f"{r['time_s_mean']:.2f} s", quiet)
    for n in notes:
        _echo(f"note: {n}", quiet)
    _echo(f"report: {os.path.join(outdir, 'report.md')} ({time.perf_counter() - t_start:.1f} s)", quiet)
    return 0


def _fmt_load(load):
    return "–" if not load else ", ".join(f"{x:.2f}" for x in load)


def _write(outs, outdir, name, text):
    with open(outs.stage(os.path.join(outdir, name)), "w", encoding="utf-8") as fh:
        fh.write(text)


def _jsonable(v):
    import math

    import numpy as np

    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v
