"""Local NCC (data_term="ncc"): local standardisation, its u-step against brute force, invariance, recovery."""
import numpy as np
from scipy import ndimage
import pytest
from scipy.optimize import minimize

import varreg
from varreg import data_terms, engine, synthetic
from varreg.data_terms import NCC, local_affine_fit, local_standardise
from varreg.differences import central_gradient
from varreg.metrics import endpoint_error
from varreg.resample import warp


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    fixed = synthetic.smooth_random_image((64, 72), rng=rng)
    truth = synthetic.sinusoidal_displacement((64, 72), amplitude=2.0)
    return fixed, synthetic.deform(fixed, truth), truth


def test_local_standardise_undoes_affine_and_slowly_varying_intensity_changes():
    rng = np.random.default_rng(1)
    img = synthetic.smooth_random_image((64, 56), sigma=2.0, rng=rng).astype(np.float64)
    for a, b in ((3.0, 7.0), (0.01, -2.0)):  # a global gain and offset: exactly (to rounding)
        np.testing.assert_allclose(local_standardise(a * img + b, 2, 9, 0.1), local_standardise(img, 2, 9, 0.1),
                                   atol=1e-7)
    # a gain 0.6-1.4 and an offset that vary slowly compared with the window: nearly (a global
    # standardisation keeps most of the change)
    gain = synthetic.bias_field(img.shape, rng=2).astype(np.float64)
    offset = 0.3 * synthetic.bias_field(img.shape, rng=3)
    changed = gain * img + offset

    def corr(x, y):
        return np.corrcoef(x.ravel(), y.ravel())[0, 1]

    local = corr(local_standardise(changed, 2, 9, 0.1), local_standardise(img, 2, 9, 0.1))
    glob = corr(local_standardise(changed, 2, 1e4, 0.1), local_standardise(img, 2, 1e4, 0.1))
    assert local > 0.97 and local > glob + 0.05, (local, glob)
    const = local_standardise(np.full((16, 16), 5.0), 2, 9, 0.1)
    assert np.isfinite(const).all() and np.abs(const).max() == 0


@pytest.mark.parametrize("weighted", [False, True])
def test_local_affine_fit_is_the_weighted_least_squares_fit(weighted):
    """Small window (no blocks): per voxel, the ridge least-squares fit of F on W under the
    Gaussian weights (scipy's kernel, border replicated), times the voxels' own weights where given
    (``support``, as NCC's robust weights), solved here directly."""
    rng = np.random.default_rng(5)
    W = synthetic.smooth_random_image((18, 16), sigma=1.5, rng=rng)
    F = 0.8 * W + 0.3 * synthetic.smooth_random_image((18, 16), sigma=2.0, rng=rng) + 0.1
    window, ridge = 5.0, 1e-3
    voxel = rng.uniform(0.01, 1.0, W.shape) if weighted else np.ones(W.shape)
    a, b = local_affine_fit(F, W, 2, window, ridge, voxel if weighted else None)
    sigma = window / 12**0.5
    r = int(3 * sigma + 0.5)
    k1 = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k1 /= k1.sum()
    for (i, j) in [(0, 0), (5, 7), (17, 15), (9, 3)]:
        rows, wts = [], []
        for di in range(-r, r + 1):
            for dj in range(-r, r + 1):
                p, q = min(max(i + di, 0), 17), min(max(j + dj, 0), 15)
                rows.append((W[p, q], F[p, q]))
                wts.append(k1[di + r] * k1[dj + r] * voxel[p, q])
        w_, f_ = np.array(rows).T
        wts = np.array(wts) / np.sum(wts)
        # minimise sum wts (f - a w - c)^2 + ridge a^2 (weights summing to 1)
        A = np.stack([w_ * np.sqrt(wts), np.sqrt(wts)], 1)
        A = np.vstack([A, [np.sqrt(ridge), 0.0]])
        y = np.concatenate([f_ * np.sqrt(wts), [0.0]])
        (a_ref, b_ref), *_ = np.linalg.lstsq(A, y, rcond=None)
        assert a_ref > 0
        np.testing.assert_allclose([a[i, j], b[i, j]], [a_ref, b_ref], rtol=1e-4, atol=1e-6)


def test_local_affine_fit_recovers_an_exact_affine_relation_on_blocks():
    """A large window (statistics on blocks, interpolated back): F = 2 W + 3 gives a = 2, b = 3."""
    W = synthetic.smooth_random_image((60, 52), sigma=2.0, rng=6)
    a, b = local_affine_fit(2.0 * W + 3.0, W, 2, 41, 0.0)
    np.testing.assert_allclose(a, 2.0, rtol=1e-4)
    np.testing.assert_allclose(b, 3.0, rtol=1e-4)


def _spatial_basis(shape, order):
    """Every monomial y^i x^j with i + j <= order of the coordinates scaled to -1 .. 1, built here from scratch."""
    y, x = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    return [y ** i * x ** j for i in range(order + 1) for j in range(order + 1 - i)]


@pytest.mark.parametrize("theta,degree,bias_order,robust,local,warm",
                         [(0.3, 1, 0, None, None, False), (2.0, 1, 0, 0.4, None, False), (0.3, 2, 0, None, None, False),
                          (2.0, 2, 0, 0.4, None, False), (0.3, 2, 2, 0.4, None, False), (2.0, 1, 1, None, None, False),
                          (0.3, 2, 1, 0.15, None, False), (0.3, 2, 2, 0.4, None, True), (2.0, 2, 1, 0.15, None, True),
                          (2.0, 2, 0, 0.4, 0.2, False), (0.3, 2, 2, 0.4, 0.2, True), (0.3, 2, 1, None, 0.3, True)])
def test_ncc_u_step_minimises_its_subproblem(theta, degree, bias_order, robust, local, warm):
    """The u-step on the prepared (standardised) images minimises |rho(u)| + theta/2 |v - u|^2 per voxel,
    rho built here from scratch: a (p(x, W) + p'(x, W) g.(u - u_w)) + b - F with W the warped
    standardised moving image, g its gradient, p the global map (a polynomial in W whose coefficients
    are polynomials of the coordinates of order ``bias_order``, fitted by least squares or, with ``robust``,
    reweighted by Tukey's biweight of the residuals) and (a, b) the local fit of F on p(x, W) (with
    ``local``: weighted by the biweight of a least-squares local fit's residuals), all frozen within the
    warp. ``warm``: the term has linearised once before (the same warp point, as if the
    motion had not changed), so its reweighting goes on from that map by one more refit."""
    rng = np.random.default_rng(2)
    f = synthetic.smooth_random_image((20, 18), rng=rng).astype(np.float64)
    m = synthetic.smooth_random_image((20, 18), rng=rng).astype(np.float64)
    uw = rng.normal(0, 0.5, (2, 20, 18))
    v = uw + rng.normal(0, 0.3, (2, 20, 18))
    term = NCC(window=7, degree=degree, bias_order=bias_order, robust=robust, local_robust=local)  # any window
    f_s, m_s = term.prepare(f, m, 2)
    if warm:
        term.linearise(f_s, m_s, uw, 2)
    u = term.step(v, term.linearise(f_s, m_s, uw, 2), theta)
    warped = warp(m_s, uw)
    g = central_gradient(warped, 2)
    # p from the normal equations solved here by lstsq, on every voxel (the term subsamples larger images)
    phis = _spatial_basis(warped.shape, bias_order)
    cols = [phi * warped ** k for k in range(degree + 1) for phi in phis]
    X, y = np.stack([c.ravel() for c in cols], 1), f_s.ravel()
    ridge = (term.floor * term.scale) ** 2
    coef = np.linalg.lstsq(X, y, rcond=None)[0]
    # one call per warp: with robust, the map refitted _ROBUST_REFITS times (then _WARM_REFITS more on
    # the next call); with local, the local fit weighted by the biweight of the residual of the previous
    # call's least-squares local fit (the first call: its own); least squares otherwise
    for call in range(1 + warm):
        for _ in range(((data_terms._WARM_REFITS if call else data_terms._ROBUST_REFITS)) if robust else 0):
            r = (y - X @ coef) / (robust * term.scale)  # iteratively reweighted least squares
            wt = np.sqrt(np.maximum(np.clip(1 - r ** 2, 0, None) ** 2, data_terms._ROBUST_FLOOR))
            coef = np.linalg.lstsq(X * wt[:, None], y * wt, rcond=None)[0]
        c_k = [sum(coef[k * len(phis) + j] * phi for j, phi in enumerate(phis)) for k in range(degree + 1)]
        mapped = sum(c * warped ** k for k, c in enumerate(c_k))
        slope = sum(k * c * warped ** (k - 1) for k, c in enumerate(c_k) if k)
        a, b = local_affine_fit(f_s, mapped, 2, 7, ridge)
        if local:  # weighted by the previous call's least-squares fit (the first call: by its own)
            pa, pb = (a, b) if call == 0 else least
            least = (a, b)
            r = (pa * mapped + pb - f_s) / (local * term.scale)
            voxel = np.maximum(np.clip(1 - r ** 2, 0, None) ** 2, data_terms._ROBUST_FLOOR)
            assert voxel.min() < 0.5  # some voxels really are down-weighted
            a, b = local_affine_fit(f_s, mapped, 2, 7, ridge, voxel)
    assert a.min() >= 0 and np.ptp(a) > 0.05  # a real, varying fit
    for (i, j) in [(3, 4), (10, 9), (15, 2), (7, 14)]:
        gi = a[i, j] * slope[i, j] * g[:, i, j]
        r0 = a[i, j] * mapped[i, j] + b[i, j] - f_s[i, j] - gi @ uw[:, i, j]

        def obj(x, gi=gi, r0=r0, vi=v[:, i, j]):
            return abs(r0 + gi @ x) + 0.5 * theta * np.sum((vi - x) ** 2)

        best = min((minimize(obj, x0, method="Nelder-Mead", options=dict(xatol=1e-10, fatol=1e-12, maxiter=4000))
                    for x0 in (v[:, i, j], u[:, i, j], v[:, i, j] - gi * r0 / (gi @ gi + 1e-12))),
                   key=lambda r: r.fun)
        assert obj(u[:, i, j]) <= best.fun + 1e-6


def test_global_intensity_map_recovers_a_polynomial_relation():
    """F = p(W) exactly (per batch item, inside a support, on a subsampled grid): p and p' come back."""
    rng = np.random.default_rng(7)
    W = rng.random((2, 150, 130)).astype(np.float32)  # 19500 voxels: the fit subsamples
    coefs = np.array([[0.3, 2.0, -1.5], [-0.1, 0.5, 0.8]])
    F = np.stack([sum(c * W[i] ** k for k, c in enumerate(coefs[i])) for i in range(2)]).astype(np.float32)
    support = (rng.random((150, 130)) > 0.3).astype(np.float32)
    F_out = np.where(support > 0, F, 5.0).astype(np.float32)  # outside the support: anything
    np.testing.assert_allclose(data_terms.intensity_map_coefficients(F_out, W, 2, 2, support)[..., 0], coefs, atol=1e-3)
    mapped, slope = data_terms.global_intensity_map(F, W, 2, 2)
    np.testing.assert_allclose(mapped, F, atol=1e-3)
    np.testing.assert_allclose(slope, coefs[:, 1, None, None] + 2 * coefs[:, 2, None, None] * W, atol=1e-3)
    zeros = np.zeros((20, 20), np.float32)  # a constant image (zeros once standardised): p' = 0
    assert np.abs(data_terms.global_intensity_map(zeros, zeros, 2, 2)[1]).max() == 0


@pytest.mark.parametrize("shape", [(150, 130), (40, 36, 30)])
def test_global_intensity_map_recovers_a_spatially_varying_relation(shape):
    """F = c0(x) + c1(x) W + c2(x) W^2 with every c_k a quadratic of the coordinates (a gamma-like map
    under a bias field): the order-2 map reproduces F, p' and, on the kernels' row form, both again."""
    rng = np.random.default_rng(9)
    W = rng.random(shape).astype(np.float32)
    t = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    c = [0.2 + 0.3 * t[0] - 0.2 * t[-1] ** 2,
         1.0 + 0.4 * t[-1] + 0.3 * t[0] * t[-1],
         -0.5 + 0.2 * t[0] ** 2]
    F = (c[0] + c[1] * W + c[2] * W ** 2).astype(np.float32)
    mapped, slope = data_terms.global_intensity_map(F, W, len(shape), 2, order=2)
    np.testing.assert_allclose(mapped, F, atol=2e-4)
    np.testing.assert_allclose(slope, c[1] + 2 * c[2] * W, atol=2e-4)
    order0 = data_terms.global_intensity_map(F, W, len(shape), 2)[0]
    assert np.abs(order0 - F).mean() > 50 * np.abs(mapped - F).mean()  # one global polynomial cannot
    coef = data_terms.intensity_map_coefficients(F, W, len(shape), 2, order=2)
    rows, xs = data_terms.map_rows(coef, shape, 2)
    xpow = np.stack([xs.astype(np.float64) ** e for e in range(rows.shape[1])])  # (order + 1, nx)
    fields = np.einsum("kezy,ex->kzyx", rows.astype(np.float64), xpow).reshape((3,) + shape)
    np.testing.assert_allclose(fields, np.stack(c), atol=2e-4)


@pytest.mark.parametrize("shape", [(150, 130), (40, 36, 30)])
def test_robust_map_fit_ignores_a_structure_that_is_not_aligned(shape):
    """F = p(x, W) except in a central block, a third of each axis, where F is brighter by 0.5 (a
    structure that the motion has not brought into place yet): least squares bends the map towards it;
    the biweighted fit recovers p's coefficients as if the block were not there."""
    rng = np.random.default_rng(12)
    W = rng.random(shape).astype(np.float32)
    t = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    F = ((0.2 + 0.3 * t[0]) + (1.0 + 0.4 * t[-1]) * W - 0.5 * W ** 2).astype(np.float32)
    F_out = F.copy()
    F_out[tuple(slice(n // 3, 2 * n // 3) for n in shape)] += 0.5
    truth = data_terms.intensity_map_coefficients(F, W, len(shape), 2, order=2)
    plain = data_terms.intensity_map_coefficients(F_out, W, len(shape), 2, order=2)
    robust = data_terms.intensity_map_coefficients(F_out, W, len(shape), 2, order=2, cutoff=0.1)
    assert np.abs(plain - truth).max() > 0.1
    np.testing.assert_allclose(robust, truth, atol=2e-3)
    np.testing.assert_allclose(data_terms.intensity_map_coefficients(F, W, len(shape), 2, order=2, cutoff=0.1),
                               truth, atol=1e-6)  # exact data: every weight is 1


@pytest.mark.parametrize("shape", [(96, 88), (40, 36, 30)])
def test_robust_local_fit_keeps_a_structure_that_is_not_aligned_visible(shape):
    """F = W except in a small block where F is brighter by a quarter of the range (a structure the
    motion has not brought into place yet), both through NCC's standardisation. The least-squares local
    fit partly explains the block away (its a, b bend in the windows around it, so the data term loses
    the residual that should move the field, and the fit is wrong around the block too); its refit
    weighted by the biweight of that fit's residual keeps a p + b = W around and inside the block (the
    residual there stays the block's step), on the numba path and on the reference alike."""
    rng = np.random.default_rng(13)
    W = ndimage.gaussian_filter(rng.random(shape), 3.0).astype(np.float32)
    W = (W - W.min()) / np.ptp(W)
    F = W.copy()
    block = tuple(slice(n // 2 - n // 8, n // 2 + n // 8) for n in shape)
    F[block] += 0.25
    zero = np.zeros((len(shape), *shape), np.float32)
    plain, robust = NCC(window=21), NCC(window=21, local_robust=0.2)
    f_s, w_s = robust.prepare(F, W, len(shape))
    gain = robust.scale / F.std()  # F's standardisation: outside the block the ideal fit is W on F's scale
    ideal = (W - F.mean()) * gain
    ring = np.zeros(shape, bool)
    ring[tuple(slice(n // 2 - n // 4, n // 2 + n // 4) for n in shape)] = True
    ring[block] = False
    for fused in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            if not fused:
                mp.setattr(data_terms, "takes_kernel", lambda *a: False)
            fit_ls = plain.linearise(f_s, w_s, zero, len(shape)).warped
            robust.reset()
            fit_rb = robust.linearise(f_s, w_s, zero, len(shape)).warped
        err_ls, err_rb = (np.abs(x - ideal) for x in (fit_ls, fit_rb))
        step = 0.25 * gain
        res_ls, res_rb = (np.mean(f_s[block] - x[block]) for x in (fit_ls, fit_rb))
        assert err_ls[ring].mean() > 0.03 * step  # least squares: bent around the block
        assert err_rb[ring].mean() < 0.2 * err_ls[ring].mean()
        # inside the block the refit keeps most of the step as residual; least squares hides more of it
        assert res_rb > 0.8 * step and res_rb > res_ls + 0.05 * step


def test_ncc_robust_warm_start_lives_within_one_call():
    """The previous warp's map is carried to the next warp of a level only: one ``NCC(robust=...)`` used
    for two registrations (or for a pair after another, or in threads at once) gives what a fresh one gives."""
    rng = np.random.default_rng(5)
    f = synthetic.smooth_random_image((48, 44), rng=rng)
    m = synthetic.contrast_change(synthetic.smooth_random_image((48, 44), rng=rng), gamma=0.7)
    term = NCC(window=9, robust=0.4)
    first = varreg.register(f, m, data_term=term).displacement
    assert term._maps  # the last warp's map is kept ...
    varreg.register(m, f, data_term=term)  # ... and another pair in between changes nothing
    np.testing.assert_array_equal(varreg.register(f, m, data_term=term).displacement, first)
    np.testing.assert_array_equal(varreg.register(f, m, data_term=NCC(window=9, robust=0.4)).displacement, first)
    term.reset()
    assert not term._maps
    # one instance in several threads at once: each thread's warps carry its own maps
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda fm: varreg.register(*fm, data_term=term).displacement, [(f, m), (m, f), (f, m)]))
    np.testing.assert_array_equal(runs[0], first)
    np.testing.assert_array_equal(runs[2], first)


def test_ncc_robust_is_validated():
    for bad in (0, -0.1, "x", True):
        with pytest.raises(ValueError, match="ncc robust"):
            NCC(robust=bad)
        with pytest.raises(ValueError, match="ncc local_robust"):
            NCC(local_robust=bad)
    assert NCC(robust=None).robust is None and NCC().local_robust is None


def test_ncc_degree_and_bias_order_are_validated():
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="ncc degree must be an integer 1..4"):
            NCC(degree=bad)
    for bad in (-1, 4, 1.0, False):
        with pytest.raises(ValueError, match="ncc bias_order must be an integer 0..3"):
            NCC(bias_order=bad)


def test_ncc_register_is_invariant_to_affine_intensity_changes(pair):
    fixed, moving, _ = pair
    ref = varreg.register(fixed, moving, data_term="ncc").displacement
    for f, m in ((fixed, 3.0 * moving + 7.0), (0.5 * fixed - 2.0, moving), (fixed * 200, moving * 0.1 + 1)):
        got = varreg.register(f, m, data_term="ncc").displacement
        assert np.abs(got - ref).max() < 0.01  # float rounding only
    # also without the joint normalisation
    got = varreg.register(fixed, 3.0 * moving + 7.0, data_term="ncc", normalise=False).displacement
    assert np.abs(got - varreg.register(fixed, moving, data_term="ncc", normalise=False).displacement).max() < 0.01


@pytest.mark.parametrize("degree,bias_order,bound", [(1, 0, 0.6), (2, 0, 0.8), (2, 2, 0.35)])
def test_ncc_recovers_the_field_under_a_contrast_change_where_l1_does_not(pair, degree, bias_order, bound):
    fixed, moving, truth = pair
    changed = synthetic.contrast_change(moving, gamma=0.7, bias=synthetic.bias_field(moving.shape, rng=1))
    # a window of 9 voxels for this 64 x 72 texture (the default, 121, suits whole slices and volumes)
    term = NCC(window=9, degree=degree, bias_order=bias_order)
    ncc = endpoint_error(varreg.register(fixed, changed, data_term=term).displacement, truth)
    l1 = endpoint_error(varreg.register(fixed, changed).displacement, truth)
    # the bias field is quadratic-like: the map with coordinate terms (bias_order 2) takes it out almost
    # entirely, so that field comes closest to the unchanged pair's accuracy (about 0.27 px)
    assert ncc < bound and l1 > 3.5 * ncc, (ncc, l1)


def test_ncc_constant_image_gives_a_finite_zero_field():
    img = np.full((24, 20), 3.0, np.float32)
    other = synthetic.smooth_random_image((24, 20), rng=3)
    for f, m in ((img, img), (img, other), (other, img)):
        res = varreg.register(f, m, data_term="ncc")
        assert np.isfinite(res.displacement).all() and np.isfinite(res.warped).all()


def test_ncc_runs_on_array_api_strict_like_numpy(pair):
    xs = pytest.importorskip("array_api_strict")
    fixed, moving, _ = pair
    f, m = fixed[::2, ::2].copy(), moving[::2, ::2].copy()
    u0 = np.zeros((2, *f.shape), np.float32)
    den = varreg.denoisers.TV(3)
    ref = engine.solve(f, m, u0, data_term=NCC(), denoiser=den, theta=1.0, lam=1.0, n_warps=2, n_iters=2, ndim=2)
    got = engine.solve(xs.asarray(f), xs.asarray(m), xs.asarray(u0), data_term=NCC(), denoiser=varreg.denoisers.TV(3),
                       theta=1.0, lam=1.0, n_warps=2, n_iters=2, ndim=2)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4)


def test_ncc_window_larger_than_the_image_is_refused():
    img = synthetic.smooth_random_image((12, 40), rng=0)
    with pytest.raises(ValueError, match="ncc window of 15 voxels is larger than the image"):
        varreg.register(img, img, data_term=NCC(window=15))
    with pytest.raises(ValueError, match="ncc window of 13 voxels is larger than the image"):
        varreg.register(img, img, data_term="ncc", window=13)
    with pytest.raises(ValueError, match="window must be a number of voxels >= 2"):
        NCC(window=1)
    with pytest.raises(ValueError, match="the data term 'l1' has no window"):
        varreg.register(img, img, window=9)
    # the default window is clipped to a level's shortest axis: small images work
    assert np.isfinite(varreg.register(img, img, data_term="ncc").displacement).all()
    assert data_terms.make_data_term("ncc").name == "ncc"
