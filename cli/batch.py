"""``varreg batch``: register a cohort of pairs on Dask distributed, resumably.

A manifest (CSV: ``id, fixed, moving`` and optional ``fixed_labels,
moving_labels, fixed_mask, moving_mask``; paths relative to the manifest's folder) names the pairs.
Each pair is one task: :func:`varreg_cli.pipeline.run_register`, the code of
``varreg register``, run on a worker into ``OUT/<id>/``. The tasks run on a
:class:`distributed.LocalCluster` (worker processes under nannies, bound to
127.0.0.1) or on any Dask cluster (``--scheduler ADDRESS`` / ``client=``).

Per pair folder, the batch writes a marker ``.varreg-batch.json`` before it
starts (``state: running``: the names it may write) and replaces it last
(``state: done``: the fingerprint of inputs and options, the result row, the
outputs with their sizes). A rerun skips pairs whose ``done`` marker has the
same fingerprint and whose outputs are all there; it recomputes pairs left
``running`` (killed driver or worker) after removing their stale temporary
files; it refuses pairs done with other inputs or options, and folders with
files it did not make, unless ``force``. ``OUT/results.csv`` has one row per
manifest row, rebuilt on every run from the markers and this run's failures,
written atomically.

``OUT/results.csv`` columns: ``id, status`` (``ok`` / ``failed``), ``error``
(the one-line message of ``varreg register``, ``<file or --flag>: <problem>``),
``mean_dice``, ``dice_<label>``..., ``hd95`` (mean of the per-label HD95 over
the labels, mm; empty when one is undefined), ``hd95_<label>``...,
``folding_percent``, ``seconds`` (the pair's time on its worker). The values
are those of the pair's ``metrics.json``: with ``--slices`` the Dice and HD95
columns are the means over the slices where every label is present (the
``slices`` block, as the summary line of ``varreg register`` reports them);
``folding_percent`` is the whole field's. Without label maps the metric
columns are empty (``varreg register`` writes no metrics.json then).

Exit codes of the command: 0 every row ok, 1 some rows failed (the others are
done), 2 bad input to the batch itself (manifest, options, OUT, scheduler), one
``error:`` line, nothing written.
"""
from __future__ import annotations

import csv
import io as _io
import json
import math
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

from varreg.io import PLAIN_EXTS, InputError, split_ext

__all__ = ["Pair", "PairResult", "read_manifest", "register_pairs", "BatchRun", "MARKER", "RESULTS"]

MARKER = ".varreg-batch.json"  #: per pair folder, written last
OUT_MARKER = ".varreg-batch-out.json"  #: in OUT: this folder is a batch's (its results.csv is ours)
RESULTS = "results.csv"
COLUMNS = ("id", "fixed", "moving", "fixed_labels", "moving_labels", "fixed_mask", "moving_mask")
REQUIRED = ("id", "fixed", "moving")
RESOURCE = "varreg_pair"  #: worker resource: one pair at a time per worker, with all its threads
DEFAULT_RETRIES = 3
DEFAULT_TIMEOUT = 10.0
#: test hook: ``ID,FLAGFILE``: the task of pair ID kills its worker (os._exit) in the middle of writing
#: its outputs while FLAGFILE does not exist (it creates it first: so only the first attempt dies)
CRASH_ENV = "VARREG_BATCH_TEST_CRASH_ONCE"

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
#: temporary names of OutputSet (``.<stem>.<8 hex>.tmp<ext>``) and of this module's atomic writes
_TMP = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp(\..*)?$")
#: the options of ``varreg register`` a batch applies to every pair (besides the solver flags)
PAIR_OPTIONS = ("slices", "isotropic", "resample", "frame", "fixed_frame", "moving_frame", "qc")
_QC_EXTS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


# --------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class Pair:
    """One manifest row: ``id`` (the folder name under OUT) and absolute paths."""

    id: str
    fixed: str
    moving: str
    fixed_labels: str | None = None
    moving_labels: str | None = None
    fixed_mask: str | None = None
    moving_mask: str | None = None


@dataclass
class PairResult:
    """What a pair came to: ``status`` ``"ok"`` or ``"failed"`` (``error``: the one-line message);
    ``metrics``: the CSV's metric columns (``mean_dice``, ``dice_<label>``, ``hd95``, ``hd95_<label>``,
    ``folding_percent``; None where undefined); ``seconds`` on the worker; ``skipped``: done by an
    earlier run with the same inputs and options (not recomputed)."""

    id: str
    status: str
    error: str = ""
    metrics: dict = field(default_factory=dict)
    seconds: float | None = None
    skipped: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def row(self) -> dict:
        return {"id": self.id, "status": self.status, "error": self.error, **self.metrics, "seconds": self.seconds}


def _check_id(pid: str, where: str, path) -> None:
    if not pid:
        raise InputError(path, f"{where}: empty id")
    if not _SAFE_ID.match(pid) or pid.lower() in (RESULTS, OUT_MARKER):
        raise InputError(path, f"{where}: id {pid!r} is not a safe folder name (letters, digits, '.', '_', '-'; "
                               f"starting with a letter or digit; at most 200 characters; not {RESULTS!r})")


def _check_pairs(pairs: list[Pair], path, wheres=None) -> None:
    """Ids unique (also ignoring case: folders on a case-insensitive disk) and safe; paths given."""
    seen: dict[str, str] = {}
    for i, p in enumerate(pairs):
        where = wheres[i] if wheres else f"pair {i + 1}"
        _check_id(p.id, where, path)
        key = p.id.casefold()
        if key in seen:
            raise InputError(path, f"{where}: duplicate id {p.id!r} (also on {seen[key]})")
        seen[key] = where
        for col in ("fixed", "moving"):
            if not getattr(p, col):
                raise InputError(path, f"{where} (id {p.id}): empty {col} path")
        if p.fixed_labels and not p.moving_labels:
            raise InputError(path, f"{where} (id {p.id}): fixed_labels needs moving_labels (the labels to warp "
                                   "and compare), as --fixed-labels does")


def read_manifest(path) -> list[Pair]:
    """The pairs of a manifest CSV, paths made absolute against the manifest's folder.

    Columns ``id, fixed, moving`` (required) and ``fixed_labels, moving_labels,
    fixed_mask, moving_mask`` (optional; empty cells allowed; the masks as ``--fixed-mask`` /
    ``--moving-mask``). Raises :class:`varreg.io.InputError` (one
    line naming the file and the row) for a missing or unreadable file, a file
    that is not CSV text, a missing or unknown column, a row of the wrong
    length, an empty path, a duplicate id or an id that is not a safe folder name.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(path, "the manifest does not exist")
    if os.path.isdir(path):
        raise InputError(path, "is a directory; give the manifest CSV file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise InputError(path, f"cannot read the manifest ({exc.strerror or exc})") from None
    if b"\0" in raw:
        raise InputError(path, "is not a CSV text file (it holds binary data); the manifest is a CSV with the "
                               "columns id, fixed, moving[, fixed_labels, moving_labels]")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(path, "is not a UTF-8 CSV text file") from None
    try:
        rows = list(csv.reader(_io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise InputError(path, f"is not a valid CSV file ({exc})") from None
    rows = [(i + 1, r) for i, r in enumerate(rows) if any(c.strip() for c in r)]
    if not rows:
        raise InputError(path, "is empty; the manifest needs a header row: id,fixed,moving[,fixed_labels,moving_labels]")
    _, header = rows[0]
    header = [h.strip().lower() for h in header]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise InputError(path, f"has no column {', '.join(missing)} (header: {', '.join(header) or 'none'}); the "
                               f"manifest's columns are {', '.join(COLUMNS)} (labels and masks optional)")
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        raise InputError(path, f"unknown column {unknown[0]!r}; the manifest's columns are {', '.join(COLUMNS)}")
    dup = [h for h in set(header) if header.count(h) > 1]
    if dup:
        raise InputError(path, f"column {dup[0]!r} appears twice in the header")
    if len(rows) == 1:
        raise InputError(path, "has a header but no pairs")
    base = os.path.dirname(os.path.abspath(path))
    pairs, wheres = [], []
    for line, r in rows[1:]:
        where = f"line {line}"
        if len(r) != len(header):
            raise InputError(path, f"{where}: {len(r)} fields, the header has {len(header)}")
        cells = {h: c.strip() for h, c in zip(header, r)}
        pid = cells["id"]
        _check_id(pid, where, path)
        for col in REQUIRED[1:]:
            if not cells[col]:
                raise InputError(path, f"{where} (id {pid}): empty {col} path")
        absolute = {c: (os.path.normpath(os.path.join(base, cells[c])) if cells.get(c) else None)
                    for c in COLUMNS[1:]}
        pairs.append(Pair(pid, **{c: absolute[c] for c in COLUMNS[1:]}))
        wheres.append(where)
    _check_pairs(pairs, path, wheres)
    return pairs


def _as_pairs(pairs) -> tuple[list[Pair], str]:
    """``pairs`` (a manifest path, or Pairs / mappings / tuples) as checked Pairs with absolute paths."""
    if isinstance(pairs, (str, os.PathLike)):
        return read_manifest(pairs), os.fspath(pairs)
    out = []
    for p in pairs:
        if isinstance(p, Pair):
            vals = tuple(getattr(p, c) for c in COLUMNS)
        elif isinstance(p, dict):
            vals = tuple(p.get(c) for c in COLUMNS)
        else:
            vals = tuple(p) + (None,) * (len(COLUMNS) - len(p))
        pid, *paths = vals
        paths = [os.path.abspath(os.fspath(x)) if x else None for x in paths]
        out.append(Pair(str(pid or ""), *paths))
    _check_pairs(out, "pairs")
    return out, "pairs"


# --------------------------------------------------------------------------- options and fingerprints
def check_options(register_options: dict) -> tuple[dict, dict, str]:
    """``(pair options, solver options, kind)``, every value checked as ``varreg register`` checks it
    (the solver flags by :func:`varreg_cli.options.method_from_flags`); an :class:`InputError` naming the flag."""
    from .options import flag, method_from_flags, solver_field_names

    classical, learned = solver_field_names()
    solver_names = classical | learned | {"denoiser"}
    opts = {k: None for k in PAIR_OPTIONS}
    opts.update(slices=False, isotropic=False, resample=False)
    solver = {}
    for k, v in register_options.items():
        if k in PAIR_OPTIONS:
            opts[k] = v
        elif k in solver_names:
            if v is not None:
                solver[k] = v
        elif k == "threads":
            raise InputError("--threads", "does not apply to a batch: use --threads-per-worker (the solver "
                                          "threads of each worker)")
        else:
            raise TypeError(f"register_pairs() got an unknown option {k!r} (options: "
                            f"{', '.join(PAIR_OPTIONS)} and the solver fields)")
    for k in ("slices", "isotropic", "resample"):
        opts[k] = bool(opts[k])
    for k in ("frame", "fixed_frame", "moving_frame"):
        v = opts[k]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise InputError(flag(k), f"{v!r} is not a frame number (an integer >= 0)")
    qc = opts["qc"]
    if qc is not None:
        qc = os.fspath(qc)
        if not qc or os.path.basename(qc) != qc or qc in (".", ".."):
            raise InputError("--qc", f"{qc!r}: give a bare file name; the figure goes into each pair's folder")
        if split_ext(qc)[1] not in _QC_EXTS:
            raise InputError("--qc", f"{qc!r}: the QC figure must be .png, .pdf, .svg or .jpg")
        if qc in (MARKER, RESULTS) or _TMP.match(qc):
            raise InputError("--qc", f"{qc!r} is a name the batch uses itself")
        opts["qc"] = qc
    if solver.get("checkpoint") is not None:  # the workers may run elsewhere: an absolute path
        solver["checkpoint"] = os.path.abspath(os.fspath(solver["checkpoint"]))
    _, kind = method_from_flags(dict(solver))
    return opts, solver, kind


def _stat(path) -> dict | None:
    if path is None:
        return None
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return {"path": real, "missing": True}
    return {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _canonical(obj):
    from .outputs import jsonable

    return json.loads(json.dumps(jsonable(obj), sort_keys=True))


def fingerprint(pair: Pair, opts: dict, solver: dict) -> dict:
    """What a pair's outputs depend on: the resolved inputs (size, mtime_ns), the options, varreg's version."""
    import varreg

    inputs = {c: _stat(getattr(pair, c)) for c in COLUMNS[1:]}
    if solver.get("checkpoint"):
        inputs["checkpoint"] = _stat(solver["checkpoint"])
    return _canonical({"inputs": inputs, "options": {**opts, "solver": solver}, "varreg_version": varreg.__version__})


def _differences(old: dict, new: dict) -> str:
    """Which parts of two fingerprints differ, in flags and input names: ``--lam, fixed changed``."""
    from .options import flag

    out = []
    if old.get("varreg_version") != new.get("varreg_version"):
        out.append(f"varreg {old.get('varreg_version')} -> {new.get('varreg_version')}")
    oo, no = old.get("options", {}), new.get("options", {})
    for k in sorted(set(oo) | set(no)):
        if k == "solver":
            so, sn = oo.get("solver", {}) or {}, no.get("solver", {}) or {}
            out += [flag(n) for n in sorted(set(so) | set(sn)) if so.get(n) != sn.get(n)]
        elif oo.get(k) != no.get(k):
            out.append(flag(k))
    oi, ni = old.get("inputs", {}), new.get("inputs", {})
    for k in sorted(set(oi) | set(ni)):
        a, b = oi.get(k), ni.get(k)
        if a != b:
            if a and b and a.get("path") == b.get("path"):
                out.append(f"{k} file changed")
            else:
                out.append(f"{k} is another file")
    return ", ".join(out) or "the fingerprint"


def expected_outputs(pair: Pair, opts: dict, solver: dict | None = None) -> list[str]:
    """The file names ``varreg register`` may write for ``pair`` into its folder."""
    names = ["warped.nii.gz", "displacement.nii.gz"]
    if (solver or {}).get("affine"):
        from .pipeline import AFFINE_OUTPUTS

        names.extend(AFFINE_OUTPUTS)
    if pair.moving_labels:
        names.append("warped_labels.nii.gz")
    if pair.fixed_labels:
        names.append("metrics.json")
    if opts.get("qc"):
        names.append(opts["qc"])
    ext = split_ext(pair.moving)[1]
    if ext in PLAIN_EXTS and ext != ".npy":
        names.append(f"warped{ext}")
    return names


# --------------------------------------------------------------------------- files
def _write_atomic(path: str, text: str) -> None:
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _write_marker(folder: str, marker: dict) -> None:
    _write_atomic(os.path.join(folder, MARKER), json.dumps(marker, indent=1, allow_nan=False) + "\n")


def read_marker(folder: str) -> dict | None:
    """The pair folder's marker, or None (none, or not one of ours)."""
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as fh:
            m = json.load(fh)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("state") in ("running", "done", "failed") else None


def clean_stale(folder: str) -> list[str]:
    """Remove the temporary files a killed run left in ``folder`` (OutputSet's ``.<name>.<hex>.tmp<ext>``)."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for n in names:
        p = os.path.join(folder, n)
        if _TMP.match(n) and os.path.isfile(p):
            try:
                os.remove(p)
                removed.append(n)
            except OSError:
                pass
    return removed


def _user_files(folder: str, marker: dict | None) -> list[str]:
    """Entries of a pair folder that the batch did not make (not its marker, outputs or temporary files)."""
    ours = {MARKER}
    if marker:
        ours |= set(marker.get("outputs", {})) | set(marker.get("may_write", ())) | set(marker.get("previous", ()))
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [n for n in names if n not in ours and not _TMP.match(n)]


def _complete(folder: str, marker: dict) -> bool:
    for name, size in marker.get("outputs", {}).items():
        try:
            if os.path.getsize(os.path.join(folder, name)) != size:
                return False
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------- metrics rows
def _num(v):
    if v is None or isinstance(v, bool):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def row_metrics(record: dict) -> dict:
    """The CSV's metric columns from ``run_register``'s record (the content of metrics.json).

    With ``--slices`` (and slices with every label present) the Dice and HD95 columns are the
    protocol means of the ``slices`` block, as :func:`varreg.evaluation.summary_line` picks them;
    ``folding_percent`` is the whole field's, as the summary line's ``folds``."""
    if "labels" not in record:
        return {"mean_dice": None, "hd95": None, "folding_percent": _num(record.get("folding_percent"))}
    labels = [int(k) for k in record["labels"]]
    src = record["slices"] if "slices" in record and record["slices"].get("n_evaluated") else record
    dice, hd95 = src.get("dice", {}) or {}, src.get("hd95_mm", {}) or {}
    out = {"mean_dice": _num(src.get("mean_dice"))}
    out.update({f"dice_{k}": _num(dice.get(str(k))) for k in labels})
    hds = [_num(hd95.get(str(k))) for k in labels]
    out["hd95"] = float(sum(hds) / len(hds)) if hds and all(h is not None for h in hds) else None
    out.update({f"hd95_{k}": h for k, h in zip(labels, hds)})
    out["folding_percent"] = _num(record.get("folding_percent"))
    return out


def _label_key(col: str):
    tail = col.split("_", 1)[1]
    return (0, int(tail), "") if tail.lstrip("-").isdigit() else (1, 0, tail)


def results_columns(rows: list[dict]) -> list[str]:
    keys = set().union(*[r.keys() for r in rows]) if rows else set()
    dice = sorted((k for k in keys if k.startswith("dice_")), key=_label_key)
    hd = sorted((k for k in keys if k.startswith("hd95_")), key=_label_key)
    return ["id", "status", "error", "mean_dice", *dice, "hd95", *hd, "folding_percent", "seconds"]


def write_results(path: str, rows: list[dict]) -> None:
    """``results.csv`` (one row per pair, manifest order), through a temporary file and os.replace."""
    cols = results_columns(rows)
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    _write_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- the task (runs on a worker)
def _solver_threads(job: dict) -> int:
    """The solver threads of this task: the worker's threads when it runs one pair at a time (the
    ``varreg_pair`` resource), else one (then each worker thread registers a pair of its own)."""
    if not job.get("one_per_worker"):
        return 1
    try:
        from distributed import get_worker

        w = get_worker()
        n = int(getattr(getattr(w, "state", None), "nthreads", 0) or getattr(w, "nthreads", 1))
    except Exception:  # noqa: BLE001  (not on a worker: a direct call)
        n = 1
    import numba

    return max(1, min(n, int(numba.config.NUMBA_NUM_THREADS)))


def _crash_in_commit():
    """Test hook: make the next OutputSet.commit rename its first file, then kill this process."""
    from . import outputs

    def commit(self):
        self._wait(raise_errors=True)
        if self._staged:
            tmp, final = self._staged[0]
            os.replace(tmp, final)
        os._exit(17)

    outputs.OutputSet.commit = commit


def run_pair(job: dict) -> dict:
    """Register one pair into its folder (on a worker); returns its result row.

    Input problems (:class:`InputError`) fail the row; anything else propagates so that Dask
    retries the task (``retries=``). The marker is written first (``running``) and last (``done``)."""
    t0 = time.perf_counter()
    from . import pipeline

    pair = Pair(**job["pair"])
    folder = job["folder"]
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    clean_stale(folder)
    previous, force_files = set(job["previous"]), job["force_files"]
    marker = read_marker(folder)
    if marker is not None:  # an earlier attempt of this run (a dead worker), or of a killed run
        if (marker["state"] == "done" and marker.get("fingerprint") == job["fingerprint"]
                and _complete(folder, marker) and marker.get("result")):
            return marker["result"]  # it finished, only its answer was lost
        if not _user_files(folder, marker):
            force_files = True  # every file at an output name there is the batch's
        previous |= set(marker.get("outputs", {})) | set(marker.get("may_write", ())) | set(marker.get("previous", ()))
    previous = sorted(previous)
    attempt = secrets.token_hex(8)
    _write_marker(folder, {"state": "running", "attempt": attempt, "fingerprint": job["fingerprint"],
                           "may_write": job["may_write"], "previous": previous})
    threads = _solver_threads(job)
    if job["kind"] == "vrnet" or "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)
    crash = job.get("crash_flag")
    if crash and not os.path.exists(crash):
        open(crash, "w").close()
        _crash_in_commit()
    opts = job["options"]
    try:
        record = pipeline.run_register(
            pair.fixed, pair.moving, folder, fixed_labels=pair.fixed_labels, moving_labels=pair.moving_labels,
            qc=opts["qc"], resample=opts["resample"], slices=opts["slices"], frame=opts["frame"],
            fixed_frame=opts["fixed_frame"], moving_frame=opts["moving_frame"], isotropic=opts["isotropic"],
            force=force_files, quiet=True, solver=dict(job["solver"]), threads=threads, fixed_mask=pair.fixed_mask,
            moving_mask=pair.moving_mask)
    except InputError as exc:
        seconds = time.perf_counter() - t0
        current = read_marker(folder)
        if current and current.get("attempt") == attempt:
            if not _user_files(folder, None) and not previous:  # nothing of the pair's: leave no trace
                os.remove(os.path.join(folder, MARKER))
                if created:
                    try:
                        os.rmdir(folder)
                    except OSError:
                        pass
            else:  # earlier outputs stay, claimed by the batch (the next run recomputes the pair)
                _write_marker(folder, {**current, "state": "failed", "error": str(exc)})
        return PairResult(pair.id, "failed", str(exc).replace("\n", " "), {}, seconds).row()
    written = sorted(os.path.basename(p) for p in record.get("written", ()))
    for name in set(previous) - set(written):  # outputs of earlier options that this run did not remake
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            os.remove(p)
    row = PairResult(pair.id, "ok", "", row_metrics(record), time.perf_counter() - t0).row()
    outputs = {n: os.path.getsize(os.path.join(folder, n)) for n in written}
    import numba

    _write_marker(folder, {"state": "done", "attempt": attempt, "fingerprint": job["fingerprint"],
                           "result": _canonical(row), "outputs": outputs, "threads": int(numba.get_num_threads()),
                           "host": _host(), "pid": os.getpid(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return row


def _host() -> str:
    import socket

    return socket.gethostname()


def _worker_memory() -> dict:
    """On a worker (``client.run``): its pid and RSS high-water mark in bytes (VmHWM)."""
    out = {"pid": os.getpid(), "hwm": None}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    out["hwm"] = int(line.split()[1]) * 1024
    except OSError:
        try:
            import resource

            out["hwm"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        except Exception:  # noqa: BLE001
            pass
    return out


# --------------------------------------------------------------------------- the driver
def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def local_layout(workers: int | None, threads_per_worker: int | None) -> tuple[int, int]:
    """``(N, T)`` of the local cluster: the usable cores shared without oversubscription by default."""
    cores = usable_cores()
    if workers is None and threads_per_worker is None:
        return cores, 1
    if workers is None:
        return max(1, cores // threads_per_worker), threads_per_worker
    if threads_per_worker is None:
        return workers, max(1, cores // workers)
    return workers, threads_per_worker


class BatchRun:
    """A checked batch: ``prepare()`` (everything checked, nothing written), then iterate ``run()``.

    ``varreg batch`` and :func:`register_pairs` are built on it."""

    def __init__(self, pairs, outdir, *, client=None, scheduler=None, workers=None, threads_per_worker=None,
                 force=False, retries=DEFAULT_RETRIES, connect_timeout=DEFAULT_TIMEOUT, **register_options):
        self.pairs_arg = pairs
        self.outdir = os.path.abspath(os.fspath(outdir))
        self.client_arg = client
        self.scheduler = scheduler
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self.force = bool(force)
        self.retries = int(retries)
        self.connect_timeout = float(connect_timeout)
        self.register_options = register_options
        self.skipped: dict[str, PairResult] = {}
        self.jobs: list[dict] = []
        self.results: dict[str, PairResult] = {}
        self.layout = None  # (N, T) of a local cluster
        self.t_start = None

    # ------------------------------------------------------------------ checks
    def prepare(self) -> "BatchRun":
        if (self.client_arg is not None or self.scheduler) and (self.workers or self.threads_per_worker):
            which = "--workers" if self.workers else "--threads-per-worker"
            raise InputError(which, "applies to the local cluster; the workers of --scheduler (or client=) have "
                                    "their own count and --nthreads")
        if self.client_arg is not None and self.scheduler:
            raise InputError("--scheduler", "give a scheduler address or a client, not both")
        self.opts, self.solver, self.kind = check_options(self.register_options)
        self.pairs, self.source = _as_pairs(self.pairs_arg)
        if not self.pairs:
            raise InputError(self.source, "no pairs to register")
        if os.path.exists(self.outdir) and not os.path.isdir(self.outdir):
            raise InputError(self.outdir, "exists and is not a directory (OUT must be a folder)")
        if self.client_arg is None and not self.scheduler:
            import numba

            self.layout = local_layout(self.workers, self.threads_per_worker)
            top = int(numba.config.NUMBA_NUM_THREADS)
            if self.layout[1] > top:
                raise InputError("--threads-per-worker", f"{self.layout[1]} is out of range 1..{top} (the CPU "
                                                         "threads numba can use here)")
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise InputError("varreg batch", "needs Dask distributed: pip install 'varreg[batch]' "
                                             "(or pip install 'dask[distributed]')") from None
        self._plan()
        return self

    def _plan(self) -> None:
        """Classify every pair from its folder: done (skip), to run, or a conflict (refused)."""
        other, foreign, files = [], [], []
        crash = os.environ.get(CRASH_ENV, "")
        crash_id, _, crash_flag = crash.partition(",")
        results_csv = os.path.join(self.outdir, RESULTS)
        if (os.path.lexists(results_csv) and not os.path.exists(os.path.join(self.outdir, OUT_MARKER))
                and not self.force):
            raise InputError(results_csv, "exists and was not written by varreg batch; pass --force to overwrite it "
                                          "(nothing was written)")
        for p in self.pairs:
            folder = os.path.join(self.outdir, p.id)
            fp = fingerprint(p, self.opts, self.solver)
            may_write = expected_outputs(p, self.opts, self.solver)
            previous: set[str] = set()
            force_files = self.force
            if os.path.lexists(folder):
                if not os.path.isdir(folder):
                    files.append(p.id)
                    continue
                marker = read_marker(folder)
                mine = _user_files(folder, marker)
                if marker is None:
                    if mine and not self.force:
                        foreign.append((p.id, mine))
                        continue
                else:
                    previous = (set(marker.get("outputs", {})) | set(marker.get("may_write", ()))
                                | set(marker.get("previous", ())))
                    if marker["state"] == "done" and marker.get("fingerprint") == fp and _complete(folder, marker):
                        res = marker.get("result") or {}
                        metrics = {k: v for k, v in res.items() if k not in ("id", "status", "error", "seconds")}
                        self.skipped[p.id] = PairResult(p.id, "ok", "", metrics, res.get("seconds"), skipped=True)
                        continue
                    if marker["state"] == "done" and marker.get("fingerprint") != fp and not self.force:
                        other.append((p.id, _differences(marker.get("fingerprint") or {}, fp)))
                        continue
                    if mine and not self.force:
                        foreign.append((p.id, mine))
                        continue
                    force_files = True  # every file at an output name there is the batch's
            self.jobs.append({
                "pair": {c: getattr(p, c) for c in COLUMNS}, "folder": folder, "fingerprint": fp,
                "may_write": may_write, "previous": sorted(previous), "force_files": force_files,
                "options": self.opts, "solver": self.solver, "kind": self.kind,
                "crash_flag": crash_flag if crash_id == p.id and crash_flag else None,
            })
        if files:
            raise InputError(os.path.join(self.outdir, files[0]), f"is a file, not a pair folder"
                                                                  f"{_more(files)}; move it away")
        problems = []
        if other:
            problems.append(f"{_count(other)} done with other inputs or options (" +
                            "; ".join(f"{i}: {why}" for i, why in other[:5]) + (f"; and {len(other) - 5} more" if len(other) > 5 else "") + ")")
        if foreign:
            problems.append(f"{_count(foreign)} with files varreg batch did not make (" +
                            "; ".join(f"{i}: {', '.join(n[:3])}{' ...' if len(n) > 3 else ''}" for i, n in foreign[:5])
                            + (f"; and {len(foreign) - 5} more" if len(foreign) > 5 else "") + ")")
        if problems:
            raise InputError(self.outdir, f"{' and '.join(problems)}; pass --force to recompute those pairs "
                                          "(nothing was written)")

    # ------------------------------------------------------------------ running
    def _connect(self):
        """``(client, owned)``: the given client, one to --scheduler, or a new LocalCluster's."""
        import logging

        import dask
        from distributed import Client, LocalCluster

        if self.client_arg is not None:
            return self.client_arg, False
        if self.scheduler:
            try:
                client = Client(self.scheduler, timeout=self.connect_timeout, set_as_default=False)
            except (OSError, TimeoutError, ValueError) as exc:
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise InputError("--scheduler", f"cannot connect to {self.scheduler} within "
                                                f"{self.connect_timeout:g} s ({msg})") from None
            return client, True
        n, t = self.layout
        with dask.config.set({"distributed.scheduler.allowed-failures": self.retries}):
            cluster = LocalCluster(n_workers=n, threads_per_worker=t, processes=True, host="127.0.0.1",
                                   dashboard_address="127.0.0.1:0", resources={RESOURCE: 1},
                                   silence_logs=logging.ERROR)
        client = Client(cluster, set_as_default=False)
        client._varreg_cluster = cluster
        return client, True

    @staticmethod
    def _close(client) -> None:
        cluster = getattr(client, "_varreg_cluster", None)
        try:
            client.close()
        finally:
            if cluster is not None:
                cluster.close()

    def _one_per_worker(self, client) -> bool:
        if self.layout is not None:
            return True
        try:
            ws = client.scheduler_info(n_workers=-1)["workers"] if _takes_n_workers(client) else client.scheduler_info()["workers"]
        except Exception:  # noqa: BLE001
            return False
        return bool(ws) and all(RESOURCE in (w.get("resources") or {}) for w in ws.values())

    def run(self) -> Iterator[PairResult]:
        """Yield a :class:`PairResult` per pair (skipped ones first, then as they finish); write results.csv."""
        self.t_start = time.perf_counter()
        for r in self.skipped.values():
            self.results[r.id] = r
            yield r
        if self.jobs:
            client, owned = self._connect()
            try:
                yield from self._submit_all(client)
            finally:
                if owned:
                    self._close(client)
        self.write_results()

    def _submit_all(self, client) -> Iterator[PairResult]:
        from distributed import as_completed

        os.makedirs(self.outdir, exist_ok=True)
        root = os.path.join(self.outdir, OUT_MARKER)
        if not os.path.exists(root):
            _write_atomic(root, json.dumps({"varreg_batch": 1, "manifest": self.source}) + "\n")
        clean_stale(self.outdir)
        one = self._one_per_worker(client)
        extra = {"resources": {RESOURCE: 1}} if one else {}
        futures = {}
        token = secrets.token_hex(4)
        for job in self.jobs:
            clean_stale(job["folder"])
            job = {**job, "one_per_worker": one}
            size = (job["fingerprint"]["inputs"]["fixed"] or {}).get("size") or 0
            # the largest pairs first: fewer workers idle at the end waiting for one long pair
            fut = client.submit(run_pair, job, key=f"varreg-pair-{job['pair']['id']}-{token}", pure=False,
                                retries=self.retries, priority=int(size), **extra)
            futures[fut] = job
        for fut in as_completed(list(futures), loop=client.loop):
            job = futures.pop(fut)
            pid = job["pair"]["id"]
            if fut.status == "finished":
                row = fut.result()
                metrics = {k: v for k, v in row.items() if k not in ("id", "status", "error", "seconds")}
                res = PairResult(pid, row["status"], row["error"], metrics, row["seconds"])
            else:
                exc = fut.exception()
                clean_stale(job["folder"])
                name = type(exc).__name__
                if name == "KilledWorker":
                    msg = (f"{job['pair']['fixed']}: the worker registering this pair died, more often than the "
                           "scheduler's allowed-failures (out of memory?); see the worker logs")
                else:
                    msg = (f"{job['pair']['fixed']}: internal error ({name}: {str(exc).splitlines()[0] if str(exc) else ''}) "
                           f"after {self.retries} retries")
                res = PairResult(pid, "failed", msg, {}, None)
            fut.release()
            self.results[pid] = res
            yield res

    def write_results(self) -> str | None:
        """results.csv from the results of every manifest row (markers for the skipped ones)."""
        if len(self.results) != len(self.pairs):
            return None
        os.makedirs(self.outdir, exist_ok=True)
        path = os.path.join(self.outdir, RESULTS)
        write_results(path, [self.results[p.id].row() for p in self.pairs])
        return path


def _takes_n_workers(client) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False


def _count(items) -> str:
    return f"{len(items)} pair{'s' if len(items) != 1 else ''}"


def _more(items) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def register_pairs(pairs, outdir, *, client=None, workers=None, threads_per_worker=None, force=False,
                   **register_options) -> Iterator[PairResult]:
    """Register ``pairs`` into ``outdir/<id>/`` on Dask; yields a :class:`PairResult` per pair as it finishes.

    ``pairs``: a manifest path, or :class:`Pair` objects (or mappings / tuples ``id, fixed, moving[,
    fixed_labels, moving_labels]``). ``client``: a :class:`distributed.Client` to run on (left open);
    by default a LocalCluster of ``workers`` x ``threads_per_worker`` (the usable cores, one thread
    each) is started and closed. ``register_options``: the options of ``varreg register`` by their
    field names (``slices=True``, ``qc="qc.png"``, ``frame=0``, ``lam=0.2``, ``denoiser="tgv"``,
    ``checkpoint=...``), and ``retries`` (default 3), ``scheduler`` (an address instead of
    ``client``), ``connect_timeout`` (s). Everything is checked here, before any cluster starts
    (:class:`varreg.io.InputError`); ``outdir/results.csv`` is written when the iteration ends.
    """
    run = BatchRun(pairs, outdir, client=client, workers=workers, threads_per_worker=threads_per_worker,
                   force=force, **register_options).prepare()
    return run.run()


# --------------------------------------------------------------------------- the command
def run_cli(manifest, outdir, *, workers=None, threads_per_worker=None, scheduler=None, connect_timeout=10.0,
            retries=DEFAULT_RETRIES, force=False, quiet=False, **register_options) -> int:
    """``varreg batch``: the exit code (0 all ok, 1 some rows failed); InputError for bad batch input."""
    import click

    from . import progress

    run = BatchRun(manifest, outdir, scheduler=scheduler, workers=workers, threads_per_worker=threads_per_worker,
                   force=force, retries=retries, connect_timeout=connect_timeout, **register_options).prepare()
    total, n_skip = len(run.pairs), len(run.skipped)
    bar = None
    if progress.enabled(quiet):
        from tqdm import tqdm

        bar = tqdm(total=total, initial=0, desc="pairs", unit="pair", file=sys.stderr, dynamic_ncols=True,
                   leave=False)
    ok = failed = 0
    t0 = time.perf_counter()
    t_first = None
    try:
        for res in run.run():
            if res.skipped:
                if bar is not None:
                    bar.update(1)
                continue
            if t_first is None:
                t_first = time.perf_counter()
            ok += res.ok
            failed += not res.ok
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"done {ok}, failed {failed}, skipped {n_skip}")
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        click.echo(f"error: interrupted; {ok} pairs done in this run are kept in {run.outdir}: rerun the same "
                   "command to resume", err=True)
        return 130
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t0
    computed = ok + failed
    if not quiet:
        lay = (f"local cluster {run.layout[0]} worker{'s' if run.layout[0] != 1 else ''} x {run.layout[1]} "
               f"thread{'s' if run.layout[1] != 1 else ''}" if run.layout else f"scheduler {scheduler}")
        rate = f"{computed / wall:.3f}" if computed and wall > 0 else "-"
        lines = [
            f"varreg batch: {total} pair{'s' if total != 1 else ''}, {lay} → {os.path.join(run.outdir, RESULTS)}",
            f"  {'ok':<24}{ok + n_skip:>8}",
            f"  {'  computed':<24}{ok:>8}",
            f"  {'  skipped (done before)':<24}{n_skip:>8}",
            f"  {'failed':<24}{failed:>8}",
            f"  {'wall time (s)':<24}{wall:>8.1f}",
            f"  {'pairs/s (computed)':<24}{rate:>8}",
        ]
        bad = [r for r in run.results.values() if not r.ok]
        if bad:
            lines.append("failed pairs (see results.csv):")
            lines += [f"  {r.id}: {r.error}" for r in bad[:10]]
            if len(bad) > 10:
                lines.append(f"  ... and {len(bad) - 10} more")
        click.echo("\n".join(lines))
    return 1 if failed else 0
