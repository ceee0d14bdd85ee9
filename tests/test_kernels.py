"""Every numba kernel in varreg.kernels against the generic code it replaces.

float32, 2D and 3D, random inputs; displacements reach well outside the grid
so that the clamped (border-replicated) branch is exercised. Tolerances are at
float32 round-off. The generic references run on ``array_api_strict`` arrays
(so they cannot fall back on a kernel) or on batched NumPy input
(a leading batch axis selects the generic branch of the data steps).
"""
import array_api_strict as xs
import numba
import numpy as np
import pytest
from scipy import ndimage

from varreg import data_terms, denoisers, differences, kernels, resample
from varreg.differences import central_gradient

# an axis of length 2 and one of length 1 exercise the "last cell" logic of the warp
WARP_SHAPES = [(23, 17), (2, 9), (1, 6), (7, 6, 5), (2, 5, 4)]
SHAPES = [(19, 14), (6, 7, 5)]


def _image_and_displacement(shape, seed):
    rng = np.random.default_rng(seed)
    img = rng.random(shape, dtype=np.float32)
    u = (rng.standard_normal((len(shape), *shape)) * 2.0).astype(np.float32)
    # a quarter of the vectors point far outside the grid (both sides)
    far = rng.random(shape) < 0.25
    for i, n in enumerate(shape):
        u[i][far] = (rng.choice([-1.0, 1.0], size=int(far.sum())) * (n + 3.0 * rng.random(int(far.sum())))).astype(np.float32)
    return img, u


def _coords(shape, u):
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    return grid + u.astype(np.float64)


@pytest.mark.parametrize("shape", WARP_SHAPES)
def test_warp_linear_matches_map_coordinates_and_generic(shape):
    img, u = _image_and_displacement(shape, seed=len(shape) * 100 + shape[0])
    coords = _coords(shape, u)
    assert (coords < 0).any() and any((coords[i] > n - 1).any() for i, n in enumerate(shape)), "no sample outside the grid"
    got = kernels.warp_linear(img, u)
    assert got.dtype == np.float32 and got.shape == shape
    ref = ndimage.map_coordinates(img.astype(np.float64), coords, order=1, mode="nearest")
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    gen = np.asarray(resample._warp_generic(xs, xs.asarray(img), xs.asarray(u), 1))
    assert gen.dtype == np.float32
    np.testing.assert_allclose(got, gen, rtol=0, atol=1e-5)
    # resample.warp dispatches NumPy to the kernel and array_api_strict to the generic gather
    np.testing.assert_array_equal(resample.warp(img, u), got)
    np.testing.assert_array_equal(np.asarray(resample.warp(xs.asarray(img), xs.asarray(u))), gen)


@pytest.mark.parametrize("shape", WARP_SHAPES)
def test_generic_nearest_matches_ndimage_path(shape):
    img, u = _image_and_displacement(shape, seed=7 + shape[-1])
    u[..., : shape[-1] // 2] = np.round(u[..., : shape[-1] // 2]) + 0.5  # exact half-way samples: round half up
    labels = (img * 5).astype(np.uint8)
    ref = resample.warp(labels, u, order=0)  # NumPy: rounded, clamped coordinates through scipy.ndimage
    gen = resample.warp(xs.asarray(labels), xs.asarray(u), order=0)
    assert gen.dtype == xs.uint8 and ref.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(gen), ref)
    c = np.stack([np.clip(np.floor(_coords(shape, u)[i] + 0.5), 0, n - 1) for i, n in enumerate(shape)]).astype(int)
    np.testing.assert_array_equal(ref, labels[tuple(c)])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_warp_gradient_matches_generic_linearise(shape, eps):
    moving, u = _image_and_displacement(shape, seed=11 + len(shape))
    fixed = np.random.default_rng(3).random(shape, dtype=np.float32)
    ndim = len(shape)
    warped, g, rho0, gg = kernels.warp_gradient(moving, fixed, u, eps)
    for a, want in ((warped, shape), (g, u.shape), (rho0, shape), (gg, shape)):
        assert a.dtype == np.float32 and a.shape == want
    # generic: the array-API warp, central differences, and the formulas of data_terms.linearise
    ref = data_terms.linearise(xs.asarray(fixed), xs.asarray(moving), xs.asarray(u), ndim, eps)
    ref = [np.asarray(a) for a in ref]
    np.testing.assert_allclose(warped, ref[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(g, ref[1], rtol=0, atol=1e-5)
    # rho0 = warped - fixed - g.u carries |u| (up to ~n voxels) times the round-off of g
    np.testing.assert_allclose(rho0, ref[2], rtol=0, atol=1e-5 * (1 + np.abs(u).max()))
    np.testing.assert_allclose(gg, ref[3], rtol=0, atol=1e-5)
    # and the same composed by hand from scipy + varreg.differences on NumPy
    w = ndimage.map_coordinates(moving.astype(np.float64), _coords(shape, u), order=1, mode="nearest")
    gw = central_gradient(w, ndim)
    np.testing.assert_allclose(g, gw, rtol=0, atol=1e-5)
    np.testing.assert_allclose(rho0, w - fixed - np.sum(gw * u, axis=0), rtol=0, atol=1e-5 * (1 + np.abs(u).max()))
    # linearise itself takes the kernel for unbatched NumPy input
    for a, b in zip(data_terms.linearise(fixed, moving, u, ndim, eps), (warped, g, rho0, gg)):
        np.testing.assert_array_equal(a, b)


def _data_step_inputs(shape, seed, eps):
    rng = np.random.default_rng(seed)
    d = len(shape)
    v = (rng.standard_normal((d, *shape)) * 2).astype(np.float32)
    g = (rng.standard_normal((d, *shape)) * 0.3).astype(np.float32)
    g[:, 0] = 0.0  # flat image rows: gg = eps (L1) or 0 (L2)
    rho0 = (rng.standard_normal(shape) * 0.3).astype(np.float32)
    gg = (np.sum(g * g, axis=0) + eps).astype(np.float32)
    return v, g, rho0, gg


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("l1", [True, False])
@pytest.mark.parametrize("theta", [0.05, 0.3, 4.0])
def test_data_step_matches_generic(shape, l1, theta):
    eps = 1e-6 if l1 else 0.0
    v, g, rho0, gg = _data_step_inputs(shape, seed=5 * len(shape) + int(l1), eps=eps)
    got = kernels.data_step(v, g, rho0, gg, theta, l1)
    assert got.dtype == np.float32 and got.shape == v.shape and np.isfinite(got).all()
    step = data_terms.l1_step if l1 else data_terms.l2_step
    if l1:  # both branches of the threshold are taken
        rho = rho0 + np.sum(g * v, axis=0)
        z = theta * np.abs(rho) / gg
        assert (z > 1).any() and (z[1:] < 1).any()
    ref = step(v[None], g[None], rho0[None], gg[None], theta)[0]  # batched: the generic NumPy branch
    assert ref.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    ref_strict = step(xs.asarray(v), xs.asarray(g), xs.asarray(rho0), xs.asarray(gg), theta)
    np.testing.assert_allclose(got, np.asarray(ref_strict), rtol=0, atol=1e-5)
    # the public step takes the kernel for a float theta, and for a NumPy scalar or 0-d array theta
    # (which must not promote the float32 field to float64)
    for th in (theta, np.float64(theta), np.asarray(theta)):
        out = step(v, g, rho0, gg, th)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, got)


TV_CASES = [
    # coupled, alpha, spacing factor (None: isotropic), n_iter, weight
    (False, 0.0, None, 1, 0.3),
    (False, 0.0, None, 6, 2.0),
    (True, 0.0, None, 6, 0.3),
    (False, 0.05, None, 6, 0.3),
    (True, 0.05, None, 6, 1.5),
    (False, 0.0, "aniso", 6, 0.7),
    (True, 0.2, "aniso", 6, 0.7),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("coupled,alpha,spacing,n_iter,weight", TV_CASES)
def test_tv_dual_matches_generic(shape, coupled, alpha, spacing, n_iter, weight):
    d = len(shape)
    rng = np.random.default_rng(17 + d)
    u = (rng.standard_normal((d, *shape)) * 1.5).astype(np.float32)
    p0 = (rng.standard_normal((d, d, *shape)) * 0.4).astype(np.float32)  # a warm start, partly outside the unit ball
    h = (1.0,) * d if spacing is None else (1.0, 2.5, 0.7)[:d]
    tau = 0.99 / (2.0 * sum(1.0 / s**2 for s in h))
    p_kernel = p0.copy()
    v = kernels.tv_dual(u, p_kernel, weight, tau, alpha, n_iter, h, coupled)
    v_ref, p_ref = denoisers.tv_dual_steps(u, p0.copy(), weight, tau, alpha, n_iter, h, coupled)
    assert v.dtype == np.float32 and v.shape == u.shape
    np.testing.assert_allclose(v, v_ref, rtol=0, atol=1e-5 * max(1.0, weight))
    np.testing.assert_allclose(p_kernel, p_ref, rtol=0, atol=1e-5)
    # the projection keeps |p| <= 1 (per component, or jointly when coupled)
    sq = np.sum(p_kernel.astype(np.float64) ** 2, axis=1)
    if coupled:
        sq = sq.sum(axis=0)
    assert sq.max() <= 1 + 1e-5
    # and the TV class, which calls the kernel, agrees with the array-API path on array_api_strict
    den = (denoisers.Huber(alpha, n_iter, coupled=coupled, spacing=h) if alpha else denoisers.TV(n_iter, coupled=coupled, spacing=h))
    den_strict = (denoisers.Huber(alpha, n_iter, coupled=coupled, spacing=h) if alpha else denoisers.TV(n_iter, coupled=coupled, spacing=h))
    for _ in range(2):  # the second call runs from the kept dual
        a = den(u, weight)
        b = np.asarray(den_strict(xs.asarray(u), weight))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, weight))


@pytest.mark.parametrize("shape", [(19, 14), (1, 6), (6, 1), (6, 7, 5), (1, 4, 3), (3, 1, 4)])
@pytest.mark.parametrize("spacing,ratio,beta,weight,dtype", [(None, 1.0, 2.0, 0.4, np.float32),
                                                               ("aniso", 2.0, 0.7, 1.5, np.float32),
                                                               ("aniso", 1.0, 2.0, 0.4, np.float64)])
def test_tgv_steps_match_generic(shape, spacing, ratio, beta, weight, dtype):
    rng = np.random.default_rng(29)
    d = len(shape)
    u = (rng.standard_normal((d, *shape)) * 1.5).astype(dtype)
    spacing = None if spacing is None else (1.0, 2.5, 0.7)[:d]
    h = spacing or (1.0,) * d
    step = 1.0 / np.sqrt(1.0 + 8.0 * sum(1.0 / s**2 for s in h))
    tau, sigma = step / ratio, step * ratio
    # a warm start with every variable non-zero, the duals partly outside their balls
    start = {k: (rng.standard_normal(a.shape) * 0.5).astype(dtype) for k, a in denoisers.tgv_initial_state(u, d).items()}
    ref = denoisers.tgv_steps(u, {k: a.copy() for k, a in start.items()}, weight, beta, tau, sigma, 6, h)
    got = {k: a.copy() for k, a in start.items()}
    kernels.tgv_steps(u, got, weight, beta, tau, sigma, 6, h)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=2e-5, err_msg=k)
    # the projections keep |p_c| <= 1 and |q_c| <= beta (off-diagonal entries counted twice)
    assert np.sqrt(np.sum(got["p"].astype(np.float64) ** 2, axis=1)).max() <= 1 + 1e-5
    q = got["q"].astype(np.float64) ** 2
    off = 1 if d == 2 else 3  # off-diagonal entries of E(w)
    assert np.sqrt(q[:, :-off].sum(axis=1) + 2 * q[:, -off:].sum(axis=1)).max() <= beta * (1 + 1e-5)
    # and the TGV class, which calls the kernel, agrees with the array-API path on array_api_strict
    den, den_strict = (denoisers.TGV(beta, 4, spacing=spacing, ratio=ratio) for _ in range(2))
    for _ in range(2):  # the second call continues from the kept state
        a = den(u, weight)
        b = np.asarray(den_strict(xs.asarray(u), weight))
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)


@pytest.mark.parametrize("shape", [(19, 14), (1, 6), (6, 1), (6, 7, 5), (1, 4, 3), (3, 1, 4)])
@pytest.mark.parametrize("spacing,dtype", [(None, np.float32), ("aniso", np.float32), ("aniso", np.float64)])
def test_quadratic_cg_matches_generic(shape, spacing, dtype):
    """The fused conjugate gradients of Quadratic against its array-API code (array_api_strict),
    over three warm-started calls, with the input left untouched."""
    rng = np.random.default_rng(31)
    d = len(shape)
    h = None if spacing is None else (1.0, 2.5, 0.7)[:d]
    fields = [(rng.standard_normal((d, *shape)) * 1.5).astype(dtype) for _ in range(2)]
    fused, generic = denoisers.Quadratic(3, spacing=h), denoisers.Quadratic(3, spacing=h)
    for u in (fields[0], fields[1], fields[0]):
        before = u.copy()
        a = fused(u, 0.8)
        b = np.asarray(generic(xs.asarray(u), 0.8))
        np.testing.assert_allclose(a, b, rtol=0, atol=5e-6 if dtype == np.float32 else 1e-12)
        np.testing.assert_array_equal(u, before)
        assert a.dtype == dtype
    # enough steps solve (I - w lap) v = u: the residual against the generic Laplacian vanishes
    v = denoisers.Quadratic(200, spacing=h, tol=1e-12)(fields[0], 0.8)
    res = v - 0.8 * differences.laplacian(v, d, h) - fields[0]
    assert np.abs(res).max() < (1e-4 if dtype == np.float32 else 1e-9)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="numba has a single thread")
@pytest.mark.parametrize("shape", SHAPES)
def test_parallel_equals_serial(shape):
    """The prange loops neither race nor reduce across iterations: any thread count gives the same bits."""
    d = len(shape)
    moving, u = _image_and_displacement(shape, seed=23)
    fixed = np.random.default_rng(4).random(shape, dtype=np.float32)
    v, g, rho0, gg = _data_step_inputs(shape, seed=2, eps=1e-6)
    p0 = (np.random.default_rng(8).standard_normal((d, d, *shape)) * 0.4).astype(np.float32)
    h = (1.0, 2.5, 0.7)[:d]

    def run():
        out = [kernels.warp_linear(moving, u), *kernels.warp_gradient(moving, fixed, u, 1e-6)]
        out += [kernels.data_step(v, g, rho0, gg, 0.3, l1) for l1 in (True, False)]
        for coupled in (False, True):
            p = p0.copy()
            out += [kernels.tv_dual(v, p, 0.7, 0.1, 0.05, 4, h, coupled), p]
        state = denoisers.tgv_initial_state(v, d)
        kernels.tgv_steps(v, state, 0.7, 2.0, 0.2, 0.3, 4, h)
        out += list(state.values())
        out.append(kernels.quadratic_cg(v, p0[0].copy(), 0.7, 4, h, 1e-9))
        return out

    serial = run()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        parallel = run()
    finally:
        numba.set_num_threads(1)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(64, 58), (21, 26, 19)])
@pytest.mark.parametrize("degree,bias_order,robust,local", [(1, 0, 0.4, 0.2), (2, 0, None, None), (3, 1, 0.4, None),
                                                        (2, 2, 0.4, 0.2), (2, 2, None, 0.3), (1, 3, 0.4, 0.4)])
def test_ncc_kernels_match_the_array_api_linearisation(shape, degree, bias_order, robust, local, monkeypatch):
    """NumPy float32 takes the numba kernels (block statistics, combination; with ``local_robust`` the block
    statistics also weighted by a local fit's biweight); the array-API code is their reference, to float32
    rounding, on a level's first warp and on the next."""
    rng = np.random.default_rng(8)
    W = ndimage.gaussian_filter(rng.random(shape), 2.0).astype(np.float32)
    W = (W - W.min()) / np.ptp(W)
    ramp = np.linspace(0.7, 1.3, shape[-1])  # a bias along the last axis, which the kernels' rows evaluate
    F = (ramp * W ** 0.7 + 0.05 * rng.random(shape)).astype(np.float32)
    uw = rng.normal(0, 1.5, (len(shape), *shape)).astype(np.float32)
    term = data_terms.NCC(window=15, degree=degree, bias_order=bias_order, robust=robust, local_robust=local)
    fused = term.linearise(F, W, uw, len(shape))
    term.reset()  # the reference's fit cold as well (the robust map's refits go on from the last warp's)
    monkeypatch.setattr(data_terms, "takes_kernel", lambda *a: False)
    ref = term.linearise(F, W, uw, len(shape))
    for x, y in zip(fused, ref):
        np.testing.assert_allclose(x, y, atol=5e-5)
    if robust is not None or local is not None:  # the next warp: the reweightings go on from each path's previous fits
        uw2 = uw + rng.normal(0, 0.3, uw.shape).astype(np.float32)
        ref = term.linearise(F, W, uw2, len(shape))
        monkeypatch.undo()
        term.reset()
        term.linearise(F, W, uw, len(shape))
        fused = term.linearise(F, W, uw2, len(shape))
        for x, y in zip(fused, ref):
            np.testing.assert_allclose(x, y, atol=5e-5)


@pytest.mark.parametrize("shape", [(150, 131), (30, 27, 25)])
@pytest.mark.parametrize("degree,order,cutoff", [(1, 0, None), (2, 2, None), (3, 1, None), (2, 2, 0.05),
                                                 (1, 1, 0.02)])
def test_map_moments_kernel_matches_the_array_api_fit(shape, degree, order, cutoff, monkeypatch):
    """The intensity map's normal equations summed by the numba pass give the reference's coefficients,
    reweighted (robust) or not."""
    rng = np.random.default_rng(11)
    W = rng.random(shape).astype(np.float32)
    F = (np.linspace(0.8, 1.2, shape[-1]) * W ** 0.7 + 0.1 * rng.random(shape)).astype(np.float32)
    fused = data_terms.intensity_map_coefficients(F, W, len(shape), degree, order=order, cutoff=cutoff)
    monkeypatch.setattr(data_terms, "takes_kernel", lambda *a: False)
    ref = data_terms.intensity_map_coefficients(F, W, len(shape), degree, order=order, cutoff=cutoff)
    np.testing.assert_allclose(fused, ref, rtol=1e-7, atol=1e-9)
    if cutoff is not None:  # a warm refit from a perturbed map: the same on both paths
        start = ref * 1.05
        ref = data_terms.intensity_map_coefficients(F, W, len(shape), degree, order=order, cutoff=cutoff,
                                                    start=start)
        monkeypatch.undo()
        fused = data_terms.intensity_map_coefficients(F, W, len(shape), degree, order=order, cutoff=cutoff,
                                                      start=start)
        np.testing.assert_allclose(fused, ref, rtol=1e-7, atol=1e-9)
