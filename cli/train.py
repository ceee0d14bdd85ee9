"""``varreg train``: train the 2-D VR-Net on a folder of ACDC ED/ES pairs (resumable).

Only click is imported at module level (``varreg --help`` stays quick); torch
and :mod:`varreg_learned.train` (the training loop, written once) are imported
when the command runs.
"""
from __future__ import annotations

import os
import sys
from typing import ClassVar

import click

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=100)
LEARNED_HINT = 'pip install "varreg[learned]"'


class TrainFailure(click.ClickException):
    """A one-line ``error: ...`` with exit code 2 (input problems), as the other commands."""

    exit_code = 2


def _size(ctx, param, value):
    """``H,W`` (or ``HxW``) -> (H, W), as the list options of ``varreg bench``."""
    if value is None:
        return None
    try:
        vals = tuple(int(v) for v in str(value).replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected H,W (two whole numbers separated by a comma), got {value!r}") from None
    if len(vals) != 2 or not all(v >= 8 for v in vals):
        raise click.BadParameter(f"expected H,W: two sizes of at least 8 pixels, got {value!r}")
    return vals


RUN, MODEL, LOSS = "Run options", "Model options (VRNetConfig)", "Loss options (LossConfig)"
_pos_int = click.IntRange(min=1)
_nonneg = click.FloatRange(min=0)


class TrainCommand(click.Command):
    """Shows the options in three sections: run, model, loss (options not listed here are run options)."""

    sections: ClassVar[dict] = {**{n: MODEL for n in ("data_term", "n_warps", "n_iters", "shared", "width", "depth", "no_residual",
                                      "no_condition", "init", "theta", "lam", "levels", "scale")},
                **{n: LOSS for n in ("similarity", "alpha", "ncc_weight", "dice_weight")}}

    def format_options(self, ctx, formatter):
        rows = {RUN: [], MODEL: [], LOSS: []}
        for p in self.get_params(ctx):
            rec = p.get_help_record(ctx)
            if rec is not None:
                rows[self.sections.get(p.name, RUN)].append(rec)
        for title, recs in rows.items():
            if recs:
                with formatter.section(title):
                    formatter.write_dl(recs)


RUN_OPTS = [
    click.option("--data", metavar="DIR", default=None,
                 help="ACDC folder: patientNNN_ED.nii.gz, patientNNN_ES.nii.gz, patientNNN_ED_gt.nii.gz, "
                      "patientNNN_ES_gt.nii.gz per patient (varreg.acdc layout), e.g. ../shared/data/acdc; read in "
                      "place. Train split: patient number % 5 in {1, 2, 3}; val split: % 5 == 4. Required "
                      "(except with --benchmark)."),
    click.option("-o", "--outdir", metavar="OUTDIR", default=None,
                 help="Output folder (created): last.pt, best.pt, log.jsonl. Required (except with --benchmark)."),
    click.option("--steps", type=_pos_int, default=20000, show_default=True, metavar="N",
                 help="Training steps (total, counting the steps of a resumed run)."),
    click.option("--batch-size", type=_pos_int, default=10, show_default=True, metavar="N",
                 help="Slice pairs per step."),
    click.option("--size", callback=_size, default="192,192", show_default=True, metavar="H,W",
                 help="Training crop (pixels): each pair is cropped/padded around the centre of the heart labels."),
    click.option("--slices", type=click.Choice(["any", "all3"]), default="any", show_default=True,
                 help="Train slices: labels present in both phases (any) or LV, Myo and RV in both (all3)."),
    click.option("--augment", is_flag=True,
                 help="Turn each pair by a random one of the 8 flips/rotations of the square crop (needs a square --size)."),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True, metavar="X",
                 help="Adam learning rate."),
    click.option("--lr-decay-start", type=click.FloatRange(0, 1), default=0.5, show_default=True, metavar="F",
                 help="Fraction of the steps before the rate decays (linearly, to --lr-final at the last step)."),
    click.option("--lr-final", type=_nonneg, default=0.1, show_default=True, metavar="F",
                 help="Final rate as a fraction of --lr."),
    click.option("--grad-clip", type=_nonneg, default=10.0, show_default=True, metavar="X",
                 help="Clip the gradient norm at X (0: no clipping)."),
    click.option("--seed", type=int, default=0, show_default=True, metavar="N",
                 help="Seed of the initial weights, the batch order and every step's randomness (a resumed run "
                      "continues the same sequence)."),
    click.option("--val-every", type=click.IntRange(min=0), default=500, show_default=True, metavar="N",
                 help="Validate (val split, the 2-D protocol: mean Dice of RV, Myo, LV) every N steps and at the "
                      "end; the best is kept as best.pt. 0: never (best.pt is then the last weights)."),
    click.option("--val-max-pairs", type=_pos_int, default=None, metavar="N",
                 help="Validate on an evenly spaced subset of N val pairs. Default: all."),
    click.option("--val-split", type=click.Choice(["val", "val-select"]), default="val", show_default=True,
                 help="Patients that validate and pick best.pt: the whole val split, or val-select (patient "
                      "number % 10 == 4), which leaves val-test (% 10 == 9) unseen for reporting."),
    click.option("--from-checkpoint", "from_checkpoint", metavar="CKPT", default=None,
                 help="Fine-tune: start from the weights of CKPT (the model options must be those it was trained "
                      "with) with a fresh Adam state at step 0. Ignored when OUTDIR/last.pt resumes a run."),
    click.option("--save-every", type=_pos_int, default=100, show_default=True, metavar="N",
                 help="Write last.pt (weights and optimizer state) every N steps (and at every validation)."),
    click.option("--device", default="auto", show_default=True, metavar="DEV",
                 help="torch device: auto (cuda when torch.cuda.is_available(), else cpu), cpu, cuda, cuda:N."),
    click.option("--threads", type=_pos_int, default=None, metavar="N",
                 help="torch CPU threads (of each process with --nproc). Default: torch's (all cores); with N "
                      "processes, the cores // N (at least 1)."),
    click.option("--nproc", type=_pos_int, default=None, metavar="N",
                 help="Data-parallel training in N processes (torch DistributedDataParallel; gloo on the CPU, nccl on "
                      "CUDA, one GPU each). --batch-size stays the global batch, split evenly across them (the "
                      "same samples as one process); rank 0 alone logs, validates and writes. Not needed under "
                      "torchrun (its WORLD_SIZE is used). Default: 1."),
    click.option("--max-patients", type=_pos_int, default=None, metavar="N",
                 help="Use only the first N train patients (smoke runs)."),
    click.option("--val-max-patients", type=_pos_int, default=None, metavar="N",
                 help="Use only the first N val patients (smoke runs)."),
    click.option("--no-resume", is_flag=True,
                 help="Refuse to start if OUTDIR/last.pt exists (default: resume from it)."),
    click.option("--no-progress", is_flag=True,
                 help="No progress bar (it is shown, with the running loss, only when stderr is a terminal)."),
    click.option("--benchmark", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
                 help="Only time N training steps on synthetic pairs of --size (no data, nothing written) and "
                      "estimate the time of --steps."),
]
MODEL_OPTS = [
    click.option("--data-term", type=click.Choice(["l1", "l2"]), default="l1", show_default=True,
                 help="Data term of the unrolled solver: l1 (thresholding step) or l2."),
    click.option("--n-warps", type=_pos_int, default=3, show_default=True, metavar="N", help="Cascade warps."),
    click.option("--n-iters", type=_pos_int, default=2, show_default=True, metavar="N",
                 help="Cascade iterations per warp (n-warps x n-iters cascades)."),
    click.option("--shared", is_flag=True, help="Theta1: one U-Net and theta for all cascades (default: one each)."),
    click.option("--width", type=_pos_int, default=16, show_default=True, metavar="N",
                 help="U-Net channels at full resolution."),
    click.option("--depth", type=click.IntRange(0, 6), default=3, show_default=True, metavar="N",
                 help="U-Net downsamplings (2x each)."),
    click.option("--no-residual", is_flag=True, help="Denoisers output v = unet(.) instead of v = u + unet(.)."),
    click.option("--no-condition", is_flag=True, help="Denoisers see the displacement only (as in the paper)."),
    click.option("--init", type=click.Choice(["zeros", "noise", "unet"]), default="unet", show_default=True,
                 help="Initial displacement: zeros, Gaussian noise, or a U-Net on the pair."),
    click.option("--theta", type=click.FloatRange(min=0, min_open=True), default=None, metavar="X",
                 help="Initial theta of every cascade. Default: per data term (varreg_learned.model.INITIAL_WEIGHTS)."),
    click.option("--lam", type=click.FloatRange(min=0, min_open=True), default=None, metavar="X",
                 help="The engine's lambda. Default: per data term (varreg_learned.model.INITIAL_WEIGHTS)."),
    click.option("--levels", type=_pos_int, default=1, show_default=True, metavar="N",
                 help="Pyramid levels (1: full resolution only)."),
    click.option("--scale", type=click.FloatRange(0.1, 1.0), default=1.0, show_default=True, metavar="F",
                 help="Grid of the network relative to the images: the pair is smoothed and shrunk by F, the "
                      "network runs there and its displacement is upsampled (F=0.5: about a quarter of the cost)."),
]
LOSS_OPTS = [
    click.option("--similarity", type=click.Choice(["l1", "mse"]), default="l1", show_default=True,
                 help="Similarity term: mean |warped - fixed| (l1) or mean squared difference."),
    click.option("--alpha", type=_nonneg, default=0.05, show_default=True, metavar="X",
                 help="Weight of the smoothness term mean |grad u|^2."),
    click.option("--ncc-weight", type=_nonneg, default=0.0, show_default=True, metavar="X",
                 help="Weight of (1 - local NCC)."),
    click.option("--dice-weight", type=_nonneg, default=0.0, show_default=True, metavar="X",
                 help="Weight of (1 - soft Dice) of the warped labels."),
]


def _add(opts):
    def deco(f):
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


@click.command(cls=TrainCommand, context_settings=CONTEXT)
@_add(RUN_OPTS)
@_add(MODEL_OPTS)
@_add(LOSS_OPTS)
def train(**opts):
    """Train the 2-D VR-Net on the ACDC ED/ES slice pairs of a folder (Adam, seeded, resumable).

    \b
    # the paper's ACDC run (R-L1-3x2, alpha 0.05, Adam 1e-4 decaying after half)
    varreg train --data ../shared/data/acdc -o runs/vrnet2d --steps 20000 --batch-size 10
    # the run behind the shipped varreg_learned/checkpoints/vrnet2d_acdc.pt (with train labels,
    # augmented; vrnet2d_acdc_unsupervised.pt: width 8, 3000 steps, neither, see docs/vrnet.md)
    varreg train --data ../shared/data/acdc -o runs/vrnet2d_w12 --steps 8000 --batch-size 8 \\
        --size 128,128 --width 12 --depth 3 --threads 1 --lr 5e-4 --val-every 500 \\
        --val-max-pairs 40 --scale 0.5 --dice-weight 1 --augment --device cpu
    # seconds per step at the default size (synthetic pairs, nothing read or written)
    varreg train --benchmark 10 --threads 1
    # data-parallel: 2 processes on one batch of 10 (5 pairs each); or under torchrun
    varreg train --data ../shared/data/acdc -o runs/vrnet2d --batch-size 10 --nproc 2
    torchrun --standalone --nproc_per_node 2 -m varreg_cli.main train --data ../shared/data/acdc -o runs/vrnet2d

    \b
    Train pairs: every slice of the train patients with labels in ED and ES,
    both directions, scaled to [0, 1] and cropped to --size. Writes into OUTDIR:
      last.pt    weights and Adam state (every --save-every steps, at every validation)
      best.pt    the best validation mean Dice (no optimizer state): use it with
                 'varreg register --denoiser unet --ckpt OUTDIR/best.pt'
      log.jsonl  one line per step: loss parts, learning rate, theta, validation scores

    Re-running the same command resumes from OUTDIR/last.pt (the model options
    must match; a larger --steps extends the run, and the learning-rate
    schedule follows the new --steps). Needs torch (pip install "varreg[learned]").
    """
    return _run(opts)


# --------------------------------------------------------------------------- the work (lazy imports)
def _device(torch, name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise TrainFailure(f"--device {name}: not a torch device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainFailure(f"--device {name}: CUDA is not available here (torch {torch.__version__}); "
                           "use --device cpu or auto")
    return name


def _torchrun() -> int:
    """The WORLD_SIZE of the torchrun that started this process, 0 when none did."""
    return int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else 0


def _nproc(torch, o, device: str, check_world) -> int:
    """The number of data-parallel processes, checked against the global batch (before any file is read)."""
    n, world = o["nproc"], _torchrun()
    if world:
        if n is not None and n != world:
            raise TrainFailure(f"--nproc {n}: this process is one of {world} started by torchrun (WORLD_SIZE "
                               f"{world}); leave --nproc out under torchrun")
        n = world
    n = 1 if n is None else n
    try:
        check_world(o["batch_size"], n, flags=True)
    except ValueError as exc:
        raise TrainFailure(str(exc)) from None
    if n > 1 and not world and torch.device(device).type == "cuda" and n > torch.cuda.device_count():
        raise TrainFailure(f"--nproc {n}: only {torch.cuda.device_count()} CUDA device(s) here; on GPUs each "
                           "process needs its own (fewer processes, or --device cpu)")
    return n


def _run(o) -> int:
    try:
        import torch
    except ImportError:
        raise TrainFailure(f"varreg train needs torch, which is not installed: {LEARNED_HINT}") from None
    try:
        from varreg_learned import LossConfig, VRNetConfig
        from varreg_learned.train import TrainConfig, TrainInputError, check_world, threads_per_process, time_steps
        from varreg_learned.train import train as train_loop
    except ImportError as exc:
        raise TrainFailure(f"varreg train cannot import varreg_learned ({exc}): {LEARNED_HINT}") from None

    device = _device(torch, o["device"])
    nproc = _nproc(torch, o, device, check_world)
    lead = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints the summary
    try:
        mcfg = VRNetConfig(ndim=2, data_term=o["data_term"], n_warps=o["n_warps"], n_iters=o["n_iters"],
                           shared=o["shared"], width=o["width"], depth=o["depth"], residual=not o["no_residual"],
                           condition=not o["no_condition"], init=o["init"], theta_init=o["theta"], lam=o["lam"],
                           levels=o["levels"], scale=o["scale"])
        lcfg = LossConfig(similarity=o["similarity"], alpha=o["alpha"], ncc_weight=o["ncc_weight"],
                          dice_weight=o["dice_weight"])
    except ValueError as exc:
        raise TrainFailure(f"model/loss options: {exc}") from None

    size = tuple(o["size"])
    if o["benchmark"]:
        try:
            s = time_steps(mcfg, lcfg, batch_size=o["batch_size"], size=size, n=o["benchmark"], threads=o["threads"],
                           device=device, nproc=1 if _torchrun() else nproc)
        except TrainInputError as exc:
            raise TrainFailure(str(exc)) from None
        world = _torchrun() or nproc
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # the processes sharing this machine's cores
        threads = threads_per_process(local, o["threads"]) or torch.get_num_threads()
        procs = f"{world} processes x {threads} threads" if world > 1 else f"threads {threads}"
        if lead:
            click.echo(f"{s:.3f} s/step (batch {o['batch_size']}, {size[0]}x{size[1]}, width {o['width']}, depth "
                       f"{o['depth']}, {o['n_warps']}x{o['n_iters']} cascades, {procs}, "
                       f"{device}); {o['steps']} steps ~ {s * o['steps'] / 3600:.1f} h")
        return 0

    data, out = o["data"], o["outdir"]
    if not data:
        raise click.UsageError("Missing option '--data' (the ACDC folder).")
    if not out:
        raise click.UsageError("Missing option '-o' / '--outdir'.")
    if not os.path.exists(data):
        raise TrainFailure(f"{data}: no such folder (give the ACDC folder with --data)")
    if not os.path.isdir(data):
        raise TrainFailure(f"{data}: not a folder (give the ACDC folder with --data)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise TrainFailure(f"{out}: exists and is not a folder")
    last = os.path.join(out, "last.pt")
    if o["no_resume"] and os.path.exists(last):
        raise TrainFailure(f"{last}: exists and --no-resume was given (remove it or choose another -o)")

    from .progress import enabled

    tcfg = TrainConfig(data=data, out=out, steps=o["steps"], batch_size=o["batch_size"], size=size,
                       slices=o["slices"], augment=o["augment"], lr=o["lr"], lr_decay_start=o["lr_decay_start"],
                       lr_final=o["lr_final"],
                       grad_clip=o["grad_clip"], seed=o["seed"], val_every=o["val_every"],
                       val_max_pairs=o["val_max_pairs"], val_split=o["val_split"],
                       init_from=o["from_checkpoint"], save_every=o["save_every"], device=device,
                       threads=o["threads"], max_patients=o["max_patients"],
                       val_max_patients=o["val_max_patients"], progress=enabled(o["no_progress"]),
                       nproc=1 if _torchrun() else nproc)
    try:
        summary = train_loop(tcfg, mcfg, lcfg, resume=True, log=click.echo)
    except TrainInputError as exc:
        raise TrainFailure(str(exc)) from None
    except FloatingPointError as exc:
        raise TrainFailure(f"{out}: training diverged: {exc} (--lr); {last} holds the last saved state") from None
    except KeyboardInterrupt:
        click.echo(f"error: interrupted; {last} (written every --save-every steps) resumes the run: "
                   "rerun the same command", err=True)
        sys.exit(130)

    if not lead:
        return 0
    best = os.path.join(out, "best.pt")
    v = summary.get("best_val")
    speed = f"{summary['s_per_step']:.2f} s/step" if summary.get("steps_run") else "no step left to run"
    if summary.get("nproc", 1) > 1 and summary.get("steps_run"):
        speed += f" in {summary['nproc']} processes"
    if v:
        click.echo(f"step {summary['step']} ({speed}): best val mean Dice "
                   f"{v['dice_mean']:.4f} (RV {v['dice_RV']:.3f}, Myo {v['dice_Myo']:.3f}, LV {v['dice_LV']:.3f}) "
                   f"at step {summary['best_step']}: {best}")
    else:
        click.echo(f"step {summary['step']} ({speed}), no validation: {best} holds the last weights")
    return 0
