"""``varreg bench`` (issue #5): peers' displacement conventions, the tables' arithmetic, the report
folder on a phantom data set, and ``--quick`` on real ACDC data against an independent computation.

Runs with one numba/ITK/torch thread (the machine may be shared). The ACDC test reads
``../shared/data/acdc`` (relative to the repository root) and is skipped when it is absent.
"""
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

import varreg
import varreg_bench as B
from varreg import acdc, metrics, phantom, synthetic
from varreg_cli.main import main

ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "acdc"
ENV1 = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="1")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    except ImportError:
        pass
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    yield
    numba.set_num_threads(before)


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _f(x):
    return float(x)


def _same(a, b, tol=1e-9):
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= tol * max(1.0, abs(b))


# --------------------------------------------------------------------------- peers' conventions
def test_demons_displacement_is_in_array_axis_voxel_order_2d():
    pytest.importorskip("SimpleITK")
    img = synthetic.smooth_random_image((64, 80), sigma=4, rng=0)
    inner = (slice(16, -16), slice(16, -16))
    # moving[i, j] = img[i, j - 3]: moving(x + (0, 3)) = img(x), so u = (0, +3)
    u = B.sitk_demons(img, np.roll(img, 3, axis=1))
    assert u.shape == (2, 64, 80) and u.dtype == np.float32
    assert abs(u[0][inner].mean()) < 0.2 and abs(u[1][inner].mean() - 3) < 0.3
    # anisotropic pixels (2 mm along axis 0): the result stays in voxels, not mm
    u = B.sitk_demons(img, np.roll(img, -2, axis=0), (2.0, 1.0))
    assert abs(u[0][inner].mean() + 2) < 0.3 and abs(u[1][inner].mean()) < 0.2
    # and warping the moving image with it reproduces the fixed one
    w = varreg.warp(np.roll(img, -2, axis=0), u)
    assert np.abs(w - img)[inner].mean() < 0.25 * np.abs(np.roll(img, -2, axis=0) - img)[inner].mean()


def test_elastix_displacement_is_in_array_axis_voxel_order_2d():
    if not B.installed("itk.ElastixPython"):
        pytest.skip("itk-elastix is not installed")
    img = synthetic.smooth_random_image((64, 80), sigma=4, rng=0)
    inner = (slice(16, -16), slice(16, -16))
    # anisotropic pixels (2 mm along axis 0); moving[i, j] = img[i + 2, j - 3]: u = (-2, +3) voxels
    moving = np.roll(np.roll(img, -2, axis=0), 3, axis=1)
    u = B.elastix_ffd(img, moving, (2.0, 1.0), iterations=128)
    assert u.shape == (2, 64, 80) and u.dtype == np.float32
    assert abs(u[0][inner].mean() + 2) < 0.3 and abs(u[1][inner].mean() - 3) < 0.3


def test_demons_displacement_is_in_array_axis_voxel_order_3d():
    pytest.importorskip("SimpleITK")
    vol = synthetic.smooth_random_image((40, 48, 12), sigma=3, rng=1)
    u = B.sitk_demons(vol, np.roll(vol, 2, axis=1), (1.5, 1.5, 10.0))
    inner = (slice(8, -8), slice(8, -8), slice(3, -3))
    assert u.shape == (3, 40, 48, 12)
    assert abs(u[1][inner].mean() - 2) < 0.3
    assert abs(u[0][inner].mean()) < 0.2 and abs(u[2][inner].mean()) < 0.2


def test_ants_displacement_convention():
    pytest.importorskip("ants")
    img = synthetic.smooth_random_image((64, 80), sigma=4, rng=0)
    inner = (slice(16, -16), slice(16, -16))
    u = B.ants_syn(img, np.roll(img, 3, axis=1), None, **B.ANTS_PARAMS)
    assert abs(u[0][inner].mean()) < 0.3 and abs(u[1][inner].mean() - 3) < 0.5
    u = B.ants_syn(img, np.roll(img, -2, axis=0), (2.0, 1.0), **B.ANTS_PARAMS)
    assert abs(u[0][inner].mean() + 2) < 0.6 and abs(u[1][inner].mean()) < 0.3


def test_skimage_runner_is_optical_flow_tvl1():
    sk = pytest.importorskip("skimage.registration")
    img = synthetic.smooth_random_image((48, 48), sigma=3, rng=2)
    mov = np.roll(img, 1, axis=0)
    np.testing.assert_array_equal(B.skimage_tvl1(img, mov), sk.optical_flow_tvl1(img, mov).astype(np.float32))


# --------------------------------------------------------------------------- registry
def test_missing_peer_and_checkpoint_are_skipped_with_a_note(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("ants", "SimpleITK") else real(name, *a))
    reg = B.registry()
    assert isinstance(reg["ants-syn"], B.Unavailable) and isinstance(reg["sitk-demons"], B.Unavailable)
    assert isinstance(reg["vrnet"], B.Unavailable) and "checkpoint" in reg["vrnet"].reason
    methods, notes = B.select_methods(["varreg", "sitk-demons", "vrnet"], reg)
    assert [m.name for m in methods] == ["varreg"]
    assert any(n.startswith("sitk-demons skipped") and "SimpleITK" in n for n in notes)
    assert any(n.startswith("vrnet skipped") for n in notes)
    defaults = B.default_methods(reg)
    assert defaults[:7] == ["unregistered", "varreg", "varreg-l1-huber", "varreg-l1-quadratic", "varreg-l2-tv",
                            "varreg-l2-huber", "varreg-l2-quadratic"]
    assert B.default_methods(reg, quick=True) == ["unregistered", "varreg", "skimage-tvl1"]
    with pytest.raises(ValueError, match="unknown method"):
        B.select_methods(["nope"], reg)


def test_varreg_method_is_the_api_call():
    reg = B.registry()
    f = synthetic.smooth_random_image((40, 40), rng=3)
    m = np.roll(f, 1, axis=1)
    np.testing.assert_array_equal(reg["varreg"].run(f, m, None, "cpu"), varreg.register(f, m, device="cpu").displacement)
    np.testing.assert_array_equal(reg["varreg-l2-huber"].run(f, m, None, "cpu"),
                                  varreg.register(f, m, data_term="l2", denoiser="huber", device="cpu").displacement)


def test_tuning_grids():
    methods, notes, grid = B.tune_methods(["sitk-demons", "varreg"])
    if importlib.util.find_spec("SimpleITK") is not None:
        assert len(methods) == 9 and all(grid[m.name][0] == "sitk-demons" for m in methods)
    assert any("varreg" in n for n in notes)


# --------------------------------------------------------------------------- arithmetic of the tables
def test_summarise_follows_the_acdc_2d_protocol():
    inf, nan = float("inf"), float("nan")
    recs = []
    vals = [  # (dice LV, Myo, RV), (hd LV, Myo, RV)
        ((0.9, 0.8, 0.7), (2.0, 3.0, 4.0)),
        ((0.95, 0.0, 0.6), (1.0, inf, 5.0)),
        ((0.85, 0.75, 0.65), (3.0, 2.0, 6.0)),
    ]
    for i, (d, h) in enumerate(vals):
        r = dict(method="x", time_s=0.1 * (i + 1), time_gpu_s=nan, fold_pct=float(i), jgrad=0.01)
        for (_, s), dv, hv in zip(B.STRUCTURES, d, h):
            r[f"dice_{s}"], r[f"hd_{s}"], r[f"hd95_{s}"] = dv, hv, hv / 2
        recs.append(r)
    (row,) = B.summarise(recs, ["x"])
    d = np.array([v[0] for v in vals])
    h = np.array([v[1] for v in vals])
    assert _same(row["dice_avg_mean"], d.mean()) and _same(row["dice_avg_std"], d.mean(1).std())
    assert _same(row["dice_Myo_mean"], d[:, 1].mean())
    assert _same(row["hd_avg_mean"], h[np.isfinite(h)].mean()) and row["lost"] == 1
    per_pair = [np.mean(x[np.isfinite(x)]) for x in h]
    assert _same(row["hd_avg_std"], np.std(per_pair))
    assert _same(row["hd_Myo_mean"], 2.5) and _same(row["fold_pct_mean"], 1.0)
    assert math.isnan(row["time_gpu_s_mean"])
    table = B.results_table([row], {"x": "method X"}, "px")
    assert "| method X | 0.900 (0.041) |" in table and "HD (HD, px)" not in table
    assert table.splitlines()[0].startswith("| Method | Dice LV | Dice Myo | Dice RV | Dice Avg | HD LV")
    rt = B.runtime_table({"acdc-2d": [row]}, {"x": "method X"}, {"acdc-2d": {"x": {"cpu": 1.5}}}, ["x"])
    assert "| method X | 0.200 (0.082) | – | – | – | 1.50 / – |" in rt


def test_a_failing_method_is_recorded_not_fatal():
    calls = []

    def flaky(fixed, moving, spacing=None, device="cpu"):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return np.zeros((2, *fixed.shape), np.float32)

    pairs = []
    for k in range(3):
        p = phantom.demo_pair((32, 32), rng=k)
        pairs.append(B.Pair("acdc-2d", f"p{k}", 0, p.fixed, p.moving, p.fixed_labels, p.moving_labels))
    m = B.Method("flaky", "flaky", "peer", flaky, (2,))
    recs, warm = B.run_suite(pairs, [m])
    assert len(recs) == 3 and recs[1]["error"] == "RuntimeError: boom" and math.isnan(recs[1]["dice_LV"])
    (row,) = B.summarise(recs, ["flaky"])
    assert row["failed"] == 1 and row["lost"] == 0 and row["n"] == 3
    assert _same(row["dice_avg_mean"], np.mean([[recs[i][f"dice_{s}"] for _, s in B.STRUCTURES] for i in (0, 2)]))


def test_csv_keeps_full_precision():
    rows = [dict(method="a", v=1 / 3, w=float("inf"), n=3)]
    (back,) = list(csv.DictReader(B.csv_text(rows).splitlines()))
    assert float(back["v"]) == 1 / 3 and math.isinf(float(back["w"])) and back["n"] == "3"


# --------------------------------------------------------------------------- the command on phantom data
def _phantom_acdc(folder, patients=(4, 9), shape=(48, 48, 4)):
    """An ACDC-like folder: patientNNN_{ED,ES}[_gt].nii.gz from the demo phantom, identity affine."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, n in enumerate(patients):
        p = phantom.demo_pair(shape, rng=k)
        for suffix, arr, dt in (("ED", p.fixed, np.float32), ("ES", p.moving, np.float32),
                                ("ED_gt", p.fixed_labels, np.uint8), ("ES_gt", p.moving_labels, np.uint8)):
            nib.save(nib.Nifti1Image(arr.astype(dt), np.eye(4)), str(folder / f"patient{n:03d}_{suffix}.nii.gz"))
    return folder


def _invoke(*args):
    res = CliRunner().invoke(main, ["bench", *args])
    return res


def test_report_folder_on_phantom_data(tmp_path):
    pytest.importorskip("SimpleITK")
    data = _phantom_acdc(tmp_path / "acdc")
    out = tmp_path / "report"
    res = _invoke("--data", str(data), "--split", "val", "--methods", "unregistered,varreg,sitk-demons,vrnet",
                  "--synthetic-shape", "24,24,20", "-o", str(out), "-q")
    assert res.exit_code == 0, res.output + str(res.exception)
    for name in ("report.md", "header.json", "runtime.md", "runtime.csv", "results_synthetic_3d.md",
                 "results_synthetic_3d.csv", "per_pair_synthetic_3d.csv"):
        assert (out / name).is_file(), name
    for t in ("acdc_2d", "acdc_3d"):
        for name in (f"results_{t}.md", f"results_{t}.csv", f"per_pair_{t}.csv", f"boxplots_{t}.png"):
            assert (out / name).stat().st_size > 0, name
    assert (out / "boxplots_acdc_2d.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    for text in ("## ACDC 2D", "## ACDC 3D", "## Synthetic 3D", "## Runtime (layout of Table VI)",
                 "vrnet skipped: no --checkpoint given", "threads per method: 1", "split val, 2 patient(s)",
                 "## Methods and configurations"):
        assert text in report, text
    head = json.loads((out / "header.json").read_text())
    assert head["patients"] == ["patient004", "patient009"] and head["spacing_3d_mm"] == [1.5, 1.5, 10.0]
    assert head["versions"]["numpy"] == np.__version__ and head["command"].startswith("varreg bench")

    # 2-D numbers of varreg agree with an independent computation on the same pairs
    per = [r for r in _read_csv(out / "per_pair_acdc_2d.csv") if r["method"] == "varreg"]
    k = 0
    for pid in ("patient004", "patient009"):
        case = acdc.load_case(data, pid)
        for z, f, m, fl, ml in acdc.slice_pairs(case):
            u = varreg.register(f, m).displacement
            w = varreg.warp(ml, u, order=0)
            r = per[k]
            assert (r["patient"], int(r["index"])) == (pid, z)
            for lab, s in B.STRUCTURES:
                assert _same(r[f"dice_{s}"], metrics.dice(fl, w, labels=[lab])[lab])
                assert _same(r[f"hd_{s}"], metrics.hausdorff(fl, w, lab))
            assert _same(r["fold_pct"], 100 * metrics.folding_fraction(u))
            k += 1
    assert k == len(per) > 0
    # 3-D: distances in mm with the assumed spacing
    per3 = [r for r in _read_csv(out / "per_pair_acdc_3d.csv") if r["method"] == "varreg"]
    case = acdc.load_case(data, "patient004")
    u = varreg.register(case.ed, case.es, spacing=(1.5, 1.5, 10.0)).displacement
    w = varreg.warp(case.es_gt, u, order=0)
    assert _same(per3[0]["hd_LV"], metrics.hausdorff(case.ed_gt, w, 3, spacing=(1.5, 1.5, 10.0)))
    # synthetic: end-point error against the known displacement
    syn = {r["method"]: r for r in _read_csv(out / "results_synthetic_3d.csv")}
    assert _f(syn["varreg"]["epe_mean"]) < _f(syn["unregistered"]["epe_mean"])

    # an existing report is never overwritten without --force: one error line, exit 2
    res = _invoke("--data", str(data), "--split", "val", "--methods", "unregistered", "--suites", "acdc-2d",
                  "-o", str(out))
    assert res.exit_code == 2 and "exists already; pass --force" in res.output


def test_vrnet_with_a_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from varreg_learned import VRNet, VRNetConfig
    from varreg_learned.checkpoint import save_checkpoint
    from varreg_learned.inference import register_learned

    ck = save_checkpoint(tmp_path / "tiny.pt", VRNet(VRNetConfig(ndim=2, width=4, depth=2, n_warps=1, n_iters=1)))
    data = _phantom_acdc(tmp_path / "acdc", patients=(4,), shape=(32, 32, 2))
    out = tmp_path / "r"
    res = _invoke("--data", str(data), "--methods", "vrnet,vrnet+refine,vrnet+refine-tgv", "--suites", "acdc-2d,acdc-3d",
                  "--checkpoint", str(ck), "--refine-warps", "2", "-o", str(out), "-q")
    torch.set_num_threads(1)
    assert res.exit_code == 0, res.output + str(res.exception)
    report = (out / "report.md").read_text()
    assert "vrnet not run in acdc-3d: it registers 2-D images only" in report
    per = _read_csv(out / "per_pair_acdc_2d.csv")
    case = acdc.load_case(data, "patient004")
    z, f, m, fl, ml = next(acdc.slice_pairs(case))
    for method, denoiser in (("vrnet+refine", "quadratic"), ("vrnet+refine-tgv", "tgv")):
        u = register_learned(f, m, str(ck), post_warps=2, post_denoiser=denoiser, device="cpu").displacement
        w = varreg.warp(ml, u, order=0)
        r = next(r for r in per if r["method"] == method and int(r["index"]) == z)
        assert _same(r["dice_LV"], metrics.dice(fl, w, labels=[3])[3]), method


@pytest.mark.parametrize("args, message", [
    (["--suites", "acdc-2d", "-o", "x"], "--data: the acdc-2d suite(s) need the ACDC folder"),
    (["--data", "/nonexistent/acdc", "-o", "x"], "/nonexistent/acdc: no such folder"),
    (["--suites", "synthetic-3d", "--methods", "nope", "-o", "x"], "--methods: unknown method(s) nope"),
    (["--suites", "bogus", "-o", "x"], "--suites: unknown suite(s) bogus"),
    (["--quick", "--scaling", "--suites", "synthetic-3d", "-o", "x"], "--scaling: is never part of --quick"),
    (["--suites", "synthetic-3d"], "Missing option '-o'"),
    (["--spacing-3d", "1,2", "-o", "x"], "expected 3 positive numbers"),
])
def test_bad_options_are_one_error_line(tmp_path, args, message):
    res = _invoke(*args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_help_and_list_do_not_run_anything():
    code = ("import sys; from varreg_cli.main import main; "
            "assert 'varreg' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV1)
    res = _invoke("--help")
    assert res.exit_code == 0 and "--quick" in res.output and "--spacing-3d" in res.output
    res = _invoke("--list-methods")
    assert res.exit_code == 0 and "varreg-l2-quadratic" in res.output and "vrnet" in res.output


def test_scaling_runs_each_size_in_a_fresh_process():
    rows = B.scaling_run(["varreg"], [32], [16], threads=1, timeout=300)
    assert [(r["ndim"], r["n"]) for r in rows] == [(2, 32), (3, 16)]
    for r in rows:
        assert "note" not in r, r
        assert r["time_s"] > 0 and r["peak_rss_gib"] >= r["rss_before_gib"] > 0
    assert "| varreg L1-TV (default) | cpu | 32×32 | 1024 |" in B.scaling_table(rows, {"varreg": "varreg L1-TV (default)"})
    import matplotlib.pyplot as plt

    plt.close(B.scaling_plot(rows, {}))


# --------------------------------------------------------------------------- --quick on real ACDC data (CI)
@pytest.mark.acdc
@pytest.mark.skipif(not (ROOT / "patient004_ED.nii.gz").exists(), reason="../shared/data/acdc is absent")
def test_quick_on_acdc_agrees_with_an_independent_computation(tmp_path):
    out = tmp_path / "quick"
    exe = Path(sys.executable).with_name("varreg")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "varreg_cli.main"]
    r = subprocess.run(cmd + ["bench", "--data", str(ROOT), "--quick", "-o", str(out)], capture_output=True,
                       text=True, env=ENV1, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "report:" in r.stdout
    for name in ("report.md", "header.json", "results_acdc_2d.md", "results_acdc_2d.csv", "per_pair_acdc_2d.csv",
                 "boxplots_acdc_2d.png", "runtime.md", "runtime.csv"):
        assert (out / name).is_file(), name
    head = json.loads((out / "header.json").read_text())
    patients = acdc.patients(ROOT, "val")[:2]
    assert head["split"] == "val" and head["patients"] == patients and head["suites"] == ["acdc-2d"]
    assert head["methods"][:2] == ["unregistered", "varreg"]

    # independent: the protocol of benchmarks/acdc_2d.py with the core API and varreg.metrics
    dice, hd, hd95, fold, jgrad, keys = [], [], [], [], [], []
    for pid in patients:
        for z, f, m, fl, ml in acdc.slice_pairs(acdc.load_case(ROOT, pid)):
            u = varreg.register(f, m).displacement
            lm = metrics.label_metrics(fl, varreg.warp(ml, u, order=0), labels=[3, 2, 1])
            dice.append([lm["dice"][k] for k in (3, 2, 1)])
            hd.append([lm["hd"][k] for k in (3, 2, 1)])
            hd95.append([lm["hd95"][k] for k in (3, 2, 1)])
            fold.append(100 * metrics.folding_fraction(u))
            jgrad.append(metrics.jacobian_gradient_magnitude(u))
            keys.append((pid, z))
    per = [r for r in _read_csv(out / "per_pair_acdc_2d.csv") if r["method"] == "varreg"]
    assert [(r["patient"], int(r["index"])) for r in per] == keys
    for i, r in enumerate(per):
        for j, (_, s) in enumerate(B.STRUCTURES):
            assert _same(r[f"dice_{s}"], dice[i][j]) and _same(r[f"hd_{s}"], hd[i][j])
            assert _same(r[f"hd95_{s}"], hd95[i][j])
        assert _same(r["fold_pct"], fold[i]) and _same(r["jgrad"], jgrad[i])
    d, h = np.array(dice), np.array(hd)
    (row,) = [r for r in _read_csv(out / "results_acdc_2d.csv") if r["method"] == "varreg"]
    assert int(row["n"]) == len(keys)
    assert _same(row["dice_avg_mean"], d.mean()) and _same(row["dice_avg_std"], d.mean(1).std())
    for j, (_, s) in enumerate(B.STRUCTURES):
        assert _same(row[f"dice_{s}_mean"], d[:, j].mean())
    assert _same(row["hd_avg_mean"], h[np.isfinite(h)].mean()) and int(row["lost"]) == int((~np.isfinite(h)).sum())
    assert _same(row["fold_pct_mean"], np.mean(fold)) and _same(row["jgrad_mean"], np.mean(jgrad))
    md = (out / "results_acdc_2d.md").read_text()
    assert f"| {d.mean():.3f} ({d.mean(1).std():.3f}) |" in md
    rt = _read_csv(out / "runtime.csv")
    assert all(_f(x["cpu_s_mean"]) > 0 for x in rt if x["method"] != "unregistered")


@pytest.mark.acdc
@pytest.mark.skipif(not (ROOT / "patient001_ED.nii.gz").exists(), reason="../shared/data/acdc is absent")
def test_quick_on_a_folder_without_val_patients_takes_its_first_two_and_says_so(tmp_path):
    data = tmp_path / "acdc"
    data.mkdir()
    for pid in ("patient001", "patient002", "patient003"):  # train-split numbers only
        for part in ("ED", "ES", "ED_gt", "ES_gt"):
            os.symlink(ROOT / f"{pid}_{part}.nii.gz", data / f"{pid}_{part}.nii.gz")
    out = tmp_path / "quick"
    res = CliRunner().invoke(main, ["bench", "--data", str(data), "--quick", "--methods", "unregistered", "-o",
                                    str(out)])
    assert res.exit_code == 0, res.output
    assert "holds no patient of the val split" in res.stdout and "--split all" in res.stdout
    head = json.loads((out / "header.json").read_text())
    assert head["split"] == "all" and head["patients"] == ["patient001", "patient002"]


def test_bench_split_choices_are_varreg_acdc_splits():
    from varreg_cli.bench import SPLITS

    assert set(SPLITS) == set(acdc.SPLITS)


def test_vrnet_slices_is_the_2d_network_on_every_slice():
    pytest.importorskip("torch")
    from varreg_learned import register_learned

    ck = str(Path(__file__).resolve().parents[1] / "varreg_learned" / "checkpoints" / "vrnet2d_acdc.pt")
    reg = B.registry([ck])
    m = reg["vrnet-slices"]
    assert m.dims == (3,) and reg["vrnet"].dims == (2,)
    p = phantom.demo_pair((48, 40, 2), rng=8)
    u = m.run(p.fixed, p.moving, spacing=(1.5, 1.5, 8.0))
    assert u.shape == (3, 48, 40, 2) and np.all(u[2] == 0)
    for k in range(2):
        ref = register_learned(p.fixed[..., k], p.moving[..., k], ck, spacing=(1.5, 1.5), post_warps=0).displacement
        np.testing.assert_allclose(u[:2, ..., k], np.asarray(ref), atol=1e-5)
