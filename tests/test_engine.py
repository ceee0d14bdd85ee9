"""Accuracy against analytic ground truth (varreg.synthetic) and the engine's per-cascade options.

The pairs are built so that ``moving(x + u_true(x)) = fixed(x)``: a smooth random
image deformed by the inverse of a sinusoidal displacement (one period across
the grid, component i varying along axis i+1), so registering
``(fixed, moving)`` should return ``u_true``.
"""
import numpy as np
import pytest
from scipy import ndimage

import varreg
from varreg import data_terms, denoisers, engine, synthetic
from varreg.data_terms import L1
from varreg.metrics import endpoint_error

L1W = L1.weights  # the L1 defaults

AMPLITUDE = 2.5  # peak displacement, voxels
MARGIN = 8  # voxels cropped from every side where stated


def _pair(shape, seed=0, amplitude=AMPLITUDE):
    rng = np.random.default_rng(seed)
    fixed = synthetic.smooth_random_image(shape, rng=rng)
    truth = synthetic.sinusoidal_displacement(shape, amplitude=amplitude)
    return fixed, synthetic.deform(fixed, truth), truth


def _crop(u, margin=MARGIN):
    return u[(slice(None),) + (slice(margin, -margin),) * (u.ndim - 1)]


@pytest.fixture(scope="module")
def pair2d():
    return _pair((256, 256))


@pytest.fixture(scope="module")
def pair3d():
    return _pair((64, 64, 64))


def test_synthetic_pair_is_consistent(pair2d):
    """The ground truth really aligns the pair (else the EPE bounds below mean nothing)."""
    fixed, moving, truth = pair2d
    assert np.abs(truth).max() == pytest.approx(AMPLITUDE, rel=1e-3)
    aligned = varreg.warp(moving, truth)
    assert np.abs(_crop(aligned[None])[0] - _crop(fixed[None])[0]).mean() < 0.1 * np.abs(moving - fixed).mean()


def test_register_2d_l1_defaults_recovers_the_field(pair2d):
    fixed, moving, truth = pair2d
    res = varreg.register(fixed, moving)
    u = res.displacement
    assert u.shape == (2, 256, 256) and u.dtype == np.float32 and np.isfinite(u).all()
    epe = endpoint_error(u, truth)  # whole grid, no crop (measured ~0.12 px; 0.05 with refine=0)
    assert epe < 0.3, f"2-D L1 EPE {epe:.3f} px"
    assert np.abs(res.warped - fixed).mean() < 0.2 * np.abs(moving - fixed).mean()
    assert res.info["data_term"] == "l1" and res.info["theta"] == L1W.theta


def test_refine_is_further_warps_at_the_finest_level(pair2d):
    """An int ``refine=N`` continues the finest level with N warps of ``refine_denoiser`` weighted by
    ``refine_lam``: the same as a second, one-level call from the first displacement."""
    fixed, moving, truth = pair2d
    base = varreg.register(fixed, moving, refine=0)
    res = varreg.register(fixed, moving, refine=3)
    again = varreg.register(fixed, moving, initial=base.displacement, levels=1, warps=3, denoiser="quadratic",
                            lam=L1W.refine_lam, refine=0)
    np.testing.assert_allclose(res.displacement, again.displacement, atol=1e-5)
    assert res.info["refine"][0] == 3 and not any(res.info["refine"][1:])
    assert res.info["refine_denoiser"] == "quadratic" and res.info["refine_lam"] == L1W.refine_lam
    assert base.info["refine_denoiser"] is None and not any(base.info["refine"])
    tgv = varreg.register(fixed, moving, refine=3, refine_denoiser="tgv")
    assert np.abs(tgv.displacement - res.displacement).max() > 1e-3


def test_refinement_regularises_in_voxel_units_whatever_the_spacing():
    """With a spacing, the main denoiser is scaled by it but the refinement warps are not: they equal a
    one-level call with the quadratic denoiser and no spacing."""
    fixed, moving, _ = _pair((12, 32, 32), amplitude=1.5)
    sp = (5.0, 1.0, 1.0)
    base = varreg.register(fixed, moving, spacing=sp, refine=0)
    res = varreg.register(fixed, moving, spacing=sp, refine=2)
    again = varreg.register(fixed, moving, initial=base.displacement, levels=1, warps=2, denoiser="quadratic",
                            lam=L1W.refine_lam, refine=0)
    np.testing.assert_allclose(res.displacement, again.displacement, atol=1e-5)
    scaled = varreg.register(fixed, moving, initial=base.displacement, levels=1, warps=2, denoiser="quadratic",
                             lam=L1W.refine_lam, refine=0, spacing=sp)
    assert np.abs(scaled.displacement - res.displacement).max() > 1e-3


def test_per_level_schedules_follow_the_pyramid_finest_first(pair2d):
    """warps: a sequence's last entry serves the coarser levels; refine: levels past the sequence get none.
    A refinement on the second level changes the result; the defaults are the documented schedule."""
    fixed, moving, _ = pair2d
    res = varreg.register(fixed, moving, warps=(2, 4), refine=(0, 3))
    n = res.info["levels"]
    assert n >= 3
    assert res.info["warps"] == (2,) + (4,) * (n - 1)
    assert res.info["refine"] == (0, 3) + (0,) * (n - 2)
    plain = varreg.register(fixed, moving, warps=(2, 4), refine=0)
    assert np.abs(plain.displacement - res.displacement).max() > 1e-3
    d = varreg.register(fixed, moving).info
    assert d["warps"][:2] == (2, 5) and d["refine"][:3] == (10, 30, 0) and d["lam"] == 0.1
    with pytest.raises(ValueError, match="refine must be a non-negative integer or a sequence"):
        varreg.register(fixed, moving, refine=(1, -1))
    with pytest.raises(ValueError, match="warps must be a positive integer or a sequence"):
        varreg.register(fixed, moving, warps=(2, 0))
    with pytest.raises(ValueError, match="warps must be a positive integer or a sequence"):
        varreg.register(fixed, moving, warps=())


def test_register_2d_l2_recovers_the_field(pair2d):
    fixed, moving, truth = pair2d
    u = varreg.register(fixed, moving, data_term="l2").displacement
    epe_all = endpoint_error(u, truth)
    epe = endpoint_error(_crop(u), _crop(truth))  # an 8-voxel margin cropped: the border holds the largest errors
    # measured: ~0.06 px over the whole grid, ~0.04 px without the margin (0.10 / 0.07 before the quadratic warps)
    assert epe < 0.3, f"2-D L2 EPE {epe:.3f} px (cropped), {epe_all:.3f} px (whole grid)"
    assert epe_all < 0.3, f"2-D L2 EPE {epe_all:.3f} px (whole grid)"


def test_register_2d_tgv_recovers_the_field(pair2d):
    """TGV (fused 2-D kernel, 5 primal-dual steps a call by default) on the same pair."""
    fixed, moving, truth = pair2d
    res = varreg.register(fixed, moving, denoiser="tgv")
    assert res.info["denoiser_iterations"] == varreg.denoisers.TGV.default_iterations
    epe = endpoint_error(res.displacement, truth)  # whole grid (measured ~0.12 px)
    assert epe < 0.3, f"2-D L1-TGV EPE {epe:.3f} px"


def test_register_3d_tgv_recovers_the_field():
    """TGV in 3-D (fused 3-D kernel) on a smaller volume."""
    fixed, moving, truth = _pair((40, 40, 40), amplitude=2.0)
    u = varreg.register(fixed, moving, denoiser="tgv").displacement
    epe = endpoint_error(u, truth)  # whole grid (measured ~0.43 px, TV defaults ~0.44; 0.29 / 0.64 before the quadratic warps)
    assert epe < 0.5, f"3-D L1-TGV EPE {epe:.3f} px"


def test_register_3d_defaults_recovers_the_field(pair3d):
    fixed, moving, truth = pair3d
    u = varreg.register(fixed, moving).displacement
    assert u.shape == (3, 64, 64, 64) and np.isfinite(u).all()
    epe_all = endpoint_error(u, truth)
    epe = endpoint_error(_crop(u), _crop(truth))  # 8-voxel margin cropped
    # measured with the L1 defaults: ~0.30 px over the whole grid, ~0.22 px without the margin
    assert epe_all < 0.5, f"3-D EPE {epe:.3f} px (cropped), {epe_all:.3f} (whole grid)"


def test_register_3d_smaller_lam_recovers_the_field(pair3d):
    fixed, moving, truth = pair3d
    u = varreg.register(fixed, moving, lam=0.03).displacement
    epe = endpoint_error(u, truth)  # whole grid (measured ~0.30 px)
    assert epe < 0.5, f"3-D EPE with lam=0.03: {epe:.3f} px"


@pytest.mark.parametrize("shape", [(64, 64), (24, 24, 24)])
@pytest.mark.parametrize("data_term", ["l1", "l2"])
def test_zero_motion_gives_zero_displacement(shape, data_term):
    fixed = synthetic.smooth_random_image(shape, rng=3)
    res = varreg.register(fixed, fixed.copy(), data_term=data_term)
    assert np.abs(res.displacement).max() < 0.01
    np.testing.assert_allclose(res.warped, fixed, atol=1e-3)


def test_plain_function_denoiser_runs_through_register(pair2d):
    fixed, moving, truth = pair2d
    calls = []

    def gaussian(u, weight):
        calls.append((type(u), u.shape, u.dtype, weight))
        return ndimage.gaussian_filter(u, (0, 1, 1))

    res = varreg.register(fixed, moving, denoiser=gaussian)
    assert calls and all(t is np.ndarray and s[0] == 2 and len(s) == 3 and d == np.float32 for t, s, d, _ in calls)
    th, lam = L1W.theta, L1W.lam
    assert all(isinstance(w, float) and w == pytest.approx(lam / th) for *_, w in calls)
    assert calls[-1][1] == (2, 256, 256)
    assert res.info["denoiser"] == "gaussian"
    epe = endpoint_error(res.displacement, truth)  # measured ~0.12 px
    assert epe < 0.3, f"Gaussian-denoiser EPE {epe:.3f} px"
    lam_fn = lambda u, w: ndimage.gaussian_filter(u, (0, 1, 1))  # noqa: E731 - the form in the docs
    assert np.isfinite(varreg.register(fixed[::4, ::4], moving[::4, ::4], denoiser=lam_fn).displacement).all()


# ------------------------------------------------------------ engine.solve options
class _Recorder:
    """A data term wrapper that records the theta of every cascade."""

    name, weights = "recorder", None

    def __init__(self, term):
        self.term, self.thetas = term, []

    def linearise(self, fixed, moving, u, ndim):
        return self.term.linearise(fixed, moving, u, ndim)

    def step(self, v, lin, theta):
        self.thetas.append(theta)
        return self.term.step(v, lin, theta)


class _CountingDenoiser:
    def __init__(self):
        self.weights, self.resets = [], 0

    def reset(self):
        self.resets += 1

    def __call__(self, u, weight):
        self.weights.append(weight)
        return ndimage.uniform_filter(u, (1, 3, 3))


@pytest.fixture(scope="module")
def small_pair():
    fixed, moving, _ = _pair((48, 40), seed=2, amplitude=1.5)
    return fixed, moving, np.zeros((2, 48, 40), np.float32)


def _solve(small_pair, **kw):
    fixed, moving, u0 = small_pair
    opts = dict(data_term=data_terms.L1(), denoiser=denoisers.TV(2), theta=0.3, lam=0.1, n_warps=2, n_iters=3, ndim=2)
    opts.update(kw)
    return engine.solve(fixed, moving, u0, **opts)


def test_solve_per_cascade_sequences_equal_the_scalar_form(small_pair):
    den = denoisers.TV(2)
    ref = _solve(small_pair, denoiser=den)
    for thetas in ([0.3] * 6, (0.3,) * 6, np.full(6, 0.3)):
        np.testing.assert_array_equal(_solve(small_pair, theta=thetas, denoiser=[den] * 6), ref)


def test_solve_uses_each_cascades_theta_and_denoiser(small_pair):
    thetas = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2]
    term = _Recorder(data_terms.L1())
    dens = [_CountingDenoiser() for _ in range(6)]
    seen = []
    v = _solve(small_pair, theta=thetas, denoiser=dens, data_term=term, lam=0.5,
               callback=lambda w, k, u, v: seen.append((w, k)))
    assert np.isfinite(v).all() and v.shape == (2, 48, 40)
    assert term.thetas == thetas
    assert [d.weights for d in dens] == [[pytest.approx(0.5 / t)] for t in thetas]
    assert all(d.resets == 1 for d in dens)
    assert seen == [(w, k) for w in range(2) for k in range(3)]
    # a shared denoiser object is reset once per solve, not once per cascade
    shared = _CountingDenoiser()
    _solve(small_pair, denoiser=[shared] * 6)
    assert shared.resets == 1 and len(shared.weights) == 6


@pytest.mark.parametrize("what", ["theta", "denoiser"])
@pytest.mark.parametrize("n", [5, 7])
def test_solve_rejects_a_sequence_of_the_wrong_length(small_pair, what, n):
    value = [0.3] * n if what == "theta" else [denoisers.TV(2) for _ in range(n)]
    with pytest.raises(ValueError, match=rf"{what}: got {n} values for 6 cascades"):
        _solve(small_pair, **{what: value})
