"""Train the 2-D VR-Net from Python: the API behind `varreg train` (docs/vrnet.md).

A smoke configuration (tiny network, the first 3 train and 2 val patients, 20 steps;
~1.4 s a step on one thread):

    python examples/train_vrnet.py ../shared/data/acdc /tmp/vrnet-smoke

Re-running it resumes from /tmp/vrnet-smoke/last.pt. Real runs (the paper's, the
shipped checkpoint's) are `varreg train` commands: see `varreg train --help`.
"""
import sys

from varreg_learned import LossConfig, VRNetConfig, load_checkpoint
from varreg_learned.train import TrainConfig, train

data = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/acdc"
out = sys.argv[2] if len(sys.argv) > 2 else "/tmp/vrnet-smoke"

model_cfg = VRNetConfig(ndim=2, data_term="l1", n_warps=3, n_iters=2, width=4, depth=3)  # R-L1-3x2, tiny U-Nets
loss_cfg = LossConfig(similarity="l1", alpha=0.05)  # the unsupervised loss, paper eq. (8)
run_cfg = TrainConfig(data=data, out=out, steps=20, batch_size=4, size=(192, 192), lr=1e-4, seed=0,
                      val_every=10, max_patients=3, val_max_patients=2, threads=1, device="cpu")

summary = train(run_cfg, model_cfg, loss_cfg)  # writes out/last.pt, out/best.pt, out/log.jsonl; resumes
print(f"step {summary['step']}, {summary['s_per_step']:.2f} s/step, best at step {summary['best_step']}")

model, meta = load_checkpoint(f"{out}/best.pt", ndim=2)  # for varreg_learned.register_learned or the CLI
print(f"best.pt: val mean Dice {meta['val']['dice_mean']:.3f} over {meta['val']['n_pairs']} pairs")
