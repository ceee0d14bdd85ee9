"""The affine stage: known rigid / similarity / affine transforms recovered, also under a contrast change,
and register(affine=...) starting the deformable solver from it with the whole transform as displacement."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

import varreg
from varreg import synthetic
from varreg.affine import Affine, displacement_of, estimate_affine, voxel_matrix, world_matrix
from varreg.metrics import endpoint_error
from varreg.resample import warp


def _rot2(deg):
    th = np.deg2rad(deg)
    return np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])


def _moving(fixed, M):
    """``moving`` with ``moving(M x) = fixed(x)`` (M: fixed voxel -> moving voxel)."""
    return warp(fixed, displacement_of(np.linalg.inv(M), fixed.shape))


@pytest.mark.parametrize("kind", ["rigid", "similarity", "affine"])
def test_recovers_a_2d_transform_of_its_kind_under_a_contrast_change(kind):
    shape, sp = (96, 88), (1.0, 1.0)
    fixed = synthetic.smooth_random_image(shape, sigma=3.0, rng=1)
    A = {"rigid": _rot2(9), "similarity": 1.07 * _rot2(9), "affine": _rot2(9) @ np.diag([1.06, 0.94])}[kind]
    M = voxel_matrix(Affine(A, np.array([5.0, -7.0]), shape, sp, kind, {}))
    moving = synthetic.contrast_change(_moving(fixed, M), gamma=0.7, bias=synthetic.bias_field(shape, rng=2))
    est = estimate_affine(fixed, moving, kind=kind, spacing=sp)
    err = endpoint_error(displacement_of(voxel_matrix(est), shape), displacement_of(M, shape))
    assert err < 0.25, (kind, err)  # measured 0.08 / 0.11 / 0.14 voxels
    sv = np.linalg.svd(est.A, compute_uv=False)
    if kind == "rigid":
        np.testing.assert_allclose(sv, 1.0, atol=1e-9)
    if kind == "similarity":
        np.testing.assert_allclose(sv, sv.mean(), atol=1e-9)
    assert np.linalg.det(est.A) > 0


def test_recovers_a_3d_affine_on_an_anisotropic_grid():
    rng = np.random.default_rng(0)
    shape, sp = (48, 56, 40), (1.5, 1.0, 1.0)
    fixed = synthetic.smooth_random_image(shape, sigma=3.0, rng=rng)
    A = Rotation.from_rotvec(np.deg2rad([5, -7, 4])).as_matrix() @ np.diag([1.05, 0.95, 1.03])
    M = voxel_matrix(Affine(A, np.array([4.0, -3.0, 5.0]), shape, sp, "affine", {}))
    est = estimate_affine(fixed, _moving(fixed, M), kind="affine", spacing=sp)
    err = endpoint_error(displacement_of(voxel_matrix(est), shape), displacement_of(M, shape))
    assert err < 0.25, err  # measured 0.08 voxels


def test_rigid_is_a_physical_rotation_on_anisotropic_voxels():
    """A rotation in mm on 2 x 1 mm voxels is no rotation of the voxel indices: voxel_matrix carries the spacing."""
    aff = Affine(_rot2(30), np.zeros(2), (40, 40), (2.0, 1.0), "rigid", {})
    M = voxel_matrix(aff)
    S = np.diag([2.0, 1.0])
    np.testing.assert_allclose(S @ M[:2, :2] @ np.linalg.inv(S), _rot2(30), atol=1e-12)
    c = (np.array([40, 40]) - 1) / 2
    np.testing.assert_allclose(M[:2, :2] @ c + M[:2, 2], c, atol=1e-12)  # the centre stays


def test_register_with_affine_recovers_what_the_deformable_solver_alone_cannot():
    shape = (96, 88)
    fixed = synthetic.smooth_random_image(shape, sigma=3.0, rng=1)
    M = voxel_matrix(Affine(_rot2(15) @ np.diag([1.08, 0.93]), np.array([10.0, -7.0]), shape, (1, 1), "affine", {}))
    moving = _moving(fixed, M)
    truth = displacement_of(M, shape)
    inner = (slice(None), slice(16, -16), slice(16, -16))
    plain = varreg.register(fixed, moving)
    res = varreg.register(fixed, moving, affine=True)
    # measured: 5.97 voxels without the affine stage, 0.11 with it
    assert endpoint_error(plain.displacement[inner], truth[inner]) > 3
    assert endpoint_error(res.displacement[inner], truth[inner]) < 0.3
    assert res.affine.shape == (3, 3) and res.info["affine"]["kind"] == "affine"
    assert endpoint_error(displacement_of(res.affine, shape), truth) < 0.3  # the affine stage alone
    # the displacement is the whole transform: warping the moving image by it gives the result's image
    np.testing.assert_allclose(varreg.warp(moving, res.displacement), res.warped, atol=1e-6)
    assert plain.affine is None and plain.info["affine"] is None


def test_world_matrix_maps_world_points():
    rng = np.random.default_rng(4)
    M = np.eye(4)
    M[:3, :3] = Rotation.from_rotvec([0.1, -0.05, 0.2]).as_matrix()
    M[:3, 3] = [2, -1, 3]
    Bf = np.diag([-1.5, -1.5, 8.0, 1.0])
    Bf[:3, 3] = [40, 50, -20]
    Bm = np.diag([-1.2, -1.4, 6.0, 1.0])
    Bm[:3, 3] = [30, 45, -10]
    W = world_matrix(M, Bf, Bm)
    x = np.append(rng.uniform(0, 20, 3), 1.0)  # a fixed voxel
    np.testing.assert_allclose(W @ (Bf @ x), Bm @ (M @ x), atol=1e-9)


def test_affine_option_errors():
    img = synthetic.smooth_random_image((32, 32), rng=0)
    with pytest.raises(ValueError, match="affine must be one of rigid, similarity, affine"):
        varreg.register(img, img, affine="shear")
    with pytest.raises(ValueError, match="affine= and initial= exclude each other"):
        varreg.register(img, img, affine=True, initial=np.zeros((2, 32, 32), np.float32))
    with pytest.raises(ValueError, match="at least 2 voxels along every axis"):
        estimate_affine(np.zeros((1, 32)), np.zeros((1, 32)))


def test_large_volumes_stop_the_affine_iterations_at_half_resolution():
    """About 10^6 voxels: the half-resolution level already gives the samples; the estimate stays accurate."""
    shape, sp = (100, 100, 100), (2.0, 2.0, 2.0)
    fixed = synthetic.smooth_random_image(shape, sigma=3.0, rng=3)
    A = Rotation.from_rotvec(np.deg2rad([4, 6, -5])).as_matrix() @ np.diag([1.04, 0.97, 1.02])
    M = voxel_matrix(Affine(A, np.array([5.0, -4.0, 3.0]), shape, sp, "affine", {}))
    est = estimate_affine(fixed, _moving(fixed, M), kind="affine", spacing=sp)
    assert shape not in [lvl["shape"] for lvl in est.info["levels"]]
    err = endpoint_error(displacement_of(voxel_matrix(est), shape), displacement_of(M, shape))
    assert err < 0.3, err
    full = estimate_affine(fixed, _moving(fixed, M), kind="affine", spacing=sp, finest=0)
    assert full.info["levels"][-1]["shape"] == shape
