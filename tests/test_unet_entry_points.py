"""VR-Net through the command line (`varreg register --denoiser unet --ckpt F`) and register_learned's options."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")  # VR-Net: the learned extra

import varreg
import varreg_learned
from varreg.phantom import demo_pair
from varreg_cli.main import main
from varreg_learned.inference import load_model, register_learned
from varreg_learned.model import UNet, resolve_precision
from varreg_learned.options import VRNetOptions

CKPT = Path(varreg_learned.__file__).parent / "checkpoints" / "vrnet2d_acdc.pt"


def _pair(shape=(48, 40)):
    fixed = np.zeros(shape, np.float32)
    fixed[14:34, 12:30] = 1.0
    return fixed, np.roll(fixed, 2, axis=0)


def test_varreg_does_not_know_vrnet():
    """The classical package names VR-Net only to say where it lives; the command line selects it."""
    fixed, moving = _pair()
    with pytest.raises(ValueError, match="denoiser 'unet' is VR-Net, which lives in varreg_learned"):
        varreg.register(fixed, moving, denoiser="unet")
    with pytest.raises(TypeError, match="unknown solver option"):
        varreg.register(fixed, moving, checkpoint=CKPT)


def test_cli_method_is_register_learned_with_post_warps():
    """--denoiser unet --ckpt F --post-warps N is register_learned with the checkpoint bound."""
    from varreg_cli.options import method_from_flags

    fixed, moving = _pair()
    method, _ = method_from_flags(dict(denoiser="unet", checkpoint=str(CKPT), post_warps=2))
    res = method(fixed, moving, spacing=None, initial=None)
    ref = register_learned(fixed, moving, CKPT, post_warps=2)
    np.testing.assert_array_equal(res.displacement, ref.displacement)
    assert res.info["method"] == "vrnet" and res.info["post_warps"] == 2


def test_post_warps_use_the_chosen_denoiser():
    fixed, moving = _pair()
    tgv = register_learned(fixed, moving, CKPT, post_warps=2, post_denoiser="tgv")
    default = register_learned(fixed, moving, CKPT, post_warps=2)
    assert tgv.info["post_options"]["denoiser"] == "tgv"
    assert default.info["post_options"]["denoiser"] == "quadratic" == VRNetOptions().post_denoiser
    assert np.abs(default.displacement - tgv.displacement).max() > 1e-4  # the choice reaches the warps
    # the post warps are the classical solver from the network's field: theta and refine_lam of the data term
    alone = register_learned(fixed, moving, CKPT, post_warps=0)
    w = varreg.data_terms.L1.weights
    same = varreg.register(fixed, moving, initial=alone.displacement, levels=1, warps=2, refine=0,
                           denoiser="quadratic", theta=w.theta, lam=w.refine_lam, device="cpu")
    np.testing.assert_array_equal(default.displacement, same.displacement)


@pytest.mark.parametrize("kwargs, message", [
    (dict(initial=np.zeros((2, 48, 40), np.float32)), "initial= is not taken"),
    (dict(post_warps=-1), "post_warps must be a non-negative integer"),
    (dict(post_warps=1, post_denoiser="bm3d"), "post_denoiser must be one of"),
    (dict(precision="float16"), "precision must be one of"),
    (dict(post_lam=0.0), "post_lam must be a positive finite number"),
])
def test_register_learned_option_errors(kwargs, message):
    fixed, moving = _pair()
    with pytest.raises(ValueError, match=message):
        register_learned(fixed, moving, CKPT, **kwargs)


def test_register_learned_needs_an_existing_checkpoint(tmp_path):
    fixed, moving = _pair()
    with pytest.raises(ValueError, match="checkpoint file not found"):
        register_learned(fixed, moving, tmp_path / "missing.pt")


def test_bfloat16_unets_match_float32():
    """bfloat16 U-Nets (autocast) move the phantom's field by a few hundredths of a pixel
    at most; the setting reaches the networks and is undone after the call."""
    pair = demo_pair((96, 96))
    res = {p: register_learned(pair.fixed, pair.moving, CKPT, precision=p) for p in ("float32", "bfloat16")}
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
        register_learned(vol, vol, CKPT)


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
    assert r.exit_code == 2 and "--ckpt: VR-Net needs a checkpoint" in r.output, r.output
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").iterdir())
    # --post-denoiser runs with --post-warps; classical flags are refused with VR-Net, VR-Net flags without it
    base = ["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "--slices", "--denoiser", "unet",
            "--ckpt", str(CKPT), "--quiet", "-o"]
    r = CliRunner().invoke(main, base + [str(tmp_path / "o3"), "--post-warps", "1", "--post-denoiser", "tgv"])
    assert r.exit_code == 0, r.output
    for extra, message in ((["--refine", "2"], "--refine: is a classical solver option; it does not apply to "
                                               "--denoiser unet"),
                           (["--theta", "0.2"], "--theta: is a classical solver option"),
                           (["--initial", "u.nii.gz"], "--initial: goes with the classical solver"),
                           (["--post-warps", "1", "--post-denoiser", "bm3d"], "post_denoiser must be one of"),
                           (["--precision", "fp16"], "'fp16' is not one of")):
        r = CliRunner().invoke(main, base + [str(tmp_path / "o4"), *extra])
        assert r.exit_code == 2 and message in r.output, r.output
        assert not (tmp_path / "o4").exists()
    # --precision runs with the network and names itself when given without it
    r = CliRunner().invoke(main, base + [str(tmp_path / "o5"), "--precision", "float32"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "--slices",
                                  "--precision", "bfloat16", "-o", str(tmp_path / "o6")])
    assert r.exit_code == 2 and "--precision: " in r.output and "goes with --denoiser unet" in r.output, r.output
