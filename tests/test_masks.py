"""Masks: the data term counts only inside; an artefact in one image, masked out, leaves the field accurate."""
import numpy as np
import pytest

import varreg
from varreg import synthetic
from varreg.metrics import endpoint_error


@pytest.fixture(scope="module")
def artefact_pair():
    """A smooth texture and its deformed copy with a bright blob (an artefact, a lesion) in the moving image only."""
    rng = np.random.default_rng(0)
    fixed = synthetic.smooth_random_image((96, 96), rng=rng)
    truth = synthetic.sinusoidal_displacement((96, 96), amplitude=2.0)
    moving = synthetic.deform(fixed, truth)
    yy, xx = np.mgrid[:96, :96]
    r2 = (yy - 40) ** 2 + (xx - 50) ** 2
    with_artefact = moving.copy()
    with_artefact[r2 < 8**2] = 1.5
    near = r2 < 14**2  # where the field is judged
    mask = (r2 >= 10**2).astype(np.uint8)  # the artefact and a margin left out
    return fixed, moving, with_artefact, truth, near, mask


def test_masked_artefact_leaves_the_field_as_accurate_as_without_it(artefact_pair):
    fixed, moving, bad, truth, near, mask = artefact_pair
    clean = endpoint_error(varreg.register(fixed, moving).displacement, truth, mask=near)
    spoiled = endpoint_error(varreg.register(fixed, bad).displacement, truth, mask=near)
    moving_masked = endpoint_error(varreg.register(fixed, bad, moving_mask=mask).displacement, truth, mask=near)
    fixed_masked = endpoint_error(varreg.register(fixed, bad, fixed_mask=mask.astype(bool)).displacement, truth,
                                  mask=near)
    # measured: clean 0.094 px, with the artefact 1.27, moving mask 0.12, fixed mask (the same region on
    # the fixed grid, which the 2-px motion nearly matches) 0.16
    assert spoiled > 5 * clean
    assert moving_masked < 1.5 * clean + 0.05, (moving_masked, clean)
    assert fixed_masked < 2.0 * clean + 0.05, (fixed_masked, clean)
    # NCC keeps its local statistics inside the masks (measured: clean 0.142 px, masked artefact 0.146)
    ncc_clean = endpoint_error(varreg.register(fixed, moving, data_term="ncc").displacement, truth, mask=near)
    ncc = endpoint_error(varreg.register(fixed, bad, data_term="ncc", moving_mask=mask).displacement, truth, mask=near)
    assert ncc < 1.5 * ncc_clean + 0.05, (ncc, ncc_clean)


def test_an_all_ones_mask_changes_nothing(artefact_pair):
    fixed, moving, *_ = artefact_pair
    ref = varreg.register(fixed, moving).displacement
    ones = np.ones(fixed.shape, np.uint8)
    np.testing.assert_array_equal(varreg.register(fixed, moving, fixed_mask=ones, moving_mask=ones).displacement, ref)


def test_outside_the_mask_the_regulariser_alone_shapes_the_field(artefact_pair):
    """With the data term only on the left half, the right half's field is the smooth continuation:
    no data can pull it, so it is much smoother than the data-driven half (the regulariser's minimiser)."""
    fixed, moving, _, truth, _, _ = artefact_pair
    half = np.zeros(fixed.shape, np.uint8)
    half[:, :48] = 1
    u = varreg.register(fixed, moving, fixed_mask=half, refine=0).displacement
    rough = lambda a: np.abs(np.diff(a, axis=-1)).mean()  # noqa: E731
    assert rough(u[:, :, 60:]) < 0.5 * rough(u[:, :, :40])


@pytest.mark.parametrize("mask, message", [
    (np.ones((10, 10)), r"fixed_mask has shape \(10, 10\); expected the image's shape \(96, 96\)"),
    (np.zeros((96, 96)), "fixed_mask is empty"),
    (np.full((96, 96), 0.5), "fixed_mask is not binary"),
    (np.full((96, 96), np.nan), "fixed_mask contains NaN"),
    (np.full((96, 96), "a"), "expected a binary"),
])
def test_bad_masks_are_refused(artefact_pair, mask, message):
    fixed, moving, *_ = artefact_pair
    with pytest.raises(ValueError, match=message):
        varreg.register(fixed, moving, fixed_mask=mask)


def test_slices_with_an_empty_mask_keep_a_zero_field(artefact_pair):
    fixed, moving, *_ = artefact_pair
    f3, m3 = np.stack([fixed, fixed], -1), np.stack([moving, moving], -1)
    mask = np.ones(f3.shape, np.uint8)
    mask[..., 1] = 0
    res = varreg.register_slices(f3, m3, fixed_mask=mask)
    assert np.abs(res.displacement[..., 0]).max() > 0.5 and np.abs(res.displacement[..., 1]).max() == 0
    np.testing.assert_array_equal(res.displacement[:2, ..., 0], varreg.register(fixed, moving).displacement)
