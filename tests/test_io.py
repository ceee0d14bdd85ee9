"""varreg.io: reading images in physical space, the ITK displacement convention, atomic outputs."""
import gzip
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from varreg_cli.outputs import OutputSet
import varreg
from varreg import io as vio
from geometry_helpers import interior

# a non-trivial voxel-to-RAS affine: axes permuted, one flipped, anisotropic, an origin
AFFINE = np.array([
    [-1.5, 0.0, 0.0, 40.0],
    [0.0, 0.0, 5.0, -30.0],
    [0.0, 1.5, 0.0, 12.5],
    [0.0, 0.0, 0.0, 1.0],
])


def smooth(shape, seed=0):
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0, mode="wrap")
    return ((a - a.min()) / (a.max() - a.min())).astype(np.float32)


def smooth_field(shape, amp=(1.2, -0.8, 0.5)):
    """A smooth displacement (voxels), every component varying; zero along axes of length 1."""
    g = np.indices(shape, dtype=np.float64)
    u = np.zeros((3,) + shape, np.float32)
    for i, a in enumerate(amp):
        if shape[i] == 1:
            continue
        j = next(k % 3 for k in range(i + 1, i + 4) if shape[k % 3] > 1 and k % 3 != i)
        u[i] = a * np.sin(2 * np.pi * g[j] / shape[j])
    return u


def save(path, arr, affine=AFFINE, dtype=None):
    img = nib.Nifti1Image(np.asarray(arr, dtype=dtype or np.asarray(arr).dtype), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return str(path)




# --------------------------------------------------------------------------- ITK convention
AXIAL = np.array([  # one axial slice: x flipped, anisotropic, an origin
    [-1.5, 0.0, 0.0, 40.0],
    [0.0, 1.2, 0.0, -30.0],
    [0.0, 0.0, 6.0, 12.5],
    [0.0, 0.0, 0.0, 1.0],
])


@pytest.mark.parametrize("shape, affine", [((20, 18, 9), AFFINE), ((24, 20, 1), AXIAL)], ids=["3d", "2d-one-slice"])
def test_displacement_file_is_applied_as_is_by_simpleitk(tmp_path, shape, affine):
    """displacement_nifti writes LPS vectors, intent 1007: SimpleITK's DisplacementFieldTransform +
    Resample reproduce moving(x + u(x)) on the fixed grid (3-D, and one slice read as 2-D)."""
    sitk = pytest.importorskip("SimpleITK")
    moving = smooth(shape)
    u = smooth_field(shape)
    ref = vio.Image(data=np.zeros(shape, np.float32), affine=affine, path="fixed")
    save(tmp_path / "fixed.nii.gz", ref.data, affine)
    save(tmp_path / "moving.nii.gz", moving, affine)
    nib.save(vio.displacement_nifti(u, ref), str(tmp_path / "d.nii.gz"))

    field = sitk.ReadImage(str(tmp_path / "d.nii.gz"))
    fixed_s = sitk.ReadImage(str(tmp_path / "fixed.nii.gz"))
    moving_s = sitk.ReadImage(str(tmp_path / "moving.nii.gz"))
    if shape[2] == 1:  # ITK reads a one-slice vector image as 2-D: use the 2-D images
        fixed_s, moving_s = fixed_s[:, :, 0], moving_s[:, :, 0]
    dim = fixed_s.GetDimension()
    assert field.GetDimension() == dim and field.GetNumberOfComponentsPerPixel() == dim
    tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    out = sitk.Resample(moving_s, fixed_s, tx, sitk.sitkLinear, 0.0)
    itk = sitk.GetArrayFromImage(out).T  # sitk arrays are (z, y, x)
    if shape[2] == 1:
        itk = itk[..., None]
        ours = np.asarray(varreg.warp(moving[..., 0], u[:2, ..., 0]))[..., None]
    else:
        ours = np.asarray(varreg.warp(moving, u))
    mask = interior(u, shape)
    assert mask.mean() > 0.3
    np.testing.assert_allclose(itk[mask], ours[mask], atol=1e-4)


def test_oblique_single_slice_keeps_three_components(tmp_path):
    shape = (10, 12, 1)
    u = smooth_field(shape)
    ref = vio.Image(data=np.zeros(shape, np.float32), affine=AFFINE, path="r")  # slice not in the x-y plane
    img = vio.displacement_nifti(u, ref)
    assert img.shape == (10, 12, 1, 1, 3)
    nib.save(img, str(tmp_path / "d.nii.gz"))
    back, _ = vio.load_displacement(tmp_path / "d.nii.gz")
    np.testing.assert_allclose(back, u, atol=1e-5)
    ref2 = vio.Image(data=np.zeros(shape, np.float32), affine=AXIAL, path="r")
    img = vio.displacement_nifti(u, ref2)
    assert img.shape == (10, 12, 1, 1, 2)
    nib.save(img, str(tmp_path / "d2.nii.gz"))
    back, _ = vio.load_displacement(tmp_path / "d2.nii.gz")
    np.testing.assert_allclose(back, u, atol=1e-5)


def test_vectors_are_lps_with_intent_vector(tmp_path):
    ref = vio.Image(data=np.zeros((4, 5, 6), np.float32), affine=np.diag([2.0, 3.0, 4.0, 1.0]), path="r")
    u = np.zeros((3, 4, 5, 6), np.float32)
    u[0], u[1], u[2] = 1.0, 1.0, 1.0  # one voxel along each axis: RAS (2, 3, 4) mm
    img = vio.displacement_nifti(u, ref)
    assert img.shape == (4, 5, 6, 1, 3)
    assert int(img.header["intent_code"]) == 1007
    np.testing.assert_allclose(np.asarray(img.dataobj)[0, 0, 0, 0], [-2.0, -3.0, 4.0])


def test_load_displacement_round_trip_and_ras_intent(tmp_path):
    shape = (10, 12, 5)
    u = smooth_field(shape)
    ref = vio.Image(data=np.zeros(shape, np.float32), affine=AFFINE, path="r")
    nib.save(vio.displacement_nifti(u, ref), str(tmp_path / "lps.nii.gz"))
    back, grid = vio.load_displacement(tmp_path / "lps.nii.gz")
    np.testing.assert_allclose(back, u, atol=1e-5)
    np.testing.assert_allclose(grid.affine, AFFINE)
    # intent 1006 (NIFTI_INTENT_DISPVECT): vectors stored in RAS
    d = vio.displacement_to_world(u, AFFINE)
    img = nib.Nifti1Image(np.moveaxis(d, 0, -1)[:, :, :, None, :], AFFINE)
    img.header.set_intent(1006)
    nib.save(img, str(tmp_path / "ras.nii.gz"))
    back, _ = vio.load_displacement(tmp_path / "ras.nii.gz")
    np.testing.assert_allclose(back, u, atol=1e-5)


def test_world_sampling_matches_grid_change(tmp_path):
    """sample_coords: the same physical points on a flipped, shifted copy of the grid."""
    data = smooth((12, 10, 6))
    a = np.diag([1.5, 1.5, 5.0, 1.0])
    b = a.copy()
    b[0, 0] = -1.5
    b[0, 3] = 1.5 * 11  # voxel i of b is voxel 11 - i of a
    flipped = data[::-1].copy()
    coords = vio.sample_coords(data.shape, a, b)
    np.testing.assert_allclose(vio.sample(flipped, coords, 1), data, atol=1e-6)
    np.testing.assert_array_equal(vio.sample((flipped * 10).astype(np.int16), coords, 0), (data * 10).astype(np.int16))


# --------------------------------------------------------------------------- reading
def test_load_nifti_keeps_affine_and_spacing(tmp_path):
    p = save(tmp_path / "a.nii.gz", smooth((8, 9, 4)))
    img = vio.load_image(p)
    assert img.shape == (8, 9, 4) and img.data.dtype == np.float32
    np.testing.assert_allclose(img.spacing, (1.5, 1.5, 5.0))
    np.testing.assert_allclose(img.affine, AFFINE)


def test_load_4d_needs_frame(tmp_path):
    arr = np.stack([smooth((8, 8, 4), s) for s in range(3)], axis=-1)
    p = save(tmp_path / "cine.nii.gz", arr)
    with pytest.raises(vio.InputError, match=r"choose one frame \(0\.\.2\)") as err:
        vio.load_image(p)
    assert err.value.option == "frame"  # the library names the argument; the command line names its flag
    np.testing.assert_array_equal(vio.load_image(p, frame=2).data, arr[..., 2])
    with pytest.raises(vio.InputError, match="out of range"):
        vio.load_image(p, frame=3)
    from varreg_cli.pipeline import load_image

    with pytest.raises(vio.InputError, match=r"choose one frame with --frame N \(0\.\.2\)"):
        load_image(p)


def test_labels_integral_floats_pass_others_fail(tmp_path):
    lab = np.zeros((8, 8, 3), np.float32)
    lab[2:5, 2:5] = 2
    p = save(tmp_path / "lab.nii.gz", lab)
    img = vio.load_image(p, labels=True)
    assert img.data.dtype.kind == "i" and img.disk_dtype == np.float32
    lab[0, 0, 0] = 0.5
    p = save(tmp_path / "bad.nii.gz", lab)
    with pytest.raises(vio.InputError, match="non-integer"):
        vio.load_image(p, labels=True)


def test_plain_images(tmp_path):
    from PIL import Image as PILImage

    gray = (smooth((20, 30)) * 255).astype(np.uint8)
    PILImage.fromarray(gray).save(tmp_path / "g.png")
    img = vio.load_image(tmp_path / "g.png")
    assert img.shape == (20, 30, 1) and img.fmt == ".png" and img.disk_dtype == np.uint8
    np.testing.assert_array_equal(img.data[..., 0], gray)
    rgb = np.stack([gray, gray // 2, 255 - gray], -1)
    PILImage.fromarray(rgb).save(tmp_path / "c.png")
    img = vio.load_image(tmp_path / "c.png")
    assert img.colour.shape == (20, 30, 3) and img.shape == (20, 30, 1)
    np.save(tmp_path / "a.npy", gray.astype(np.float32))
    assert vio.load_image(tmp_path / "a.npy").shape == (20, 30, 1)


@pytest.mark.parametrize("case", ["missing", "directory", "garbage", "truncated", "nan", "5d", "unknown"])
def test_bad_inputs_raise_input_error(tmp_path, case):
    good = save(tmp_path / "good.nii.gz", smooth((8, 8, 4)))
    p = tmp_path / "x.nii.gz"
    if case == "missing":
        pass
    elif case == "directory":
        p.mkdir()
    elif case == "garbage":
        p.write_bytes(b"this is not a nifti file" * 20)
    elif case == "truncated":
        raw = open(good, "rb").read()
        p.write_bytes(raw[: len(raw) // 2])
    elif case == "nan":
        a = smooth((8, 8, 4))
        a[1, 1, 1] = np.nan
        save(p, a)
    elif case == "5d":
        save(p, np.zeros((4, 4, 4, 2, 3), np.float32))
    elif case == "unknown":
        p = tmp_path / "x.xyz"
        p.write_text("hello")
    with pytest.raises(vio.InputError) as err:
        vio.load_image(p)
    assert str(p) in str(err.value)


def test_truncated_gzip_detected(tmp_path):
    raw = gzip.compress(b"\0" * 1000)
    p = tmp_path / "t.nii.gz"
    p.write_bytes(raw[:20])
    with pytest.raises(vio.InputError):
        vio.load_image(p)


# --------------------------------------------------------------------------- writing
def test_output_set_is_all_or_nothing(tmp_path):
    out = tmp_path / "new" / "deeper"
    with pytest.raises(RuntimeError):
        with OutputSet() as outs:
            outs.plan(out / "a.json")
            outs.save_json({"a": 1}, out / "a.json")
            raise RuntimeError("interrupted")
    assert not (tmp_path / "new").exists()  # created folders removed again, no temporary files left
    (tmp_path / "x.json").write_text("old")
    with pytest.raises(vio.InputError, match="--force"):
        OutputSet().plan(tmp_path / "x.json")
    with OutputSet(force=True) as outs:
        outs.plan(tmp_path / "x.json")
        outs.save_json({"new": True}, tmp_path / "x.json")
        assert (tmp_path / "x.json").read_text() == "old"  # not replaced before commit
        outs.commit()
    assert "new" in (tmp_path / "x.json").read_text()
    assert sorted(os.listdir(tmp_path)) == ["x.json"]
