"""Thick-slice stacks under an affine: ``slice_axis`` (the deformable field moves within the slices) and
one 3-D affine stage before slice-by-slice registration (``register_slices(..., affine=...)``)."""
import numpy as np
import pytest

import varreg
from varreg import synthetic
from varreg.affine import Affine, compose_affine, displacement_of, residual_displacement, voxel_matrix
from varreg.data_terms import L1, InPlane, Linearised
from varreg.metrics import endpoint_error
from varreg.options import OptionError

SHAPE, SPACING = (64, 56, 10), (1.5, 1.5, 6.0)
INNER = (slice(None), slice(8, -8), slice(8, -8), slice(1, -1))


@pytest.fixture(scope="module")
def stack():
    """A stack under a known 3-D affine (a 7 degree in-plane rotation, a tilt, 0.4 slice through the
    slices) after a smooth in-plane field: truth ``d = a + A s``."""
    fixed = synthetic.smooth_random_image(SHAPE, sigma=(3.0, 3.0, 1.5), rng=3)
    th = np.deg2rad(7)
    A = np.array([[np.cos(th), -np.sin(th), 0.03], [np.sin(th), np.cos(th), 0.0], [0, 0, 1.0]]) @ np.diag([1.04, 0.97, 1])
    M = voxel_matrix(Affine(A, np.array([3.0, -2.0, 2.4]), SHAPE, SPACING, "affine", {}))
    s = np.zeros((3, *SHAPE), np.float32)  # in-plane only, varying across the slices
    s[0] = 1.5 * np.sin(2 * np.pi * np.arange(56) / 56)[None, :, None] * np.cos(0.05 * np.pi * np.arange(10))[None, None, :]
    s[1] = 1.5 * np.sin(2 * np.pi * np.arange(64) / 64)[:, None, None]
    truth = compose_affine(M, displacement_of(M, SHAPE), s)
    return dict(fixed=fixed, moving=synthetic.deform(fixed, truth), truth=truth, M=M)


def _z_error(u, truth):
    return float(np.abs(u[2] - truth[2])[INNER[1:]].mean())


def test_in_plane_linearisation_drops_the_axis_and_matches_brute_force():
    """rho(u) = rho0 + g.u of the wrapped term, with the axis component of u held: the same affine
    function of the other components (checked against the full linearisation at random points)."""
    rng = np.random.default_rng(0)
    shape = (12, 10, 6)
    f, m = (synthetic.smooth_random_image(shape, rng=k) for k in (1, 2))
    u = rng.normal(0, 0.5, (3, *shape)).astype(np.float32)
    full = L1().linearise(f, m, u, 3)
    lin = InPlane(L1(), 2).linearise(f, m, u, 3)
    assert isinstance(lin, Linearised) and not lin.g[2].any()
    w = u + rng.normal(0, 0.3, u.shape).astype(np.float32)
    w_held = w.copy()
    w_held[2] = u[2]  # the held component keeps the linearisation point
    rho_full = full.rho0 + (full.g * w_held).sum(0)
    rho_in = lin.rho0 + (lin.g * w).sum(0)
    np.testing.assert_allclose(rho_in, rho_full, atol=1e-5)
    np.testing.assert_allclose(lin.gg, full.gg - full.g[2] ** 2, atol=1e-6)
    v = L1().step(u, lin, 0.1)
    np.testing.assert_array_equal(v[2], u[2])  # the u-step leaves the axis to the regulariser


def test_slice_axis_moves_within_the_slices_and_the_affine_carries_the_rest(stack):
    res = varreg.register(stack["fixed"], stack["moving"], spacing=SPACING, affine="affine", slice_axis=2)
    r = residual_displacement(res.displacement, res.affine)
    assert np.abs(r[2]).max() < 1e-5  # the deformable part has no through-slice component
    assert _z_error(res.displacement, stack["truth"]) < 0.06  # measured 0.028 slice: the affine's
    assert endpoint_error(res.displacement[INNER], stack["truth"][INNER]) < 0.45  # measured 0.28 voxel
    np.testing.assert_allclose(varreg.warp(stack["moving"], res.displacement), res.warped, atol=1e-6)


def test_slices_with_an_affine_stage_recover_the_through_slice_shift(stack):
    plain = varreg.register_slices(stack["fixed"], stack["moving"], axis=2, spacing=SPACING)
    res = varreg.register_slices(stack["fixed"], stack["moving"], axis=2, spacing=SPACING, affine="affine")
    assert plain.affine is None and res.affine.shape == (4, 4) and res.info["affine"]["kind"] == "affine"
    assert _z_error(plain.displacement, stack["truth"]) > 0.3  # slices alone cannot move through each other
    assert _z_error(res.displacement, stack["truth"]) < 0.06  # measured 0.028
    assert endpoint_error(res.displacement[INNER], stack["truth"][INNER]) < 0.6  # measured 0.39 (plain 0.81)
    assert np.abs(residual_displacement(res.displacement, res.affine)[2]).max() < 1e-5
    # one stage for the stack, none per slice
    assert all(i.get("affine") is None for i in res.info["slices"])


def test_the_affine_option_reaches_the_stack_from_a_bound_method(stack):
    """The CLI binds SolverOptions in a functools.partial; the stack gets the 3-D stage all the same."""
    import functools

    method = functools.partial(varreg.register, options=varreg.SolverOptions(affine="rigid", refine=0))
    res = varreg.register_slices(stack["fixed"], stack["moving"], axis=2, spacing=SPACING, method=method)
    assert res.info["affine"]["kind"] == "rigid" and all(i.get("affine") is None for i in res.info["slices"])


@pytest.mark.parametrize("value", [3, -1, 1.5, True, "z"])
def test_bad_slice_axis_is_an_option_error(value):
    with pytest.raises(OptionError, match="slice_axis"):
        varreg.SolverOptions(slice_axis=value)


def test_slice_axis_on_a_2d_image_says_why():
    img = synthetic.smooth_random_image((32, 32), rng=0)
    with pytest.raises(ValueError, match="slice_axis=2 needs a 3-D image"):
        varreg.register(img, img, slice_axis=2)
