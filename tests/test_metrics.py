"""Ground-truth tests for varreg.metrics."""
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from varreg.metrics import (
    dice,
    displacement_metrics,
    endpoint_error,
    folding_fraction,
    hausdorff,
    hd95,
    jacobian_determinant,
    jacobian_gradient_magnitude,
    label_metrics,
)


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))


def _disc(shape, centre, radius):
    x = _grid(shape)
    c = np.asarray(centre, dtype=float).reshape((-1,) + (1,) * len(shape))
    return np.sum((x - c) ** 2, axis=0) <= radius**2


def _brute_force_hd(ma, mb, spacing, percentile):
    """Surface distances by explicit pairwise distances between surface voxels."""
    st = ndimage.generate_binary_structure(ma.ndim, 1)
    sa = ma & ~ndimage.binary_erosion(ma, st, border_value=0)
    sb = mb & ~ndimage.binary_erosion(mb, st, border_value=0)
    pa = np.argwhere(sa) * np.asarray(spacing)
    pb = np.argwhere(sb) * np.asarray(spacing)
    d = cdist(pa, pb)
    d_ab, d_ba = d.min(axis=1), d.min(axis=0)
    if percentile == 100:
        return max(d_ab.max(), d_ba.max())
    return np.percentile(np.concatenate([d_ab, d_ba]), percentile)


# --------------------------------------------------------------------------- dice
def test_dice_squares_known_overlap():
    a = np.zeros((40, 40), dtype=np.int32)
    b = np.zeros_like(a)
    a[10:20, 10:20] = 1  # 100 voxels
    b[15:25, 10:20] = 1  # 100 voxels, 50 shared
    a[30:34, 30:34] = 2  # 16 voxels
    b[30:34, 32:36] = 2  # 16 voxels, 8 shared
    d = dice(a, b)
    assert set(d) == {1, 2}
    assert d[1] == pytest.approx(0.5, abs=0)
    assert d[2] == pytest.approx(0.5, abs=0)
    assert dice(a, a) == {1: 1.0, 2: 1.0}


def test_dice_absent_labels():
    a = np.zeros((10, 10), dtype=np.uint8)
    b = np.zeros_like(a)
    a[2:5, 2:5] = 1
    b[2:5, 2:5] = 1
    a[7:9, 7:9] = 3  # only in a
    d = dice(a, b, labels=[1, 2, 3])
    assert d[1] == 1.0
    assert math.isnan(d[2])  # absent from both
    assert d[3] == 0.0  # present in one only
    assert set(dice(a, b)) == {1, 3}  # default: nonzero labels present in either


def test_dice_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        dice(np.zeros((4, 4), int), np.zeros((4, 5), int))


# --------------------------------------------------------------------------- hausdorff
@pytest.mark.parametrize("k", [1, 3, 5])
def test_hausdorff_shifted_square_and_disc(k):
    sq_a = np.zeros((40, 40), dtype=np.int32)
    sq_a[10:20, 10:20] = 1
    sq_b = np.roll(sq_a, k, axis=0)
    assert hausdorff(sq_a, sq_b, 1) == pytest.approx(k)

    da = _disc((48, 48), (20, 24), 8).astype(np.int32) * 4
    db = _disc((48, 48), (20 + k, 24), 8).astype(np.int32) * 4
    assert hausdorff(da, db, 4) == pytest.approx(k)
    # anisotropic spacing: the shift is along axis 0
    assert hausdorff(da, db, 4, spacing=(2.5, 0.7)) == pytest.approx(2.5 * k)
    assert hd95(da, db, 4) <= hausdorff(da, db, 4) + 1e-12


def test_hausdorff_shifted_ball_3d_anisotropic():
    a = _disc((24, 24, 24), (12, 12, 10), 5)
    b = _disc((24, 24, 24), (12, 12, 13), 5)
    assert hausdorff(a, b, True, spacing=(1.0, 1.0, 1.5)) == pytest.approx(4.5)


def test_hausdorff_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(2):
        noise = ndimage.gaussian_filter(rng.standard_normal((32, 28)), 2.0)
        blobs.append(noise > 0.05)
    a, b = blobs
    assert a.any() and b.any()
    for spacing in [(1.0, 1.0), (0.8, 1.7)]:
        for p in (100, 95, 50):
            got = hausdorff(a, b, True, spacing=spacing, percentile=p)
            want = _brute_force_hd(a, b, spacing, p)
            assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert hd95(a, b, True, spacing=spacing) <= hausdorff(a, b, True, spacing=spacing) + 1e-12
    # label=None: nonzero voxels
    assert hausdorff(a.astype(int) * 7, b.astype(int) * 7, None) == pytest.approx(_brute_force_hd(a, b, (1, 1), 100))


def test_hausdorff_empty_masks():
    a = np.zeros((12, 12), dtype=np.int32)
    b = np.zeros_like(a)
    assert math.isnan(hausdorff(a, b, 1))
    assert math.isnan(hd95(a, b, 1))
    b[3:6, 3:6] = 1
    assert hausdorff(a, b, 1) == math.inf
    assert hausdorff(b, a, 1) == math.inf
    assert hd95(a, b, 1) == math.inf


def test_hausdorff_bad_inputs():
    a = np.zeros((8, 8), int)
    with pytest.raises(ValueError, match=r"\(8, 8\).*\(8, 9\)"):
        hausdorff(a, np.zeros((8, 9), int), 1)
    with pytest.raises(ValueError, match="spacing"):
        hausdorff(a, a, 1, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="percentile"):
        hausdorff(a, a, 1, percentile=101)


# --------------------------------------------------------------------------- jacobian
@pytest.mark.parametrize(
    "A",
    [
        np.array([[0.1, 0.0], [0.0, 0.1]]),  # scaling 1.1
        np.array([[0.1, 0.3], [0.0, 0.1]]),  # scaling and shear
        np.array([[-0.2, 0.25], [0.4, 0.05]]),
    ],
)
def test_jacobian_affine_2d(A):
    shape = (16, 20)
    u = np.einsum("ij,j...->i...", A, _grid(shape))
    det = jacobian_determinant(u)
    assert det.shape == shape
    np.testing.assert_allclose(det[1:-1, 1:-1], np.linalg.det(np.eye(2) + A), rtol=1e-12)
    # spacing does not change the determinant of a voxel-unit displacement
    np.testing.assert_allclose(jacobian_determinant(u, spacing=(2.0, 0.5)), det, rtol=0, atol=0)


def test_jacobian_affine_3d():
    A = np.array([[0.1, 0.2, 0.0], [0.0, 0.1, -0.15], [0.05, 0.0, 0.1]])
    shape = (8, 9, 10)
    u = np.einsum("ij,j...->i...", A, _grid(shape))
    det = jacobian_determinant(u)
    assert det.shape == shape
    np.testing.assert_allclose(det[1:-1, 1:-1, 1:-1], np.linalg.det(np.eye(3) + A), rtol=1e-12)


def test_jacobian_border_uses_half_one_sided_difference():
    # u_0 = 0.2 x_0: interior du0/dx0 = 0.2, first/last rows (f[1]-f[0])/2 = 0.1
    u = np.zeros((2, 6, 5))
    u[0] = 0.2 * _grid((6, 5))[0]
    det = jacobian_determinant(u)
    np.testing.assert_allclose(det[1:-1], 1.2)
    np.testing.assert_allclose(det[[0, -1]], 1.1)


def test_folding_field_fully_folded():
    shape = (10, 12)
    u = np.zeros((2,) + shape)
    u[0] = -2.0 * _grid(shape)[0]
    det = jacobian_determinant(u)
    np.testing.assert_allclose(det[1:-1], -1.0)
    np.testing.assert_allclose(det[[0, -1]], 0.0)  # border: 1 - 1 = 0, still folded (<= 0)
    assert folding_fraction(u) == 1.0
    assert displacement_metrics(u)["folding_fraction"] == 1.0


def test_partial_folding_fraction():
    shape = (10, 10)
    u = np.zeros((2,) + shape)
    u[1, 4:7, :] = -3.0 * _grid(shape)[1][4:7, :]  # rows 4..6 fold along axis 1
    assert folding_fraction(u) == pytest.approx(0.3)


@pytest.mark.parametrize("shape", [(9, 11), (5, 6, 7)])
def test_identity_field(shape):
    u = np.zeros((len(shape),) + shape, dtype=np.float32)
    np.testing.assert_array_equal(jacobian_determinant(u), 1.0)
    assert folding_fraction(u) == 0.0
    assert jacobian_gradient_magnitude(u) == 0.0
    assert displacement_metrics(u) == {"folding_fraction": 0.0, "jacobian_grad": 0.0}


def test_jacobian_gradient_of_quadratic_field():
    # u_0 = c x_0^2 / 2: central differences are exact on quadratics, so away from the
    # border det = 1 + c x_0 and its gradient has magnitude c.
    c = 0.01
    shape = (20, 8)
    u = np.zeros((2,) + shape)
    u[0] = 0.5 * c * _grid(shape)[0] ** 2
    det = jacobian_determinant(u)
    np.testing.assert_allclose(det[1:-1], 1.0 + c * _grid(shape)[0][1:-1], rtol=1e-12)
    # Rows of det by hand (n = 20): d0 = 1 + c/4 (half one-sided difference of u_0),
    # d_i = 1 + c i for i = 1..18, d19 = 1 + c (19^2 - 18^2) / 4 = 1 + 37c/4.
    # |d'| per row: 3c/8, 7c/8, c (rows 2..17), 31c/8, 35c/8  ->  mean 25.5 c / 20.
    g = jacobian_gradient_magnitude(u)
    assert g == pytest.approx(25.5 * c / 20, rel=1e-12)
    assert jacobian_gradient_magnitude(u, spacing=(2.0, 1.0)) == pytest.approx(g / 2)


def test_displacement_shape_errors():
    with pytest.raises(ValueError, match=r"\(3, 8, 8\)"):
        jacobian_determinant(np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="spacing"):
        jacobian_determinant(np.zeros((2, 8, 8)), spacing=(1.0,))


# --------------------------------------------------------------------------- endpoint error
def test_endpoint_error_constant_offset():
    shape = (6, 7)
    u = np.zeros((2,) + shape)
    u[0], u[1] = 3.0, 4.0
    u_true = np.zeros_like(u)
    assert endpoint_error(u, u_true) == pytest.approx(5.0)
    # physical units: component i scaled by spacing[i]
    assert endpoint_error(u, u_true, spacing=(2.0, 0.5)) == pytest.approx(math.hypot(6.0, 2.0))
    u3 = np.zeros((3, 4, 5, 6))
    u3[0], u3[1], u3[2] = 1.0, 2.0, 2.0
    assert endpoint_error(u3, np.zeros_like(u3)) == pytest.approx(3.0)
    assert endpoint_error(u3, np.zeros_like(u3), spacing=(2.0, 1.0, 1.0)) == pytest.approx(math.sqrt(12.0))


def test_endpoint_error_mask():
    shape = (8, 8)
    u = np.zeros((2,) + shape)
    u_true = np.zeros_like(u)
    u[0, :4] = 3.0
    u[1, :4] = 4.0  # error 5 in the top half, 0 below
    mask = np.zeros(shape, dtype=bool)
    mask[:4] = True
    assert endpoint_error(u, u_true) == pytest.approx(2.5)
    assert endpoint_error(u, u_true, mask=mask) == pytest.approx(5.0)
    assert endpoint_error(u, u_true, mask=~mask) == pytest.approx(0.0)
    assert endpoint_error(u, u_true, spacing=(1.0, 2.0), mask=mask) == pytest.approx(math.hypot(3.0, 8.0))
    assert math.isnan(endpoint_error(u, u_true, mask=np.zeros(shape, bool)))


def test_endpoint_error_shape_errors():
    with pytest.raises(ValueError, match=r"\(2, 8, 8\).*\(2, 8, 9\)"):
        endpoint_error(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)))
    with pytest.raises(ValueError, match=r"mask.*\(8, 8\).*\(8, 7\)"):
        endpoint_error(np.zeros((2, 8, 8)), np.zeros((2, 8, 8)), mask=np.ones((8, 7), bool))


# --------------------------------------------------------------------------- bundles
def test_label_metrics_bundle():
    a = np.zeros((40, 40), dtype=np.int32)
    a[10:20, 10:20] = 1
    a[25:35, 25:35] = 2
    b = np.roll(a, 2, axis=0)
    m = label_metrics(a, b, spacing=(1.5, 1.0))
    assert set(m) == {"dice", "hd", "hd95"}
    assert set(m["dice"]) == set(m["hd"]) == set(m["hd95"]) == {1, 2}
    assert m["dice"][1] == pytest.approx(0.8)
    assert m["hd"][1] == pytest.approx(3.0)
    assert m["hd95"][1] <= m["hd"][1]
    m2 = label_metrics(a, b, labels=[5])
    assert math.isnan(m2["dice"][5]) and math.isnan(m2["hd"][5]) and math.isnan(m2["hd95"][5])


def test_hausdorff_on_the_bounding_box_equals_the_whole_grid():
    """The distances are computed on the masks' bounding box (plus one voxel): equal to a whole-grid brute
    force (surfaces by erosion, distance transforms of the full grid), masks touching the grid's corner included."""
    from varreg.metrics import _surface

    rng = np.random.default_rng(0)
    for shape, sp in (((30, 26), (1.5, 0.7)), ((16, 14, 6), (1.2, 1.2, 5.0))):
        a = (ndimage.gaussian_filter(rng.standard_normal(shape), 2) > 0.1).astype(np.uint8) * 2
        b = (ndimage.gaussian_filter(rng.standard_normal(shape), 2) > 0.1).astype(np.uint8) * 2
        a[(0,) * len(shape)] = 2  # a mask voxel on the grid's corner
        sa, sb = _surface(a == 2), _surface(b == 2)
        d = np.concatenate([ndimage.distance_transform_edt(~sb, sampling=sp)[sa],
                            ndimage.distance_transform_edt(~sa, sampling=sp)[sb]])
        assert hausdorff(a, b, 2, spacing=sp) == d.max()
        assert hd95(a, b, 2, spacing=sp) == np.percentile(d, 95)
        lm = label_metrics(a, b, spacing=sp)
        assert lm["hd"][2] == d.max() and lm["hd95"][2] == np.percentile(d, 95)
    assert np.isinf(hausdorff(a, np.zeros_like(a), 2)) and np.isnan(hd95(a * 0, a * 0, 2))
