"""VR-Net through the classical entry points: varreg.register(denoiser="unet") and `varreg register --denoiser unet`."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

import varreg
import varreg_learned
from varreg.phantom import demo_pair
from varreg_cli.main import main
from varreg_learned.inference import load_model, register_learned
from varreg_learned.model import UNet, resolve_precision

CKPT = Path(varreg_learned.__file__).parent / "checkpoints" / "vrnet2d_acdc.pt"


def _pair(shape=(48, 40)):
    fixed = np.zeros(shape, np.float32)
    fixed[14:34, 12:30] = 1.0
    return fixed, np.roll(fixed, 2, axis=0)


def test_register_unet_is_vrnet_with_refinement():
    fixed, moving = _pair()
    res = varreg.register(fixed, moving, denoiser="unet", checkpoint=CKPT, refine=2)
    ref = register_learned(fixed, moving, CKPT, refine=2)
    np.testing.assert_allclose(res.displacement, ref.displacement, atol=1e-5)
    assert res.info["method"] == "vrnet" and res.info["refine"] == 2


def test_register_unet_refines_with_the_chosen_denoiser():
    fixed, moving = _pair()
    res = varreg.register(fixed, moving, denoiser="unet", checkpoint=CKPT, refine=2, refine_denoiser="tgv")
    ref = register_learned(fixed, moving, CKPT, refine=2, denoiser="tgv")
    np.testing.assert_allclose(res.displacement, ref.displacement, atol=1e-5)
    assert res.info["refine_options"]["denoiser"] == "tgv"
    default = varreg.register(fixed, moving, denoiser="unet", checkpoint=CKPT, refine=2)
    assert default.info["refine_options"]["denoiser"] == "quadratic"
    assert np.abs(default.displacement - res.displacement).max() > 1e-4  # the choice reaches the warps
    # register_learned's refinement takes the same default
    ref = register_learned(fixed, moving, CKPT, refine=2)
    np.testing.assert_allclose(default.displacement, ref.displacement, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(denoiser="unet"), "needs checkpoint"),
    (dict(denoiser="unet", checkpoint=CKPT, initial=np.zeros((2, 48, 40), np.float32)), "initial= is not taken"),
    (dict(checkpoint=CKPT), "go with denoiser='unet'"),
    (dict(refine=-1), "refine must be a non-negative integer"),
    (dict(refine=1, refine_denoiser="bm3d"), "refine_denoiser must be one of"),
    (dict(precision="bfloat16"), "go with denoiser='unet'"),
    (dict(denoiser="unet", checkpoint=CKPT, precision="float16"), "precision must be one of"),
    (dict(denoiser="unet", checkpoint=CKPT, refine=1, refine_denoiser="bm3d"), "refine_denoiser must be one of"),
])
def test_register_unet_option_errors(kwargs, message):
    fixed, moving = _pair()
    with pytest.raises(ValueError, match=message):
        varreg.register(fixed, moving, **kwargs)


def test_bfloat16_unets_match_float32():
    """bfloat16 U-Nets (autocast) move the phantom's field by a few hundredths of a pixel
    at most; the setting reaches the networks and is undone after the call."""
    pair = demo_pair((96, 96))
    res = {p: varreg.register(pair.fixed, pair.moving, denoiser="unet", checkpoint=CKPT, precision=p)
           for p in ("float32", "bfloat16")}
    a, b = (res[p].displacement for p in ("float32", "bfloat16"))
    diff = np.abs(a - b)
    assert 0 < diff.max() < 0.1 and diff.mean() < 0.01, (diff.max(), diff.mean())
    assert b.dtype == np.float32 and [res[p].info["precision"] for p in res] == ["float32", "bfloat16"]
    model = load_model(CKPT)[0]
    assert all(m.compute_dtype is None for m in model.modules() if isinstance(m, UNet))


def test_resolve_precision():
    assert resolve_precision("float32", "cpu") == "float32"
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"
    assert resolve_precision("auto", "cuda") == "float32"
    assert resolve_precision("auto", "cpu") in ("float32", "bfloat16")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")


def test_register_unet_refuses_3d_with_a_2d_checkpoint():
    vol = np.random.default_rng(0).random((8, 24, 24)).astype(np.float32)
    with pytest.raises(ValueError, match="2-D"):
        varreg.register(vol, vol, denoiser="unet", checkpoint=CKPT)


def test_cli_register_slices_with_unet(tmp_path):
    fixed, moving = _pair()
    stack = lambda a: np.repeat(a[..., None], 3, axis=2)  # noqa: E731  (H, W, slices)
    for name, arr in (("f", stack(fixed)), ("m", stack(moving))):
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o", str(out),
                                  "--slices", "--denoiser", "unet", "--ckpt", str(CKPT), "--quiet"])
    assert r.exit_code == 0, r.output
    assert (out / "warped.nii.gz").is_file() and (out / "displacement.nii.gz").is_file()
    r = CliRunner().invoke(main, ["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o",
                                  str(tmp_path / "o2"), "--denoiser", "unet"])
    assert r.exit_code == 2 and "needs --ckpt" in r.output
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").iterdir())
    # --refine-denoiser: runs with --refine, and is refused without it or with an unknown name
    base = ["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "--slices", "--denoiser", "unet",
            "--ckpt", str(CKPT), "--quiet", "-o"]
    r = CliRunner().invoke(main, base + [str(tmp_path / "o3"), "--refine", "1", "--refine-denoiser", "tgv"])
    assert r.exit_code == 0, r.output
    for extra, message in ((["--refine-denoiser", "tgv"], "give --refine N too"),
                           (["--refine", "2,3"], "takes one count N"),
                           (["--refine", "1", "--refine-denoiser", "bm3d"], "unknown denoiser 'bm3d'"),
                           (["--precision", "fp16"], "'fp16' is not one of")):
        r = CliRunner().invoke(main, base + [str(tmp_path / "o4"), *extra])
        assert r.exit_code == 2 and message in r.output, r.output
        assert not (tmp_path / "o4").exists()
    # --precision runs with the network and names itself when given without it
    r = CliRunner().invoke(main, base + [str(tmp_path / "o5"), "--precision", "float32"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "--slices",
                                  "--precision", "bfloat16", "-o", str(tmp_path / "o6")])
    assert r.exit_code == 2 and "--precision: " in r.output and "go with --denoiser unet" in r.output, r.output
