"""Train the 2-D VR-Net on ACDC (ES->ED and ED->ES slices of the train split), resumable.

The full run (the paper's ACDC setting: R-L1-3x2, batch 10, alpha 0.05, Adam 1e-4,
20000 steps with the rate decaying after half):

    python examples/train_vrnet.py --out runs/vrnet2d --steps 20000 --batch-size 10 --threads 2

Re-running the same command resumes from runs/vrnet2d/last.pt. The checkpoint to ship
is runs/vrnet2d/best.pt (best validation mean Dice, no optimizer state):

    from varreg_learned import register_learned
    res = register_learned(fixed, moving, "runs/vrnet2d/best.pt", refine=0)

Smoke run (tiny network, three patients, a few seconds per step on one thread):

    python examples/train_vrnet.py --out /tmp/vrnet-smoke --steps 20 --batch-size 4 --width 4 \
        --max-patients 3 --val-every 10 --val-max-patients 2 --threads 1

Time per step at a given size, without data or output (for planning a run):

    python examples/train_vrnet.py --benchmark 10 --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "acdc"), help="ACDC folder (varreg.acdc layout)")
    g.add_argument("--out", default="runs/vrnet2d", help="output folder: last.pt, best.pt, log.jsonl")
    g.add_argument("--steps", type=int, default=20000)
    g.add_argument("--batch-size", type=int, default=10)
    g.add_argument("--size", type=int, nargs=2, default=(192, 192), metavar=("H", "W"), help="training crop")
    g.add_argument("--slices", choices=("any", "all3"), default="any",
                   help="train slices: labels present in both phases (any) or LV, Myo and RV in both (all3)")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--lr-decay-start", type=float, default=0.5, help="fraction of the steps before the rate decays")
    g.add_argument("--lr-final", type=float, default=0.1, help="final rate as a fraction of --lr")
    g.add_argument("--grad-clip", type=float, default=10.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--val-every", type=int, default=500, help="validate (val split, 2D protocol) every N steps; 0: never")
    g.add_argument("--val-max-pairs", type=int, default=None, help="evenly spaced subset of the val pairs")
    g.add_argument("--save-every", type=int, default=100)
    g.add_argument("--device", default="cpu", help="torch device: cpu, cuda")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--max-patients", type=int, default=None, help="use only the first N train patients (smoke runs)")
    g.add_argument("--val-max-patients", type=int, default=None, help="use only the first N val patients (smoke runs)")
    g.add_argument("--no-resume", action="store_true", help="refuse to start if OUT/last.pt exists")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--benchmark", type=int, default=0, metavar="N", help="only time N training steps on synthetic data")
    m = p.add_argument_group("model")
    m.add_argument("--data-term", choices=("l1", "l2"), default="l1")
    m.add_argument("--n-warps", type=int, default=3)
    m.add_argument("--n-iters", type=int, default=2)
    m.add_argument("--shared", action="store_true", help="Theta1: one U-Net and theta for all cascades")
    m.add_argument("--width", type=int, default=16)
    m.add_argument("--depth", type=int, default=3)
    m.add_argument("--no-residual", action="store_true")
    m.add_argument("--no-condition", action="store_true", help="denoisers see the displacement only (as in the paper)")
    m.add_argument("--init", choices=("zeros", "noise", "unet"), default="unet")
    m.add_argument("--theta", type=float, default=None, help="initial theta (default per data term)")
    m.add_argument("--lam", type=float, default=None)
    m.add_argument("--levels", type=int, default=1)
    lo = p.add_argument_group("loss")
    lo.add_argument("--similarity", choices=("l1", "mse"), default="l1")
    lo.add_argument("--alpha", type=float, default=0.05)
    lo.add_argument("--ncc-weight", type=float, default=0.0)
    lo.add_argument("--dice-weight", type=float, default=0.0)
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    import torch

    from varreg_learned import LossConfig, VRNetConfig
    from varreg_learned.train import TrainConfig, time_steps, train

    mcfg = VRNetConfig(ndim=2, data_term=a.data_term, n_warps=a.n_warps, n_iters=a.n_iters, shared=a.shared,
                       width=a.width, depth=a.depth, residual=not a.no_residual, condition=not a.no_condition,
                       init=a.init, theta_init=a.theta, lam=a.lam, levels=a.levels)
    lcfg = LossConfig(similarity=a.similarity, alpha=a.alpha, ncc_weight=a.ncc_weight, dice_weight=a.dice_weight)
    if a.benchmark:
        s = time_steps(mcfg, lcfg, batch_size=a.batch_size, size=tuple(a.size), n=a.benchmark, threads=a.threads,
                       device=a.device)
        print(f"{s:.3f} s/step (batch {a.batch_size}, {a.size[0]}x{a.size[1]}, width {a.width}, depth {a.depth}, "
              f"{a.n_warps}x{a.n_iters} cascades, threads {torch.get_num_threads()}, {a.device}); "
              f"{a.steps} steps ~ {s * a.steps / 3600:.1f} h")
        return 0
    if a.no_resume and (Path(a.out) / "last.pt").exists():
        print(f"{a.out}/last.pt exists and --no-resume was given", file=sys.stderr)
        return 2
    tcfg = TrainConfig(data=a.data, out=a.out, steps=a.steps, batch_size=a.batch_size, size=tuple(a.size),
                       slices=a.slices, lr=a.lr, lr_decay_start=a.lr_decay_start, lr_final=a.lr_final,
                       grad_clip=a.grad_clip, seed=a.seed, val_every=a.val_every, val_max_pairs=a.val_max_pairs,
                       save_every=a.save_every, device=a.device, threads=a.threads, max_patients=a.max_patients,
                       val_max_patients=a.val_max_patients,
                       progress=not a.no_progress)
    summary = train(tcfg, mcfg, lcfg)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
