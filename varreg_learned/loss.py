"""The unsupervised VR-Net loss, paper eq. (8), with optional NCC and label-Dice terms.

``L = sim(warp(moving, u), fixed) + alpha * mean |grad u|^2``

* ``sim``: mean absolute difference (``"l1"``, the paper's) or mean squared
  difference (``"mse"``) over voxels and batch;
* ``|grad u|^2``: sum over components and directions of the squared central
  differences (:func:`varreg.differences.central_gradient`, border replicated),
  averaged over voxels and batch -- the paper's sums divided by the voxel count,
  so the paper's ``alpha`` (0.05 for ACDC) keeps its meaning;
* optional: ``ncc_weight * (1 - local NCC)`` (box window ``ncc_window``) and
  ``dice_weight * (1 - soft Dice)`` of the linearly warped one-hot moving labels
  against the fixed labels (labels ``1..n_labels``); both off by default.

Data-parallel training (``vrnet_loss(..., distributed=True)``): every rank holds
an equal share of the global batch, and DDP averages the ranks' gradients. The
voxel means (similarity, smoothness, NCC) of equal shares average to the
global mean as they are. The label Dice is a mean over the (pair, label)
entries *present* in the batch, whose count differs between shares; with
``distributed`` each rank divides its sum by the global count (all-reduced)
times the world size, so the ranks' average is the Dice of the global batch
and the gradients are those of one process on the whole batch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from varreg.differences import central_gradient
from varreg.resample import warp

__all__ = ["LossConfig", "vrnet_loss", "smoothness", "local_ncc", "soft_dice"]


@dataclass
class LossConfig:
    similarity: str = "l1"
    alpha: float = 0.05
    ncc_weight: float = 0.0
    ncc_window: int = 9
    dice_weight: float = 0.0
    n_labels: int = 3

    def __post_init__(self):
        if self.similarity not in ("l1", "mse"):
            raise ValueError(f"similarity must be 'l1' or 'mse', got {self.similarity!r}")
        for name in ("alpha", "ncc_weight", "dice_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.ncc_window < 1 or self.ncc_window % 2 == 0:
            raise ValueError(f"ncc_window must be a positive odd integer, got {self.ncc_window}")

    def to_dict(self) -> dict:
        return asdict(self)


def smoothness(u, ndim: int):
    """``mean |grad u|^2`` with central differences; ``u`` ``(B, ndim, *spatial)``."""
    g = central_gradient(u, ndim)  # (B, ndim, ndim, *spatial)
    return (g * g).sum(dim=(1, 2)).mean()


def local_ncc(a, b, ndim: int, window: int = 9, eps: float = 1e-5):
    """Mean local normalised cross-correlation of ``(B, *spatial)`` images in a box window."""
    pool = (F.avg_pool2d, F.avg_pool3d)[ndim - 2]
    a, b = a.unsqueeze(1), b.unsqueeze(1)

    def mean(x):
        return pool(x, window, stride=1, padding=window // 2, count_include_pad=False)

    ma, mb = mean(a), mean(b)
    cov = mean(a * b) - ma * mb
    va = (mean(a * a) - ma * ma).clamp_min(0)
    vb = (mean(b * b) - mb * mb).clamp_min(0)
    return (cov * cov / (va * vb + eps)).mean()


def _soft_dice_terms(fixed_labels, moving_labels, u, ndim: int, n_labels: int = 3, eps: float = 1e-5):
    """The soft Dice of every (pair, label) present in either map, ``(B, n_labels)``, and the mask of those."""
    onehot_m = torch.stack([(moving_labels == k).to(u.dtype) for k in range(1, n_labels + 1)], dim=1)
    onehot_f = torch.stack([(fixed_labels == k).to(u.dtype) for k in range(1, n_labels + 1)], dim=1)
    uu = u.unsqueeze(1).expand(u.shape[0], n_labels, *u.shape[1:])
    warped = warp(onehot_m, uu)
    axes = tuple(range(2, warped.ndim))
    inter = (warped * onehot_f).sum(axes)
    total = warped.sum(axes) + onehot_f.sum(axes)
    present = total > 0
    return (2 * inter + eps) / (total + eps), present


def soft_dice(fixed_labels, moving_labels, u, ndim: int, n_labels: int = 3, eps: float = 1e-5, *,
              distributed: bool = False):
    """Mean soft Dice over labels ``1..n_labels`` of the moving labels warped (linearly) by ``u``.

    The mean runs over the (pair, label) entries present in the fixed or the
    warped map; 1 when there is none. ``distributed``: this batch is one rank's
    share of a global batch (``torch.distributed``'s default group): the sum is
    divided by the global count of entries over ``world_size``, so that the
    mean over the ranks is the Dice of the global batch (module docstring).
    """
    d, present = _soft_dice_terms(fixed_labels, moving_labels, u, ndim, n_labels, eps)
    world = _world_size() if distributed else 1
    if world == 1:
        return d[present].mean() if bool(present.any()) else d.new_ones(())
    import torch.distributed as dist

    count = present.sum().to(d.dtype).detach()
    dist.all_reduce(count)  # every rank reaches this: the same loss config on all of them
    if float(count) == 0:
        return d.new_ones(())
    return d[present].sum() * (world / count)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def vrnet_loss(fixed, moving, u, config: LossConfig | None = None, *, fixed_labels=None, moving_labels=None,
               distributed: bool = False):
    """Loss of a batch: ``(total, parts)`` with ``parts`` a dict of floats.

    ``fixed``, ``moving``: ``(B, *spatial)``; ``u``: ``(B, ndim, *spatial)``;
    labels ``(B, *spatial)`` integer maps, needed only when ``dice_weight > 0``.
    ``distributed``: the batch is this rank's equal share of a global batch (data-parallel
    training): the mean of the ranks' losses is then the loss of the global batch
    (module docstring), and so is the mean over the ranks of each of ``parts``.
    """
    cfg = config or LossConfig()
    ndim = u.shape[1]
    warped = warp(moving, u)
    diff = warped - fixed
    sim = diff.abs().mean() if cfg.similarity == "l1" else (diff * diff).mean()
    smooth = smoothness(u, ndim)
    total = sim + cfg.alpha * smooth
    parts = {"sim": float(sim.detach()), "smooth": float(smooth.detach())}
    if cfg.ncc_weight > 0:
        ncc = local_ncc(warped, fixed, ndim, cfg.ncc_window)
        total = total + cfg.ncc_weight * (1 - ncc)
        parts["ncc"] = float(ncc.detach())
    if cfg.dice_weight > 0:
        if fixed_labels is None or moving_labels is None:
            raise ValueError("dice_weight > 0 needs fixed_labels and moving_labels")
        d = soft_dice(fixed_labels, moving_labels, u, ndim, cfg.n_labels, distributed=distributed)
        total = total + cfg.dice_weight * (1 - d)
        parts["dice"] = float(d.detach())
    parts["total"] = float(total.detach())
    return total, parts
