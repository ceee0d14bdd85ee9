"""The report folder of ``varreg bench``: choose the patients and methods, run the suites, write the files.

:func:`run` takes the resolved options (:class:`BenchOptions`; ``varreg bench``
parses and checks them) and writes, atomically (:class:`varreg_cli.outputs.OutputSet`):
``report.md``, ``header.json``, ``results_*.md/.csv``, ``per_pair_*.csv``,
``runtime.md/.csv``, ``boxplots_*.png``, and ``scaling.*`` or ``tuning.*``.
Problems with the input are :class:`varreg.io.InputError` (one error line).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass

from varreg import acdc
from varreg.io import InputError
from varreg_cli import progress as P
from varreg_cli.outputs import OutputSet, jsonable

from . import methods as M
from .machine import apply_threads, header_info
from .pairs import acdc_pairs, synthetic_pair
from .plots import boxplots, close_figure, scaling_plot
from .run import run_suite, summarise
from .scaling import SCALING_METHODS, scaling_run, scaling_table
from .tables import csv_text, epe_table, results_table, runtime_table
from .tuning import TUNING_GRIDS, tune_methods, tuning_table

__all__ = ["BenchOptions", "load_registry", "list_methods", "choose_patients", "output_paths", "canonical_command",
           "run"]

TITLES = {"acdc-2d": "ACDC 2D (ES slice → ED slice)", "acdc-3d": "ACDC 3D (ES volume → ED volume)",
          "synthetic-3d": "Synthetic 3D pair, known displacement"}


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """The options of ``varreg bench`` (see its ``--help``), with the defaults of ``--quick``/``--tune`` resolved:
    ``suites`` and ``split`` are never empty, ``max_patients`` is 2 with ``--quick``."""

    outdir: str
    data: str | None
    split: str
    suites: list
    methods: list | None
    quick: bool
    tune: bool
    patients: list | None
    max_patients: int | None
    spacing_3d: tuple
    synthetic_shape: tuple
    synthetic_amplitude: float
    checkpoints: tuple
    refine_warps: int
    gpu: bool | None
    threads: int | None
    scaling: bool
    scaling_sizes_2d: tuple
    scaling_sizes_3d: tuple
    scaling_methods: list | None
    scaling_timeout: float
    seed: int
    force: bool
    quiet: bool

    @property
    def acdc_suites(self) -> list:
        return [s for s in self.suites if s.startswith("acdc")]


def load_registry(checkpoints, refine_warps: int) -> dict:
    """:func:`varreg_bench.methods.registry`; a checkpoint that cannot be loaded is an :class:`InputError`."""
    try:
        return M.registry(checkpoints, refine_warps)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        bad = checkpoints[0] if len(checkpoints) == 1 else "--checkpoint"
        raise InputError(bad, f"cannot be used as a VR-Net checkpoint ({exc})") from None


def list_methods(checkpoints=(), refine_warps: int = 5, threads: int | None = None, echo=print) -> int:
    """``--list-methods``: one line per method: whether it can run here, whether it is a default, its configuration."""
    apply_threads(threads, torch_too=bool(checkpoints))
    reg = load_registry(checkpoints, refine_warps)
    defaults = set(M.default_methods(reg))
    for n, m in reg.items():
        state = "ok " if isinstance(m, M.Method) else "n/a"
        cfg = m.config if isinstance(m, M.Method) else m.reason
        echo(f"{state} {n:24s} {'default' if n in defaults else '       '}  {m.label}: {cfg}")
    return 0


def choose_patients(data, split: str, wanted, max_patients) -> list[str]:
    """The patients of ``split`` under ``data``: those in ``wanted`` (ids or numbers), the first ``max_patients``."""
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
            raise InputError("--patients",
                             f"{', '.join(missing)} not among the {len(ids)} patients of the {split} split")
        ids = [i for i in ids if i in norm]
    if max_patients:
        ids = ids[:max_patients]
    return ids


def output_paths(outdir, suites, scaling: bool, tune: bool) -> list[str]:
    """Every file the report will write, under ``outdir``."""
    names = ["report.md", "header.json"]
    if tune:
        return [os.path.join(outdir, n) for n in names + ["tuning.md", "tuning.csv", "per_pair_tuning.csv"]]
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


def canonical_command(o: BenchOptions, *, patients, methods, threads) -> str:
    """The command with every choice explicit (what --quick and the defaults resolved to), to rerun it exactly."""
    parts = ["varreg", "bench"]
    if patients:
        parts += ["--data", o.data, "--split", o.split, "--patients", ",".join(patients)]
    parts += ["--suites", ",".join(o.suites), "--methods", ",".join(methods)]
    if o.tune:
        parts.append("--tune")
    if "acdc-3d" in o.suites:
        parts += ["--spacing-3d", ",".join(f"{v:g}" for v in o.spacing_3d)]
    if "synthetic-3d" in o.suites:
        parts += ["--synthetic-shape", ",".join(map(str, o.synthetic_shape)),
                  "--synthetic-amplitude", f"{o.synthetic_amplitude:g}"]
    for c in o.checkpoints:
        parts += ["--checkpoint", c]
    if o.checkpoints:
        parts += ["--refine-warps", str(o.refine_warps)]
    if o.gpu is not None:
        parts.append("--gpu" if o.gpu else "--no-gpu")
    parts += ["--threads", str(threads)]
    if o.scaling:
        parts += ["--scaling", "--scaling-sizes-2d", ",".join(map(str, o.scaling_sizes_2d)),
                  "--scaling-sizes-3d", ",".join(map(str, o.scaling_sizes_3d)),
                  "--scaling-timeout", f"{o.scaling_timeout:g}"]
        if o.scaling_methods:
            parts += ["--scaling-methods", ",".join(o.scaling_methods)]
    parts += ["--seed", str(o.seed), "-o", o.outdir]
    return shlex.join(parts)


def _methods_md(methods, reg, labels) -> str:
    rows = ["| name | method | kind | configuration |", "|---|---|---|---|"]
    for m in methods:
        rows.append(f"| `{m.name}` | {labels.get(m.name, m.name)} | {m.kind} | {m.config} |")
    for name, m in reg.items():
        if isinstance(m, M.Unavailable):
            rows.append(f"| `{name}` | {m.label} | {m.kind} | not run here: {m.reason} |")
    return "\n".join(rows) + "\n"


def _choose_methods(o: BenchOptions, reg: dict, labels: dict, notes: list):
    """``(methods, requested names, tuning grid or None)``; notes of skipped methods appended."""
    if o.tune:
        names = o.methods or list(TUNING_GRIDS)
        unknown = [n for n in names if n not in reg]
        if unknown:
            raise InputError("--methods", f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(reg)}")
        methods, tnotes, grid = tune_methods(names)
        notes += tnotes
        labels.update({m.name: m.label for m in methods})
        if not methods:
            raise InputError("--methods", "nothing to tune here: " + "; ".join(tnotes))
        if o.split != "train":
            notes.append(f"tuned on the {o.split} split: numbers chosen here are not independent of that split")
        return methods, names, grid
    try:
        methods, snotes = M.select_methods(o.methods, reg, o.quick)
    except ValueError as exc:
        raise InputError("--methods", str(exc)) from None
    notes += snotes
    if not methods:
        raise InputError("--methods", "no method can run here: " + "; ".join(snotes))
    return methods, [m.name for m in methods], None


def _read_pairs(o: BenchOptions, patients, methods, notes) -> dict:
    pairs = {}
    if o.acdc_suites:
        dims = tuple(int(s[5]) for s in o.acdc_suites)
        with P.Spinner(f"reading {len(patients)} ACDC patients", P.enabled(o.quiet)):
            pairs.update(acdc_pairs(o.data, patients, dims=dims, spacing_3d=o.spacing_3d))
    if "synthetic-3d" in o.suites:
        with P.Spinner(f"making the synthetic pair {o.synthetic_shape}", P.enabled(o.quiet)):
            pairs["synthetic-3d"] = [synthetic_pair(o.synthetic_shape, o.synthetic_amplitude, o.seed)]
    for s in o.suites:
        nd = 2 if s == "acdc-2d" else 3
        for m in methods:
            if nd not in m.dims:
                notes.append(f"{m.name} not run in {s}: it registers {'/'.join(map(str, m.dims))}-D images only")
        if not pairs.get(s):
            notes.append(f"{s}: no pairs")
    return pairs


def _run_suites(o: BenchOptions, pairs, methods, gpu, notes):
    """``(records, warm-ups, summaries)`` per suite, every method on every pair of it."""
    order = [m.name for m in methods]
    total = sum(len(pairs.get(s, [])) for s in o.suites)
    bar = None
    if P.enabled(o.quiet):
        from tqdm import tqdm

        bar = tqdm(total=total, desc="bench", unit="pair", file=sys.stderr, dynamic_ncols=True)
    results, warmups, summaries = {}, {}, {}
    try:
        for s in o.suites:
            if not pairs.get(s):
                continue
            if bar is not None:
                bar.set_description(f"{s} ({len(methods)} methods)")
            recs, warm = run_suite(pairs[s], methods, gpu=gpu, progress=(bar.update if bar else None),
                                   warmup_crop=None if s == "acdc-2d" else 64)
            results[s], warmups[s] = recs, warm
            for name in order:
                errs = [r for r in recs if r["method"] == name and r.get("error")]
                if errs:
                    notes.append(f"{name} failed on {len(errs)} of {len(pairs[s])} {s} pair(s) (left out of its "
                                 f"means), first: {errs[0]['pair']}: {errs[0]['error']}")
            summaries[s] = summarise(recs, order)
    finally:
        if bar is not None:
            bar.close()
    return results, warmups, summaries


def _run_scaling(o: BenchOptions, reg, threads, gpu, notes) -> list[dict]:
    sm = o.scaling_methods or [n for n in SCALING_METHODS if isinstance(reg.get(n), M.Method)]
    for n in sm:
        if not isinstance(reg.get(n), M.Method):
            notes.append(f"scaling: {n} skipped: {reg[n].reason}")
    sm = [n for n in sm if isinstance(reg.get(n), M.Method)]
    ncase = len(sm) * (len(o.scaling_sizes_2d) + len(o.scaling_sizes_3d))
    sbar = None
    if P.enabled(o.quiet):
        from tqdm import tqdm

        sbar = tqdm(total=ncase, desc="scaling", unit="case", file=sys.stderr, dynamic_ncols=True)
    try:
        return scaling_run(sm, o.scaling_sizes_2d, o.scaling_sizes_3d, threads=threads, timeout=o.scaling_timeout,
                           seed=o.seed, gpu=gpu and isinstance(reg.get("varreg"), M.Method)
                           and "gpu" in reg["varreg"].devices, progress=sbar.update if sbar else None)
    finally:
        if sbar is not None:
            sbar.close()


def _fmt_load(load):
    return "–" if not load else ", ".join(f"{x:.2f}" for x in load)


def _write(outs, outdir, name, text):
    with open(outs.stage(os.path.join(outdir, name)), "w", encoding="utf-8") as fh:
        fh.write(text)


def _save_figure(outs, fig, path):
    outs.save_figure(fig, path, dpi=110)
    close_figure(fig)


def run(o: BenchOptions, command: str | None = None, echo=print) -> int:
    """Run the benchmark of ``o`` and write its report folder; ``command``: the command as typed (for the header).

    Returns the exit code (0). Summary lines go to ``echo`` unless ``o.quiet``.
    """
    t_start = time.perf_counter()
    bad = [n for n in o.scaling_methods or () if n not in SCALING_METHODS] if o.scaling else []
    if bad:  # before any work: the scaling runs come last
        raise InputError("--scaling-methods", f"{', '.join(bad)}: choose from {', '.join(SCALING_METHODS)}")
    threads = apply_threads(o.threads, torch_too=bool(o.checkpoints))
    reg = load_registry(o.checkpoints, o.refine_warps)
    labels = {n: m.label for n, m in reg.items()}
    patients = choose_patients(o.data, o.split, o.patients, o.max_patients) if o.acdc_suites else []

    notes = []
    methods, names, grid = _choose_methods(o, reg, labels, notes)
    gpu_ok = any("gpu" in m.devices for m in methods)
    gpu = gpu_ok if o.gpu is None else o.gpu
    if gpu and not gpu_ok:
        notes.append("--gpu: no method can use a GPU here (no CuPy GPU for varreg, no CUDA for torch); "
                     "GPU columns stay empty")
        gpu = False

    outdir = o.outdir
    outs = OutputSet(force=o.force, background=False)
    for f in output_paths(outdir, o.suites, o.scaling, o.tune):
        outs.plan(f)

    canonical = canonical_command(o, patients=patients, methods=names, threads=threads)
    extra = dict(command_canonical=canonical, data=o.data, split=o.split if o.acdc_suites else None,
                 patients=patients, suites=o.suites, spacing_3d_mm=list(o.spacing_3d), gpu_timing=gpu,
                 methods=[m.name for m in methods])
    if "synthetic-3d" in o.suites:
        extra["synthetic"] = dict(shape=list(o.synthetic_shape), amplitude=o.synthetic_amplitude)
    head = header_info(command or canonical, threads, o.seed, extra)

    pairs = _read_pairs(o, patients, methods, notes)
    order = [m.name for m in methods]
    results, warmups, summaries = _run_suites(o, pairs, methods, gpu, notes)
    scaling_rows = _run_scaling(o, reg, threads, gpu, notes) if o.scaling else []

    # ---------------------------------------------------------------- report
    head["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    head["wall_s"] = round(time.perf_counter() - t_start, 2)
    try:
        head["machine"]["load_average_at_end"] = os.getloadavg()
    except OSError:
        pass
    head["notes"] = notes
    head["pairs"] = {s: len(pairs.get(s, [])) for s in o.suites}
    head["warmup_s"] = warmups
    units = {"acdc-2d": "px" if all(p.spacing is None for p in pairs.get("acdc-2d", [])) else "mm", "acdc-3d": "mm"}
    mach = head["machine"]
    md = ["# varreg bench report", "",
          f"- command: `{head['command']}`",
          f"- every option: `{canonical}`" if command else None,
          f"- started {head['started']}, finished {head['finished']}, wall time {head['wall_s']:.1f} s",
          f"- machine: {mach['cpu']}, {mach['cpus_usable']} usable CPUs, "
          f"{mach['memory_gib']} GiB, GPU: {mach['gpu'] or 'none'}; {mach['platform']}",
          f"- load average (1, 5, 15 min) at start {_fmt_load(mach.get('load_average_at_start'))}, "
          f"at end {_fmt_load(mach.get('load_average_at_end'))} (a shared machine slows every method)",
          f"- threads per method: {threads}",
          "- versions: " + ", ".join(f"{k} {v}" for k, v in head["versions"].items()),
          f"- seeds: synthetic images {o.seed}; {head['seeds']['note']}",
          (f"- data: `{o.data}`, split {o.split}, {len(patients)} patient(s): {', '.join(patients)}"
           if o.acdc_suites else "- data: synthetic only"),
          ""]
    md = [x for x in md if x is not None]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if o.tune:
        summary = summaries.get("acdc-2d", [])
        table = tuning_table(summary, grid)
        md += ["## Tuning of the peers (acdc-2d pairs of the " + o.split + " split)", "", table,
               "Best by mean Dice; the chosen values go into varreg_bench/peers.py (documented in docs/bench.md).", ""]
        _write(outs, outdir, "tuning.md", table)
        rows = [dict(r, peer=grid[r["method"]][0], params=json.dumps(grid[r["method"]][1])) for r in summary]
        _write(outs, outdir, "tuning.csv", csv_text(rows))
        _write(outs, outdir, "per_pair_tuning.csv", csv_text(results.get("acdc-2d", [])))
    else:
        for s in o.suites:
            if s not in results:
                continue
            t = s.replace("-", "_")
            n_p = len(pairs[s])
            if s == "synthetic-3d":
                table = epe_table(summaries[s], labels)
                md += [f"## {TITLES[s]}", "", f"Grid {tuple(o.synthetic_shape)}, sinusoidal displacement, peak "
                       f"{o.synthetic_amplitude} voxels; end-point error in voxels.", "", table]
            else:
                table = results_table(summaries[s], labels, units[s])
                where = (f"{n_p} slice pairs from {len(patients)} patient(s)" if s == "acdc-2d"
                         else f"{n_p} volume pairs, spacing {tuple(o.spacing_3d)} mm assumed for (H, W, slice)")
                md += [f"## {TITLES[s]}", "", where + ".", "", table,
                       f"![Dice and HD per method](boxplots_{t}.png)", ""]
                _save_figure(outs, boxplots(results[s], order, labels, f"{TITLES[s]}: {where}", units[s]),
                             os.path.join(outdir, f"boxplots_{t}.png"))
            _write(outs, outdir, f"results_{t}.md", f"# {TITLES[s]}\n\n" + table)
            _write(outs, outdir, f"results_{t}.csv", csv_text(
                [dict(r, label=labels.get(r["method"], r["method"])) for r in summaries[s]]))
            _write(outs, outdir, f"per_pair_{t}.csv", csv_text(results[s]))
        if any(s in results for s in ("acdc-2d", "acdc-3d")):
            rt = runtime_table(summaries, labels, warmups, order)
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
            _write(outs, outdir, "runtime.csv", csv_text(rows))
        if o.scaling:
            st = scaling_table(scaling_rows, labels)
            md += ["## Scaling of time and memory", "", st, "![time and memory against size](scaling.png)", ""]
            _write(outs, outdir, "scaling.md", "# Scaling\n\n" + st)
            _write(outs, outdir, "scaling.csv", csv_text(scaling_rows))
            _save_figure(outs, scaling_plot(scaling_rows, labels), os.path.join(outdir, "scaling.png"))
        md += ["## Methods and configurations", "", _methods_md(methods, reg, labels)]
    _write(outs, outdir, "report.md", "\n".join(md) + "\n")
    outs.save_json(jsonable(head), os.path.join(outdir, "header.json"))
    outs.commit()

    if not o.quiet:
        for s in o.suites:
            for r in summaries.get(s, []):
                if "dice_avg_mean" in r:
                    echo(f"{s}: {labels.get(r['method'], r['method'])}: Dice {r['dice_avg_mean']:.4f}, "
                         f"HD {r['hd_avg_mean']:.2f} {units.get(s, '')}, {1000 * r['time_s_mean']:.0f} ms/pair")
                elif "epe_mean" in r:
                    echo(f"{s}: {labels.get(r['method'], r['method'])}: EPE {r['epe_mean']:.3f} voxels, "
                         f"{r['time_s_mean']:.2f} s")
        for n in notes:
            echo(f"note: {n}")
        echo(f"report: {os.path.join(outdir, 'report.md')} ({time.perf_counter() - t_start:.1f} s)")
    return 0
