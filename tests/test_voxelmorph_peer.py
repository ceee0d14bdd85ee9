"""VoxelMorph as a bench peer (varreg_bench/voxelmorph.py): conventions, checkpoint files, the shipped models."""
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("voxelmorph")
pytest.importorskip("safetensors")

import varreg  # noqa: E402
from varreg_bench import voxelmorph as vp  # noqa: E402
from varreg_bench.methods import Method, Unavailable  # noqa: E402

torch.set_num_threads(1)
SMALL = {"nb_features": [4, 4], "integration_steps": 0}
ACDC = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "acdc"


def _image(shape):
    yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
    return (np.exp(-((yy - shape[0] / 2) ** 2 / 60 + (xx - shape[1] / 2.2) ** 2 / 90))
            + 0.3 * np.sin(xx / 5) * np.cos(yy / 7)).astype(np.float32)


def _constant_model(config, d):
    """A VxmPairwise whose output is the constant displacement ``d`` (flow layer: zero weights, bias d)."""
    model = vp.build_model(config)
    with torch.no_grad():
        model.flow_layer.conv0.weight.zero_()
        model.flow_layer.conv0.bias.copy_(torch.tensor(d, dtype=torch.float32))
    return model.eval()


def test_package_convention_is_varregs():
    """The package's warp with a displacement d is varreg.warp with u = d: voxels, axis i, pull-back."""
    H, W = 40, 52
    src = _image((H, W))
    model = vp.build_model(SMALL)
    yy, xx = np.mgrid[:H, :W].astype(np.float32)
    inner = (slice(6, H - 6), slice(6, W - 6))
    # a pure translation by (3, -5) voxels: warped(x) = src(x + (3, -5))
    d = np.stack([np.full((H, W), 3.0), np.full((H, W), -5.0)]).astype(np.float32)
    ws = model.spatial_transformer(torch.from_numpy(src)[None, None], torch.from_numpy(d)[None])[0, 0].numpy()
    expected = np.zeros_like(src)
    expected[:H - 3, 5:] = src[3:, :W - 5]
    np.testing.assert_allclose(ws[inner], expected[inner], atol=1e-5)
    # a smooth non-uniform field: the same as varreg.warp
    u = np.stack([2 * np.sin(yy / 9) * np.cos(xx / 11), 1.5 * np.cos(yy / 13)]).astype(np.float32)
    ws = model.spatial_transformer(torch.from_numpy(src)[None, None], torch.from_numpy(u)[None])[0, 0].numpy()
    np.testing.assert_allclose(ws[inner], np.asarray(varreg.warp(src, u))[inner], atol=1e-5)


def test_register_voxelmorph_translation(tmp_path):
    """A network that outputs (3, -5) registers a pair shifted by (3, -5) through register_voxelmorph,
    on a shape that needs padding; the field comes back in varreg's convention and the input's shape."""
    H, W = 45, 58  # not multiples of 2**2: padded, then cropped back
    big = _image((H + 10, W + 10))
    fixed = big[3:3 + H, 0:W] * 200 + 50  # fixed(x) = moving(x + (3, -5)), any intensity range
    moving = big[0:H, 5:5 + W] * 200 + 50
    path = tmp_path / "const.safetensors"
    vp.save(path, _constant_model(SMALL, (3.0, -5.0)), SMALL, {"steps": 0})
    u = vp.register_voxelmorph(fixed, moving, path)
    assert u.shape == (2, H, W) and u.dtype == np.float32
    np.testing.assert_allclose(u[0], 3.0, atol=1e-6)
    np.testing.assert_allclose(u[1], -5.0, atol=1e-6)
    inner = (slice(0, H - 4), slice(6, W))
    np.testing.assert_allclose(np.asarray(varreg.warp(moving, u))[inner], fixed[inner], rtol=1e-5, atol=1e-3)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = vp.build_model(SMALL)
    path = tmp_path / "m.safetensors"
    vp.save(path, model, SMALL, {"steps": 12, "loss": {"dice_weight": 1.0}})
    assert path.read_bytes()[:8] != b"PK\x03\x04" and not list(tmp_path.glob("*.tmp"))
    back, config, meta = vp.load(path)
    assert config == {**vp.DEFAULT_CONFIG, **SMALL} and meta == {"steps": 12, "loss": {"dice_weight": 1.0}}
    assert not back.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.eval()(x, x), back(x, x))


def test_bad_files_refused(tmp_path):
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a VoxelMorph checkpoint"):
        vp.load(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="format"):
        vp.load(foreign)
    three = tmp_path / "three.safetensors"
    vp.save(three, vp.build_model({**SMALL, "ndim": 3}), {**SMALL, "ndim": 3})
    with pytest.raises(ValueError, match="3-D"):
        vp.load(three)
    wrong = tmp_path / "wrong.safetensors"  # weights of another config under this one's name
    vp.save(wrong, vp.build_model({"nb_features": [4, 8]}), {"nb_features": [4, 8]})
    from safetensors import safe_open
    with safe_open(str(wrong), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        md = dict(f.metadata())
    md["config"] = md["config"].replace("[4, 8]", "[4, 4]")
    save_file(tensors, str(wrong), metadata=md)
    with pytest.raises(ValueError, match="do not fit"):
        vp.load(wrong)
    with pytest.raises(FileNotFoundError):
        vp.load(tmp_path / "absent.safetensors")


def test_methods(tmp_path):
    path = tmp_path / "const.safetensors"
    vp.save(path, _constant_model(SMALL, (0.0, 0.0)), SMALL, {"steps": 3, "loss": {"dice_weight": 0}})
    ms = vp.voxelmorph_methods({"voxelmorph": str(path), "voxelmorph-labels": str(tmp_path / "absent.safetensors")})
    assert [m.name for m in ms] == ["voxelmorph", "voxelmorph-labels"]
    m, missing = ms
    assert isinstance(m, Method) and m.kind == "peer" and m.dims == (2,) and m.devices == ("cpu",)
    assert "3 steps" in m.config
    assert isinstance(missing, Unavailable) and "absent.safetensors" in missing.reason
    f = _image((30, 40))
    u = m.run(f, f, None, "cpu")
    assert u.shape == (2, 30, 40) and u.dtype == np.float32 and not u.any()


@pytest.mark.parametrize("name", ["voxelmorph", "voxelmorph-labels"])
def test_shipped_checkpoint_improves_dice(name):
    ck = Path(vp.CHECKPOINTS[name])
    if not ck.is_file():
        pytest.skip(f"{ck} not shipped")
    if not ACDC.is_dir():
        pytest.skip("no ACDC data in ../shared/data/acdc")
    from varreg import acdc

    pid = acdc.patients(ACDC, "val-test")[0]
    z, f, m, lf, lm = next(iter(acdc.slice_pairs(acdc.load_case(ACDC, pid))))
    u = vp.register_voxelmorph(f, m, ck)
    after = np.mean(list(acdc.score_pair(lf, lm, u)["dice"].values()))
    before = np.mean(list(acdc.score_pair(lf, lm, np.zeros_like(u))["dice"].values()))
    assert u.shape == (2, *f.shape) and after > before + 0.02, (before, after)
