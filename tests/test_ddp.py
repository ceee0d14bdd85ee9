"""Data-parallel VR-Net training (DDP, gloo on the CPU): the same gradients, runs and resumes as one process.

Each test that starts processes pays their start (torch imported in each: a few
seconds), so there are three launches in all: the gradients of one step, a
2-process run through ``varreg train --nproc 2`` resumed under ``torchrun``, and
an input error inside the ranks.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

from click.testing import CliRunner  # noqa: E402

from varreg_cli.main import main  # noqa: E402
from varreg_learned import LossConfig, VRNetConfig, read_checkpoint  # noqa: E402
from varreg_learned.train import (_forward_backward, _launch, _process_group, _share, _wrap, _World,  # noqa: E402
                                  check_world)

from test_cli_train import make_acdc, one_error_line  # noqa: E402  (the fake ACDC folder of the CLI tests)

MODEL = VRNetConfig(ndim=2, width=3, depth=1, n_warps=2, n_iters=1)  # init "unet": 3 U-Nets
#: every loss term on: the label Dice is the one whose normalisation depends on the batch
LOSS = LossConfig(alpha=0.05, ncc_weight=0.5, ncc_window=5, dice_weight=1.0)
TINY = ["--width", "4", "--depth", "2", "--batch-size", "4", "--size", "32,32", "--threads", "1", "--no-progress",
        "--dice-weight", "1", "--ncc-weight", "0.5", "--augment", "--seed", "3"]
ROOT = Path(__file__).resolve().parents[1]


def _batch(n=4, size=(24, 24), seed=0):
    """``n`` pairs whose label maps hold different label sets (so the shares differ in their Dice entry counts)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: size[0], : size[1]]
    fixed, moving, lf, lm = [], [], [], []
    for i in range(n):
        r = np.hypot(yy - 12 - i % 2, xx - 11)
        lab = np.zeros(size, np.int64)
        lab[r < 8] = 2
        lab[r < 5] = 3
        if i == 0:
            lab[(np.abs(xx - 3) < 2) & (lab == 0)] = 1  # only the first pair has label 1
        if i >= 2:
            lab[lab == 2] = 0  # the last pairs lack label 2
        img = np.choose(lab, [0.1, 0.7, 0.35, 0.9]) + 0.05 * rng.standard_normal(size)
        shifted = np.roll(lab, 1 + i % 2, axis=1)
        mov = np.choose(shifted, [0.1, 0.7, 0.35, 0.9]) + 0.05 * rng.standard_normal(size)
        fixed.append(img), moving.append(mov), lf.append(lab), lm.append(shifted)
    t = torch.from_numpy
    return {"fixed": t(np.clip(fixed, 0, 1).astype(np.float32)), "moving": t(np.clip(moving, 0, 1).astype(np.float32)),
            "fixed_labels": t(np.stack(lf)), "moving_labels": t(np.stack(lm))}


def _grads(batch, model_cfg, loss_cfg):
    """One step's gradients (and loss parts) of this process's share; all ranks' gradients for a check."""
    torch.set_num_threads(1)
    with _process_group("cpu") as world:
        return _grads_in(world, batch, model_cfg, loss_cfg)  # the DDP model is gone before the group


def _grads_in(world, batch, model_cfg, loss_cfg):
    from varreg_learned.model import VRNet

    torch.manual_seed(0)
    model = VRNet(model_cfg)
    net = _wrap(model, world, torch.device("cpu"))
    parts = _forward_backward(net, _share(batch, world), loss_cfg, world, "cpu")
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    every = [grads]
    if world.size > 1:
        every = [torch.empty_like(grads) for _ in range(world.size)]
        torch.distributed.all_gather(every, grads)
    return parts, [g.numpy() for g in every]


def test_two_processes_give_the_gradients_of_one():
    batch = _batch()
    parts1, (g1,) = _grads(batch, MODEL, LOSS)
    parts2, g2 = _launch(2, _grads, (batch, MODEL, LOSS))
    assert len(g2) == 2
    np.testing.assert_array_equal(g2[0], g2[1])  # DDP: the same averaged gradients on every rank
    scale = np.abs(g1).max()
    assert scale > 0
    np.testing.assert_allclose(g2[0], g1, rtol=1e-4, atol=1e-5 * scale)
    for k in parts1:  # the logged parts are the global batch's (the ranks' mean)
        assert parts2[k] == pytest.approx(parts1[k], rel=1e-5, abs=1e-7), k


def test_a_plain_mean_of_the_shares_label_dice_would_be_wrong():
    """Why the label term is normalised by the global count: the shares' means do not average to the batch's."""
    from varreg_learned.loss import soft_dice

    b = _batch()
    u = torch.zeros(4, 2, 24, 24, requires_grad=True)
    u2 = u + 0.3 * torch.sin(torch.arange(24.0) / 3)  # a field that moves the labels
    whole = soft_dice(b["fixed_labels"], b["moving_labels"], u2, 2).detach()
    halves = [soft_dice(b["fixed_labels"][s], b["moving_labels"][s], u2[s], 2).detach()
              for s in (slice(0, 2), slice(2, 4))]
    assert abs(float(whole) - float(sum(halves) / 2)) > 1e-3


def test_the_global_batch_must_split_evenly():
    check_world(8, 2)
    check_world(8, 1)
    for batch, n, words in ((8, 0, "at least 1"), (2, 4, "more processes"), (9, 2, "not divisible")):
        with pytest.raises(ValueError, match=words):
            check_world(batch, n)
    assert _share({"a": torch.arange(6)}, _World(rank=1, size=3, grouped=True))["a"].tolist() == [2, 3]


def _state(path):
    return read_checkpoint(path)["state_dict"]


def test_nproc_run_resumed_under_torchrun_matches_one_process(tmp_path):
    """2 steps with ``--nproc 2``, resumed to 4 by ``torchrun --standalone --nproc_per_node 2 -m varreg_cli.main train``
    (the documented entry), against 4 uninterrupted steps of one process: the same log and weights."""
    data = make_acdc(tmp_path / "acdc")
    common = ["--data", data, "--val-every", "2", "--save-every", "2", *TINY]
    one = tmp_path / "one"
    res = CliRunner().invoke(main, [str(a) for a in ["train", "-o", one, "--steps", "4", *common]])
    assert res.exit_code == 0, res.output

    two = tmp_path / "two"
    res = CliRunner().invoke(main, [str(a) for a in ["train", "-o", two, "--steps", "2", "--nproc", "2", *common]])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "2 processes x 1 threads, 2 pairs each" in res.stdout and "in 2 processes" in res.stdout
    assert res.stdout.count("train: 2 patients") == 1  # rank 0 alone reports
    assert sorted(os.listdir(two)) == ["best.pt", "last.pt", "log.jsonl"]
    meta = read_checkpoint(two / "last.pt")["meta"]["train"]
    assert meta["nproc"] == 2 and meta["batch_size"] == 4

    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen([*launcher, "--standalone", "--nproc_per_node", "2", "-m", "varreg_cli.main", "train",
                             "-o", str(two), "--steps", "4", *map(str, common)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # torchrun and its workers (their own session)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"torchrun timed out\n{stdout}\n{stderr}") from None
    assert proc.returncode == 0, stdout + stderr
    lines = stdout.splitlines()
    resumed = [line for line in lines if line.startswith("resumed ")]
    assert len(resumed) == 1 and "at step 2" in resumed[0], stdout  # rank 0 alone prints
    assert sum("best val mean Dice" in line for line in lines) == 1, stdout

    recs1 = [json.loads(line) for line in (one / "log.jsonl").read_text().splitlines()]
    recs2 = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs2] == [1, 2, 3, 4]
    for a, b in zip(recs1, recs2):
        # "lr" too: the rate follows --steps, and the 2-step run's rates are those of the 4-step run's first steps
        for k in ("lr", "total", "sim", "smooth", "ncc", "dice", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4), (a["step"], k)
        if "val" in a:
            assert b["val"]["dice_mean"] == pytest.approx(a["val"]["dice_mean"], abs=1e-4)
    s1, s2 = _state(one / "last.pt"), _state(two / "last.pt")
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-4, atol=1e-6)
    assert read_checkpoint(two / "last.pt")["train_state"]["step"] == 4


def test_an_input_error_inside_the_ranks_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "empty"), "-o", str(tmp_path / "run"),
                                    "--nproc", "2", *TINY])
    one_error_line(res, "no ACDC patients", "patientNNN_ED.nii.gz")
    assert not (tmp_path / "run").exists()
