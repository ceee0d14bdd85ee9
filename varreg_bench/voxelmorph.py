"""VoxelMorph (the ``voxelmorph`` package's ``VxmPairwise``) as a benchmark peer of VR-Net, 2-D.

The network is the package's own; this module builds it from a plain config,
stores it as **safetensors** (weights) with the config and the training record
as JSON in the file's metadata (no pickle anywhere), and runs it on a 2-D pair
with the conventions of :func:`varreg.register`.

Conventions (measured with pure translations and smooth fields, see
``tests/test_voxelmorph_peer.py``): ``VxmPairwise.forward(source, target)``
returns a displacement ``(B, ndim, *spatial)`` **in voxels**, component ``i``
along array axis ``i``, **pull-back**: the package's ``SpatialTransformer``
gives ``warped_source(x) = source(x + d(x))`` (linear, align_corners). That is
varreg's convention with source = moving, target = fixed, so the conversion is
the identity (minus the batch axis); ``varreg.warp(moving, d)`` equals the
package's warped source away from the border (varreg replicates the border,
the package pads with zeros).

Inference (:func:`register_voxelmorph`) prepares a pair as VR-Net's inference
does: joint min-max scaling to [0, 1] (``varreg.registration.normalise_pair``),
the full slice (no heart crop), replicate padding at the end of each axis to a
multiple of ``2**levels``, the field cropped back.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

__all__ = ["FORMAT", "DEFAULT_CONFIG", "CHECKPOINTS", "build_model", "save", "load", "levels",
           "register_voxelmorph", "field", "voxelmorph_methods", "default_checkpoints"]

#: the ``format`` entry of a checkpoint's safetensors metadata
FORMAT = "varreg-voxelmorph/1"

#: the VoxelMorph paper's 2-D-sized U-Net: encoder 16, 32, 32, 32 (decoder mirrored), plain displacement
DEFAULT_CONFIG = {"ndim": 2, "source_channels": 1, "target_channels": 1, "nb_features": [16, 32, 32, 32],
                  "integration_steps": 0}

_HERE = Path(__file__).resolve().parent / "checkpoints"
#: method name -> shipped checkpoint
CHECKPOINTS = {"voxelmorph": str(_HERE / "voxelmorph2d_acdc.safetensors"),
               "voxelmorph-labels": str(_HERE / "voxelmorph2d_acdc_labels.safetensors")}

_KEYS = ("ndim", "source_channels", "target_channels", "nb_features", "integration_steps")


def _check_config(config: dict) -> dict:
    if not isinstance(config, dict):
        raise ValueError(f"VoxelMorph config must be a dict, got {type(config).__name__}")
    cfg = {**DEFAULT_CONFIG, **config}
    unknown = sorted(set(cfg) - set(_KEYS))
    if unknown:
        raise ValueError(f"VoxelMorph config: unknown key(s) {', '.join(unknown)}; known: {', '.join(_KEYS)}")
    if cfg["ndim"] not in (2, 3):
        raise ValueError(f"VoxelMorph config: ndim must be 2 or 3, got {cfg['ndim']!r}")
    nf = cfg["nb_features"]
    if not (isinstance(nf, (list, tuple)) and nf and all(isinstance(f, int) and f > 0 for f in nf)):
        raise ValueError(f"VoxelMorph config: nb_features must be a list of positive integers, got {nf!r}")
    if not (isinstance(cfg["integration_steps"], int) and cfg["integration_steps"] >= 0):
        raise ValueError(f"VoxelMorph config: integration_steps must be an integer >= 0, "
                         f"got {cfg['integration_steps']!r}")
    cfg["nb_features"] = [int(f) for f in nf]
    return cfg


def levels(config: dict) -> int:
    """The number of stride-2 levels of the U-Net: inputs must be multiples of ``2**levels``."""
    return len(_check_config(config)["nb_features"])


def build_model(config: dict):
    """A ``voxelmorph.nn.models.VxmPairwise`` from a plain config (keys of :data:`DEFAULT_CONFIG`)."""
    from voxelmorph.nn.models import VxmPairwise

    cfg = _check_config(config)
    return VxmPairwise(ndim=cfg["ndim"], source_channels=cfg["source_channels"],
                       target_channels=cfg["target_channels"], nb_features=tuple(cfg["nb_features"]),
                       integration_steps=cfg["integration_steps"])


def save(path, model, config: dict, meta: dict | None = None) -> None:
    """Write ``model``'s weights to ``path`` (safetensors), config and ``meta`` as JSON in its metadata.

    Written to a temporary name and renamed, so ``path`` is never half written.
    """
    from safetensors.torch import save_file

    cfg = _check_config(config)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "config": json.dumps(cfg), "meta": json.dumps(meta or {})}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def load(path, ndim: int | None = 2):
    """``(model, config, meta)`` from a file written by :func:`save`; the model in eval mode on the CPU.

    Raises ``ValueError`` for a file that is not such a checkpoint (not safetensors, no or another
    ``format``, weights that do not fit the config) or, with ``ndim``, one for another dimension;
    ``FileNotFoundError`` when ``path`` does not exist. Loading runs no code from the file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such VoxelMorph checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001  (safetensors raises its own error types for foreign files)
        raise ValueError(f"{path}: not a VoxelMorph checkpoint (not a safetensors file: "
                         f"{type(exc).__name__})") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not a VoxelMorph checkpoint (safetensors metadata format "
                         f"{metadata.get('format')!r}, expected {FORMAT!r})")
    try:
        config = _check_config(json.loads(metadata["config"]))
        meta = json.loads(metadata.get("meta", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: VoxelMorph checkpoint with unreadable config/meta ({exc})") from None
    if ndim is not None and config["ndim"] != ndim:
        raise ValueError(f"{path}: a {config['ndim']}-D VoxelMorph checkpoint, {ndim}-D needed")
    model = build_model(config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ValueError(f"{path}: weights do not fit its config {config} ({first})") from None
    model.eval()
    return model, config, meta


@functools.lru_cache(maxsize=4)
def _cached(path: str):
    return load(path, ndim=2)


def register_voxelmorph(fixed, moving, checkpoint, spacing=None) -> np.ndarray:
    """The displacement ``(2, H, W)`` float32 (voxels, pull-back: ``moving(x + u(x)) ~ fixed(x)``) of a 2-D pair.

    ``spacing`` is accepted for the bench's signature and ignored (the network works in voxels).
    The model is loaded once per path (cached), on the CPU.
    """
    from varreg.registration import normalise_pair

    fixed, moving = np.asarray(fixed), np.asarray(moving)
    if fixed.ndim != 2 or fixed.shape != moving.shape:
        raise ValueError(f"register_voxelmorph needs two 2-D images of one shape, got {fixed.shape} and "
                         f"{moving.shape}")
    model, config, _ = _cached(str(Path(checkpoint).resolve()))
    f, m = normalise_pair(fixed, moving)
    return field(model, config, f, m)


def field(model, config: dict, fixed, moving) -> np.ndarray:
    """The network's displacement for a 2-D pair already scaled to [0, 1], in varreg's convention.

    Pads the end of each axis (border replicated) to a multiple of ``2**levels`` and crops the field back;
    runs under ``torch.no_grad`` (the caller sets eval mode).
    """
    import torch
    import torch.nn.functional as F

    H, W = fixed.shape
    mult = 2 ** levels(config)
    ph, pw = -H % mult, -W % mult
    x = torch.from_numpy(np.stack([moving, fixed]).astype(np.float32))[None]  # (1, 2: source=moving, target=fixed, H, W)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    with torch.no_grad():
        d = model(x[:, :1], x[:, 1:])  # VoxelMorph: (1, 2, H', W'), voxels, component i along axis i, pull-back
    return np.ascontiguousarray(d[0, :, :H, :W].numpy(), dtype=np.float32)  # varreg's convention: identity


def _describe(path, config, meta) -> str:
    loss = meta.get("loss", {})
    lab = "with the label term (soft Dice of the warped train labels, weight " \
          f"{loss.get('dice_weight')})" if loss.get("dice_weight") else "unsupervised"
    return (f"VoxelMorph (voxelmorph {meta.get('voxelmorph_version', '?')} VxmPairwise) checkpoint {path}: "
            f"U-Net features {config['nb_features']} (decoder mirrored), integration_steps "
            f"{config['integration_steps']} ({'plain displacement' if not config['integration_steps'] else 'diffeomorphic'}), "
            f"{meta.get('parameters', '?')} parameters; trained on VR-Net's ACDC data and protocol "
            f"(128x128 heart crops, batch {meta.get('batch_size', '?')}, Adam {meta.get('lr', '?')}, flips/rotations), "
            f"loss {loss.get('similarity', '?')} + {loss.get('alpha', '?')} |grad u|^2 {lab}, "
            f"{meta.get('steps', '?')} steps, kept step {meta.get('best_step', '?')} (best val-select Dice "
            f"{meta.get('best_dice', float('nan')):.4f}); full slice at inference, scaled jointly to [0, 1]")


def default_checkpoints() -> dict:
    """The shipped checkpoints: ``{"voxelmorph": path, "voxelmorph-labels": path}``."""
    return dict(CHECKPOINTS)


def voxelmorph_methods(checkpoints: dict | None = None) -> list:
    """Bench methods ``voxelmorph`` and ``voxelmorph-labels`` (``Method`` or ``Unavailable``).

    ``checkpoints``: method name -> checkpoint path; the shipped ones (:data:`CHECKPOINTS`) when ``None``.
    A bad checkpoint file raises ``ValueError`` naming it.
    """
    from .methods import Method, Unavailable, installed

    checkpoints = default_checkpoints() if checkpoints is None else dict(checkpoints)
    labels = {"voxelmorph": "VoxelMorph (unsupervised)", "voxelmorph-labels": "VoxelMorph + label term"}
    out = []
    for name in ("voxelmorph", "voxelmorph-labels"):
        label = labels[name]
        path = checkpoints.get(name)
        if not (installed("voxelmorph") and installed("torch") and installed("safetensors")):
            out.append(Unavailable(name, label, "peer", "voxelmorph is not installed (pip install voxelmorph "
                                                        "torch==<the installed torch version>)"))
            continue
        if not path or not Path(path).is_file():
            out.append(Unavailable(name, label, "peer", f"no VoxelMorph checkpoint {path or '(none given)'} "
                                                        "(benchmarks/train_voxelmorph.py makes it)"))
            continue
        _, config, meta = _cached(str(Path(path).resolve()))

        def run(fixed, moving, spacing=None, device="cpu", _ck=path):
            return register_voxelmorph(fixed, moving, _ck, spacing)

        out.append(Method(name, label, "peer", run, (2,), ("cpu",), _describe(path, config, meta), False))
    return out
