"""varreg.register_slices: slice-by-slice 2-D registration of 3-D stacks."""
import numpy as np
import pytest

import varreg
from varreg import synthetic

FAST = dict(warps=3, iterations=3)


def _stack(axis, n=3, seed=0):
    """A (n-slice) stack along ``axis`` whose slices move by known smooth in-plane displacements."""
    rng = np.random.default_rng(seed)
    fixed, moving = [], []
    for k in range(n):
        f = synthetic.smooth_random_image((48, 40), rng=rng)
        w = synthetic.sinusoidal_displacement((48, 40), amplitude=1.0 + 0.5 * k)
        fixed.append(f)
        moving.append(np.asarray(varreg.warp(f, -w)))
    return np.stack(fixed, axis=axis), np.stack(moving, axis=axis)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_equals_register_on_each_slice(axis):
    fixed, moving = _stack(axis)
    seen = []
    res = varreg.register_slices(fixed, moving, axis=axis, spacing=(1.2, 1.3, 1.4),
                                 progress=lambda it: (seen.append(k) or k for k in it), **FAST)
    ax = axis % 3
    plane = [a for a in range(3) if a != ax]
    sp = tuple((1.2, 1.3, 1.4)[a] for a in plane)
    assert res.displacement.shape == (3, *fixed.shape) and res.displacement.dtype == np.float32
    assert np.all(res.displacement[ax] == 0)  # no through-slice component
    assert seen == [0, 1, 2] and len(res.info["slices"]) == 3 and res.info["slice_axis"] == ax
    for k in range(3):
        ref = varreg.register(np.take(fixed, k, axis=ax), np.take(moving, k, axis=ax), spacing=sp, **FAST)
        got = np.stack([np.take(res.displacement[a], k, axis=ax) for a in plane])
        np.testing.assert_allclose(got, ref.displacement, atol=1e-6)
        np.testing.assert_allclose(np.take(res.warped, k, axis=ax), ref.warped, atol=1e-5)


def test_recovers_in_plane_motion_on_a_two_slice_stack():
    fixed, moving = _stack(-1, n=2, seed=3)  # fewer slices than register takes along an axis
    res = varreg.register_slices(fixed, moving)
    err0 = np.abs(moving - fixed).mean()
    assert np.abs(res.warped - fixed).mean() < 0.3 * err0


@pytest.mark.parametrize("kw, a, b, match", [
    ({}, np.zeros((16, 16)), np.zeros((16, 16)), "register_slices takes 3-D stacks"),
    ({}, np.zeros((16, 16, 3)), np.zeros((16, 17, 3)), "differ in shape"),
    ({"axis": 3}, np.zeros((16, 16, 3)), np.zeros((16, 16, 3)), "axis must be"),
    ({"spacing": (1.0, 1.0)}, np.zeros((16, 16, 3)), np.zeros((16, 16, 3)), "spacing must hold 3"),
    ({}, np.full((16, 16, 3), np.nan), np.zeros((16, 16, 3)), "NaN"),
])
def test_bad_input_is_refused_with_a_clear_message(kw, a, b, match):
    with pytest.raises(ValueError, match=match):
        varreg.register_slices(a, b, **kw)
