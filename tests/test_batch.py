"""``varreg batch`` on Dask distributed: outputs as ``varreg register``'s, results.csv, resume, faults.

Tiny one-slice phantom pairs (48x40) keep each pair well under a second. The
tests start every service they use: one in-process LocalCluster (2 worker
processes under nannies, 127.0.0.1) shared by the module, a ``dask scheduler``
and a ``dask worker`` as subprocesses, and the CLI as a subprocess (its own
LocalCluster) for the SIGKILL test.
"""
import csv
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

distributed = pytest.importorskip("distributed")

from varreg import phantom  # noqa: E402
from varreg_cli import batch as B  # noqa: E402
from varreg_cli.main import main  # noqa: E402

AFFINE = np.diag([1.5, 1.5, 8.0, 1.0])
N_GOOD = 4
#: slower solver settings (about 0.25 s a pair) for the test that kills the driver mid-run
SLOW = ["--warps", "5,10", "--iterations", "30"]


def save(path, arr, dtype):
    img = nib.Nifti1Image(np.asarray(arr).reshape(arr.shape + (1,)).astype(dtype), AFFINE)
    img.set_sform(AFFINE, code=1)
    img.set_qform(AFFINE, code=1)
    nib.save(img, str(path))
    return str(path)


def make_cohort(folder, n, *, bad=True, seed=0):
    """``n`` phantom pairs as NIfTI under folder/data, a manifest with relative paths; plus a corrupt pair."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = [["id", "fixed", "moving", "fixed_labels", "moving_labels"]]
    for i in range(n):
        p = phantom.demo_pair((48, 40), rng=seed + i)
        names = {}
        for k, a, dt in (("f", p.fixed, np.float32), ("m", p.moving, np.float32),
                         ("fl", p.fixed_labels, np.uint8), ("ml", p.moving_labels, np.uint8)):
            names[k] = f"data/p{i}_{k}.nii.gz"
            save(folder / names[k], a, dt)
        rows.append([f"p{i}", names["f"], names["m"], names["fl"], names["ml"]])
    if bad:
        (data / "bad_m.nii.gz").write_bytes(b"\x1f\x8b this is not a gzip stream")
        rows.append(["bad", "data/p0_f.nii.gz", "data/bad_m.nii.gz", "", ""])
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return manifest


def read_results(out):
    with open(os.path.join(out, "results.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tmp_files(out):
    return [p for p in glob.glob(os.path.join(str(out), "**", ".*tmp*"), recursive=True)]


def markers(out):
    return {os.path.basename(os.path.dirname(p)): json.load(open(p))
            for p in glob.glob(os.path.join(str(out), "*", B.MARKER))}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    d = tmp_path_factory.mktemp("cohort")
    return make_cohort(d, N_GOOD)


@pytest.fixture(scope="module")
def cluster():
    """An in-process LocalCluster: 2 worker processes (nannies), 1 thread each, on 127.0.0.1."""
    from distributed import Client, LocalCluster

    lc = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0")
    client = Client(lc)
    try:
        yield client
    finally:
        client.close()
        lc.close()


@pytest.fixture(scope="module")
def first_run(cohort, cluster, tmp_path_factory):
    """``varreg batch`` on the cohort, through --scheduler to the module's cluster."""
    out = tmp_path_factory.mktemp("batch") / "out"
    res = cli("batch", cohort, "-o", out, "--scheduler", cluster.scheduler.address)
    return res, out


# --------------------------------------------------------------------------- outputs and results
def test_outputs_equal_register_and_a_corrupt_pair_fails_alone(first_run, cohort, tmp_path):
    res, out = first_run
    assert res.exit_code == 1, res.output  # one row failed, the others done
    assert "failed" in res.stdout and "bad:" in res.stdout
    pairs = {p.id: p for p in B.read_manifest(cohort)}
    for pid in ("p0", "p3"):
        p = pairs[pid]
        ref = tmp_path / pid
        r = cli("register", p.fixed, p.moving, "-o", ref, "--fixed-labels", p.fixed_labels, "--moving-labels",
                p.moving_labels, "--threads", "1", "-q")
        assert r.exit_code == 0, r.output
        got = out / pid
        assert sorted(os.listdir(ref)) == sorted(n for n in os.listdir(got) if n != B.MARKER)
        m_ref, m_got = (json.loads((d / "metrics.json").read_text()) for d in (ref, got))
        m_ref.pop("time_s"), m_got.pop("time_s")
        assert m_got == m_ref
        for name in ("displacement.nii.gz", "warped.nii.gz", "warped_labels.nii.gz"):
            a, b = (np.asanyarray(nib.load(str(d / name)).dataobj) for d in (ref, got))
            assert np.array_equal(a, b), name
    assert not (out / "bad").exists()  # a failed pair leaves no folder
    assert tmp_files(out) == []


def test_results_csv_one_row_per_pair_with_metrics_json_values(first_run, cohort):
    _, out = first_run
    rows = read_results(out)
    assert [r["id"] for r in rows] == [p.id for p in B.read_manifest(cohort)]
    assert list(rows[0]) == ["id", "status", "error", "mean_dice", "dice_1", "dice_2", "dice_3", "hd95", "hd95_1",
                             "hd95_2", "hd95_3", "folding_percent", "seconds"]
    for r in rows[:N_GOOD]:
        assert r["status"] == "ok" and r["error"] == ""
        m = json.loads((out / r["id"] / "metrics.json").read_text())
        assert float(r["mean_dice"]) == m["mean_dice"]
        for k in ("1", "2", "3"):
            assert float(r[f"dice_{k}"]) == m["dice"][k]
            assert float(r[f"hd95_{k}"]) == m["hd95_mm"][k]
        assert float(r["hd95"]) == pytest.approx(np.mean([m["hd95_mm"][k] for k in "123"]), rel=1e-12)
        assert float(r["folding_percent"]) == m["folding_percent"]
        assert float(r["seconds"]) > 0
    bad = rows[-1]
    assert bad["status"] == "failed" and "bad_m.nii.gz" in bad["error"] and "\n" not in bad["error"]
    assert bad["mean_dice"] == ""


def test_slices_columns_are_the_protocol_means(tmp_path, cluster):
    """--slices: Dice and HD95 from the ``slices`` block of metrics.json, as the summary line."""
    p = phantom.demo_pair((40, 36, 3), rng=4)
    d = tmp_path / "s"
    d.mkdir()
    for k, a, dt in (("f", p.fixed, np.float32), ("m", p.moving, np.float32), ("fl", p.fixed_labels, np.uint8),
                     ("ml", p.moving_labels, np.uint8)):
        img = nib.Nifti1Image(a.astype(dt), np.diag([1.5, 1.5, 6.0, 1.0]))
        nib.save(img, str(d / f"{k}.nii.gz"))
    (d / "m.csv").write_text("id,fixed,moving,fixed_labels,moving_labels\ns1,f.nii.gz,m.nii.gz,fl.nii.gz,ml.nii.gz\n")
    [r] = list(B.register_pairs(d / "m.csv", tmp_path / "out", client=cluster, slices=True, warps=3, iterations=5))
    m = json.loads((tmp_path / "out" / "s1" / "metrics.json").read_text())
    assert r.ok and m["slices"]["n_evaluated"] > 0
    assert r.metrics["mean_dice"] == m["slices"]["mean_dice"] != m["mean_dice"]
    assert r.metrics["dice_2"] == m["slices"]["dice"]["2"]
    assert r.metrics["hd95_3"] == m["slices"]["hd95_mm"]["3"]
    assert r.metrics["folding_percent"] == m["folding_percent"]


# --------------------------------------------------------------------------- resume
def test_rerun_skips_done_pairs_without_recomputing(first_run, cohort, cluster):
    _, out = first_run
    before = read_results(out)
    stamp = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "p*" / "*")) + glob.glob(str(out / "p*" / ".*"))}
    results = list(B.register_pairs(cohort, out, client=cluster))
    assert sorted(r.id for r in results if r.skipped) == [f"p{i}" for i in range(N_GOOD)]
    assert [r.status for r in results if not r.skipped] == ["failed"]  # failures are retried on a rerun
    assert {p: os.stat(p).st_mtime_ns for p in stamp} == stamp  # no output, no marker rewritten
    after = read_results(out)
    assert after[:N_GOOD] == before[:N_GOOD]
    assert [r["id"] for r in after] == [r["id"] for r in before]


def test_other_options_refused_then_force_recomputes(first_run, cohort, tmp_path):
    _, src = first_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    stamp = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "**"), recursive=True)}
    res = cli("batch", cohort, "-o", out, "--lam", "0.1", "--workers", "1")
    assert res.exit_code == 2
    line = res.stderr.strip()
    assert "\n" not in line and line.startswith("error: ") and "other inputs or options" in line
    assert "p0: --lam" in line and "--force" in line
    assert {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "**"), recursive=True)} == stamp
    # a file the batch did not make, in a pair folder: refused as well
    (out / "p0" / "notes.txt").write_text("mine")
    os.remove(out / "p1" / B.MARKER)
    res = cli("batch", cohort, "-o", out, "--workers", "1")
    assert res.exit_code == 2 and "did not make" in res.stderr and "p1:" in res.stderr
    res = cli("batch", cohort, "-o", out, "--lam", "0.1", "--force", "--workers", "2", "--threads-per-worker", "1")
    assert res.exit_code == 1, res.output
    m = markers(out)
    assert all(m[f"p{i}"]["state"] == "done" and m[f"p{i}"]["fingerprint"]["options"]["solver"] == {"lam": 0.1}
               for i in range(N_GOOD))
    assert (out / "p0" / "notes.txt").read_text() == "mine"  # never touched
    assert json.loads((out / "p0" / "metrics.json").read_text())["solver"]["lam"] == 0.1


def test_results_csv_of_someone_else_is_not_overwritten(cohort, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("mine\n")
    res = cli("batch", cohort, "-o", out)
    assert res.exit_code == 2 and "results.csv" in res.stderr and "--force" in res.stderr
    assert os.listdir(out) == ["results.csv"]


def test_driver_killed_mid_run_then_resumed(tmp_path):
    manifest = make_cohort(tmp_path, 10, bad=False, seed=20)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "varreg_cli.main", "batch", str(manifest), "-o", str(out), "--workers", "2", "-q", *SLOW]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if any(m["state"] == "done" for m in _markers_safe(out).values()):
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # worker processes of the killed driver, if any are left
        except ProcessLookupError:
            pass
    done = [k for k, m in _markers_safe(out).items() if m["state"] == "done"]
    assert 1 <= len(done) < 10, "the driver should have been killed in the middle of the run"
    assert not (out / "results.csv").exists()
    stamp = {k: os.stat(out / k / B.MARKER).st_mtime_ns for k in done}
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    rows = read_results(out)
    assert sorted(r["id"] for r in rows) == sorted(f"p{i}" for i in range(10))  # each pair once
    assert all(r["status"] == "ok" for r in rows)
    assert {k: os.stat(out / k / B.MARKER).st_mtime_ns for k in done} == stamp  # done ones not recomputed
    assert tmp_files(out) == []
    for i in range(10):
        names = set(os.listdir(out / f"p{i}"))
        assert names == {B.MARKER, "warped.nii.gz", "displacement.nii.gz", "warped_labels.nii.gz", "metrics.json"}
        nib.load(str(out / f"p{i}" / "displacement.nii.gz")).get_fdata()  # complete, readable


def _markers_safe(out):
    m = {}
    for p in glob.glob(os.path.join(str(out), "*", B.MARKER)):
        try:
            with open(p) as fh:
                m[os.path.basename(os.path.dirname(p))] = json.load(fh)
        except (OSError, ValueError):
            pass
    return m


# --------------------------------------------------------------------------- faults on the workers
def test_worker_killed_mid_pair_is_replaced_and_the_pair_retried(tmp_path, cluster, monkeypatch):
    manifest = make_cohort(tmp_path, 3, bad=False, seed=40)
    flag = tmp_path / "crashed"
    monkeypatch.setenv(B.CRASH_ENV, f"p1,{flag}")
    pids = set(cluster.run(os.getpid).values())
    results = {r.id: r for r in B.register_pairs(manifest, tmp_path / "out", client=cluster)}
    assert flag.exists()  # p1's first attempt killed its worker in the middle of writing its outputs
    assert all(r.ok for r in results.values()), results
    cluster.wait_for_workers(2, timeout=60)
    assert set(cluster.run(os.getpid).values()) != pids  # the nanny started a new worker process
    out = tmp_path / "out" / "p1"
    assert markers(tmp_path / "out")["p1"]["state"] == "done"
    assert tmp_files(tmp_path / "out") == []
    assert {"warped.nii.gz", "displacement.nii.gz", "metrics.json"} <= set(os.listdir(out))


@pytest.fixture
def dask_services(tmp_path_factory):
    """Address of a ``dask scheduler`` with one ``dask worker --nthreads 1`` on 127.0.0.1.

    ``.ci/run`` starts them before the suite and exports ``VARREG_TEST_SCHEDULER``; without
    it (``python -m pytest`` on its own) they start here and stop after the test."""
    given = os.environ.get("VARREG_TEST_SCHEDULER")
    if given:
        yield given
        return
    import dask_services as S

    address, procs = S.start(str(tmp_path_factory.mktemp("dask")), timeout=180)
    try:
        yield address
    finally:
        S.stop(procs)


def test_real_scheduler_and_worker_processes(tmp_path, dask_services):
    manifest = make_cohort(tmp_path, 2, bad=False, seed=60)
    res = cli("batch", manifest, "-o", tmp_path / "out", "--scheduler", dask_services)
    assert res.exit_code == 0, res.output
    assert f"scheduler {dask_services}" in res.stdout
    rows = read_results(tmp_path / "out")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert {m["threads"] for m in markers(tmp_path / "out").values()} == {1}


# --------------------------------------------------------------------------- bad input to the batch itself
def _bad_cases(tmp, cohort):
    good = cohort.read_text().splitlines()
    data = cohort.parent

    def manifest(name, text):
        p = data / name
        p.write_text(text)
        return p

    bin_file = data / "data" / "p0_f.nii.gz"
    port = free_port()
    return {
        "missing manifest": ([data / "nope.csv"], "does not exist"),
        "missing column": ([manifest("nocol.csv", "id,fixed\np0,data/p0_f.nii.gz\n")], "no column moving"),
        "unknown column": ([manifest("unk.csv", good[0] + ",notes\n" + good[1] + ",x\n")], "unknown column 'notes'"),
        "duplicate id": ([manifest("dup.csv", "\n".join([good[0], good[1], good[2].replace("p1,", "p0,", 1)]) + "\n")],
                         "duplicate id 'p0'"),
        "unsafe id": ([manifest("unsafe.csv", "\n".join([good[0], good[1].replace("p0,", "../p0,", 1)]) + "\n")],
                      "not a safe folder name"),
        "empty path": ([manifest("empty.csv", "\n".join([good[0], "p0,,data/p0_m.nii.gz,,"]) + "\n")],
                       "empty fixed path"),
        "short row": ([manifest("short.csv", "\n".join([good[0], "p0,data/p0_f.nii.gz"]) + "\n")], "2 fields"),
        "no rows": ([manifest("header.csv", good[0] + "\n")], "no pairs"),
        "not csv": ([bin_file], "not a CSV"),
        "out is a file": ([cohort, "-o", data / "data" / "p0_m.nii.gz"], "is not a directory"),
        "bad solver option": ([cohort, "--lam", "-1"], "--lam"),
        "vrnet flag without unet": ([cohort, "--post-warps", "3"], "--post-warps"),
        "qc in a folder": ([cohort, "--qc", "sub/qc.png"], "bare file name"),
        "workers with scheduler": ([cohort, "--scheduler", "tcp://127.0.0.1:1", "--workers", "2"], "--workers"),
        "unreachable scheduler": ([cohort, "--scheduler", f"tcp://127.0.0.1:{port}", "--connect-timeout", "1"],
                                  "cannot connect"),
    }


CASES = ["missing manifest", "missing column", "unknown column", "duplicate id", "unsafe id", "empty path",
         "short row", "no rows", "not csv", "out is a file", "bad solver option", "vrnet flag without unet",
         "qc in a folder", "workers with scheduler", "unreachable scheduler"]


@pytest.mark.parametrize("case", CASES)
def test_bad_batch_input_is_one_line_exit_2_nothing_written(case, cohort, tmp_path):
    args, expect = _bad_cases(tmp_path, cohort)[case]
    if "-o" not in args:
        args = [*args, "-o", tmp_path / "out"]
    t0 = time.monotonic()
    res = cli("batch", *args)
    assert res.exit_code == 2, (res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines
    assert not (tmp_path / "out").exists()
    assert time.monotonic() - t0 < 15


def test_read_manifest_paths_are_absolute_against_its_folder(cohort):
    pairs = B.read_manifest(cohort)
    assert [p.id for p in pairs] == ["p0", "p1", "p2", "p3", "bad"]
    assert pairs[0].fixed == str(cohort.parent / "data" / "p0_f.nii.gz")
    assert pairs[-1].fixed_labels is None and pairs[-1].moving_labels is None
    assert all(os.path.isabs(p.moving) for p in pairs)


def test_api_checks_options_before_any_cluster(cohort, tmp_path):
    from varreg.io import InputError

    with pytest.raises(InputError, match="--theta"):
        B.register_pairs(cohort, tmp_path / "out", theta=-1.0)
    with pytest.raises(TypeError, match="unknown option"):
        B.register_pairs(cohort, tmp_path / "out", lamda=0.1)
    with pytest.raises(InputError, match="--threads-per-worker"):
        B.register_pairs(cohort, tmp_path / "out", threads_per_worker=10_000)
    assert not (tmp_path / "out").exists()


def test_own_local_cluster_gives_each_worker_its_threads(tmp_path):
    """register_pairs without a client: a LocalCluster of N x T, one pair at a time per worker, T solver threads."""
    manifest = make_cohort(tmp_path, 2, bad=False, seed=80)
    t = min(2, B.usable_cores())
    results = list(B.register_pairs(manifest, tmp_path / "out", workers=1, threads_per_worker=t))
    assert [r.status for r in results] == ["ok", "ok"] and not any(r.skipped for r in results)
    assert {m["threads"] for m in markers(tmp_path / "out").values()} == {t}
    assert len(read_results(tmp_path / "out")) == 2


def test_own_workers_run_one_pair_each_only_with_the_resource():
    """On an external cluster the pair resource is used only when every worker has it."""
    class FakeClient:
        def __init__(self, resources):
            self.workers = {f"w{i}": {"resources": r} for i, r in enumerate(resources)}

        def scheduler_info(self, n_workers=-1):
            return {"workers": self.workers}

    run = B.BatchRun([], "out", client=object())
    assert run._one_per_worker(FakeClient([{B.RESOURCE: 1}, {B.RESOURCE: 1}]))
    assert not run._one_per_worker(FakeClient([{B.RESOURCE: 1}, {}]))
    assert not run._one_per_worker(FakeClient([]))


def test_local_layout_shares_the_cores():
    cores = B.usable_cores()
    assert B.local_layout(None, None) == (cores, 1)
    n, t = B.local_layout(None, 2)
    assert t == 2 and n == max(1, cores // 2)
    n, t = B.local_layout(1, None)
    assert (n, t) == (1, cores)


def test_mask_columns_reach_register_and_a_bad_mask_fails_its_row(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    p = phantom.demo_pair((48, 40), rng=70)
    save(data / "f.nii.gz", p.fixed, np.float32)
    save(data / "m.nii.gz", p.moving, np.float32)
    mask = np.ones((48, 40), np.uint8)
    mask[:6] = 0
    save(data / "mask.nii.gz", mask, np.uint8)
    save(data / "empty.nii.gz", np.zeros((48, 40), np.uint8), np.uint8)
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,fixed,moving,fixed_mask\nok,data/f.nii.gz,data/m.nii.gz,data/mask.nii.gz\n"
                        "empty,data/f.nii.gz,data/m.nii.gz,data/empty.nii.gz\n")
    res = cli("batch", manifest, "-o", tmp_path / "out", "--workers", 1, "--threads-per-worker", 1)
    assert res.exit_code != 0
    rows = {r["id"]: r for r in read_results(tmp_path / "out")}
    assert rows["ok"]["status"] == "ok" and rows["empty"]["status"] == "failed"
    assert "empty" in rows["empty"]["error"] and "--fixed-mask" in rows["empty"]["error"]
    single = cli("register", data / "f.nii.gz", data / "m.nii.gz", "-o", tmp_path / "single", "--fixed-mask",
                 data / "mask.nii.gz")
    assert single.exit_code == 0, single.output
    a = nib.load(str(tmp_path / "out" / "ok" / "displacement.nii.gz")).get_fdata()
    b = nib.load(str(tmp_path / "single" / "displacement.nii.gz")).get_fdata()
    np.testing.assert_allclose(a, b, atol=1e-5)
