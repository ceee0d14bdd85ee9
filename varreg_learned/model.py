"""VR-Net: Algorithm 1 of :mod:`varreg.engine` unrolled into a trainable network.

The network does not re-implement the iteration: :meth:`VRNet.forward` calls
:func:`varreg.engine.solve` on torch tensors with

* ``theta``: the learned penalty weights, one per cascade (``Theta2``) or one
  shared (``Theta1``), kept positive as ``softplus(raw) + THETA_MIN``;
* ``denoiser``: the generalised denoising layers (GDL), one light residual
  U-Net per cascade (or one shared), each wrapped in a callable that follows
  the engine's plug-in protocol ``denoiser(u, weight) -> v``.

Generalised denoising layer (a design choice, see docs/vrnet.md): with
``condition=True`` (default) the U-Net sees the displacement ``u`` *and* the
fixed image and the moving image warped by ``u``
(``ndim + 2`` input channels), so the learned regulariser can follow the
anatomy; with ``condition=False`` it sees ``u`` only, as in the paper. The
layer is ``v = u + unet(.)`` (``residual=True``) or ``v = unet(.)``. The
weight ``lam / theta`` that the engine hands to every denoiser is ignored: the
U-Net absorbs ``lambda`` and ``theta`` (paper, sec. IV-A); ``lam`` is kept in the
config only because the engine protocol carries it.

Shapes: ``fixed``, ``moving`` ``(B, *spatial)``; the result ``(B, ndim, *spatial)``
in voxels of the fixed grid, pull-back (``moving(x + u(x)) ~ fixed(x)``),
component ``i`` along spatial axis ``i`` -- the conventions of :mod:`varreg`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from varreg.data_terms import make_data_term
from varreg.engine import solve
from varreg.pyramid import coarse_to_fine, level_shapes, smoothing_sigma
from varreg.resample import gaussian_smooth, resize, resize_displacement, warp

from .options import PRECISIONS

__all__ = ["VRNetConfig", "VRNet", "UNet", "GeneralisedDenoiser", "THETA_MIN", "inverse_softplus",
           "PRECISIONS", "resolve_precision", "unet_precision"]

#: floor added to ``softplus``: theta stays positive even where softplus underflows.
THETA_MIN = 1e-6
#: initial theta and lambda per data term of an untrained VR-Net (the shipped checkpoints started
#: from these); a training hyper-parameter, not the classical solver's weights (varreg.data_terms).
INITIAL_WEIGHTS = {"l1": (0.3, 0.1), "l2": (0.02, 0.005)}
INITS = ("zeros", "noise", "unet")


def inverse_softplus(y: float) -> float:
    """``x`` with ``softplus(x) = y`` (``y > 0``)."""
    return y + math.log(-math.expm1(-y))


@dataclass
class VRNetConfig:
    """Everything that defines a VR-Net; stored in checkpoints as a plain dict.

    Attributes
    ----------
    ndim : 2 or 3 spatial axes.
    data_term : ``"l1"`` (thresholding step, paper eq. 5) or ``"l2"`` (Sherman-Morrison).
    n_warps, n_iters : cascade-warp and cascade-iter counts; ``n_warps * n_iters`` cascades.
    shared : True for ``Theta1`` (one U-Net and one theta for all cascades),
        False for ``Theta2`` (one of each per cascade).
    width, depth : U-Net channels at full resolution and number of 2x downsamplings
        (inputs are padded to a multiple of ``2**depth`` and cropped back).
    residual : ``v = u + unet(.)`` (True) or ``v = unet(.)``.
    condition : the denoising U-Nets also see the fixed and the warped moving image.
    init : initial displacement: ``"zeros"``, ``"noise"`` (Gaussian, ``noise_std``
        voxels; seeded and thus repeatable in eval mode) or ``"unet"`` (a U-Net on
        the pair, trained with the rest).
    theta_init, lam : initial theta of every cascade and the engine's lambda;
        ``None`` takes :data:`INITIAL_WEIGHTS` of the data term.
    levels : pyramid levels (1: full resolution only); the cascades are shared by all levels.
    scale : grid of the network relative to the images (1: the images' grid). With
        ``scale < 1`` the pair is smoothed and shrunk (as a pyramid level), the
        network runs there, and its displacement is upsampled (values rescaled) to
        the images' grid: ``scale**ndim`` of the cost, for smooth motion.
    zero_init_out : zero the last convolution of every U-Net, so that an untrained
        residual network is the classical iteration with an identity denoiser.
    noise_std : standard deviation of the ``"noise"`` initialisation, voxels.
    """

    ndim: int = 2
    data_term: str = "l1"
    n_warps: int = 3
    n_iters: int = 2
    shared: bool = False
    width: int = 16
    depth: int = 3
    residual: bool = True
    condition: bool = True
    init: str = "unet"
    theta_init: float | None = None
    lam: float | None = None
    levels: int = 1
    scale: float = 1.0
    zero_init_out: bool = True
    noise_std: float = 0.5

    def __post_init__(self):
        if self.ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {self.ndim!r}")
        self.data_term = str(self.data_term).lower()
        if self.data_term not in INITIAL_WEIGHTS:
            raise ValueError(f"data_term must be 'l1' or 'l2', got {self.data_term!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        for name in ("n_warps", "n_iters", "width", "levels"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.depth, int) and 0 <= self.depth <= 6):
            raise ValueError(f"depth must be an integer in [0, 6], got {self.depth!r}")
        th0, lam0 = INITIAL_WEIGHTS[self.data_term]
        self.theta_init = float(th0 if self.theta_init is None else self.theta_init)
        self.lam = float(lam0 if self.lam is None else self.lam)
        for name in ("theta_init", "lam"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        self.noise_std = float(self.noise_std)
        self.scale = float(self.scale)
        if not (0.1 <= self.scale <= 1.0):
            raise ValueError(f"scale must be in [0.1, 1], got {self.scale!r}")
        for name in ("shared", "residual", "condition", "zero_init_out"):
            setattr(self, name, bool(getattr(self, name)))

    @property
    def n_cascades(self) -> int:
        return self.n_warps * self.n_iters

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VRNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown VR-Net config keys {unknown}: the checkpoint was written by a newer or different version")
        return cls(**d)


# --------------------------------------------------------------------------- U-Net
def _conv(ndim):
    return (nn.Conv2d, nn.Conv3d)[ndim - 2]


class UNet(nn.Module):
    """A light U-Net: ``depth`` stride-2 levels, ``width * 2**level`` channels, LeakyReLU, no normalisation.

    Any spatial size is accepted: the input is padded (border replicated) at the
    end of each axis to a multiple of ``2**depth`` and the output cropped back.
    2-D networks run in channels-last layout (mkldnn's fast path, faster for
    training and inference on the CPU: docs/vrnet.md); the output is returned in
    the usual contiguous layout.

    ``compute_dtype`` (default ``None``: the parameters' dtype) runs the network under
    ``torch.autocast`` in that dtype and returns the output in the input's dtype; set it
    through :func:`unet_precision`.
    """

    compute_dtype: torch.dtype | None = None

    def __init__(self, ndim: int, in_channels: int, out_channels: int, width: int = 16, depth: int = 3,
                 zero_init_out: bool = True):
        super().__init__()
        Conv = _conv(ndim)
        self.ndim, self.depth = ndim, depth
        ch = [width * 2**i for i in range(depth + 1)]
        self.inc = Conv(in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(depth):
            self.down.append(nn.ModuleList([Conv(ch[i], ch[i + 1], 3, stride=2, padding=1),
                                            Conv(ch[i + 1], ch[i + 1], 3, padding=1)]))
        self.up = nn.ModuleList([Conv(ch[i + 1] + ch[i], ch[i], 3, padding=1) for i in reversed(range(depth))])
        self.out = Conv(ch[0], out_channels, 3, padding=1)
        if zero_init_out:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def pad_amounts(self, spatial) -> list[int]:
        """Voxels added at the end of each spatial axis."""
        m = 2**self.depth
        return [(-n) % m for n in spatial]

    def forward(self, x):
        if self.compute_dtype is None:
            return self._forward(x)
        with torch.autocast(x.device.type, dtype=self.compute_dtype):
            return self._forward(x).to(x.dtype)

    def _forward(self, x):
        spatial = tuple(x.shape[2:])
        if len(spatial) != self.ndim:
            raise ValueError(f"UNet({self.ndim}-D) got input of shape {tuple(x.shape)}; expected (B, C, *spatial)")
        pads = self.pad_amounts(spatial)
        if any(pads):
            flat = []
            for p in reversed(pads):  # F.pad wants the last axis first
                flat += [0, p]
            x = F.pad(x, flat, mode="replicate")
        if self.ndim == 2:
            x = x.contiguous(memory_format=torch.channels_last)
        act = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
        h = act(self.inc(x))
        skips = [h]
        for conv_down, conv in self.down:
            h = act(conv(act(conv_down(h))))
            skips.append(h)
        skips.pop()
        for conv in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[2:], mode="nearest")
            h = act(conv(torch.cat([h, skip], dim=1)))
        out = self.out(h)
        if any(pads):
            out = out[(slice(None), slice(None)) + tuple(slice(0, n) for n in spatial)]
        return out.contiguous()




def _native_bf16_cpu() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX); False if unknown."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers of torch.cpu, absent from some builds
        return False


def resolve_precision(precision: str, device) -> str:
    """``"float32"`` or ``"bfloat16"`` for ``precision`` in :data:`PRECISIONS` on a torch ``device``.

    ``"auto"`` takes bfloat16 on CPUs that compute it in hardware (faster there,
    at the same Dice: docs/vrnet.md) and float32 elsewhere: emulated bfloat16 is
    slower, and on a GPU the network is not the bottleneck.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bfloat16" if torch.device(device).type == "cpu" and _native_bf16_cpu() else "float32"


@contextmanager
def unet_precision(model: nn.Module, precision: str):
    """Within the block, every :class:`UNet` of ``model`` computes in ``precision``
    (``"float32"`` or ``"bfloat16"``; the rest of the engine, warps and data steps,
    stays in the parameters' dtype). The previous setting is restored on exit."""
    dtype = {"float32": None, "bfloat16": torch.bfloat16}[precision]
    nets = [m for m in model.modules() if isinstance(m, UNet)]
    before = [n.compute_dtype for n in nets]
    for n in nets:
        n.compute_dtype = dtype
    try:
        yield
    finally:
        for n, b in zip(nets, before):
            n.compute_dtype = b


class GeneralisedDenoiser:
    """One GDL in the engine's protocol ``denoiser(u, weight) -> v`` (a plain callable, built per forward).

    ``u``: ``(B, ndim, *spatial)``. With ``fixed``/``moving`` given (conditioning),
    the U-Net input is ``[u, fixed, warp(moving, u)]`` along the channel axis.
    ``weight`` (``lam / theta``) is ignored: the network absorbs it.
    """

    def __init__(self, net: UNet, *, residual: bool = True, fixed=None, moving=None):
        self.net, self.residual, self.fixed, self.moving = net, residual, fixed, moving

    def __call__(self, u, weight=None):
        x = u
        if self.fixed is not None:
            x = torch.cat([u, self.fixed.unsqueeze(1), warp(self.moving, u).unsqueeze(1)], dim=1)
        r = self.net(x)
        return u + r if self.residual else r


# --------------------------------------------------------------------------- VR-Net
class VRNet(nn.Module):
    """VR-Net (Jia et al.): the varreg engine with learned theta and U-Net denoisers.

    ``forward(fixed, moving)`` with ``(B, *spatial)`` (or unbatched ``spatial``)
    tensors returns the displacement ``(B, ndim, *spatial)`` in voxels, pull-back.
    Intensities are expected in [0, 1] (``register_learned`` scales the pair jointly).
    """

    def __init__(self, config: VRNetConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = VRNetConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a VRNetConfig or keyword arguments, not both")
        self.config = cfg = config
        self.data_term = make_data_term(cfg.data_term)
        n_nets = 1 if cfg.shared else cfg.n_cascades
        in_ch = cfg.ndim + (2 if cfg.condition else 0)
        self.denoisers = nn.ModuleList(
            [UNet(cfg.ndim, in_ch, cfg.ndim, cfg.width, cfg.depth, cfg.zero_init_out) for _ in range(n_nets)]
        )
        self.theta_raw = nn.Parameter(torch.full((n_nets,), inverse_softplus(cfg.theta_init - THETA_MIN), dtype=torch.float32))
        self.init_net = UNet(cfg.ndim, 2, cfg.ndim, cfg.width, cfg.depth, cfg.zero_init_out) if cfg.init == "unet" else None

    # -- parameters
    @property
    def theta(self):
        """Positive penalty weights, shape ``(1,)`` (shared) or ``(n_cascades,)``."""
        return F.softplus(self.theta_raw) + THETA_MIN

    def extra_repr(self) -> str:
        c = self.config
        return (f"ndim={c.ndim}, data_term={c.data_term}, cascades={c.n_warps}x{c.n_iters}, "
                f"{'Theta1 (shared)' if c.shared else 'Theta2 (per cascade)'}, init={c.init}")

    # -- forward
    def _check(self, fixed, moving):
        nd = self.config.ndim
        if not (torch.is_tensor(fixed) and torch.is_tensor(moving)):
            raise TypeError("VRNet.forward takes torch tensors; use varreg_learned.register_learned for NumPy arrays")
        if tuple(fixed.shape) != tuple(moving.shape):
            raise ValueError(f"fixed and moving differ in shape: {tuple(fixed.shape)} vs {tuple(moving.shape)}")
        if fixed.ndim not in (nd, nd + 1):
            raise ValueError(f"this VR-Net is {nd}-D: expected images (B, *spatial) with {nd} spatial axes, "
                             f"got shape {tuple(fixed.shape)}")

    def initial_displacement(self, fixed, moving):
        """The initialisation ``u^1`` (``(B, ndim, *spatial)``) or ``None`` for zeros."""
        cfg = self.config
        shape = (fixed.shape[0], cfg.ndim, *fixed.shape[1:])
        if cfg.init == "unet":
            return self.init_net(torch.stack([fixed, moving], dim=1))
        if cfg.init == "noise" and cfg.noise_std > 0:
            gen = None
            if not self.training:  # repeatable inference
                gen = torch.Generator(device=fixed.device).manual_seed(0)
            return torch.randn(shape, generator=gen, device=fixed.device, dtype=fixed.dtype) * cfg.noise_std
        return None

    def _cascades(self, fixed, moving):
        cfg = self.config
        cond = dict(fixed=fixed, moving=moving) if cfg.condition else {}
        dens = [GeneralisedDenoiser(net, residual=cfg.residual, **cond) for net in self.denoisers]
        theta = self.theta
        if cfg.shared:
            return dens[0], theta[0]
        return dens, theta

    def _solve(self, fixed, moving, u):
        cfg = self.config
        den, theta = self._cascades(fixed, moving)
        return solve(fixed, moving, u, data_term=self.data_term, denoiser=den, theta=theta, lam=cfg.lam,
                     n_warps=cfg.n_warps, n_iters=cfg.n_iters, ndim=cfg.ndim)

    def forward(self, fixed, moving):
        self._check(fixed, moving)
        cfg = self.config
        unbatched = fixed.ndim == cfg.ndim
        if unbatched:
            fixed, moving = fixed.unsqueeze(0), moving.unsqueeze(0)
        dtype = self.theta_raw.dtype  # images follow the parameters (float32 unless the model was cast)
        fixed, moving = fixed.to(dtype), moving.to(dtype)
        full = tuple(fixed.shape[1:])
        if cfg.scale < 1:
            small = tuple(max(int(round(n * cfg.scale)), 4) for n in full)
            sigma = smoothing_sigma(cfg.scale)
            fixed = resize(gaussian_smooth(fixed, sigma, cfg.ndim), small, cfg.ndim)
            moving = resize(gaussian_smooth(moving, sigma, cfg.ndim), small, cfg.ndim)
        u = self._forward_grid(fixed, moving)
        if cfg.scale < 1:
            u = resize_displacement(u, full, cfg.ndim)
        return u[0] if unbatched else u

    def _forward_grid(self, fixed, moving):
        """The cascades on the network's grid: ``(B, *spatial)`` pair -> ``(B, ndim, *spatial)``."""
        cfg = self.config
        u0 = self.initial_displacement(fixed, moving)
        spatial = tuple(fixed.shape[1:])
        if cfg.levels == 1:
            if u0 is None:
                u0 = fixed.new_zeros((fixed.shape[0], cfg.ndim, *spatial))
            u = self._solve(fixed, moving, u0)
        else:
            shapes = level_shapes(spatial, scale=0.5, levels=cfg.levels, min_size=8)
            u = coarse_to_fine(fixed, moving, lambda f, m, uu, lvl: self._solve(f, m, uu),
                               shapes=shapes, ndim=cfg.ndim, scale=0.5, u0=u0)
        return u
