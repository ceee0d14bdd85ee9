"""``varreg train`` on a tiny fake ACDC folder: a run, its checkpoints and log, resuming, clear errors.

The folder is made here (3 patients of 32x32x3, a tiny network), so the module
needs no real data and takes a few seconds on one thread. Without torch only the
checks that need none run (help, the missing-torch message, option parsing).
"""
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from varreg_cli.main import main

try:
    import torch
except ImportError:  # the learned extra is optional
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (the 'learned' extra)")

TINY = ["--width", "4", "--depth", "2", "--batch-size", "2", "--size", "32,32", "--threads", "1", "--no-progress"]
CHECKPOINTS = os.path.join(os.path.dirname(__file__), "..", "varreg_learned", "checkpoints")


def run(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args])
    if ok and res.exit_code != 0:
        raise AssertionError(f"exit {res.exit_code}\nstdout: {res.stdout}\nstderr: {res.stderr}\n{res.exception!r}")
    return res


def one_error_line(res, *words):
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _phase(radius, shift, rng, shape=(32, 32, 3)):
    """An image in [0, 1] and labels 1 RV, 2 Myo, 3 LV: an LV disk of ``radius`` in a ring, an RV blob beside it."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r_lv = np.hypot(yy - 16, xx - 18)
    r_rv = np.hypot(yy - 16, xx - 7 - shift)
    lab2 = np.zeros(shape[:2], np.uint8)
    lab2[r_lv < radius + 2.5] = 2
    lab2[r_lv < radius] = 3
    lab2[(r_rv < 4) & (lab2 == 0)] = 1
    img2 = np.choose(lab2, [0.1, 0.7, 0.35, 0.9]).astype(np.float32)
    img = np.repeat(img2[..., None], shape[2], axis=2) + 0.03 * rng.standard_normal(shape)
    return np.clip(img, 0, 1).astype(np.float32), np.repeat(lab2[..., None], shape[2], axis=2)


def make_acdc(root, numbers=(1, 2, 4), skip=()):
    """An ACDC-layout folder: patientNNN_{ED,ES}[_gt].nii.gz, the ES blob smaller (contraction)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in numbers:
        for phase, radius, shift in (("ED", 7.0, 0), ("ES", 5.0, 1)):
            img, lab = _phase(radius, shift, rng)
            for suffix, arr in ((phase, img), (f"{phase}_gt", lab)):
                name = f"patient{n:03d}_{suffix}.nii.gz"
                if name not in skip:
                    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(root / name))
    return root


def steps_of(log):
    return [json.loads(line)["step"] for line in open(log).read().splitlines()]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """4 steps, validation every 2: the run every test below starts from (copied, never changed)."""
    d = tmp_path_factory.mktemp("train")
    data = make_acdc(d / "acdc")
    out = d / "run"
    res = run("train", "--data", data, "-o", out, "--steps", 4, "--val-every", 2, "--save-every", 2, *TINY)
    return dict(data=data, out=out, res=res)


def copy_run(first_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(first_run["out"], dst)
    return dst


# --------------------------------------------------------------------------- a run and its outputs
@needs_torch
def test_train_writes_checkpoints_and_log(first_run):
    from varreg_learned import VRNetConfig, load_checkpoint, read_checkpoint

    out = first_run["out"]
    assert sorted(os.listdir(out)) == ["best.pt", "last.pt", "log.jsonl"]
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(np.isfinite(r["total"]) for r in recs)
    assert [r["step"] for r in recs if "val" in r] == [2, 4]
    model, meta = load_checkpoint(out / "best.pt", ndim=2)
    assert model.config == VRNetConfig(ndim=2, width=4, depth=2)
    assert meta["train"]["steps"] == 4 and meta["train"]["batch_size"] == 2 and meta["train"]["size"] == [32, 32]
    assert meta["train"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    assert meta["split"]["train_patients"] == 2 and meta["split"]["train_pairs"] == 2 * 3 * 2
    assert meta["best_step"] in (2, 4) and 0 <= meta["val"]["dice_mean"] <= 1 and meta["val"]["n_pairs"] == 3
    assert "train_state" not in read_checkpoint(out / "best.pt")
    assert read_checkpoint(out / "last.pt")["train_state"]["step"] == 4
    stdout = first_run["res"].stdout
    assert "train: 2 patients, 12 pairs" in stdout and "best val mean Dice" in stdout and "best.pt" in stdout


@needs_torch
def test_more_steps_resume(first_run, tmp_path):
    from varreg_learned import read_checkpoint

    out = copy_run(first_run, tmp_path)
    res = run("train", "--data", first_run["data"], "-o", out, "--steps", 6, "--val-every", 2, "--save-every", 2,
              *TINY)
    assert "resumed" in res.stdout and "at step 4" in res.stdout
    assert steps_of(out / "log.jsonl") == [1, 2, 3, 4, 5, 6]
    assert read_checkpoint(out / "last.pt")["train_state"]["step"] == 6


@needs_torch
def test_resume_drops_log_lines_after_the_last_save(first_run, tmp_path):
    out = copy_run(first_run, tmp_path)
    with open(out / "log.jsonl", "a") as fh:  # an interrupted run got past last.pt (step 4) ...
        fh.write(json.dumps({"step": 5, "total": 0.1}) + "\n" + '{"step": 6, "tot')  # ... and was cut mid-line
    run("train", "--data", first_run["data"], "-o", out, "--steps", 5, "--val-every", 0, *TINY)
    assert steps_of(out / "log.jsonl") == [1, 2, 3, 4, 5]


# --------------------------------------------------------------------------- errors: one line, exit 2, nothing written
@needs_torch
def test_missing_and_empty_data_folders(tmp_path):
    out = tmp_path / "run"
    err = one_error_line(run("train", "--data", tmp_path / "nope", "-o", out, *TINY, ok=False), "nope", "no such folder")
    (tmp_path / "empty").mkdir()
    err = one_error_line(run("train", "--data", tmp_path / "empty", "-o", out, *TINY, ok=False),
                         "no ACDC patients", "patientNNN_ED.nii.gz", "patientNNN_ES_gt.nii.gz")
    assert not out.exists(), err


@needs_torch
def test_folders_without_usable_pairs(tmp_path):
    out = tmp_path / "run"
    only_val = make_acdc(tmp_path / "only_val", numbers=(4,))
    one_error_line(run("train", "--data", only_val, "-o", out, *TINY, ok=False),
                   "none of its 1 ACDC patients is in the train split", "% 5 in {1, 2, 3}")
    no_val = make_acdc(tmp_path / "no_val", numbers=(1,))
    one_error_line(run("train", "--data", no_val, "-o", out, *TINY, ok=False),
                   "no validation pair", "% 5 == 4", "--val-every 0")
    partial = make_acdc(tmp_path / "partial", numbers=(1, 4), skip=("patient001_ES_gt.nii.gz",))
    one_error_line(run("train", "--data", partial, "-o", out, *TINY, ok=False), "patient001 lacks patient001_ES_gt.nii.gz")
    broken = make_acdc(tmp_path / "broken", numbers=(1, 4))
    (broken / "patient001_ES.nii.gz").write_bytes(b"not a nifti")
    one_error_line(run("train", "--data", broken, "-o", out, *TINY, ok=False), "cannot read patient001")
    assert not out.exists()


@needs_torch
def test_incompatible_config_on_resume_is_refused(first_run, tmp_path):
    out = copy_run(first_run, tmp_path)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    args = [a if a != "4" else "6" for a in TINY]  # --width 6
    one_error_line(run("train", "--data", first_run["data"], "-o", out, "--steps", 6, *args, ok=False),
                   "different model config", "width 4 there, 6 asked")
    one_error_line(run("train", "--data", first_run["data"], "-o", out, "--steps", 6, "--no-resume", *TINY, ok=False),
                   "last.pt", "--no-resume")
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_torch_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    one_error_line(run("train", "--data", tmp_path, "-o", tmp_path / "run", ok=False),
                   "needs torch", 'pip install "varreg[learned]"')


def test_bad_options(tmp_path):
    one_error_line(run("train", "--data", tmp_path, "-o", tmp_path / "r", "--size", "32", ok=False), "H,W")
    if torch is None:
        return
    one_error_line(run("train", "--data", tmp_path, "-o", tmp_path / "r", "--device", "cuda:x", ok=False), "--device")
    one_error_line(run("train", "-o", tmp_path / "r", ok=False), "--data")
    one_error_line(run("train", "--data", tmp_path, "-o", tmp_path / "r", "--augment", "--size", "128,96", ok=False),
                   "square")
    assert not (tmp_path / "r").exists()


@needs_torch
def test_bad_process_counts(tmp_path, monkeypatch):
    """--nproc: at least 1, at most the global batch, dividing it; under torchrun its WORLD_SIZE (checked first)."""
    base = ["train", "--data", tmp_path, "-o", tmp_path / "r", "--no-progress"]
    one_error_line(run(*base, "--nproc", "0", ok=False), "--nproc")
    one_error_line(run(*base, "--nproc", "3", "--batch-size", "2", ok=False), "--nproc 3", "more processes",
                   "--batch-size 2")
    one_error_line(run(*base, "--nproc", "2", "--batch-size", "5", ok=False), "--batch-size 5", "not divisible",
                   "2 processes", "--batch-size 4 or 6")
    one_error_line(run(*base[:1], "--benchmark", "1", "--nproc", "4", "--batch-size", "6", ok=False), "not divisible")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    one_error_line(run(*base, "--nproc", "3", ok=False), "--nproc 3", "torchrun", "WORLD_SIZE 2")
    one_error_line(run(*base, "--batch-size", "3", ok=False), "--batch-size 3", "2 processes")
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- options, help, benchmark
#: the documented command behind each shipped checkpoint (docs/vrnet.md, `varreg train --help`)
SHIPPED_COMMANDS = {
    "vrnet2d_acdc.pt": "--steps 8000 --batch-size 8 --size 128,128 --width 12 --depth 3 --threads 1 --lr 5e-4 "
                       "--val-every 500 --val-max-pairs 40 --scale 0.5 --dice-weight 1 --augment --device cpu",
    "vrnet2d_acdc_unsupervised.pt": "--steps 3000 --batch-size 8 --size 128,128 --width 8 --depth 3 --threads 2 "
                                    "--lr 5e-4 --val-every 500 --val-max-pairs 40 --scale 0.5 --device cpu",
}


def test_every_shipped_checkpoint_has_its_command():
    assert sorted(f for f in os.listdir(CHECKPOINTS) if f.endswith(".pt")) == sorted(SHIPPED_COMMANDS)


@needs_torch
@pytest.mark.parametrize("name", sorted(SHIPPED_COMMANDS))
def test_shipped_checkpoint_command_gives_its_configuration(name, tmp_path, monkeypatch):
    """The documented `varreg train` command of each shipped checkpoint reproduces the configs stored in it."""
    import varreg_learned.train as T
    from varreg_learned import LossConfig, VRNetConfig, read_checkpoint

    seen = {}

    def fake_train(tcfg, mcfg, lcfg, **kw):
        seen.update(tcfg=tcfg, mcfg=mcfg, lcfg=lcfg, kw=kw)
        return {"step": tcfg.steps, "best_step": None, "best_val": None, "s_per_step": 0.0, "out": tcfg.out}

    monkeypatch.setattr(T, "train", fake_train)
    run("train", "--data", tmp_path, "-o", tmp_path / "runs" / "r", *SHIPPED_COMMANDS[name].split())
    meta = read_checkpoint(os.path.join(CHECKPOINTS, name))
    skip = {"data", "out", "progress"}  # where it ran, and whether a terminal showed the bar
    stored = {k: v for k, v in meta["meta"]["train"].items() if k not in skip}
    asked = {k: v for k, v in seen["tcfg"].to_dict().items() if k not in skip}
    defaults = T.TrainConfig().to_dict()
    # options added after a checkpoint was trained are absent from its record: they must be at their defaults
    assert asked == {**{k: defaults[k] for k in asked if k not in stored}, **stored}
    assert seen["mcfg"] == VRNetConfig.from_dict(meta["config"])
    assert seen["lcfg"] == LossConfig(**meta["meta"]["loss"])
    assert seen["kw"]["resume"] is True


def test_help_is_cheap_and_grouped():
    code = ("import sys; from varreg_cli.main import main; "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
    text = run("train", "--help").stdout
    for word in ("Run options", "Model options (VRNetConfig)", "Loss options (LossConfig)", "--device DEV",
                 "--size H,W", "--no-resume", "--benchmark", "torch.cuda.is_available()"):
        assert word in text, word
    assert "train" in run("--help").stdout


@needs_torch
@pytest.mark.parametrize("extra", [[], ["--dice-weight", "1"]], ids=["unsupervised", "label-term"])
def test_benchmark_writes_nothing(tmp_path, monkeypatch, extra):
    # with the label term the synthetic pairs need labels too (it used to stop with an internal error)
    monkeypatch.chdir(tmp_path)
    res = run("train", "--benchmark", "1", "--steps", "100", "--width", "2", "--depth", "1", "--n-warps", "1",
              "--n-iters", "1", "--batch-size", "1", "--size", "16,16", "--threads", "1", *extra)
    assert res.exit_code == 0, res.output
    assert "s/step" in res.stdout and "100 steps" in res.stdout
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- fine-tuning and the honest val halves
def test_val_halves_split_val_and_are_disjoint():
    from varreg import acdc

    numbers = range(1, 101)
    sel = {n for n in numbers if n % acdc.SPLITS["val-select"][0] in acdc.SPLITS["val-select"][1]}
    test = {n for n in numbers if n % acdc.SPLITS["val-test"][0] in acdc.SPLITS["val-test"][1]}
    val = {n for n in numbers if n % 5 == 4}
    assert sel | test == val and not sel & test and len(sel) == len(test) == 10
    for first in range(1, 101, 20):  # two patients of each pathology group (20 numbers) in each half
        group = set(range(first, first + 20))
        assert len(group & sel) == len(group & test) == 2
    assert acdc.split_rule("val-test") == "patient number % 10 == 9"
    assert acdc.split_rule("train") == "patient number % 5 in {1, 2, 3}"


@needs_torch
def test_from_checkpoint_starts_from_its_weights_and_validates_on_val_select(first_run, tmp_path):
    import torch

    from varreg_learned.checkpoint import load_checkpoint

    data = make_acdc(tmp_path / "acdc", numbers=(1, 4, 9))
    start = first_run["out"] / "best.pt"
    out = tmp_path / "ft"
    res = run("train", "--data", data, "-o", out, "--steps", 1, "--val-every", 1, "--lr", "1e-12",
              "--val-split", "val-select", "--from-checkpoint", start, *TINY)
    assert f"weights from {start}" in res.stdout
    (a, _), (b, meta) = load_checkpoint(start), load_checkpoint(out / "best.pt")
    for k, v in a.state_dict().items():  # one step at a negligible rate: the starting weights
        assert torch.allclose(v, b.state_dict()[k], atol=1e-9), k
    assert meta["split"]["val-select"] == "patient number % 10 == 4"
    assert "val-test" not in meta["split"]


@needs_torch
def test_from_checkpoint_of_another_model_is_refused(first_run, tmp_path):
    out = tmp_path / "ft"
    args = [a if a != "4" else "6" for a in TINY]  # --width 6
    one_error_line(run("train", "--data", first_run["data"], "-o", out, "--steps", 1,
                       "--from-checkpoint", first_run["out"] / "best.pt", *args, ok=False),
                   "--from-checkpoint", "width 4 there, 6 asked")
    assert not out.exists()
