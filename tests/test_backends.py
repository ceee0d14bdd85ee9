"""One engine, several array backends: array_api_strict and torch agree with NumPy (numba).

``engine.solve`` is run on one pyramid level (the pyramid's smoothing is
backend-specific by design); the warp of every backend follows
one convention (pull-back, linear, border replicated; order 0 rounds half up).
"""
import array_api_strict as xs
import numpy as np
import pytest

from varreg import backend, data_terms, denoisers, engine, resample, synthetic


try:
    import torch
except ImportError:  # the learned extra is optional: the torch cases skip
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch (the learned extra) is not installed")


def _pair(shape, seed=0):
    fixed = synthetic.smooth_random_image(shape, rng=seed)
    truth = synthetic.sinusoidal_displacement(shape, amplitude=1.5)
    return fixed, synthetic.deform(fixed, truth), np.zeros((len(shape), *shape), np.float32)


CASES = [
    ("l1-tv", lambda: data_terms.L1(), lambda: denoisers.TV(3)),
    ("l2-tv-vectorial", lambda: data_terms.L2(), lambda: denoisers.TV(3, coupled=True)),
    ("l1-huber-aniso", lambda: data_terms.L1(), lambda: denoisers.Huber(0.05, 3, spacing=None)),
    ("l1-quadratic", lambda: data_terms.L1(), lambda: denoisers.Quadratic(5)),
    # the robust intensity map carried across the warps (state on the host, whatever the backend)
    ("ncc-tv", lambda: data_terms.NCC(window=9), lambda: denoisers.TV(3)),
]


def _solve(f, m, u, term, den, ndim):
    return engine.solve(f, m, u, data_term=term, denoiser=den, theta=0.3, lam=0.1, n_warps=3, n_iters=4, ndim=ndim)


@needs_torch
@pytest.mark.parametrize("shape", [(40, 36), (12, 14, 10)])
@pytest.mark.parametrize("name,make_term,make_den", CASES, ids=[c[0] for c in CASES])
def test_solve_array_api_strict_and_torch_match_numpy(shape, name, make_term, make_den):
    ndim = len(shape)
    f, m, u = _pair(shape)
    ref = _solve(f, m, u, make_term(), make_den(), ndim)
    assert isinstance(ref, np.ndarray) and ref.dtype == np.float32
    assert np.abs(ref).max() > 0.1  # it moved

    strict = _solve(xs.asarray(f), xs.asarray(m), xs.asarray(u), make_term(), make_den(), ndim)
    assert backend.namespace(strict) is xs and strict.dtype == xs.float32
    np.testing.assert_allclose(np.asarray(strict), ref, rtol=0, atol=1e-4)

    tt = _solve(torch.from_numpy(f), torch.from_numpy(m), torch.from_numpy(u), make_term(), make_den(), ndim)
    assert isinstance(tt, torch.Tensor) and tt.dtype == torch.float32
    np.testing.assert_allclose(tt.numpy(), ref, rtol=0, atol=1e-4)


@needs_torch
@pytest.mark.parametrize("make_term", [data_terms.L1, lambda: data_terms.NCC(window=9)], ids=["l1", "ncc"])
def test_solve_on_batched_torch_tensors_matches_each_item(make_term):
    f, m, u = _pair((32, 28))
    f2, m2, _ = _pair((32, 28), seed=1)
    batch = engine.solve(torch.from_numpy(np.stack([f, f2])), torch.from_numpy(np.stack([m, m2])),
                         torch.from_numpy(np.stack([u, u])), data_term=make_term(), denoiser=denoisers.TV(3),
                         theta=0.3, lam=0.1, n_warps=2, n_iters=3, ndim=2)
    for b, (fb, mb) in enumerate(((f, m), (f2, m2))):
        one = engine.solve(fb, mb, u, data_term=make_term(), denoiser=denoisers.TV(3), theta=0.3, lam=0.1,
                           n_warps=2, n_iters=3, ndim=2)
        np.testing.assert_allclose(batch[b].numpy(), one, rtol=0, atol=1e-4)


def _image_and_displacement(shape, seed, *, half=False):
    rng = np.random.default_rng(seed)
    img = rng.random(shape, dtype=np.float32)
    u = (rng.standard_normal((len(shape), *shape)) * 3).astype(np.float32)
    u[..., :2] *= 10  # some samples far outside the grid
    if half:  # exact half-way coordinates, where the rounding rule matters
        u[..., 2:4] = np.round(u[..., 2:4]) + 0.5
    return img, u


@needs_torch
@pytest.mark.parametrize("shape", [(37, 29), (2, 11), (9, 8, 7)])
def test_warp_numpy_and_torch_agree(shape):
    img, u = _image_and_displacement(shape, seed=len(shape), half=True)
    lin_np = resample.warp(img, u)
    lin_t = resample.warp(torch.from_numpy(img), torch.from_numpy(u))
    assert lin_t.dtype == torch.float32
    np.testing.assert_allclose(lin_t.numpy(), lin_np, rtol=0, atol=1e-5)
    labels = (img * 6).astype(np.uint8)
    near_np = resample.warp(labels, u, order=0)
    near_t = resample.warp(torch.from_numpy(labels), torch.from_numpy(u), order=0)
    assert near_np.dtype == np.uint8 and near_t.dtype == torch.uint8
    np.testing.assert_array_equal(near_t.numpy(), near_np)
    # floating images with order 0 agree exactly as well
    np.testing.assert_array_equal(resample.warp(torch.from_numpy(img), torch.from_numpy(u), order=0).numpy(),
                                  resample.warp(img, u, order=0))


@needs_torch
@pytest.mark.parametrize("shape", [(17, 13), (6, 7, 5)])
def test_batched_torch_warp_equals_per_item_numpy(shape):
    ndim = len(shape)
    rng = np.random.default_rng(3)
    imgs = rng.random((2, 3, *shape), dtype=np.float32)
    us = (rng.standard_normal((2, 3, ndim, *shape)) * 4).astype(np.float32)
    out = resample.warp(torch.from_numpy(imgs), torch.from_numpy(us))
    assert tuple(out.shape) == imgs.shape
    near = resample.warp(torch.from_numpy((imgs * 5).astype(np.int16)), torch.from_numpy(us), order=0)
    for a in range(2):
        for b in range(3):
            np.testing.assert_allclose(out[a, b].numpy(), resample.warp(imgs[a, b], us[a, b]), rtol=0, atol=1e-5)
            np.testing.assert_array_equal(near[a, b].numpy(), resample.warp((imgs[a, b] * 5).astype(np.int16), us[a, b], order=0))
    # batched NumPy and array_api_strict go item by item and agree too
    np.testing.assert_allclose(resample.warp(imgs, us), out.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(resample.warp(xs.asarray(imgs), xs.asarray(us))), out.numpy(), rtol=0, atol=1e-5)


@pytest.mark.skipif(backend.gpu_available(), reason="a usable GPU is present")
def test_resolve_device_without_gpu():
    with pytest.raises(RuntimeError, match=r"device='gpu'.*no GPU is usable.*device='cpu'"):
        backend.resolve_device("gpu")
    assert backend.resolve_device("auto") == "cpu"
    assert backend.resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="device must be one of"):
        backend.resolve_device("cuda")


def _linear_field(shape, coeffs, offset):
    """u_i(x) = offset_i + sum_j coeffs_ij x_j on the grid ``shape``."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    return offset.reshape(-1, *([1] * len(shape))) + np.tensordot(coeffs, grid, axes=1)


@needs_torch
@pytest.mark.parametrize("old,new", [((20, 31), (39, 16)), ((9, 12, 7), (17, 6, 13))])
def test_resize_displacement_of_a_linear_field_is_exact(old, new):
    ndim = len(old)
    rng = np.random.default_rng(ndim)
    coeffs, offset = rng.standard_normal((ndim, ndim)) * 0.2, rng.standard_normal(ndim)
    u = _linear_field(old, coeffs, offset)
    # on the new grid, x_old = x_new (n_old - 1)/(n_new - 1) and voxel values scale by (n_new - 1)/(n_old - 1)
    r = np.array([(o - 1) / (n - 1) for o, n in zip(old, new)])
    want = _linear_field(new, coeffs * r[None, :], offset) / r[:, None].reshape(-1, *([1] * ndim))
    got = resample.resize_displacement(u, new, ndim)
    assert got.shape == (ndim, *new)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    got_t = resample.resize_displacement(torch.from_numpy(u.astype(np.float32)), new, ndim)
    np.testing.assert_allclose(got_t.numpy(), want, rtol=0, atol=1e-4)
    # batched torch
    got_b = resample.resize_displacement(torch.from_numpy(np.stack([u, 2 * u]).astype(np.float32)), new, ndim)
    np.testing.assert_allclose(got_b[1].numpy(), 2 * want, rtol=0, atol=2e-4)
    # the same size is returned untouched
    assert resample.resize_displacement(u, old, ndim) is u


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,new", [((37, 23), (20, 41)), ((2, 31, 17), (50, 9)), ((3, 9, 12, 7), (17, 6, 13)),
                                       ((6, 5), (6, 11))])
def test_resize_equals_scipy_zoom_of_order_one_and_runs_on_array_api_strict(shape, new, dtype):
    """The separable resize is scipy.ndimage.zoom(order=1, grid_mode=False) (corners aligned) on any
    leading axes, keeps the dtype, and is array-API clean."""
    from scipy import ndimage

    ndim = len(new)
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(dtype)
    lead = x.ndim - ndim
    zoom = [1.0] * lead + [n / o for n, o in zip(new, shape[lead:])]
    want = ndimage.zoom(x, zoom, order=1, mode="nearest", grid_mode=False, prefilter=False)
    got = resample.resize(x, new, ndim)
    assert got.shape == want.shape and got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-12)
    got_s = resample.resize(xs.asarray(x), new, ndim)
    assert backend.namespace(got_s) is xs
    np.testing.assert_allclose(np.asarray(got_s), want, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-12)


def test_coarse_to_fine_single_level_runs_on_array_api_strict():
    """The pyramid driver itself is array-API clean (zeros with the input's device); with one level it
    needs no smoothing, which stays NumPy/CuPy/torch only."""
    from varreg.pyramid import coarse_to_fine

    f, m, _ = _pair((24, 20))

    def solve_level(fl, ml, ul, lvl):
        return engine.solve(fl, ml, ul, data_term=data_terms.L1(), denoiser=denoisers.TV(2), theta=0.3, lam=0.1,
                            n_warps=2, n_iters=2, ndim=2)

    ref = coarse_to_fine(f, m, solve_level, shapes=[(24, 20)], ndim=2, scale=0.5)
    got = coarse_to_fine(xs.asarray(f), xs.asarray(m), solve_level, shapes=[(24, 20)], ndim=2, scale=0.5)
    assert backend.namespace(got) is xs and tuple(got.shape) == (2, 24, 20)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-4)
