"""varreg.register refuses bad input with a message that names the problem, and takes odd-but-valid input."""
import numpy as np
import pytest

import varreg
from varreg import backend, synthetic


@pytest.fixture(scope="module")
def img():
    return synthetic.smooth_random_image((32, 32), rng=0)


def _with(a, index, value):
    a = a.copy()
    a[index] = value
    return a


BAD_PAIRS = [
    ("shapes", lambda f: (f, f[:24]), ValueError, r"differ in shape: \(32, 32\) vs \(24, 32\)"),
    ("1-D", lambda f: (f[0], f[1]), ValueError, r"fixed image has 1 dimension\(s\).*2-D or 3-D"),
    ("4-D", lambda f: (np.ones((6, 6, 6, 6)), np.ones((6, 6, 6, 6))), ValueError, r"4 dimension\(s\).*pick one frame"),
    ("nan fixed", lambda f: (_with(f, (3, 4), np.nan), f), ValueError, r"fixed image contains NaN or Inf"),
    ("nan moving", lambda f: (f, _with(f, (0, 0), np.nan)), ValueError, r"moving image contains NaN or Inf"),
    ("inf", lambda f: (f, _with(f, (5, 5), -np.inf)), ValueError, r"moving image contains NaN or Inf"),
    ("complex", lambda f: (f.astype(np.complex64), f), TypeError, r"fixed image is complex"),
    ("boolean", lambda f: (f, f > 0.5), TypeError, r"moving image is boolean"),
    ("object", lambda f: (f.astype(object), f), TypeError, r"fixed image has dtype object"),
    ("too small", lambda f: (f[:3], f[:3]), ValueError, r"too small: every axis needs at least 4"),
]


@pytest.mark.parametrize("name,make,exc,match", BAD_PAIRS, ids=[b[0] for b in BAD_PAIRS])
def test_register_rejects_bad_pairs(img, name, make, exc, match):
    fixed, moving = make(img)
    with pytest.raises(exc, match=match):
        varreg.register(fixed, moving)


BAD_OPTIONS = [
    (dict(data_term="mind"), ValueError, r"unknown data_term 'mind'; choose one of \['l1', 'l2', 'ncc'\]"),
    (dict(data_term=42), ValueError, r"data_term must be one of \['l1', 'l2', 'ncc'\] or an object"),
    (dict(denoiser="bm3d"), ValueError, r"unknown denoiser 'bm3d'; choose one of"),
    (dict(denoiser=3.0), ValueError, r"denoiser must be a name or a callable"),
    (dict(denoiser="unet"), ValueError, r"denoiser 'unet' is VR-Net, which lives in varreg_learned"),
    (dict(refine_denoiser="bm3d"), ValueError, r"refine_denoiser must be one of"),
    (dict(refine=-1), ValueError, r"refine must be a non-negative integer"),
    (dict(checkpoint="x.pt"), TypeError, r"unknown solver option\(s\) checkpoint"),
    (dict(theta=0), ValueError, r"theta must be a positive finite number, got 0"),
    (dict(theta=-0.5), ValueError, r"theta must be a positive finite number"),
    (dict(theta=float("inf")), ValueError, r"theta must be a positive finite number"),
    (dict(lam=0.0), ValueError, r"lam must be a positive finite number"),
    (dict(lam=-1), ValueError, r"lam must be a positive finite number"),
    (dict(lam=float("nan")), ValueError, r"lam must be a positive finite number"),
    (dict(initial=np.zeros((2, 16, 16))), ValueError, r"initial displacement has shape \(2, 16, 16\); expected \(2, 32, 32\)"),
    (dict(initial=np.zeros((3, 32, 32))), ValueError, r"initial displacement has shape \(3, 32, 32\)"),
    (dict(initial=np.full((2, 32, 32), np.nan)), ValueError, r"initial displacement contains NaN"),
    (dict(warps=0), ValueError, r"warps must be a positive integer"),
    (dict(spacing=(1.0, 0.0)), ValueError, r"spacing must hold 2 positive numbers"),
    (dict(device="cuda"), ValueError, r"device must be one of"),
]


@pytest.mark.parametrize("kw,exc,match", BAD_OPTIONS, ids=[next(iter(b[0])) + "-" + str(i) for i, b in enumerate(BAD_OPTIONS)])
def test_register_rejects_bad_options(img, kw, exc, match):
    with pytest.raises(exc, match=match):
        varreg.register(img, img, **kw)


@pytest.mark.skipif(backend.gpu_available(), reason="a usable GPU is present")
def test_register_device_gpu_without_gpu_is_a_clear_runtime_error(img):
    with pytest.raises(RuntimeError, match=r"device='gpu'.*no GPU is usable"):
        varreg.register(img, img, device="gpu")
    assert varreg.register(img, img, device="auto").info["device"] == "cpu"


@pytest.mark.parametrize("data_term", ["l1", "l2"])
@pytest.mark.parametrize("values", [(0.0, 0.0), (7.0, 3.0)])
def test_constant_images_give_zero_motion_and_no_nan(data_term, values):
    fixed, moving = np.full((24, 20), values[0]), np.full((24, 20), values[1])
    res = varreg.register(fixed, moving, data_term=data_term)
    assert np.isfinite(res.displacement).all() and np.isfinite(res.warped).all()
    assert np.abs(res.displacement).max() == 0.0
    np.testing.assert_array_equal(res.warped, moving)


@pytest.mark.parametrize("dtype,lo,hi", [(np.uint8, 0, 255), (np.int16, -1000, 2000), (np.uint16, 0, 4095)])
@pytest.mark.parametrize("data_term", ["l1", "l2"])
def test_integer_images_register(img, dtype, lo, hi, data_term):
    fixed = (lo + img * (hi - lo)).round().astype(dtype)
    moving = np.roll(fixed, 2, axis=1)  # moving(x + 2 e_1) = fixed(x): u = (0, 2) away from the wrap seam
    res = varreg.register(fixed, moving, data_term=data_term)
    u = res.displacement
    assert u.dtype == np.float32 and np.isfinite(u).all() and np.isfinite(res.warped).all()
    assert res.warped.dtype == np.float32
    inner = u[:, 6:-6, 6:-6]
    assert abs(np.median(inner[1]) - 2.0) < 0.25 and abs(np.median(inner[0])) < 0.25


def test_3d_and_list_input(img):
    vol = synthetic.smooth_random_image((12, 16, 14), rng=1)
    res = varreg.register(vol, vol)
    assert res.displacement.shape == (3, 12, 16, 14) and np.abs(res.displacement).max() < 0.01
    res = varreg.register(img.tolist(), img.tolist())  # nested lists are arrays too
    assert res.displacement.shape == (2, 32, 32)


@pytest.mark.parametrize("shape", [(40, 36), (10, 12, 9)])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
def test_warp_order0_keeps_label_dtype_and_set(shape, dtype):
    rng = np.random.default_rng(0)
    labels = (synthetic.smooth_random_image(shape, rng=rng) * 4.99).astype(dtype)
    u = synthetic.sinusoidal_displacement(shape, amplitude=2.0)
    out = varreg.warp(labels, u, order=0)
    assert out.dtype == dtype and out.shape == labels.shape
    assert set(np.unique(out)) <= set(np.unique(labels))
    assert set(np.unique(out)) == set(np.unique(labels))  # a smooth 2-px motion loses no label
    assert not np.array_equal(out, labels)
    # zero displacement is the identity; order 1 on labels gives float32
    np.testing.assert_array_equal(varreg.warp(labels, np.zeros_like(u), order=0), labels)
    assert varreg.warp(labels, u, order=1).dtype == np.float32
    # boolean masks come back as uint8 0/1
    mask = varreg.warp(labels > 2, u, order=0)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    with pytest.raises(ValueError, match="order must be 0"):
        varreg.warp(labels, u, order=3)
    with pytest.raises(ValueError, match="does not fit image"):
        varreg.warp(labels, u[:, :-1])
