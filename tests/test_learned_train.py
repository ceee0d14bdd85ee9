"""VR-Net training code: cropping, schedule, deterministic batches, and a 3-step resumable run on ACDC."""
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from varreg_learned import VRNetConfig, load_checkpoint  # noqa: E402
from varreg_learned.train import (ACDCSlices, TrainConfig, _Sampler, augment_d4, crop_or_pad, evaluate,  # noqa: E402
                                  load_val_pairs, lr_at, train)

ACDC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "acdc"
needs_acdc = pytest.mark.skipif(not (ACDC / "patient001_ED.nii.gz").exists(), reason="ACDC data not found")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def test_crop_or_pad():
    a = np.arange(10 * 7).reshape(10, 7)
    out = crop_or_pad(a, (5, 3), (4, 9))  # crop rows 3..6, pad columns 1..7
    assert out.shape == (4, 9)
    np.testing.assert_array_equal(out[:, 1:8], a[3:7])
    assert (out[:, 0] == 0).all() and (out[:, 8] == 0).all()
    np.testing.assert_array_equal(crop_or_pad(a, (0, 0), (4, 7)), a[:4])  # clamped at the border
    np.testing.assert_array_equal(crop_or_pad(a, (100, 3), (4, 7)), a[-4:])


def test_schedule_and_sampler():
    cfg = TrainConfig(steps=100, lr=1e-3, lr_decay_start=0.5, lr_final=0.1)
    assert lr_at(0, cfg) == lr_at(49, cfg) == 1e-3
    assert lr_at(100, cfg) == pytest.approx(1e-4) and lr_at(75, cfg) == pytest.approx(5.5e-4)
    s1, s2 = _Sampler(7, 3, seed=4), _Sampler(7, 3, seed=4)
    seen = [i for step in range(7) for i in s1.indices(step)]  # 21 samples = 3 epochs
    assert sorted(seen[:7]) == list(range(7)) and sorted(seen[7:14]) == list(range(7))
    assert s2.indices(5) == s1.indices(5)  # any step, any order: resumable


def test_augment_d4_turns_each_pair_as_one():
    """Every pair gets one of the 8 symmetries of the square, the same for its four maps; seeded."""
    rng = np.random.default_rng(0)
    n = 64
    fixed = torch.from_numpy(rng.random((n, 5, 5), dtype=np.float32))
    batch = {"fixed": fixed, "moving": fixed + 1, "fixed_labels": (fixed * 4).long(), "moving_labels": (fixed * 4).long() + 1}
    out = augment_d4(batch, [3, 7])
    a = fixed.numpy()
    group = [np.flip(m, axes) if axes else m for m in (a, a.transpose(0, 2, 1)) for axes in ((), (1,), (2,), (1, 2))]
    seen = set()
    for i in range(n):
        k = [j for j, g in enumerate(group) if np.array_equal(out["fixed"][i].numpy(), g[i])]
        assert len(k) == 1  # exactly one symmetry (random values: no two coincide)
        seen.add(k[0])
        np.testing.assert_array_equal(out["moving"][i].numpy(), group[k[0]][i] + 1)
        np.testing.assert_array_equal(out["moving_labels"][i] - 1, out["fixed_labels"][i])
        np.testing.assert_array_equal(out["fixed_labels"][i].numpy(), (torch.from_numpy(group[k[0]][i].copy()) * 4).long().numpy())
    assert seen == set(range(8))
    again = augment_d4(batch, [3, 7])
    assert all(torch.equal(again[k], out[k]) for k in out)
    with pytest.raises(ValueError, match="square"):
        augment_d4({"fixed": torch.zeros(2, 4, 6)}, 0)
    with pytest.raises(ValueError, match="square"):
        train(TrainConfig(out=str(Path("never-created")), size=(64, 96), augment=True))


@needs_acdc
@pytest.mark.acdc
def test_dataset_and_resumable_run(tmp_path):
    ds = ACDCSlices(ACDC, "train", (96, 80), max_patients=1)
    assert len(ds) >= 2 and len(ds) % 2 == 0 and ds.patients == ["patient001"]
    b = ds.batch([0, 1])
    assert b["fixed"].shape == (2, 96, 80) and b["moving_labels"].dtype == torch.int64
    assert float(b["fixed"].max()) <= 1.0 and float(b["fixed"].min()) >= 0.0
    assert (b["fixed_labels"] > 0).any()  # the crop follows the heart
    torch.testing.assert_close(ds.batch([1])["fixed"][0], ds.batch([0])["moving"][0])  # both directions

    pairs = load_val_pairs(ACDC, "val", max_pairs=2, max_patients=1)
    assert len(pairs) == 2 and pairs[0][0].ndim == 2
    mcfg = VRNetConfig(width=2, depth=2, n_warps=1, n_iters=1, init="zeros")
    tcfg = TrainConfig(data=str(ACDC), out=str(tmp_path / "run"), steps=2, batch_size=2, size=(64, 64), val_every=2,
                       val_max_pairs=2, val_max_patients=1, max_patients=1, save_every=1, progress=False)
    r = train(tcfg, mcfg, log=lambda *a: None)
    assert r["step"] == 2 and r["best_step"] == 2
    model, meta = load_checkpoint(tmp_path / "run" / "best.pt", ndim=2)
    assert model.config == mcfg and meta["steps"] == 2 and 0 <= meta["val"]["dice_mean"] <= 1
    assert meta["split"]["train_patients"] == 1 and meta["loss"]["alpha"] == 0.05 and meta["versions"]["torch"]
    ev = evaluate(model, pairs)
    assert ev["n_pairs"] == 2 and set(ev) >= {"dice_RV", "dice_Myo", "dice_LV", "dice_mean", "folding_fraction"}

    tcfg.steps = 3  # resume: one more step from last.pt
    r = train(tcfg, mcfg, log=lambda *a: None)
    assert r["step"] == 3
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    with pytest.raises(ValueError, match="different model config"):
        train(tcfg, VRNetConfig(width=3, depth=2, n_warps=1, n_iters=1, init="zeros"), log=lambda *a: None)
