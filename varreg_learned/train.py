"""Training VR-Net on 2D ACDC slices: dataset, validation (the paper's 2D protocol), resumable loop.

* Train pairs (:class:`ACDCSlices`): the train split (patient number % 5 in
  {1, 2, 3}), every short-axis slice whose label map is non-empty in both ED and
  ES (``slices="any"``; ``"all3"``: LV, Myo and RV present in both, the
  evaluation rule), both directions ED->ES and ES->ED, each pair scaled jointly
  to [0, 1] on the full slice, then cropped/padded to ``size`` around the
  centre of the heart labels (so the heart is always inside the crop).
* Validation (:func:`evaluate`): the val split (% 5 == 4), the 2D protocol of
  :func:`varreg.acdc.slice_pairs` on full (uncropped) slices: ES moving, ED
  fixed, ES labels warped by nearest neighbour, Dice per structure against ED.
* Loop (:func:`train`): Adam, the loss of :mod:`varreg_learned.loss`, constant
  learning rate then a linear decay, gradient clipping, deterministic batches
  (a permutation per epoch from ``seed``) and per-step torch seeding, so a run
  resumed from ``last.pt`` continues the same sequence. ``best.pt`` keeps the
  best validation mean Dice; ``log.jsonl`` holds the history.
* Data-parallel (:func:`train` with ``TrainConfig(nproc=N)``, ``varreg train
  --nproc N``, or started by ``torchrun``): torch ``DistributedDataParallel``,
  gloo on the CPU, nccl on CUDA (device ``cuda:LOCAL_RANK``). ``batch_size``
  stays the global batch: every rank builds the same global batch of the
  sampler and takes its equal share, and the loss is normalised so that the
  averaged gradients are those of one process on the whole batch
  (:mod:`varreg_learned.loss`). Rank 0 alone writes the log, the progress and
  the checkpoints and validates; every rank resumes from the same ``last.pt``.
* Inputs are checked before anything is written: a folder without usable
  pairs, a patient with missing or unreadable files, or an ``out/last.pt``
  that cannot be resumed raise :class:`TrainInputError` (a ``ValueError``)
  with a one-line message. The command line is ``varreg train``.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import pickle
import socket
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from varreg import acdc, metrics
from varreg.registration import normalise_pair
from varreg.resample import warp

from .checkpoint import load_checkpoint, save_checkpoint
from .loss import LossConfig, vrnet_loss
from .model import VRNet, VRNetConfig

__all__ = ["ACDCSlices", "TrainConfig", "TrainInputError", "train", "evaluate", "load_val_pairs", "crop_or_pad",
           "lr_at", "time_steps", "threads_per_process", "check_world"]


# --------------------------------------------------------------------------- data
class TrainInputError(ValueError):
    """The data folder, the output folder or the crop options cannot be used (raised before anything is written)."""


_LAYOUT = ("patientNNN_ED.nii.gz, patientNNN_ES.nii.gz, patientNNN_ED_gt.nii.gz, patientNNN_ES_gt.nii.gz "
          "per patient (varreg.acdc layout)")
_FILES = ("ED", "ES", "ED_gt", "ES_gt")


def _split_patients(root, split: str, max_patients: int | None = None, *, required: bool = True) -> list[str]:
    """Patient ids of ``split`` under ``root`` (the first ``max_patients``), each with its four files.

    Raises :class:`TrainInputError` naming the expected layout when ``required``
    and there are none, or when a listed patient lacks one of its files.
    """
    ids = acdc.patients(root, split)
    if max_patients is not None:
        ids = ids[:max_patients]
    if not ids and required:
        n_all = len(acdc.patients(root, "all"))
        if n_all == 0:
            raise TrainInputError(f"{root}: no ACDC patients in this folder; expected {_LAYOUT}")
        raise TrainInputError(f"{root}: none of its {n_all} ACDC patients is in the {split} split "
                              f"({acdc.split_rule(split)})")
    for pid in ids:
        missing = [f"{pid}_{s}.nii.gz" for s in _FILES if not (Path(root) / f"{pid}_{s}.nii.gz").is_file()]
        if missing:
            raise TrainInputError(f"{root}: {pid} lacks {', '.join(missing)}; expected {_LAYOUT}")
    return ids


def _load_case(root, pid):
    try:
        return acdc.load_case(root, pid)
    except Exception as exc:  # noqa: BLE001  (nibabel's errors for corrupt or non-NIfTI files vary)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise TrainInputError(f"{root}: cannot read {pid} ({type(exc).__name__}: {first})") from None


def crop_or_pad(a: np.ndarray, center, size) -> np.ndarray:
    """The ``size`` window of ``a`` (2-D) centred at ``center`` (clamped inside when ``a`` is larger), zero padded."""
    out = np.zeros(size, dtype=a.dtype)
    src, dst = [], []
    for n, c, s in zip(a.shape, center, size):
        if n >= s:
            start = int(min(max(round(c - s / 2), 0), n - s))
            src.append(slice(start, start + s))
            dst.append(slice(0, s))
        else:  # pad: centre the whole axis
            off = (s - n) // 2
            src.append(slice(0, n))
            dst.append(slice(off, off + n))
    out[tuple(dst)] = a[tuple(src)]
    return out


class ACDCSlices(torch.utils.data.Dataset):
    """2-D ED<->ES slice pairs of ACDC, cropped/padded to ``size``.

    Items: dict of ``fixed``, ``moving`` (float32 ``size``), ``fixed_labels``,
    ``moving_labels`` (int64 ``size``). ``pairs`` lists ``(patient, z, direction)``.
    """

    def __init__(self, root, split: str = "train", size=(192, 192), *, slices: str = "any",
                 both_directions: bool = True, max_patients: int | None = None):
        if slices not in ("any", "all3"):
            raise ValueError(f"slices must be 'any' or 'all3', got {slices!r}")
        self.root, self.split, self.size = str(root), split, tuple(int(s) for s in size)
        ids = _split_patients(root, split, max_patients)
        self.patients = ids
        self.pairs, fixed, moving, flab, mlab = [], [], [], [], []
        for pid in ids:
            case = _load_case(root, pid)
            for z in range(case.ed.shape[2]):
                a, b = case.ed_gt[..., z], case.es_gt[..., z]
                if slices == "any":
                    keep = a.any() and b.any()
                else:
                    keep = all((a == k).any() and (b == k).any() for k in acdc.LABELS)
                if not keep:
                    continue
                centre = np.argwhere((a > 0) | (b > 0)).mean(axis=0)
                ed, es = normalise_pair(case.ed[..., z], case.es[..., z])
                ed, es = crop_or_pad(ed, centre, self.size), crop_or_pad(es, centre, self.size)
                la, lb = crop_or_pad(a, centre, self.size), crop_or_pad(b, centre, self.size)
                dirs = [("ES->ED", ed, es, la, lb)]  # fixed ED, moving ES (the evaluation direction)
                if both_directions:
                    dirs.append(("ED->ES", es, ed, lb, la))
                for d, f, m, lf, lm in dirs:
                    self.pairs.append((pid, z, d))
                    fixed.append(f), moving.append(m), flab.append(lf), mlab.append(lm)
        if not self.pairs:
            need = "labels" if slices == "any" else "RV, Myo and LV (labels 1, 2, 3)"
            raise TrainInputError(f"{root}: no usable slice pair: no slice of the {len(ids)} {split} patient(s) has "
                                  f"{need} in both ED and ES")
        self.fixed = torch.from_numpy(np.stack(fixed))
        self.moving = torch.from_numpy(np.stack(moving))
        self.fixed_labels = torch.from_numpy(np.stack(flab).astype(np.int64))
        self.moving_labels = torch.from_numpy(np.stack(mlab).astype(np.int64))

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return {"fixed": self.fixed[i], "moving": self.moving[i],
                "fixed_labels": self.fixed_labels[i], "moving_labels": self.moving_labels[i]}

    def batch(self, indices):
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return {"fixed": self.fixed[idx], "moving": self.moving[idx],
                "fixed_labels": self.fixed_labels[idx], "moving_labels": self.moving_labels[idx]}


def augment_d4(batch: dict, seed) -> dict:
    """Each pair of a batch turned by one of the 8 flips/rotations of the square (the dihedral group D4).

    ``batch``: ``fixed``, ``moving`` (and ``fixed_labels``, ``moving_labels``) of shape
    ``(B, H, W)``, ``H == W`` (square crops); the same transform is applied to the four
    maps of a pair, drawn per pair from ``numpy.random.default_rng(seed)``. A pair stays
    a valid registration problem: the loss needs no ground-truth displacement.
    """
    shapes = {tuple(v.shape[1:]) for v in batch.values()}
    if any(h != w for h, w in shapes):
        raise ValueError(f"D4 augmentation needs square crops, got {sorted(shapes)}")
    codes = np.random.default_rng(seed).integers(0, 8, size=len(next(iter(batch.values()))))

    def turn(x, c):  # c: bit 0 transpose, bit 1 flip rows, bit 2 flip columns
        if c & 1:
            x = x.transpose(-2, -1)
        dims = [d for bit, d in ((2, -2), (4, -1)) if c & bit]
        return x.flip(dims) if dims else x

    return {k: torch.stack([turn(v[i], int(c)) for i, c in enumerate(codes)]) for k, v in batch.items()}


def load_val_pairs(root, split: str = "val", max_pairs: int | None = None, max_patients: int | None = None):
    """Full-size validation pairs of the 2D protocol: list of ``(fixed, moving, fixed_labels, moving_labels)``.

    ``max_pairs``: an evenly spaced subset; ``max_patients``: the first patients only (smoke runs).
    """
    pairs = []
    for pid in _split_patients(root, split, max_patients, required=False):
        case = _load_case(root, pid)
        for z, f, m, lf, lm in acdc.slice_pairs(case):
            f, m = normalise_pair(f, m)
            pairs.append((f, m, lf, lm))
    if max_pairs is not None and len(pairs) > max_pairs:
        keep = np.linspace(0, len(pairs) - 1, max_pairs).round().astype(int)
        pairs = [pairs[i] for i in keep]
    return pairs


@torch.no_grad()
def evaluate(model: VRNet, pairs, device="cpu") -> dict:
    """Mean Dice per structure (RV, Myo, LV), their mean, and the folding fraction, over ``pairs``."""
    was = model.training
    model.eval()
    scores = {k: [] for k in acdc.LABELS}
    folds, before = [], []
    try:
        for f, m, lf, lm in pairs:
            u = model(torch.from_numpy(f).to(device)[None], torch.from_numpy(m).to(device)[None])[0].cpu()
            warped = warp(torch.from_numpy(lm.astype(np.int64)), u, order=0).numpy()
            d = metrics.dice(lf, warped, labels=list(acdc.LABELS))
            d0 = metrics.dice(lf, lm, labels=list(acdc.LABELS))
            for k in acdc.LABELS:
                scores[k].append(d[k])
            before.append(np.nanmean(list(d0.values())))
            folds.append(metrics.folding_fraction(u.numpy()))
    finally:
        model.train(was)
    out = {f"dice_{acdc.LABELS[k]}": float(np.nanmean(v)) for k, v in scores.items()}
    out["dice_mean"] = float(np.mean([out[f"dice_{n}"] for n in acdc.LABELS.values()]))
    out["dice_before"] = float(np.mean(before))
    out["folding_fraction"] = float(np.mean(folds))
    out["n_pairs"] = len(pairs)
    return out


# --------------------------------------------------------------------------- data-parallel
#: how long a rank waits in a collective (the others wait while rank 0 validates and saves)
DIST_TIMEOUT = datetime.timedelta(hours=1)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_process(nproc: int, threads: int | None = None) -> int | None:
    """torch threads of each of ``nproc`` processes on this machine: ``threads`` if given, else
    the cores shared out (``cores // nproc``, at least 1); ``None`` for one process (torch's default)."""
    if threads:
        return int(threads)
    return max(1, _cores() // int(nproc)) if nproc > 1 else None


def check_world(batch_size: int, nproc: int, flags: bool = False) -> None:
    """Raise :class:`TrainInputError` unless ``batch_size`` (the global batch) splits evenly across ``nproc``."""
    nb, npr = ("--batch-size", "--nproc") if flags else ("batch_size", "nproc")
    if nproc < 1:
        raise TrainInputError(f"{npr} {nproc}: needs at least 1 process")
    if nproc > batch_size:
        raise TrainInputError(f"{npr} {nproc}: more processes than pairs in a step ({nb} {batch_size}, the global "
                              "batch); each process needs at least one")
    if batch_size % nproc:
        raise TrainInputError(f"{nb} {batch_size}: not divisible by the {nproc} processes ({nb} is the global batch, "
                              f"split evenly across them; e.g. {nb} {batch_size - batch_size % nproc} or "
                              f"{batch_size + nproc - batch_size % nproc})")


def _env_world() -> int | None:
    """``WORLD_SIZE`` when this process was started by torchrun (``RANK`` and ``WORLD_SIZE`` set), else ``None``."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def _in_world() -> bool:
    import torch.distributed as dist

    return (dist.is_available() and dist.is_initialized()) or _env_world() is not None


@dataclass(frozen=True)
class _World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    grouped: bool = False  # a torch.distributed process group is in use (DDP), even of one process

    def device(self, name: str) -> torch.device:
        dev = torch.device(name)
        if dev.type == "cuda" and self.grouped:
            return torch.device("cuda", self.local_rank)
        return dev

    def barrier(self):
        if self.grouped and self.size > 1:
            torch.distributed.barrier()


@contextlib.contextmanager
def _process_group(device: str):
    """The data-parallel world this process is in: a group already initialised (kept), one
    described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``; initialised here, gloo on the CPU, nccl on CUDA, and destroyed on leaving),
    or one process without a group."""
    import torch.distributed as dist

    env = os.environ
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
        yield _World(rank, size, int(env.get("LOCAL_RANK", rank)), int(env.get("LOCAL_WORLD_SIZE", size)), True)
        return
    size = _env_world()
    if size is None:
        yield _World()
        return
    rank = int(env["RANK"])
    local = int(env.get("LOCAL_RANK", rank))
    world = _World(rank, size, local, int(env.get("LOCAL_WORLD_SIZE", size)), True)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=rank, world_size=size,
                            timeout=DIST_TIMEOUT)
    try:
        yield world
        if size > 1:
            dist.barrier()  # leave together
            # gloo's worker threads drop their last finished work (it holds Python tensors) only once they get
            # the GIL; a process that went on into interpreter shutdown first aborted ("terminate called without
            # an active exception", SIGABRT at exit, ~1 run in 10 here). A pause without the GIL lets them.
            time.sleep(0.05)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (to re-raise it in the parent), else a RuntimeError with its text."""
    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _silent(*args, **kwargs):
    return None


def _spawned(rank, nproc, port, fn, args, kwargs, forward_log, queue):
    """One spawned rank: torchrun's environment for this machine, then ``fn(*args, **kwargs)``;
    rank 0's log lines and result, and any rank's error, go to the parent through ``queue``."""
    try:
        from torch.multiprocessing.spawn import _prctl_pr_set_pdeathsig
        import signal

        _prctl_pr_set_pdeathsig(signal.SIGTERM)  # do not outlive the parent
    except Exception:  # noqa: BLE001  (private helper; Linux only)
        pass
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if forward_log:
        kwargs = {**kwargs, "log": (lambda msg="", **kw: queue.put(("log", str(msg)))) if rank == 0 else _silent}
    try:
        result = fn(*args, **kwargs)
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseException as exc:  # noqa: BLE001
        queue.put(("error", rank, _portable(exc)))
        sys.exit(1)
    if rank == 0:
        queue.put(("result", result))


def _launch(nproc: int, fn, args=(), kwargs=None, *, log=None, grace_s: float = 10.0):
    """Run ``fn(*args, **kwargs)`` in ``nproc`` processes (torch.multiprocessing, spawn) forming a
    data-parallel world on 127.0.0.1 (a free port); returns rank 0's result.

    With ``log``, rank 0's ``log`` calls are printed here (``fn`` must take ``log=``). The first
    error of a rank is raised here as it was raised there (a TrainInputError stays one); the other
    ranks get ``grace_s`` seconds to stop, then are terminated.
    """
    import multiprocessing.connection

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_spawned, args=(r, nproc, port, fn, tuple(args), dict(kwargs or {}), log is not None,
                                                 queue), name=f"varreg-rank{r}") for r in range(nproc)]
    result, errors, stop_by = None, [], None

    def drain():
        nonlocal result
        while not queue.empty():
            msg = queue.get()
            if msg[0] == "log" and log is not None:
                log(msg[1])
            elif msg[0] == "result":
                result = msg[1]
            elif msg[0] == "error":
                errors.append(msg[1:])

    try:
        for p in procs:
            p.start()
        pending = {p.sentinel: p for p in procs}
        failed = None
        while pending and failed is None:
            for sentinel in multiprocessing.connection.wait(list(pending), timeout=0.2):
                p = pending.pop(sentinel)
                p.join()
                if p.exitcode != 0 and failed is None:
                    failed = p
            drain()
        if failed is not None:
            stop_by = time.monotonic() + grace_s
            for p in procs:
                p.join(max(stop_by - time.monotonic(), 0))
            drain()
            if errors:
                raise errors[0][1]
            rank = procs.index(failed)
            raise RuntimeError(f"data-parallel rank {rank} (of {nproc}) died with exit code {failed.exitcode}")
        drain()
        return result
    finally:
        if stop_by is None:  # e.g. Ctrl-C, which reaches every rank: they stop on their own (and release their locks)
            stop_by = time.monotonic() + grace_s
        for p in procs:
            if p.pid is not None:
                p.join(max(stop_by - time.monotonic(), 0))
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            if p.pid is not None:
                p.join()
        queue.close()


def _all_mean(parts: dict, world: _World, device) -> dict:
    """The mean over the ranks of each of the loss parts (floats): the global batch's values."""
    if world.size == 1:
        return parts
    keys = sorted(parts)
    t = torch.tensor([parts[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, (t / world.size).tolist()))


def _share(batch: dict, world: _World) -> dict:
    """This rank's equal share of a global batch (every rank builds the same global batch)."""
    if world.size == 1:
        return batch
    n = len(next(iter(batch.values())))
    per = n // world.size
    return {k: v[world.rank * per:(world.rank + 1) * per] for k, v in batch.items()}


def _step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of a step (rank 0: the single-process seed; other ranks: their own stream)."""
    base = seed * 1_000_003 + step
    if rank == 0:
        return base
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] % (2**63))


def _forward_backward(net, batch: dict, loss_cfg: LossConfig, world: _World, device, step: int = 0):
    """Loss of this rank's share and its backward (DDP averages the gradients across the ranks).

    Returns the loss parts of the global batch (the ranks' mean). Raises FloatingPointError on
    every rank together when the global loss is not finite (before any gradient is touched).
    """
    u = net(batch["fixed"], batch["moving"])
    loss, parts = vrnet_loss(batch["fixed"], batch["moving"], u, loss_cfg, fixed_labels=batch.get("fixed_labels"),
                             moving_labels=batch.get("moving_labels"), distributed=world.size > 1)
    parts = _all_mean(parts, world, device)
    if not math.isfinite(parts["total"]):
        raise FloatingPointError(f"loss is {parts['total']} at step {step}; lower the learning rate")
    net.zero_grad(set_to_none=True)
    loss.backward()
    return parts


def _wrap(model, world: _World, device):
    """``model`` in DistributedDataParallel when in a process group, else itself."""
    if not world.grouped:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# --------------------------------------------------------------------------- loop
@dataclass
class TrainConfig:
    data: str = "../shared/data/acdc"
    out: str = "runs/vrnet2d"
    steps: int = 20000
    batch_size: int = 10
    size: tuple = (192, 192)
    slices: str = "any"
    augment: bool = False  # random flips/rotations of each pair (augment_d4)
    lr: float = 1e-4
    lr_decay_start: float = 0.5  # fraction of the steps after which the rate decays linearly ...
    lr_final: float = 0.1  # ... to lr * lr_final at the last step
    grad_clip: float = 10.0
    seed: int = 0
    val_every: int = 500
    val_max_pairs: int | None = None
    val_split: str = "val"  # the patients that pick best.pt ("val-select" leaves "val-test" unseen)
    init_from: str | None = None  # start from this checkpoint's weights (fresh Adam, step 0) instead of random ones
    save_every: int = 100
    device: str = "cpu"
    threads: int | None = None
    max_patients: int | None = None  # limit the train patients (smoke runs)
    val_max_patients: int | None = None  # limit the val patients (smoke runs)
    progress: bool = True
    nproc: int = 1  # data-parallel processes (spawned here; under torchrun: 1, or its WORLD_SIZE)

    def to_dict(self):
        d = asdict(self)
        d["size"] = list(self.size)
        return d


def lr_at(step: int, cfg: TrainConfig) -> float:
    start = int(cfg.lr_decay_start * cfg.steps)
    if step < start or cfg.steps <= start:
        return cfg.lr
    frac = (step - start) / max(cfg.steps - start, 1)
    return cfg.lr * (1.0 - (1.0 - cfg.lr_final) * frac)


class _Sampler:
    """Deterministic batches: sample ``step * B + j`` of a per-epoch permutation seeded by ``(seed, epoch)``."""

    def __init__(self, n, batch_size, seed):
        self.n, self.b, self.seed, self._perm = n, batch_size, seed, {}

    def indices(self, step):
        out = []
        for g in range(step * self.b, (step + 1) * self.b):
            epoch = g // self.n
            if epoch not in self._perm:
                self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
            out.append(int(self._perm[epoch][g % self.n]))
        return out


def _initial_weights(path, model_cfg: VRNetConfig) -> dict:
    """The state dict of the checkpoint ``path``, checked to hold ``model_cfg`` (fine-tuning start)."""
    try:
        start, _ = load_checkpoint(path, ndim=model_cfg.ndim)
    except (OSError, ValueError) as exc:
        raise TrainInputError(f"--from-checkpoint: {exc}") from None
    if start.config != model_cfg:
        raise TrainInputError(f"--from-checkpoint {path}: holds another model config "
                              f"({_config_diff(start.config, model_cfg)}); give the model options it was trained with")
    return start.state_dict()


def _config_diff(have: VRNetConfig, want: VRNetConfig) -> str:
    """``"width 4 there, 6 asked, ..."``: the fields where a checkpoint's config differs from the one asked."""
    h, w = have.to_dict(), want.to_dict()
    return ", ".join(f"{k} {h.get(k)!r} there, {w[k]!r} asked" for k in w if h.get(k) != w[k])


def _meta(tcfg, lcfg, ds, step, val, best_step):
    return {
        "data": "ACDC 2-D ED<->ES short-axis slices (varreg.acdc layout)",
        "data_root": str(tcfg.data),
        "split": {"train": acdc.split_rule("train"), tcfg.val_split: acdc.split_rule(tcfg.val_split),
                  "train_patients": len(ds.patients), "train_pairs": len(ds), "slices": tcfg.slices,
                  "directions": "ED->ES and ES->ED", "crop": list(tcfg.size)},
        "steps": int(step),
        "best_step": best_step,
        "val": val,
        "loss": lcfg.to_dict(),
        "train": tcfg.to_dict(),
    }


def _trim_log(path: Path, step: int) -> None:
    """Drop records after ``step`` (written after the last save of an interrupted run), so a resumed log has no repeats."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) > step:
                continue
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the interruption
        keep.append(line)
    if keep != lines:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)


def train(tcfg: TrainConfig, model_cfg: VRNetConfig | None = None, loss_cfg: LossConfig | None = None,
          *, resume: bool = True, log=print) -> dict:
    """Train (or resume) a VR-Net; writes ``out/last.pt``, ``out/best.pt``, ``out/log.jsonl``.

    With ``resume`` an existing ``out/last.pt`` (same model config) is continued
    from its step. Bad inputs raise :class:`TrainInputError` before ``out`` is
    created or touched. Returns a summary dict (final step, best validation
    scores, seconds per step).

    Data-parallel: ``tcfg.nproc > 1`` spawns that many processes here (gloo on
    the CPU, nccl on CUDA; 127.0.0.1, a free port) and returns rank 0's summary;
    in a process started by torchrun (or with a ``torch.distributed`` group
    already initialised) this process is one rank of that world, and
    ``tcfg.nproc`` must be 1 or its size. ``tcfg.batch_size`` is the global
    batch, split evenly across the ranks (the same samples, in the same
    order, as one process); rank 0 alone logs, validates and writes.
    """
    model_cfg = model_cfg or VRNetConfig(ndim=2)
    loss_cfg = loss_cfg or LossConfig()
    if model_cfg.ndim != 2:
        raise ValueError("the ACDC trainer is 2-D: use VRNetConfig(ndim=2)")
    if tcfg.augment and tcfg.size[0] != tcfg.size[1]:
        raise TrainInputError(f"augment turns the crops by 90 degrees: it needs a square crop (--size), "
                              f"got {tcfg.size[0]}x{tcfg.size[1]}")
    nproc = int(tcfg.nproc)
    if nproc < 1:
        check_world(tcfg.batch_size, nproc)
    if not _in_world():
        check_world(tcfg.batch_size, nproc)
        if nproc > 1:
            if torch.device(tcfg.device).type == "cuda" and nproc > torch.cuda.device_count():
                raise TrainInputError(f"nproc {nproc}: only {torch.cuda.device_count()} CUDA device(s) here; on GPUs "
                                      "each process needs its own (fewer processes, or device cpu)")
            return _launch(nproc, train, (tcfg, model_cfg, loss_cfg), {"resume": resume}, log=log)
    with _process_group(tcfg.device) as world:
        if nproc not in (1, world.size):
            raise TrainInputError(f"nproc {nproc}: this process is one of {world.size} (torchrun's WORLD_SIZE); "
                                  "leave nproc (--nproc) out under torchrun")
        check_world(tcfg.batch_size, world.size)
        return _train(replace(tcfg, nproc=world.size), model_cfg, loss_cfg, world, resume=resume,
                      log=log if world.rank == 0 else _silent)


def _train(tcfg: TrainConfig, model_cfg: VRNetConfig, loss_cfg: LossConfig, world: _World, *, resume: bool,
           log) -> dict:
    """The loop of one rank (or of the one process): :func:`train` after the world is set up."""
    from tqdm import tqdm

    threads = threads_per_process(world.local_size, tcfg.threads)
    if threads:
        torch.set_num_threads(threads)
    lead = world.rank == 0
    out = Path(tcfg.out)
    last, best = out / "last.pt", out / "best.pt"
    dev = world.device(tcfg.device)

    torch.manual_seed(tcfg.seed)
    model = VRNet(model_cfg).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr, betas=(0.9, 0.999))
    step, best_score, best_step, best_val = 0, -math.inf, None, None
    if resume and last.exists():  # every rank loads the same last.pt
        try:
            model_l, _, payload = load_checkpoint(last, return_payload=True)
        except (OSError, ValueError) as exc:
            raise TrainInputError(f"cannot resume: {exc}") from None
        if model_l.config != model_cfg:
            raise TrainInputError(f"{last} holds a different model config ({_config_diff(model_l.config, model_cfg)}); "
                                  "resume with the model options it was started with, or use another output folder")
        model.load_state_dict(model_l.state_dict())
        ts = payload.get("train_state", {})
        if "optimizer" in ts:
            opt.load_state_dict(ts["optimizer"])
        step = int(ts.get("step", 0))
        best_score = float(ts.get("best_score", -math.inf))
        best_step = ts.get("best_step")
        best_val = ts.get("best_val")
        log(f"resumed {last} at step {step} (best val dice {best_score:.4f})")
    elif tcfg.init_from:
        model.load_state_dict(_initial_weights(tcfg.init_from, model_cfg))
        log(f"weights from {tcfg.init_from}")
    model.train()

    ds = ACDCSlices(tcfg.data, "train", tcfg.size, slices=tcfg.slices, max_patients=tcfg.max_patients)
    val_pairs = load_val_pairs(tcfg.data, tcfg.val_split, tcfg.val_max_pairs, tcfg.val_max_patients) if tcfg.val_every else []
    if tcfg.val_every and not val_pairs:
        n_val = len(acdc.patients(tcfg.data, tcfg.val_split)[:tcfg.val_max_patients])
        raise TrainInputError(
            f"{tcfg.data}: no validation pair: " + (f"no patient of the {tcfg.val_split} split ({acdc.split_rule(tcfg.val_split)})" if not n_val
            else f"no slice of the {n_val} val patient(s) has RV, Myo and LV (labels 1, 2, 3) in both ED and ES")
            + "; validation needs one (or train without it: val_every=0, --val-every 0)")
    if not lead:
        val_pairs = []  # rank 0 alone validates
    net = _wrap(model, world, dev)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        _trim_log(out / "log.jsonl", step)
    ranks = (f"; {world.size} processes x {torch.get_num_threads()} threads, "
             f"{tcfg.batch_size // world.size} pairs each" if world.size > 1 else "")
    log(f"train: {len(ds.patients)} patients, {len(ds)} pairs of {tcfg.size}; val: {len(val_pairs)} pairs; "
        f"model: {sum(p.numel() for p in model.parameters())} parameters{ranks}")
    sampler = _Sampler(len(ds), tcfg.batch_size, tcfg.seed)  # the global sequence, the same on every rank

    def save(path, with_state, val):
        ts = None
        if with_state:
            ts = {"step": step, "optimizer": opt.state_dict(), "best_score": best_score, "best_step": best_step,
                  "best_val": best_val}
        save_checkpoint(path, model, _meta(tcfg, loss_cfg, ds, step, val, best_step), train_state=ts)

    logf = open(out / "log.jsonl", "a") if lead else None
    bar = tqdm(total=tcfg.steps, initial=step, disable=not (tcfg.progress and lead), dynamic_ncols=True)
    say = bar.write if not bar.disable else log
    avg, t_steps, n_timed = None, 0.0, 0
    try:
        while step < tcfg.steps:
            t0 = time.perf_counter()
            b = ds.batch(sampler.indices(step))
            if tcfg.augment:
                b = augment_d4(b, [tcfg.seed, step])
            b = {k: v.to(dev) for k, v in _share(b, world).items()}
            for g in opt.param_groups:
                g["lr"] = lr_at(step, tcfg)
            torch.manual_seed(_step_seed(tcfg.seed, step, world.rank))
            parts = _forward_backward(net, b, loss_cfg, world, dev, step)
            grad_norm = None
            if tcfg.grad_clip:  # the gradients are the same on every rank (averaged): so is the clipping
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip))
            opt.step()
            step += 1
            dt = time.perf_counter() - t0
            t_steps += dt
            n_timed += 1
            avg = parts["total"] if avg is None else 0.95 * avg + 0.05 * parts["total"]
            bar.update(1)
            bar.set_postfix(loss=f"{avg:.4f}", sim=f"{parts['sim']:.4f}", best=f"{best_score:.3f}" if best_step else "-")
            rec = {"step": step, "lr": lr_at(step - 1, tcfg), "time_s": dt, **parts,
                   "theta": [round(float(t), 5) for t in model.theta.detach().cpu()]}
            if grad_norm is not None:
                rec["grad_norm"] = grad_norm
            validate = bool(tcfg.val_every) and (step % tcfg.val_every == 0 or step == tcfg.steps)
            saving = validate or step % tcfg.save_every == 0 or step == tcfg.steps
            if validate and lead:
                val = evaluate(model, val_pairs, dev)
                rec["val"] = val
                if val["dice_mean"] > best_score:
                    best_score, best_step, best_val = val["dice_mean"], step, val
                    save(best, False, val)
                say(f"step {step}: val dice {val['dice_mean']:.4f} (RV {val['dice_RV']:.3f} Myo {val['dice_Myo']:.3f} "
                    f"LV {val['dice_LV']:.3f}; before {val['dice_before']:.3f}), folding {val['folding_fraction']:.2e}; "
                    f"best {best_score:.4f} at {best_step}")
            if lead:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                if saving:
                    save(last, True, best_val)
            if saving:
                world.barrier()  # the others wait while rank 0 validates and writes
    finally:
        bar.close()
        if logf is not None:
            logf.close()
    if not tcfg.val_every and lead:  # no validation: the last weights are the result
        save(best, False, None)
    world.barrier()  # every rank returns once the files are written
    return {"step": step, "steps_run": n_timed, "best_step": best_step, "best_val": best_val,
            "s_per_step": t_steps / max(n_timed, 1), "out": str(out), "nproc": world.size}


def time_steps(model_cfg: VRNetConfig, loss_cfg: LossConfig | None = None, *, batch_size=10, size=(192, 192),
               n=10, warmup=1, threads=None, device="cpu", seed=0, nproc: int = 1) -> float:
    """Seconds per training step (forward, loss, backward, Adam) on synthetic smooth pairs of ``size``.

    With a label term (``loss_cfg.dice_weight > 0``) the pairs get labels too:
    the intensity quantiles of each image cut into background and ``n_labels`` classes.
    ``nproc > 1``: data-parallel, as :func:`train` (spawned here, or the torchrun world this
    process is in); ``batch_size`` is the global batch; rank 0's time is returned.
    """
    if not _in_world():
        check_world(batch_size, nproc)
        if nproc > 1:
            return _launch(nproc, time_steps, (model_cfg, loss_cfg),
                           dict(batch_size=batch_size, size=size, n=n, warmup=warmup, threads=threads, device=device,
                                seed=seed))
    with _process_group(device) as world:
        check_world(batch_size, world.size)
        return _time_steps(model_cfg, loss_cfg, world, batch_size=batch_size, size=size, n=n, warmup=warmup,
                           threads=threads, device=device, seed=seed)


def _time_steps(model_cfg, loss_cfg, world: _World, *, batch_size, size, n, warmup, threads, device, seed) -> float:
    from varreg.synthetic import deform, sinusoidal_displacement, smooth_random_image

    loss_cfg = loss_cfg or LossConfig()
    threads = threads_per_process(world.local_size, threads)
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    f = np.stack([smooth_random_image(size, rng=rng) for _ in range(batch_size)])
    truth = sinusoidal_displacement(tuple(size), amplitude=3.0)
    m = np.stack([deform(x, truth) for x in f])
    dev = world.device(device)
    batch = {"fixed": torch.from_numpy(f), "moving": torch.from_numpy(m)}
    if loss_cfg.dice_weight > 0:
        def quantile_labels(x):
            edges = np.quantile(x, np.linspace(0, 1, loss_cfg.n_labels + 2)[1:-1])
            return torch.from_numpy(np.digitize(x, edges).astype(np.int64))
        batch.update(fixed_labels=quantile_labels(f), moving_labels=quantile_labels(m))
    batch = {k: v.to(dev) for k, v in _share(batch, world).items()}
    model = VRNet(model_cfg).to(dev)
    net = _wrap(model, world, dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + n):
        world.barrier()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _forward_backward(net, batch, loss_cfg, world, dev, i)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    world.barrier()
    return float(np.mean(times))
