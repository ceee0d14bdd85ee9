"""``varreg register --affine`` writes affine.tfm + residual.nii.gz that SimpleITK composes into the
whole transform, and ``--fixed-mask`` / ``--moving-mask`` reach the solver (bad masks: one line, exit 2)."""
import os

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy.spatial.transform import Rotation

import varreg
from varreg import synthetic
from varreg.affine import Affine, displacement_of, voxel_matrix
from varreg.resample import warp
from varreg_cli.main import main
from geometry_helpers import interior

# voxel -> RAS: axes permuted, x flipped, anisotropic voxels, an origin (as tests/test_cli.py)
OBLIQUE = np.array([[-1.5, 0.0, 0.0, 40.0], [0.0, 0.0, 3.0, -30.0], [0.0, 1.5, 0.0, 12.5], [0, 0, 0, 1.0]])
AXIAL = np.array([[-1.5, 0, 0, 40.0], [0, 1.2, 0, -30.0], [0, 0, 6.0, 12.5], [0, 0, 0, 1]])
CKPT = os.path.join(os.path.dirname(__file__), "..", "varreg_learned", "checkpoints", "vrnet2d_acdc.pt")
SHIFT = np.array([[0, 0, 0, 3.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])  # the origin 3 mm along x
FAST = ["--warps", "2", "--iterations", "4", "--refine", "0"]


def save(path, arr, affine):
    img = nib.Nifti1Image(np.asarray(arr), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return str(path)


def run(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args])
    if ok and res.exit_code != 0:
        raise AssertionError(f"exit {res.exit_code}\nstdout: {res.stdout}\nstderr: {res.stderr}\n{res.exception!r}")
    return res


def read(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


def moved(fixed, A, t, spacing):
    """``moving`` with ``moving(M x) = fixed(x)`` for the voxel transform M of (A, t) about the centre."""
    M = voxel_matrix(Affine(A, np.asarray(t, float), fixed.shape, spacing, "affine", {}))
    return warp(fixed, displacement_of(np.linalg.inv(M), fixed.shape)), M


def composite_resample(sitk, out, fixed_path, moving_path, two_d=False):
    """SimpleITK: Resample(moving, fixed, Composite[affine.tfm, DisplacementField(residual)])."""
    aff = sitk.ReadTransform(str(out / "affine.tfm"))
    field = sitk.ReadImage(str(out / "residual.nii.gz"))
    disp = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    tx = sitk.CompositeTransform([aff, disp])  # the last one is applied first: the field, then the affine
    f, m = sitk.ReadImage(fixed_path), sitk.ReadImage(moving_path)
    if two_d:
        f, m = f[:, :, 0], m[:, :, 0]
    out_img = sitk.GetArrayFromImage(sitk.Resample(m, f, tx, sitk.sitkLinear, 0.0)).T
    return out_img[..., None] if two_d else out_img


def test_3d_affine_and_residual_compose_in_simpleitk_to_warped(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    shape = (40, 36, 24)
    fixed = synthetic.smooth_random_image(shape, sigma=2.5, rng=3).astype(np.float32)
    A = Rotation.from_rotvec(np.deg2rad(6) * np.array([0.3, 0.5, 0.8]) / np.linalg.norm([0.3, 0.5, 0.8])).as_matrix()
    moving, M = moved(fixed, A @ np.diag([1.04, 0.97, 1.0]), (2.0, -1.5, 1.0), (1.5, 3.0, 1.5))
    f, m = save(tmp_path / "f.nii.gz", fixed, OBLIQUE), save(tmp_path / "m.nii.gz", moving.astype(np.float32), OBLIQUE)
    out = tmp_path / "o"
    run("register", f, m, "-o", out, "--affine", "affine", *FAST)
    assert sorted(os.listdir(out)) == ["affine.tfm", "displacement.nii.gz", "residual.nii.gz", "warped.nii.gz"]
    text = (out / "affine.tfm").read_text()
    assert text.startswith("#Insight Transform File V1.0") and "AffineTransform_double_3_3" in text
    itk = composite_resample(sitk, out, f, m)
    u = varreg.io.load_displacement(out / "displacement.nii.gz")[0]
    r = varreg.io.load_displacement(out / "residual.nii.gz")[0]
    assert np.abs(u).max() > 2.0 and np.abs(r).mean() < 0.5 * np.abs(u).mean()  # the affine carries the motion
    mask = interior(u, shape)
    assert mask.mean() > 0.3
    np.testing.assert_allclose(itk[mask], read(out / "warped.nii.gz")[mask], atol=2e-4)


def test_one_axial_slice_writes_2d_transforms_that_compose(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    fixed = synthetic.smooth_random_image((56, 48), sigma=2.5, rng=4).astype(np.float32)
    th = np.deg2rad(8)
    moving, _ = moved(fixed, np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]), (3.0, -2.0), (1.5, 1.2))
    f = save(tmp_path / "f.nii.gz", fixed[..., None], AXIAL)
    m = save(tmp_path / "m.nii.gz", moving[..., None].astype(np.float32), AXIAL)
    out = tmp_path / "o"
    run("register", f, m, "-o", out, "--affine", "rigid", *FAST)
    assert "AffineTransform_double_2_2" in (out / "affine.tfm").read_text()
    assert sitk.ReadImage(str(out / "residual.nii.gz")).GetDimension() == 2
    itk = composite_resample(sitk, out, f, m, two_d=True)
    u = varreg.io.load_displacement(out / "displacement.nii.gz")[0]
    mask = interior(u, u.shape[1:])
    np.testing.assert_allclose(itk[mask], read(out / "warped.nii.gz")[mask], atol=2e-4)


def test_slices_mode_has_one_3d_affine_whose_files_compose_in_simpleitk(tmp_path):
    """--slices --affine: one 3-D affine of the stack (a tilt through the slices included), then 2-D
    slices; the residual is the slices' in-plane field and [affine.tfm, residual] is the whole transform."""
    sitk = pytest.importorskip("SimpleITK")
    shape = (48, 44, 8)
    vol = synthetic.smooth_random_image(shape, sigma=(2.5, 2.5, 1.2), rng=5).astype(np.float32)
    th = np.deg2rad(5)
    A = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1.0]])
    moving, M = moved(vol, A, (2.0, -1.5, 0.4), (1.5, 1.2, 6.0))
    f, m = save(tmp_path / "f.nii.gz", vol, AXIAL), save(tmp_path / "m.nii.gz", moving.astype(np.float32), AXIAL)
    out = tmp_path / "o"
    run("register", f, m, "-o", out, "--slices", "--affine", "affine", *FAST)
    assert sorted(os.listdir(out)) == ["affine.tfm", "displacement.nii.gz", "residual.nii.gz", "warped.nii.gz"]
    assert "AffineTransform_double_3_3" in (out / "affine.tfm").read_text()
    u = varreg.io.load_displacement(out / "displacement.nii.gz")[0]
    r = varreg.io.load_displacement(out / "residual.nii.gz")[0]
    mask = interior(u, shape)
    assert np.abs(r[2]).max() < 1e-4  # the slices move in-plane; the affine carries the shift through them
    assert abs(float(np.median(u[2][mask])) - float(M[2, 3] + (M[2, :3] - np.eye(3)[2]) @ (np.array(shape) - 1) / 2)) < 0.15
    itk = composite_resample(sitk, out, f, m)
    np.testing.assert_allclose(itk[mask], read(out / "warped.nii.gz")[mask], atol=2e-4)


# --------------------------------------------------------------------------- masks
@pytest.fixture
def masked_pair(tmp_path):
    fixed = synthetic.smooth_random_image((48, 44), sigma=2.5, rng=6).astype(np.float32)
    moving = np.roll(fixed, (2, -1), axis=(0, 1)).copy()
    moving[10:20, 12:22] = 1.5  # an artefact in the moving image only
    fmask = np.ones((48, 44), np.uint8)
    mmask = np.ones((48, 44), np.uint8)
    mmask[8:22, 10:24] = 0
    return dict(dir=tmp_path, fixed=fixed, moving=moving, fmask=fmask, mmask=mmask,
                f=save(tmp_path / "f.nii.gz", fixed[..., None], AXIAL),
                m=save(tmp_path / "m.nii.gz", moving[..., None], AXIAL),
                fm=save(tmp_path / "fm.nii.gz", fmask[..., None], AXIAL),
                mm=save(tmp_path / "mm.nii.gz", mmask[..., None], AXIAL))


def test_masks_reach_the_solver_as_in_the_library(masked_pair):
    p = masked_pair
    out = p["dir"] / "o"
    run("register", p["f"], p["m"], "-o", out, "--fixed-mask", p["fm"], "--moving-mask", p["mm"], *FAST)
    u_cli = varreg.io.load_displacement(out / "displacement.nii.gz")[0][:2, :, :, 0]
    lib = varreg.register(p["fixed"], p["moving"], spacing=(1.5, 1.2), fixed_mask=p["fmask"], moving_mask=p["mmask"],
                          warps=2, iterations=4, refine=0)
    plain = varreg.register(p["fixed"], p["moving"], spacing=(1.5, 1.2), warps=2, iterations=4, refine=0)
    np.testing.assert_allclose(u_cli, np.asarray(lib.displacement), atol=1e-4)
    assert np.abs(np.asarray(plain.displacement) - np.asarray(lib.displacement)).max() > 0.1  # the mask mattered


def _one_error(res, *parts):
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])


def test_bad_masks_one_error_line_and_no_outputs(masked_pair):
    p = masked_pair
    d = p["dir"]
    bad = {
        "shape": (save(d / "b1.nii.gz", np.ones((40, 44, 1), np.uint8), AXIAL), "grid"),
        "not binary": (save(d / "b2.nii.gz", (np.arange(48 * 44).reshape(48, 44, 1) % 3).astype(np.uint8), AXIAL),
                       "not binary"),
        "empty": (save(d / "b3.nii.gz", np.zeros((48, 44, 1), np.uint8), AXIAL), "empty"),
        "other grid": (save(d / "b4.nii.gz", np.ones((48, 44, 1), np.uint8), AXIAL + SHIFT), "--resample"),
        "unreadable": (str(d / "nope.nii.gz"), "nope.nii.gz"),
    }
    for flag in ("--fixed-mask", "--moving-mask"):
        for name, (path, message) in bad.items():
            out = d / f"out_{name.replace(' ', '_')}"
            res = run("register", p["f"], p["m"], "-o", out, flag, path, *FAST, ok=False)
            _one_error(res, message)
            assert not out.exists(), name


def test_masks_with_the_network_are_refused(masked_pair):
    p = masked_pair
    res = run("register", p["f"], p["m"], "-o", p["dir"] / "o", "--fixed-mask", p["fm"], "--denoiser", "unet",
              "--ckpt", CKPT, ok=False)
    _one_error(res, "--fixed-mask", "classical solver")


def test_slice_axis_keeps_the_residual_in_plane_and_refuses_slices(tmp_path):
    shape = (48, 44, 8)
    vol = synthetic.smooth_random_image(shape, sigma=(2.5, 2.5, 1.2), rng=7).astype(np.float32)
    moving, _ = moved(vol, np.eye(3), (1.5, -1.0, 1.8), (1.5, 1.2, 6.0))
    f, m = save(tmp_path / "f.nii.gz", vol, AXIAL), save(tmp_path / "m.nii.gz", moving.astype(np.float32), AXIAL)
    run("register", f, m, "-o", tmp_path / "o", "--affine", "rigid", "--slice-axis", "2", *FAST)
    r = varreg.io.load_displacement(tmp_path / "o" / "residual.nii.gz")[0]
    u = varreg.io.load_displacement(tmp_path / "o" / "displacement.nii.gz")[0]
    assert np.abs(r[2]).max() < 1e-4 and abs(float(np.median(u[2])) - 0.3) < 0.1  # 1.8 mm = 0.3 slice, the affine's
    res = run("register", f, m, "-o", tmp_path / "o2", "--slices", "--slice-axis", "2", *FAST, ok=False)
    assert res.exit_code == 2 and "slice_axis=2 needs a 3-D image" in res.stderr
    assert not os.path.exists(tmp_path / "o2") or not os.listdir(tmp_path / "o2")
