"""The varreg command line: register / apply / evaluate / demo through click, outputs checked on disk.

Small images and few solver iterations keep the module at a few seconds. The
SimpleITK checks apply the written displacement.nii.gz with
DisplacementFieldTransform + Resample and compare with warped.nii.gz.
"""
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from varreg.options import FIELDS
from varreg_cli.outputs import OutputSet
import varreg
from varreg import io as vio
from varreg import metrics as M
from varreg import phantom
from varreg_cli.main import main
from geometry_helpers import interior

# voxel -> RAS: axes permuted, x flipped, voxels 1.5 x 1.5 x 5 mm, an origin
AFFINE = np.array([
    [-1.5, 0.0, 0.0, 40.0],
    [0.0, 0.0, 5.0, -30.0],
    [0.0, 1.5, 0.0, 12.5],
    [0.0, 0.0, 0.0, 1.0],
])
AXIAL = np.array([[-1.5, 0, 0, 40.0], [0, 1.2, 0, -30.0], [0, 0, 6.0, 12.5], [0, 0, 0, 1]])
FAST = ["--warps", "3", "--iterations", "5"]


def save(path, arr, affine=AFFINE, dtype=None):
    arr = np.asarray(arr)
    img = nib.Nifti1Image(arr.astype(dtype or arr.dtype), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return str(path)


def read(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


def run(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args])
    if ok and res.exit_code != 0:
        raise AssertionError(f"exit {res.exit_code}\nstdout: {res.stdout}\nstderr: {res.stderr}\n{res.exception!r}")
    return res


def files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []




@pytest.fixture(scope="module")
def pair3d(tmp_path_factory):
    """A 3-D phantom pair on the permuted anisotropic grid, with labels (moving labels int16)."""
    d = tmp_path_factory.mktemp("pair3d")
    p = phantom.demo_pair((32, 28, 6), rng=1)
    return dict(
        dir=d,
        fixed=save(d / "fixed.nii.gz", p.fixed),
        moving=save(d / "moving.nii.gz", p.moving),
        fixed_labels=save(d / "fixed_labels.nii.gz", p.fixed_labels, dtype=np.uint8),
        moving_labels=save(d / "moving_labels.nii.gz", p.moving_labels, dtype=np.int16),
        arrays=p,
    )


@pytest.fixture(scope="module")
def reg3d(pair3d):
    """One labelled 3-D registration through the CLI."""
    out = pair3d["dir"] / "out"
    res = run("register", pair3d["fixed"], pair3d["moving"], "-o", out, "--fixed-labels", pair3d["fixed_labels"],
              "--moving-labels", pair3d["moving_labels"], *FAST)
    return dict(out=out, stdout=res.stdout, **pair3d)


# --------------------------------------------------------------------------- help and options
def test_top_level_help_does_not_import_the_solver():
    code = ("import sys; from varreg_cli.main import main; "
            "assert 'varreg' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
    res = run("--help")
    for cmd in ("register", "apply", "evaluate", "demo"):
        assert cmd in res.stdout


def test_register_help_shows_the_option_dataclasses():
    """Every solver flag is a field of SolverOptions or VRNetOptions, with its help and its default."""
    from varreg.data_terms import DATA_TERMS
    from varreg.options import FIELDS
    from varreg_learned.options import FIELDS as VRNET_FIELDS

    text = " ".join(run("register", "--help").stdout.split())
    for name, f in {**VRNET_FIELDS, **FIELDS}.items():  # shared names (normalise, device): the classical help
        assert "--" + name.replace("_", "-") in text, name
        assert " ".join(f.metadata["help"].split()) in text, name
    for key in ("theta", "lam", "refine_lam"):
        expected = ", ".join(f"{getattr(cls.weights, key)} for {dt}" for dt, cls in DATA_TERMS.items())
        assert expected in text, key
    assert "Default: 2,5." in text and "Default: 10,30." in text and "Default: 0.6." in text
    assert "5 for tgv" in text and "--ckpt" in text and "Default: the data term's refine_lam" in text
    for word in ("mm", "--slices", "--resample", "--frame", "--force", "--quiet", "--device", "--qc"):
        assert word in text


@pytest.fixture
def spied_pair(tmp_path, monkeypatch):
    """A one-slice NIfTI pair (1.5 x 1.2 mm) and the list that records varreg.register's keywords."""
    calls = []
    real = varreg.register

    def spy(fixed, moving, **kw):
        calls.append(kw)
        return real(fixed, moving, **kw)

    monkeypatch.setattr(varreg, "register", spy)
    p = phantom.demo_pair((40, 36), rng=2)
    f = save(tmp_path / "f.nii.gz", p.fixed[..., None], AXIAL)
    m = save(tmp_path / "m.nii.gz", p.moving[..., None], AXIAL)
    return calls, f, m


def test_options_reach_the_api_and_unset_ones_stay_api_defaults(tmp_path, spied_pair):
    calls, f, m = spied_pair
    run("register", f, m, "-o", tmp_path / "o", "--data-term", "l2", "--lam", "0.01", "--warps", "2",
        "--device", "cpu", "-q")
    (kw,) = calls
    o = kw["options"]
    assert o.data_term == "l2" and o.lam == 0.01 and o.warps == 2 and o.device == "cpu"
    for unset in ("theta", "iterations", "denoiser_iterations", "levels", "scale", "min_size", "normalise"):
        assert getattr(o, unset) == FIELDS[unset].default  # the library's own (per-data-term) default
    assert kw["spacing"] == pytest.approx((1.5, 1.2))  # anisotropic voxel sizes from the affine


def test_per_level_schedules_reach_the_api_as_tuples(tmp_path, spied_pair):
    calls, f, m = spied_pair
    run("register", f, m, "-o", tmp_path / "o", "--warps", "2,4", "--refine", "0,6", "--refine-lam", "0.02", "-q")
    (kw,) = calls
    o = kw["options"]
    assert o.warps == (2, 4) and o.refine == (0, 6) and o.refine_lam == 0.02
    for extra, message in ((["--refine-denoiser", "bm3d"], "--refine-denoiser: refine_denoiser must be one of"),
                           (["--data-term", "mind"], "--data-term: unknown data_term 'mind'"),
                           (["--denoiser", "bm3d"], "--denoiser: unknown denoiser 'bm3d'"),
                           (["--device", "tpu"], "--device: device must be one of"),
                           (["--post-warps", "2"], "--post-warps: goes with --denoiser unet"),
                           (["--refine", "2,x"], "not N or N1,N2"),
                           (["--warps", "2,0"], "counts must be >= 1")):
        res = run("register", f, m, "-o", tmp_path / "o2", *extra, ok=False)
        assert res.exit_code == 2 and message in res.output, res.output
        assert not (tmp_path / "o2").exists()


# --------------------------------------------------------------------------- register: physical space
def test_register_3d_displacement_reproduced_by_simpleitk(reg3d):
    sitk = pytest.importorskip("SimpleITK")
    out = reg3d["out"]
    assert files(out) == ["displacement.nii.gz", "metrics.json", "warped.nii.gz", "warped_labels.nii.gz"]
    warped_img = nib.load(str(out / "warped.nii.gz"))
    np.testing.assert_allclose(warped_img.affine, AFFINE, atol=1e-5)  # the fixed header
    field = sitk.ReadImage(str(out / "displacement.nii.gz"))
    tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    itk = sitk.Resample(sitk.ReadImage(reg3d["moving"]), sitk.ReadImage(reg3d["fixed"]), tx, sitk.sitkLinear, 0.0)
    itk = sitk.GetArrayFromImage(itk).T
    u, _ = vio.load_displacement(out / "displacement.nii.gz")
    assert np.abs(u).max() > 0.5  # a real deformation, not the identity
    mask = interior(u, u.shape[1:])
    assert mask.mean() > 0.3
    np.testing.assert_allclose(itk[mask], read(out / "warped.nii.gz")[mask], atol=1e-4)


def test_register_one_slice_displacement_reproduced_by_simpleitk(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    p = phantom.demo_pair((48, 40), rng=3)
    f = save(tmp_path / "f.nii.gz", p.fixed[..., None], AXIAL)
    m = save(tmp_path / "m.nii.gz", p.moving[..., None], AXIAL)
    run("register", f, m, "-o", tmp_path / "o", *FAST)
    field = sitk.ReadImage(str(tmp_path / "o" / "displacement.nii.gz"))
    assert field.GetDimension() == 2 and field.GetNumberOfComponentsPerPixel() == 2
    tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    itk = sitk.Resample(sitk.ReadImage(m)[:, :, 0], sitk.ReadImage(f)[:, :, 0], tx, sitk.sitkLinear, 0.0)
    itk = sitk.GetArrayFromImage(itk).T[..., None]
    u, _ = vio.load_displacement(tmp_path / "o" / "displacement.nii.gz")
    mask = interior(u, u.shape[1:])
    np.testing.assert_allclose(itk[mask], read(tmp_path / "o" / "warped.nii.gz")[mask], atol=1e-4)


def test_slices_mode_registers_each_slice_in_2d(tmp_path):
    p = phantom.demo_pair((40, 36, 3), rng=4)
    aff = np.diag([1.4, 1.4, 8.0, 1.0])
    f = save(tmp_path / "f.nii.gz", p.fixed, aff)
    m = save(tmp_path / "m.nii.gz", p.moving, aff)
    run("register", f, m, "-o", tmp_path / "o", "--slices", *FAST, "-q")
    u, _ = vio.load_displacement(tmp_path / "o" / "displacement.nii.gz")
    assert np.all(u[2] == 0)  # no through-slice component
    img = nib.load(str(tmp_path / "o" / "displacement.nii.gz"))
    assert img.shape == (40, 36, 3, 1, 3) and np.all(np.asarray(img.dataobj)[..., 2] == 0)
    for z in range(3):
        ref = varreg.register(p.fixed[..., z], p.moving[..., z], spacing=(1.4, 1.4), warps=3, iterations=5)
        np.testing.assert_allclose(u[:2, ..., z], ref.displacement, atol=1e-4)
        np.testing.assert_allclose(read(tmp_path / "o" / "warped.nii.gz")[..., z], ref.warped, atol=1e-5)


def test_labels_metrics_and_summary(reg3d):
    out = reg3d["out"]
    wl = nib.load(str(out / "warped_labels.nii.gz"))
    assert wl.get_data_dtype() == np.int16  # the moving labels' dtype is kept
    fl = read(reg3d["fixed_labels"])
    wla = np.asarray(wl.dataobj)
    m = json.loads((out / "metrics.json").read_text())
    sp = (1.5, 1.5, 5.0)
    for k in (1, 2, 3):
        a, b = fl == k, wla == k
        assert m["dice"][str(k)] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
        assert m["hd_mm"][str(k)] == pytest.approx(M.hausdorff(fl, wla, k, spacing=sp))
        assert m["hd95_mm"][str(k)] == pytest.approx(M.hd95(fl, wla, k, spacing=sp))
        before = read(reg3d["moving_labels"]) == k
        assert m["dice_before"][str(k)] == pytest.approx(2 * (a & before).sum() / (a.sum() + before.sum()))
    u, _ = vio.load_displacement(out / "displacement.nii.gz")
    assert m["folding_percent"] == pytest.approx(100 * M.folding_fraction(u), abs=1e-9)
    assert m["mean_grad_jacobian_per_mm"] == pytest.approx(M.jacobian_gradient_magnitude(u, spacing=sp), rel=1e-3)
    assert m["spacing_mm"] == pytest.approx(sp) and m["solver"]["spacing"] == pytest.approx(sp)
    assert set(m["time_s"]) == {"solver", "total", "overhead"} and m["time_s"]["total"] >= m["time_s"]["solver"]
    lines = reg3d["stdout"].strip().splitlines()
    assert len(lines) == 1 and "Dice" in lines[0] and "→" in lines[0]
    assert m["mean_dice"] > m["mean_dice_before"]


def test_qc_figure_2d_and_3d(tmp_path, pair3d):
    p = phantom.demo_pair((40, 36), rng=5)
    f = save(tmp_path / "f.nii.gz", p.fixed[..., None], AXIAL)
    m = save(tmp_path / "m.nii.gz", p.moving[..., None], AXIAL)
    run("register", f, m, "-o", tmp_path / "o", "--qc", "qc.png", *FAST, "-q")
    from PIL import Image

    w, h = Image.open(tmp_path / "o" / "qc.png").size
    assert w > 600 and h > 300
    run("register", pair3d["fixed"], pair3d["moving"], "-o", tmp_path / "o3", "--qc", tmp_path / "elsewhere" / "q.png",
        *FAST, "-q")
    assert (tmp_path / "elsewhere" / "q.png").exists() and "q.png" not in files(tmp_path / "o3")


def test_resample_needed_for_other_grids(tmp_path, reg3d):
    """The moving image stored flipped along axis 0 (same physical image): refused, then resampled."""
    flip = AFFINE.copy()
    flip[:3, 0] *= -1
    flip[:3, 3] = AFFINE[:3, 3] + AFFINE[:3, 0] * (32 - 1)
    mov = save(tmp_path / "m_flipped.nii.gz", read(reg3d["moving"])[::-1], flip)
    out = tmp_path / "o"
    res = run("register", reg3d["fixed"], mov, "-o", out, ok=False)
    assert res.exit_code == 2 and "--resample" in res.stderr and "m_flipped.nii.gz" in res.stderr
    assert files(out) == []
    run("register", reg3d["fixed"], mov, "-o", out, "--resample", *FAST, "-q")
    np.testing.assert_allclose(read(out / "warped.nii.gz"), read(reg3d["out"] / "warped.nii.gz"), atol=1e-4)


def test_four_d_input_with_frame(tmp_path):
    p = phantom.demo_pair((40, 36), rng=6)
    series = np.stack([p.moving, p.fixed, p.moving], axis=-1)[:, :, None, :]  # (X, Y, 1, T)
    s = save(tmp_path / "cine.nii.gz", series, AXIAL)
    f = save(tmp_path / "f.nii.gz", p.fixed[..., None], AXIAL)
    res = run("register", f, s, "-o", tmp_path / "x", ok=False)
    assert res.exit_code == 2 and "--frame" in res.stderr and "cine.nii.gz" in res.stderr
    run("register", s, s, "-o", tmp_path / "o", "--fixed-frame", "1", "--moving-frame", "2", *FAST, "-q")
    ref = varreg.register(p.fixed, p.moving, spacing=(1.5, 1.2), warps=3, iterations=5)
    np.testing.assert_allclose(read(tmp_path / "o" / "warped.nii.gz")[..., 0], ref.warped, atol=1e-5)


def test_plain_png_pair(tmp_path):
    from PIL import Image

    p = phantom.demo_pair((48, 40), rng=7)
    Image.fromarray((p.fixed * 255).astype(np.uint8)).save(tmp_path / "f.png")
    Image.fromarray((p.moving * 255).astype(np.uint8)).save(tmp_path / "m.png")
    run("register", tmp_path / "f.png", tmp_path / "m.png", "-o", tmp_path / "o", *FAST, "-q")
    assert files(tmp_path / "o") == ["displacement.nii.gz", "warped.nii.gz", "warped.png"]
    w = np.asarray(Image.open(tmp_path / "o" / "warped.png"))
    assert w.dtype == np.uint8 and w.shape == (48, 40)
    assert nib.load(str(tmp_path / "o" / "displacement.nii.gz")).shape == (48, 40, 1, 1, 2)
    before = np.abs(p.fixed * 255 - p.moving * 255).mean()
    assert np.abs(p.fixed * 255 - w).mean() < 0.7 * before


# --------------------------------------------------------------------------- apply, evaluate
def test_apply_reproduces_register_outputs(tmp_path, reg3d):
    out = reg3d["out"]
    run("apply", out / "displacement.nii.gz", reg3d["moving"], "-o", tmp_path / "w.nii.gz", "-q")
    np.testing.assert_allclose(read(tmp_path / "w.nii.gz"), read(out / "warped.nii.gz"), atol=1e-4)
    run("apply", out / "displacement.nii.gz", reg3d["moving_labels"], "-o", tmp_path / "l.nii.gz", "--labels", "-q")
    lab = nib.load(str(tmp_path / "l.nii.gz"))
    assert lab.get_data_dtype() == np.int16
    agree = (np.asarray(lab.dataobj) == read(out / "warped_labels.nii.gz")).mean()
    assert agree > 0.999  # nearest neighbour: identical but for ties at round-off


def test_evaluate_matches_register_metrics(tmp_path, reg3d):
    out = reg3d["out"]
    res = run("evaluate", reg3d["fixed_labels"], out / "warped_labels.nii.gz", "--displacement",
              out / "displacement.nii.gz", "--moving-labels", reg3d["moving_labels"], "-o", tmp_path / "m.json")
    assert "Dice" in res.stdout
    ev = json.loads((tmp_path / "m.json").read_text())
    reg = json.loads((out / "metrics.json").read_text())
    for key in ("dice", "hd_mm", "hd95_mm", "dice_before"):
        assert ev[key] == pytest.approx(reg[key])
    assert ev["folding_percent"] == pytest.approx(reg["folding_percent"], abs=1e-6)
    assert ev["mean_grad_jacobian_per_mm"] == pytest.approx(reg["mean_grad_jacobian_per_mm"], rel=1e-3)


def test_initial_displacement_and_evaluate_slices(tmp_path):
    p = phantom.demo_pair((40, 36, 3), rng=8)
    aff = np.diag([1.4, 1.4, 8.0, 1.0])
    f = save(tmp_path / "f.nii.gz", p.fixed, aff)
    m = save(tmp_path / "m.nii.gz", p.moving, aff)
    fl = save(tmp_path / "fl.nii.gz", p.fixed_labels, aff)
    ml = save(tmp_path / "ml.nii.gz", p.moving_labels, aff)
    run("register", f, m, "-o", tmp_path / "a", "--slices", *FAST, "-q")
    # restart from the result: a zero-iteration-like refinement stays close to it
    run("register", f, m, "-o", tmp_path / "b", "--slices", "--initial", tmp_path / "a" / "displacement.nii.gz",
        "--moving-labels", ml, *FAST, "-q")
    ua, _ = vio.load_displacement(tmp_path / "a" / "displacement.nii.gz")
    ub, _ = vio.load_displacement(tmp_path / "b" / "displacement.nii.gz")
    assert np.abs(ub - ua).mean() < 0.5 * np.abs(ua).mean()
    res = run("evaluate", fl, tmp_path / "b" / "warped_labels.nii.gz", "--slices", "--moving-labels", ml,
              "--displacement", tmp_path / "b" / "displacement.nii.gz", "-o", tmp_path / "e.json")
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["mode"] == "slices" and len(ev["slices"]["per_slice"]) == 3
    assert "slices" in res.stdout and ev["slices"]["mean_dice"] > ev["slices"]["mean_dice_before"]


def test_apply_to_colour_png(tmp_path):
    from PIL import Image

    p = phantom.demo_pair((48, 40), rng=9)
    Image.fromarray((p.fixed * 255).astype(np.uint8)).save(tmp_path / "f.png")
    Image.fromarray((p.moving * 255).astype(np.uint8)).save(tmp_path / "m.png")
    rgb = np.stack([(p.moving * 255).astype(np.uint8)] * 3, -1)
    rgb[..., 2] = 255 - rgb[..., 2]
    Image.fromarray(rgb).save(tmp_path / "c.png")
    run("register", tmp_path / "f.png", tmp_path / "m.png", "-o", tmp_path / "o", *FAST, "-q")
    run("apply", tmp_path / "o" / "displacement.nii.gz", tmp_path / "c.png", "-o", tmp_path / "cw.png", "-q")
    cw = np.asarray(Image.open(tmp_path / "cw.png"))
    w = np.asarray(Image.open(tmp_path / "o" / "warped.png"))
    assert cw.shape == (48, 40, 3) and cw.dtype == np.uint8
    assert np.abs(cw[..., 0].astype(int) - w).max() <= 1  # the same warp, channel by channel
    assert np.abs(cw[..., 2].astype(int) - (255 - w)).max() <= 1


# --------------------------------------------------------------------------- demo
def test_demo_runs_from_the_console_script(tmp_path):
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    exe = os.path.join(os.path.dirname(sys.executable), "varreg")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "varreg_cli.main"]
    res = subprocess.run(cmd + ["demo", "-o", "demo_out"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert files(tmp_path / "demo_out") == sorted([
        "fixed.nii.gz", "moving.nii.gz", "fixed_labels.nii.gz", "moving_labels.nii.gz", "warped.nii.gz",
        "displacement.nii.gz", "warped_labels.nii.gz", "metrics.json", "qc.png"])
    line = res.stdout.strip()
    assert "\n" not in line and "RV" in line and "Myo" in line and "LV" in line
    m = json.loads((tmp_path / "demo_out" / "metrics.json").read_text())
    assert m["mean_dice"] > m["mean_dice_before"] + 0.1
    assert m["endpoint_error_mm"] < 1.5
    again = subprocess.run(cmd + ["demo", "-o", "demo_out"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "--force" in again.stderr


# --------------------------------------------------------------------------- safety
def test_existing_outputs_need_force(tmp_path, reg3d):
    out = tmp_path / "o"
    out.mkdir()
    (out / "warped.nii.gz").write_bytes(b"precious")
    res = run("register", reg3d["fixed"], reg3d["moving"], "-o", out, ok=False)
    assert res.exit_code == 2 and "--force" in res.stderr
    assert files(out) == ["warped.nii.gz"] and (out / "warped.nii.gz").read_bytes() == b"precious"
    run("register", reg3d["fixed"], reg3d["moving"], "-o", out, "--force", *FAST, "-q")
    assert files(out) == ["displacement.nii.gz", "warped.nii.gz"] and read(out / "warped.nii.gz").shape == (32, 28, 6)


def test_failure_while_writing_leaves_no_file(tmp_path, reg3d, monkeypatch):
    def boom(self, obj, path):
        raise OSError("disk full")

    monkeypatch.setattr(OutputSet, "save_json", boom)
    res = run("register", reg3d["fixed"], reg3d["moving"], "-o", tmp_path / "o", "--fixed-labels",
              reg3d["fixed_labels"], "--moving-labels", reg3d["moving_labels"], *FAST, ok=False)
    assert res.exit_code != 0 and "disk full" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_quiet_prints_nothing(tmp_path, reg3d):
    res = run("register", reg3d["fixed"], reg3d["moving"], "-o", tmp_path / "o", "-q", *FAST)
    assert res.stdout == "" and res.stderr == ""


def _bad_inputs(tmp, reg):
    """name -> (argv, the file the message must name)."""
    d = tmp
    good_f, good_m = reg["fixed"], reg["moving"]
    raw = open(good_m, "rb").read()
    (d / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (d / "garbage.nii.gz").write_bytes(os.urandom(2000))
    (d / "empty.nii.gz").write_bytes(b"")
    (d / "folder.nii.gz").mkdir()
    a = read(good_m).astype(np.float32)
    nan = a.copy()
    nan[3, 3, 3] = np.nan
    save(d / "nan.nii.gz", nan)
    inf = a.copy()
    inf[0, 0, 0] = np.inf
    save(d / "inf.nii.gz", inf)
    save(d / "fourd.nii.gz", np.stack([a, a], -1))
    fl = read(reg["moving_labels"]).astype(np.float32)
    fl[5, 5, 2] = 1.5
    save(d / "floatlab.nii.gz", fl)
    save(d / "smalllab.nii.gz", np.zeros((8, 8, 3), np.uint8))
    save(d / "other_grid.nii.gz", a[:-2])
    save(d / "tiny.nii.gz", np.random.default_rng(0).random((3, 28, 6), np.float32))
    save(d / "constant.nii.gz", np.full(a.shape, 3.0, np.float32))
    disp = reg["out"] / "displacement.nii.gz"
    other = d / "other_disp.nii.gz"
    nib.save(vio.displacement_nifti(np.zeros((3, 30, 28, 6), np.float32),
                                    vio.Image(np.zeros((30, 28, 6), np.float32), AFFINE, "x")), str(other))
    (d / "x.txt").write_text("hello")
    o = d / "out"
    reg_ = ["register", good_f]
    return {
        "missing": (reg_ + [d / "nope.nii.gz", "-o", o], "nope.nii.gz"),
        "directory": (reg_ + [d / "folder.nii.gz", "-o", o], "folder.nii.gz"),
        "empty": (reg_ + [d / "empty.nii.gz", "-o", o], "empty.nii.gz"),
        "garbage": (reg_ + [d / "garbage.nii.gz", "-o", o], "garbage.nii.gz"),
        "truncated": (reg_ + [d / "truncated.nii.gz", "-o", o], "truncated.nii.gz"),
        "unknown-type": (reg_ + [d / "x.txt", "-o", o], "x.txt"),
        "nan": (reg_ + [d / "nan.nii.gz", "-o", o], "nan.nii.gz"),
        "inf": (reg_ + [d / "inf.nii.gz", "-o", o], "inf.nii.gz"),
        "4d-no-frame": (reg_ + [d / "fourd.nii.gz", "-o", o], "fourd.nii.gz"),
        "frame-out-of-range": (reg_ + [d / "fourd.nii.gz", "-o", o, "--moving-frame", "5"], "fourd.nii.gz"),
        "float-labels": (reg_ + [good_m, "-o", o, "--moving-labels", d / "floatlab.nii.gz"], "floatlab.nii.gz"),
        "labels-grid": (reg_ + [good_m, "-o", o, "--moving-labels", d / "smalllab.nii.gz"], "smalllab.nii.gz"),
        "fixed-labels-alone": (reg_ + [good_m, "-o", o, "--fixed-labels", reg["fixed_labels"]], "fixed_labels"),
        "other-grid": (reg_ + [d / "other_grid.nii.gz", "-o", o], "other_grid.nii.gz"),
        "constant": (reg_ + [d / "constant.nii.gz", "-o", o], "constant.nii.gz"),
        "too-small": (["register", d / "tiny.nii.gz", d / "tiny.nii.gz", "-o", o], "tiny.nii.gz"),
        "bad-theta": (reg_ + [good_m, "-o", o, "--theta", "-1"], "--theta"),
        "bad-denoiser": (reg_ + [good_m, "-o", o, "--denoiser", "median"], "--denoiser"),
        "outdir-is-file": (reg_ + [good_m, "-o", d / "x.txt"], "x.txt"),
        "apply-disp-mismatch": (["apply", other, good_m, "-o", o / "w.nii.gz"], "moving.nii.gz"),
        "apply-not-a-disp": (["apply", good_m, good_m, "-o", o / "w.nii.gz"], "moving.nii.gz"),
        "apply-float-labels": (["apply", disp, d / "floatlab.nii.gz", "-o", o / "w.nii.gz", "--labels"], "floatlab.nii.gz"),
        "apply-corrupt-disp": (["apply", d / "truncated.nii.gz", good_m, "-o", o / "w.nii.gz"], "truncated.nii.gz"),
        "evaluate-disp-mismatch": (["evaluate", reg["fixed_labels"], reg["fixed_labels"], "--displacement", other,
                                    "-o", o / "m.json"], "other_disp.nii.gz"),
        "initial-grid": (reg_ + [good_m, "-o", o, "--initial", other], "other_disp.nii.gz"),
        "unknown-output-type": (["apply", disp, good_m, "-o", o / "w.xyz"], "w.xyz"),
        "bad-threads": (reg_ + [good_m, "-o", o, "--threads", "100000"], "--threads"),
        "evaluate-grid": (["evaluate", reg["fixed_labels"], d / "smalllab.nii.gz", "-o", o / "m.json"], "smalllab.nii.gz"),
    }


CASES = ["missing", "directory", "empty", "garbage", "truncated", "unknown-type", "nan", "inf", "4d-no-frame",
         "frame-out-of-range", "float-labels", "labels-grid", "fixed-labels-alone", "other-grid", "constant",
         "too-small",
         "bad-theta", "bad-denoiser", "outdir-is-file", "apply-disp-mismatch", "apply-not-a-disp",
         "apply-float-labels", "apply-corrupt-disp", "evaluate-disp-mismatch", "evaluate-grid", "initial-grid",
         "unknown-output-type", "bad-threads"]


@pytest.fixture(scope="module")
def bad(tmp_path_factory, reg3d):
    d = tmp_path_factory.mktemp("bad")
    return d, _bad_inputs(d, reg3d)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_matrix(bad, case):
    d, table = bad
    argv, name = table[case]
    res = run(*argv, ok=False)
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in res.stderr, err
    assert name in err, err
    assert res.stdout == ""
    assert files(d / "out") == []  # no output, no temporary file
