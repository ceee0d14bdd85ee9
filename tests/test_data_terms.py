"""The data steps and the denoisers solve the problems they claim to solve.

Data steps: the point-wise sub-problem ``(1/s)|rho0 + g.u|^s + theta/2 |v - u|^2``
against a brute-force minimiser (L1) and the exact linear solve / the paper's
component-wise formulas (L2). Denoisers: ROF closed forms, duality gaps,
perturbation checks, the residual of the quadratic solve, Huber's quadratic limit,
TGV-ROF against a brute-force (smoothed, L-BFGS) minimiser and on affine fields.
Float64 unless stated (the kernels are typed for it too), so that objective
values can be compared at 1e-6.
"""
import numpy as np
import pytest
from scipy.optimize import minimize

from varreg import data_terms, denoisers
from varreg.data_terms import Linearised
from varreg.differences import divergence, forward_difference, laplacian


# ----------------------------------------------------------------- data steps
def _subproblem(shape, seed, *, rho_scale=1.0):
    rng = np.random.default_rng(seed)
    d = len(shape)
    v = rng.standard_normal((d, *shape))
    g = rng.standard_normal((d, *shape))
    rho0 = rng.standard_normal(shape) * rho_scale
    return v, g, rho0


def _l1_objective(u, v, g, rho0, theta):
    """``|rho0 + g.u| + theta/2 |v - u|^2`` per voxel; ``u``, ``v``, ``g``: (d, n)."""
    return np.abs(rho0 + np.sum(g * u, axis=0)) + 0.5 * theta * np.sum((v - u) ** 2, axis=0)


def _steps(term, v, g, rho0, gg, theta):
    """The step through the numba kernel (unbatched) and through the generic code (a batch axis of 1)."""
    lin, lin1 = Linearised(None, g, rho0, gg), Linearised(None, g[None], rho0[None], gg[None])
    return term.step(v, lin, theta), term.step(v[None], lin1, theta)[0]


@pytest.mark.parametrize("shape,theta", [((12, 14), 0.4), ((5, 6, 6), 1.7)])
def test_l1_step_minimises_its_subproblem(shape, theta):
    d = len(shape)
    v, g, rho0 = _subproblem(shape, seed=d, rho_scale=1.5)
    term = data_terms.L1(eps=0.0)  # the exact sub-problem: gg = |g|^2
    gg = np.sum(g * g, axis=0) + term.eps
    n = int(np.prod(shape))
    vf, gf, rf = v.reshape(d, n), g.reshape(d, n), rho0.reshape(n)
    # both regimes: thresholded (|rho(v)| > |g|^2/theta) and exactly solved (rho(u) = 0)
    rho_v = rf + np.sum(gf * vf, axis=0)
    inside = np.abs(rho_v) <= gg.reshape(n) / theta
    assert 20 < inside.sum() < n - 20
    # brute force: Nelder-Mead from two starts (v, and the projection of v onto rho = 0 jittered) on every
    # second voxel, run once and compared with both the kernel and the generic step
    rng = np.random.default_rng(99)
    brute = {}
    for t in range(0, n, 2):
        f = lambda x: _l1_objective(x[:, None], vf[:, t:t + 1], gf[:, t:t + 1], rf[t:t + 1], theta)[0]
        starts = [vf[:, t], vf[:, t] - gf[:, t] * rho_v[t] / gg.reshape(n)[t] + 0.3 * rng.standard_normal(d)]
        brute[t] = min(minimize(f, x0, method="Nelder-Mead", options=dict(xatol=1e-9, fatol=1e-12, maxiter=4000)).fun for x0 in starts)
    for u in _steps(term, v, g, rho0, gg, theta):
        uf = u.reshape(d, n)
        f_closed = _l1_objective(uf, vf, gf, rf, theta)
        np.testing.assert_allclose(rf[inside] + np.sum(gf * uf, axis=0)[inside], 0, atol=1e-9)
        for t, best in brute.items():
            assert f_closed[t] <= best + 1e-6, (t, f_closed[t], best)
            assert best <= f_closed[t] + 1e-4  # the brute force did find the minimum
        # ... and a multi-scale grid around the closed form at every voxel (convex: local = global)
        for radius in (1.0, 1e-2, 1e-4):
            axes = np.linspace(-radius, radius, 9 if d == 2 else 7)
            offs = np.stack(np.meshgrid(*([axes] * d), indexing="ij")).reshape(d, -1)
            trial = uf[:, :, None] + offs[:, None, :]
            f_grid = _l1_objective(trial, vf[:, :, None], gf[:, :, None], rf[:, None], theta).min(axis=1)
            assert np.all(f_closed <= f_grid + 1e-9)


def test_l1_default_eps_changes_the_objective_by_at_most_eps_over_theta():
    v, g, rho0 = _subproblem((12, 12), seed=4)
    theta = 0.3
    exact = data_terms.L1(eps=0.0)
    default = data_terms.L1()
    u0 = exact.step(v, Linearised(None, g, rho0, np.sum(g * g, axis=0)), theta)
    u1 = default.step(v, Linearised(None, g, rho0, np.sum(g * g, axis=0) + default.eps), theta)
    f = lambda u: _l1_objective(u.reshape(2, -1), v.reshape(2, -1), g.reshape(2, -1), rho0.reshape(-1), theta)
    assert np.all(f(u1) - f(u0) <= default.eps / theta + 1e-12)
    # a flat image (g = 0): no division by zero, u = v
    z = np.zeros_like(g)
    np.testing.assert_array_equal(default.step(v, Linearised(None, z, rho0, np.sum(z * z, axis=0) + default.eps), theta), v)


@pytest.mark.parametrize("shape,theta", [((11, 13), 0.05), ((11, 13), 2.0), ((4, 5, 6), 0.3)])
def test_l2_step_is_the_exact_linear_solve(shape, theta):
    d = len(shape)
    v, g, rho0 = _subproblem(shape, seed=10 + d)
    gg = np.sum(g * g, axis=0)
    n = int(np.prod(shape))
    gf = g.reshape(d, n).T  # (n, d)
    A = gf[:, :, None] * gf[:, None, :] + theta * np.eye(d)
    b = theta * v.reshape(d, n).T - gf * rho0.reshape(n)[:, None]
    exact = np.linalg.solve(A, b[..., None])[..., 0].T.reshape(v.shape)
    for u in _steps(data_terms.L2(), v, g, rho0, gg, theta):
        np.testing.assert_allclose(u, exact, rtol=0, atol=1e-10)
    # and its gradient vanishes: g rho(u) + theta (u - v) = 0
    rho_u = rho0 + np.sum(g * exact, axis=0)
    np.testing.assert_allclose(g * rho_u + theta * (exact - v), 0, atol=1e-10)


def _paper_inputs(shape, seed):
    """u_w, v, the warped-image gradient g and the residual r = I1(x + u_w) - I0 at u_w."""
    rng = np.random.default_rng(seed)
    d = len(shape)
    uw, v, g = (rng.standard_normal((d, *shape)) for _ in range(3))
    r = rng.standard_normal(shape)
    rho0 = r - np.sum(g * uw, axis=0)  # the engine's form: rho(u) = rho0 + g.u
    return uw, v, g, r, rho0


@pytest.mark.parametrize("theta", [0.02, 0.5])
def test_l2_step_equals_paper_eq16_2d(theta):
    """Eq. 16: the 2x2 system (g g^T + theta I)(u - u_w) = theta (v - u_w) - g r by Cramer's rule."""
    uw, v, g, r, rho0 = _paper_inputs((9, 8), seed=1)
    g1, g2 = g
    b1 = theta * (v[0] - uw[0]) - g1 * r
    b2 = theta * (v[1] - uw[1]) - g2 * r
    det = (theta + g1 * g1) * (theta + g2 * g2) - (g1 * g2) ** 2  # = theta (theta + g1^2 + g2^2)
    u1 = uw[0] + ((theta + g2 * g2) * b1 - g1 * g2 * b2) / det
    u2 = uw[1] + ((theta + g1 * g1) * b2 - g1 * g2 * b1) / det
    for u in _steps(data_terms.L2(), v, g, rho0, g1 * g1 + g2 * g2, theta):
        np.testing.assert_allclose(u[0], u1, rtol=0, atol=1e-10)
        np.testing.assert_allclose(u[1], u2, rtol=0, atol=1e-10)


@pytest.mark.parametrize("theta", [0.02, 0.5])
def test_l2_step_equals_paper_eq17_3d(theta):
    """Eq. 17: the 3x3 system solved by the adjugate (cofactors written out) over the determinant."""
    uw, v, g, r, rho0 = _paper_inputs((4, 5, 3), seed=2)
    g1, g2, g3 = g
    a11, a22, a33 = theta + g1 * g1, theta + g2 * g2, theta + g3 * g3
    a12, a13, a23 = g1 * g2, g1 * g3, g2 * g3
    b1 = theta * (v[0] - uw[0]) - g1 * r
    b2 = theta * (v[1] - uw[1]) - g2 * r
    b3 = theta * (v[2] - uw[2]) - g3 * r
    c11 = a22 * a33 - a23 * a23
    c12 = a13 * a23 - a12 * a33
    c13 = a12 * a23 - a13 * a22
    c22 = a11 * a33 - a13 * a13
    c23 = a12 * a13 - a11 * a23
    c33 = a11 * a22 - a12 * a12
    det = a11 * c11 + a12 * c12 + a13 * c13  # = theta^2 (theta + |g|^2)
    np.testing.assert_allclose(det, theta**2 * (theta + g1 * g1 + g2 * g2 + g3 * g3), rtol=1e-12)
    u1 = uw[0] + (c11 * b1 + c12 * b2 + c13 * b3) / det
    u2 = uw[1] + (c12 * b1 + c22 * b2 + c23 * b3) / det
    u3 = uw[2] + (c13 * b1 + c23 * b2 + c33 * b3) / det
    for u in _steps(data_terms.L2(), v, g, rho0, g1 * g1 + g2 * g2 + g3 * g3, theta):
        np.testing.assert_allclose(u, np.stack([u1, u2, u3]), rtol=0, atol=1e-9)


# ------------------------------------------------------------------ denoisers
def _tv_primal(v, u, weight, h, coupled, alpha=0.0):
    """``sum H_alpha(|grad v|) + |v - u|^2 / (2 weight)`` (alpha = 0: TV), forward differences."""
    ndim = v.ndim - 1
    gr = forward_difference(v.astype(np.float64), ndim, h)  # (d, ndim, *spatial)
    sq = np.sum(gr * gr, axis=1)
    if coupled:
        sq = sq.sum(axis=0)
    t = np.sqrt(sq)
    reg = t if alpha == 0 else np.where(t <= alpha, t * t / (2 * alpha), t - alpha / 2)
    return reg.sum() + np.sum((v - u) ** 2) / (2 * weight)


def _tv_dual(p, u, weight, h, alpha=0.0):
    """The dual objective ``(|u|^2 - |u + weight div p|^2)/(2 weight) - alpha/2 |p|^2`` (|p| <= 1)."""
    p = p.astype(np.float64)
    w = u + weight * divergence(p, u.ndim - 1, h)
    return (np.sum(u * u) - np.sum(w * w)) / (2 * weight) - 0.5 * alpha * np.sum(p * p)


def _step_field(shape, axis, split, heights):
    """A displacement whose components are steps along ``axis`` (constant along the other axes)."""
    x = np.arange(shape[axis]).reshape([-1 if k == axis else 1 for k in range(len(shape))])
    return np.stack([np.broadcast_to(np.where(x < split, a, 0.0), shape) for a in heights]).astype(np.float32)


@pytest.mark.parametrize("shape,axis,spacing", [((6, 16), 1, (2.0, 0.5)), ((3, 16, 4), 1, (1.0, 0.5, 3.0))])
@pytest.mark.parametrize("coupled", [False, True])
def test_tv_matches_the_1d_rof_closed_form_of_a_step(shape, axis, spacing, coupled):
    """ROF of a step of height a on n1 + n2 samples: the plateaus move by weight/(h n1) and weight/(h n2)
    (or merge into the mean when the jump is smaller than the sum); the vectorial TV moves the jump vector
    along itself by the same amounts."""
    d = len(shape)
    heights = (1.0, -0.6, 0.25)[:d]
    n = shape[axis]
    n1, n2 = 6, n - 6
    weight = 1.5
    h = spacing[axis]
    u = _step_field(shape, axis, n1, heights)
    den = denoisers.TV(n_iter=3000, coupled=coupled, spacing=spacing)
    v = den(u, weight)
    left, right = weight / (h * n1), weight / (h * n2)
    a = np.asarray(heights)
    if coupled:
        direction = a / np.linalg.norm(a)
        assert np.linalg.norm(a) > left + right
        lo, hi = direction * right, a - direction * left
    else:
        survive = np.abs(a) > left + right
        assert survive.any() and not survive.all()  # one component keeps its jump, one is flattened
        lo = np.where(survive, np.sign(a) * right, a * n1 / n)
        hi = np.where(survive, a - np.sign(a) * left, a * n1 / n)
    want = np.stack([np.broadcast_to(np.where(
        np.arange(n).reshape([-1 if k == axis else 1 for k in range(d)]) < n1, hi[c], lo[c]), shape) for c in range(d)])
    np.testing.assert_allclose(v, want, rtol=0, atol=2e-4)


@pytest.mark.parametrize("coupled,alpha,spacing", [(False, 0.0, None), (True, 0.0, None), (False, 0.1, (1.0, 2.5)), (True, 0.1, (1.0, 2.5))])
def test_tv_family_reaches_the_rof_minimiser(coupled, alpha, spacing):
    """Many dual steps: a vanishing duality gap, and no perturbation of v lowers the primal objective."""
    rng = np.random.default_rng(5)
    u = rng.standard_normal((2, 16, 16)).astype(np.float32)
    weight = 0.8
    h = spacing or (1.0, 1.0)
    den = denoisers.Huber(alpha, n_iter=2000, coupled=coupled, spacing=spacing) if alpha else denoisers.TV(2000, coupled=coupled, spacing=spacing)
    v = den(u, weight).astype(np.float64)
    u64 = u.astype(np.float64)
    primal = _tv_primal(v, u64, weight, h, coupled, alpha)
    dual = _tv_dual(den._p, u64, weight, h, alpha)
    assert dual <= primal + 1e-6 * abs(primal)  # weak duality (p is feasible)
    assert primal - dual < 2e-4 * abs(primal), (primal, dual)
    for k in range(20):
        delta = rng.standard_normal(v.shape) * (1e-2 if k % 2 else 1e-3)
        assert primal <= _tv_primal(v + delta, u64, weight, h, coupled, alpha) + 1e-7 * abs(primal)
    # the untouched input is far worse; a second call continues from the kept dual and only improves
    assert _tv_primal(u64, u64, weight, h, coupled, alpha) > primal + 1.0
    v2 = den(u, weight).astype(np.float64)
    assert _tv_primal(v2, u64, weight, h, coupled, alpha) <= primal + 1e-6 * abs(primal)
    np.testing.assert_allclose(v2, v, atol=2e-3)


@pytest.mark.parametrize("shape,spacing", [((20, 17), None), ((20, 17), (1.0, 2.5)), ((7, 8, 9), (2.0, 1.0, 1.0))])
def test_quadratic_solves_the_screened_poisson_equation(shape, spacing):
    rng = np.random.default_rng(6)
    d = len(shape)
    u = rng.standard_normal((d, *shape))
    weight = 2.0
    den = denoisers.Quadratic(n_iter=500, spacing=spacing, tol=1e-12)
    v = den(u, weight)
    h = spacing or (1.0,) * d
    residual = v - weight * laplacian(v, d, h) - u
    assert np.linalg.norm(residual) <= 1e-10 * np.linalg.norm(u)
    # the minimiser of |grad v|^2/2 + |v - u|^2/(2 weight): the gradient of that objective vanishes too
    assert not np.allclose(v, u)
    # warm start: a second call with the same u returns the solution at once
    np.testing.assert_allclose(den(u, weight), v, atol=1e-12)


def _tgv_parts(v, w, h, eps=0.0):
    """Residual ``g = grad v - w``, ``e = E(w)`` and their norms (``|e|`` with off-diagonals twice), smoothed by ``eps``."""
    ndim = v.ndim - 1
    g = forward_difference(v, ndim, h) - w
    e = denoisers.symmetrised_gradient(w, ndim, h)
    weight = np.array([1.0] * ndim + [2.0] * (ndim * (ndim - 1) // 2)).reshape((-1,) + (1,) * ndim)
    ng = np.sqrt(np.sum(g * g, axis=1) + eps**2)
    ne = np.sqrt(np.sum(weight * e * e, axis=1) + eps**2)
    return g, e, ng, ne


def _tgv_primal(v, w, u, weight, beta, h, eps=0.0):
    """``sum_c |grad v_c - w_c| + beta |E(w_c)| + |v - u|^2 / (2 weight)``."""
    _, _, ng, ne = _tgv_parts(v, w, h, eps)
    return ng.sum() + beta * ne.sum() + np.sum((v - u) ** 2) / (2 * weight)


@pytest.mark.parametrize("spacing", [None, (1.0, 2.0)])
def test_tgv_reaches_the_brute_force_minimiser(spacing):
    """Many primal-dual steps reach the minimum that L-BFGS finds on the smoothed objective, and no perturbation lowers it."""
    rng = np.random.default_rng(8)
    d, shape, weight, beta = 2, (7, 6), 0.7, 1.5
    h = spacing or (1.0, 1.0)
    u = rng.standard_normal((d, *shape)) * 1.5
    den = denoisers.TGV(beta, n_iter=20000, spacing=spacing)
    v = den(u, weight)
    w = den._state["w"]
    got = _tgv_primal(v, w, u, weight, beta, h)

    nv = u.size
    eps = 1e-4

    def smoothed(x):
        vv, ww = x[:nv].reshape(u.shape), x[nv:].reshape(w.shape)
        g, e, ng, ne = _tgv_parts(vv, ww, h, eps)
        f = ng.sum() + beta * ne.sum() + np.sum((vv - u) ** 2) / (2 * weight)
        gn = g / ng[:, None]
        grad_v = -divergence(gn, 2, h) + (vv - u) / weight
        grad_w = -gn - beta * denoisers.symmetrised_divergence(e / ne[:, None], 2, h)
        return f, np.concatenate([grad_v.ravel(), grad_w.ravel()])

    x0 = np.concatenate([u.ravel(), np.zeros(w.size)])
    res = minimize(smoothed, x0, jac=True, method="L-BFGS-B", options=dict(maxiter=5000, maxfun=10000, ftol=1e-15, gtol=1e-9))
    brute = _tgv_primal(res.x[:nv].reshape(u.shape), res.x[nv:].reshape(w.shape), u, weight, beta, h)
    assert got <= brute + 1e-5 * abs(brute), (got, brute)
    assert brute <= got + 1e-3 * abs(got), (got, brute)  # the brute force found the same minimum
    assert _tgv_primal(u, np.zeros_like(w), u, weight, beta, h) > got + 1.0
    for k in range(20):
        dv = rng.standard_normal(v.shape) * (1e-2 if k % 2 else 1e-3)
        dw = rng.standard_normal(w.shape) * (1e-2 if k % 2 else 1e-3)
        assert got <= _tgv_primal(v + dv, w + dw, u, weight, beta, h) + 1e-7 * abs(got)


def test_symmetrised_gradient_of_a_linear_field():
    """``E(w) = (grad w + grad w^T) / 2``: constant for a linear ``w``, stored as diagonal then off-diagonal entries."""
    z, y, x = np.mgrid[0:6, 0:7, 0:8].astype(np.float64)
    h = (2.0, 1.0, 0.5)
    A = np.array([[0.3, -0.2, 0.5], [0.7, 0.1, -0.4], [0.2, 0.6, -0.3]])  # w_j = sum_k A[j, k] * (coordinate k in units of h)
    coords = (z * h[0], y * h[1], x * h[2])
    w = np.stack([sum(A[j, k] * coords[k] for k in range(3)) for j in range(3)])
    e = denoisers.symmetrised_gradient(w, 3, h)[:, :-1, :-1, :-1]  # forward differences vanish on the far faces
    want = [A[0, 0], A[1, 1], A[2, 2], (A[0, 1] + A[1, 0]) / 2, (A[0, 2] + A[2, 0]) / 2, (A[1, 2] + A[2, 1]) / 2]
    for got, expected in zip(e, want):
        np.testing.assert_allclose(got, expected, atol=1e-12)


def test_tgv_keeps_an_affine_field_that_tv_flattens():
    """An affine displacement has no second derivative: TGV returns it nearly untouched, TV shrinks its slopes."""
    y, x = np.mgrid[0:24, 0:20].astype(np.float64)
    u = np.stack([0.1 * y + 0.05 * x + 1.0, -0.2 * x + 0.03 * y])
    v_tgv = denoisers.TGV(2.0, n_iter=3000)(u, 0.5)
    v_tv = denoisers.TV(3000)(u, 0.5)
    err_tgv, err_tv = np.abs(v_tgv - u).max(), np.abs(v_tv - u).max()
    assert err_tgv < 0.03 and err_tv > 0.3, (err_tgv, err_tv)
    # the slopes inside: exact for TGV up to a border effect of the Neumann differences
    inner = (slice(None), slice(4, -4), slice(4, -4))
    np.testing.assert_allclose(np.gradient(v_tgv, axis=1)[inner], np.gradient(u, axis=1)[inner], atol=5e-3)


def test_huber_with_a_large_alpha_is_the_quadratic_denoiser():
    """H_alpha(t) = t^2/(2 alpha) when every |grad v| <= alpha: Huber(weight) = Quadratic(weight / alpha)."""
    rng = np.random.default_rng(7)
    u = rng.random((2, 18, 15)).astype(np.float32)
    alpha, weight = 10.0, 20.0
    v_huber = denoisers.Huber(alpha, n_iter=600)(u, weight)
    v_quad = denoisers.Quadratic(n_iter=300, tol=1e-10)(u.astype(np.float64), weight / alpha)
    assert np.abs(forward_difference(v_quad, 2)).max() < alpha
    np.testing.assert_allclose(v_huber, v_quad, rtol=0, atol=1e-4)
    # a TV of the same weight is a different (piecewise-flat) answer
    assert np.abs(denoisers.TV(600)(u, weight) - v_quad).max() > 1e-2
