"""Train VoxelMorph (``voxelmorph.nn.models.VxmPairwise``, 2-D) on exactly VR-Net's ACDC data and protocol.

Data, batches and loss are VR-Net's (``varreg_learned.train`` / ``.loss``), only the network differs:

* train pairs: ``ACDCSlices(root, "train", (128, 128), slices="any")`` (60 patients, both directions,
  scaled jointly to [0, 1] on the full slice, cropped around the heart);
* batches: ``_Sampler(len(ds), batch, seed)`` (a permutation per epoch), each pair turned by one of the
  8 flips/rotations (``augment_d4(batch, [seed, step])``), torch reseeded every step (``_step_seed``);
* loss: ``vrnet_loss`` with ``LossConfig(similarity="l1", alpha=0.05, dice_weight=...)`` on VoxelMorph's
  displacement (voxels, pull-back: varreg's convention, see ``varreg_bench/voxelmorph.py``);
* Adam (0.9, 0.999), lr 5e-4 held for half of the steps then decayed linearly to 0.1x (``lr_at``),
  gradient clipping 10;
* validation every ``--val-every`` steps on ``load_val_pairs(root, "val-select")`` (full slices, ES
  moving, ED fixed, moving labels warped by nearest neighbour, mean Dice of RV/Myo/LV); the best step
  is kept as ``OUT/best.safetensors`` (the checkpoint to ship).

Resumable: ``OUT/last.pt`` (model, optimizer, step, best; plain containers read back with
``torch.load(weights_only=True)``) is written every ``--save-every`` steps and at every validation;
re-running the same command continues from it.

    python benchmarks/train_voxelmorph.py --data ../shared/data/acdc --out runs/vxm_unsup --steps 8000 \\
        --dice-weight 0 --features 16,32,32,32 --threads 1
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import varreg  # noqa: E402
from varreg import acdc, metrics  # noqa: E402
from varreg_bench import voxelmorph as vxm_peer  # noqa: E402
from varreg_learned.loss import LossConfig, vrnet_loss  # noqa: E402
from varreg_learned.train import (ACDCSlices, TrainConfig, _Sampler, _step_seed, augment_d4,  # noqa: E402
                                  load_val_pairs, lr_at)


def validate(model, config, pairs) -> dict:
    """Mean Dice per structure over ``pairs`` (VR-Net's ``evaluate``, on VoxelMorph's field), and their mean."""
    was = model.training
    model.eval()
    scores = {k: [] for k in acdc.LABELS}
    folds = []
    try:
        for f, m, lf, lm in pairs:
            u = vxm_peer.field(model, config, f, m)
            warped = np.asarray(varreg.warp(lm.astype(np.int64), u, order=0))
            d = metrics.dice(lf, warped, labels=list(acdc.LABELS))
            for k in acdc.LABELS:
                scores[k].append(d[k])
            folds.append(metrics.folding_fraction(u))
    finally:
        model.train(was)
    out = {f"dice_{acdc.LABELS[k]}": float(np.nanmean(v)) for k, v in scores.items()}
    out["dice_mean"] = float(np.mean([out[f"dice_{n}"] for n in acdc.LABELS.values()]))
    out["folding_fraction"] = float(np.mean(folds))
    out["n_pairs"] = len(pairs)
    return out


def _trim_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/acdc")
    ap.add_argument("--out", required=True, help="run folder (runs/... is git-ignored)")
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--size", default="128,128")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--grad-clip", type=float, default=10.0)
    ap.add_argument("--dice-weight", type=float, default=0.0)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--features", default="16,32,32,32", help="VxmPairwise nb_features (encoder; decoder mirrored)")
    ap.add_argument("--integration-steps", type=int, default=0, help="0: plain displacement (VoxelMorph-1/2)")
    ap.add_argument("--val-every", type=int, default=500)
    ap.add_argument("--val-split", default="val-select")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-patients", type=int, default=None, help="limit the train patients (smoke runs)")
    ap.add_argument("--val-max-pairs", type=int, default=None, help="evenly spaced val subset (smoke runs)")
    ap.add_argument("--time-only", type=int, default=0, help="time this many steps, write nothing")
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    size = tuple(int(s) for s in a.size.split(","))
    config = {**vxm_peer.DEFAULT_CONFIG, "nb_features": [int(f) for f in a.features.split(",")],
              "integration_steps": a.integration_steps}
    lcfg = LossConfig(similarity="l1", alpha=a.alpha, dice_weight=a.dice_weight)
    tcfg = TrainConfig(data=a.data, out=a.out, steps=a.steps, batch_size=a.batch_size, size=size, augment=True,
                       lr=a.lr, grad_clip=a.grad_clip, seed=a.seed, val_every=a.val_every, val_split=a.val_split)
    out = Path(a.out)
    last, best = out / "last.pt", out / "best.safetensors"

    torch.manual_seed(a.seed)
    model = vxm_peer.build_model(config)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=a.lr, betas=(0.9, 0.999))
    step, best_dice, best_step, history = 0, -math.inf, None, []
    if not a.time_only and last.exists():
        state = torch.load(last, weights_only=True)
        if state["config"] != config or state["loss"] != lcfg.to_dict():
            raise SystemExit(f"error: {last}: written with config {state['config']} / loss {state['loss']}; "
                             "resume with the same options or use another --out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, best_dice, best_step = int(state["step"]), float(state["best_dice"]), state["best_step"]
        history = json.loads(state["history"])
        print(f"resumed {last} at step {step} (best val dice {best_dice:.4f} at {best_step})", flush=True)
    model.train()

    ds = ACDCSlices(a.data, "train", size, slices="any", max_patients=a.max_patients)
    val_pairs = [] if a.time_only else load_val_pairs(a.data, a.val_split, a.val_max_pairs)
    print(f"train: {len(ds.patients)} patients, {len(ds)} pairs of {size}; val ({a.val_split}): {len(val_pairs)} "
          f"pairs; VoxelMorph {config}: {n_params} parameters; loss {lcfg.to_dict()}; {torch.get_num_threads()} "
          "thread(s)", flush=True)
    sampler = _Sampler(len(ds), a.batch_size, a.seed)
    command = "python " + " ".join(shlex.quote(x) for x in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])

    def meta(val):
        return {"data": "ACDC 2-D ED<->ES short-axis slices (varreg.acdc layout)", "data_root": str(a.data),
                "split": {"train": acdc.split_rule("train"), a.val_split: acdc.split_rule(a.val_split),
                          "train_patients": len(ds.patients), "train_pairs": len(ds), "slices": "any",
                          "directions": "ED->ES and ES->ED", "crop": list(size)},
                "steps": step, "steps_planned": a.steps, "best_step": best_step, "best_dice": best_dice, "val": val,
                "val_history": history, "loss": lcfg.to_dict(), "lr": a.lr, "lr_schedule": "constant, then linear "
                "decay to 0.1x over the second half (varreg_learned.train.lr_at)", "batch_size": a.batch_size,
                "grad_clip": a.grad_clip, "augment": "augment_d4", "seed": a.seed, "parameters": n_params,
                "voxelmorph_version": _version("voxelmorph"), "torch_version": torch.__version__,
                "command": command}

    def save_last():
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "best_dice": best_dice,
                 "best_step": best_step, "history": json.dumps(history), "config": config, "loss": lcfg.to_dict()}
        tmp = last.with_name(last.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(last)

    if not a.time_only:
        out.mkdir(parents=True, exist_ok=True)
        _trim_log(out / "log.jsonl", step)
    logf = None if a.time_only else open(out / "log.jsonl", "a")
    end = min(a.steps, step + a.time_only) if a.time_only else a.steps
    t_run, n_run, t_window, loss_avg = 0.0, 0, [], None
    try:
        while step < end:
            t0 = time.perf_counter()
            b = augment_d4(ds.batch(sampler.indices(step)), [a.seed, step])
            for g in opt.param_groups:
                g["lr"] = lr_at(step, tcfg)
            torch.manual_seed(_step_seed(a.seed, step, 0))
            u = model(b["moving"][:, None], b["fixed"][:, None])  # source = moving, target = fixed
            loss, parts = vrnet_loss(b["fixed"], b["moving"], u, lcfg, fixed_labels=b["fixed_labels"],
                                     moving_labels=b["moving_labels"])
            if not math.isfinite(parts["total"]):
                raise FloatingPointError(f"loss is {parts['total']} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)) if a.grad_clip else None
            opt.step()
            step += 1
            dt = time.perf_counter() - t0
            t_run, n_run = t_run + dt, n_run + 1
            t_window.append(dt)
            loss_avg = parts["total"] if loss_avg is None else 0.95 * loss_avg + 0.05 * parts["total"]
            rec = {"step": step, "lr": lr_at(step - 1, tcfg), "time_s": dt, **parts, "grad_norm": gn}
            if step % a.log_every == 0 or step == end:
                print(f"step {step}/{a.steps}: loss {loss_avg:.4f} (sim {parts['sim']:.4f}, smooth "
                      f"{parts['smooth']:.3f}{', dice %.3f' % parts['dice'] if 'dice' in parts else ''}), "
                      f"{np.mean(t_window):.3f} s/step, lr {rec['lr']:.2e}", flush=True)
                t_window = []
            if a.time_only:
                continue
            if a.val_every and (step % a.val_every == 0 or step == a.steps):
                tv = time.perf_counter()
                val = validate(model, config, val_pairs)
                history.append({"step": step, **val})
                rec["val"] = val
                if val["dice_mean"] > best_dice:
                    best_dice, best_step = val["dice_mean"], step
                    vxm_peer.save(best, model, config, meta(val))
                print(f"step {step}: val dice {val['dice_mean']:.4f} (RV {val['dice_RV']:.3f} Myo "
                      f"{val['dice_Myo']:.3f} LV {val['dice_LV']:.3f}), folding {val['folding_fraction']:.2e}; "
                      f"best {best_dice:.4f} at {best_step} ({time.perf_counter() - tv:.0f} s)", flush=True)
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                save_last()
                continue
            logf.write(json.dumps(rec) + "\n")
            if step % a.save_every == 0 or step == a.steps:
                logf.flush()
                save_last()
    finally:
        if logf is not None:
            logf.close()
    print(f"{n_run} steps in {t_run:.0f} s ({t_run / max(n_run, 1):.3f} s/step)", flush=True)
    if not a.time_only and step >= a.steps:
        if not a.val_every:
            best_step, best_dice = step, float("nan")
            vxm_peer.save(best, model, config, meta(None))
        else:  # rewrite best's record with the whole run (same weights)
            bm, _, bmeta = vxm_peer.load(best)
            rec = meta(bmeta.get("val"))
            vxm_peer.save(best, bm, config, rec)
        print(f"best: step {best_step}, val dice {best_dice:.4f} -> {best}", flush=True)
    return 0


def _version(pkg):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
