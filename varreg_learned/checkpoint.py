"""VR-Net checkpoints: one file with weights, the full config and training metadata.

Format (``torch.save`` of plain containers only, read back with
``torch.load(weights_only=True)``, so loading never runs pickled code)::

    {
      "format": "varreg-vrnet", "format_version": 1,
      "config": {...VRNetConfig fields...},
      "state_dict": {name: tensor},
      "meta": {"data", "split", "steps", "val", "loss", "versions", "created", ...},
      "train_state": {...}          # optional: optimizer state, step (resumable runs only)
    }

Writes are atomic: a temporary file in the target folder, fsync, ``os.replace``.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import tempfile
from pathlib import Path

import torch

from .model import VRNet, VRNetConfig

__all__ = ["FORMAT", "FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "read_checkpoint", "versions"]

FORMAT = "varreg-vrnet"
FORMAT_VERSION = 1


def versions() -> dict:
    import numpy
    import varreg

    return {"varreg": varreg.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def _plain(obj, where="meta"):
    """Check that ``obj`` holds only what ``weights_only`` loading accepts (and convert tuples/paths)."""
    if obj is None:
        return obj
    for t in (bool, int, float, str):  # exact builtins: subclasses (torch's TorchVersion) are refused by weights_only
        if isinstance(obj, t):
            return t(obj)
    if isinstance(obj, Path):
        return str(obj)
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return [_plain(v, where) for v in obj]
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: dict key {k!r} is not a string or integer")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalars
        return obj.item()
    raise TypeError(f"{where}: {type(obj).__name__} cannot be stored in a checkpoint (plain values and tensors only)")


def save_checkpoint(path, model: VRNet, meta: dict | None = None, *, train_state: dict | None = None) -> Path:
    """Write ``model`` (weights + config) and ``meta`` to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    meta.setdefault("versions", versions())
    meta.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": _plain(meta),
    }
    if train_state is not None:
        payload["train_state"] = _plain(train_state, "train_state")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def read_checkpoint(path) -> dict:
    """The raw checkpoint dict, checked for format; clear errors for missing or unreadable files."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"VR-Net checkpoint {path} does not exist")
    if not path.is_file():
        raise ValueError(f"VR-Net checkpoint {path} is not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"cannot read VR-Net checkpoint {path}: the file is corrupt, truncated or not a torch checkpoint "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a VR-Net checkpoint (no '{FORMAT}' format tag)")
    ver = payload.get("format_version")
    if not isinstance(ver, int) or ver > FORMAT_VERSION:
        raise ValueError(f"{path} has checkpoint format version {ver!r}; this varreg_learned reads up to {FORMAT_VERSION}")
    for key in ("config", "state_dict", "meta"):
        if not isinstance(payload.get(key), dict):
            raise ValueError(f"{path} is a damaged VR-Net checkpoint: '{key}' is missing")
    return payload


def load_checkpoint(path, *, ndim: int | None = None, expect: dict | None = None, map_location="cpu",
                    return_payload: bool = False):
    """Load a VR-Net from ``path``; returns ``(model, meta)`` (model in eval mode).

    ``ndim``: the image dimension the caller will use; a checkpoint for another
    dimension is refused with ``ValueError``. ``expect``: config fields that must
    match (e.g. ``{"data_term": "l1"}``). ``return_payload`` adds the raw dict
    (with ``train_state`` if present) as a third item.
    """
    payload = read_checkpoint(path)
    try:
        cfg = VRNetConfig.from_dict(dict(payload["config"]))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: incompatible VR-Net config: {exc}") from None
    if ndim is not None and cfg.ndim != ndim:
        raise ValueError(f"{path} is a {cfg.ndim}-D VR-Net checkpoint; it cannot register {ndim}-D images "
                         f"(train or pick a {ndim}-D checkpoint)")
    for key, want in (expect or {}).items():
        have = getattr(cfg, key, None)
        if have != want:
            raise ValueError(f"{path}: checkpoint config has {key}={have!r}, expected {want!r}")
    model = VRNet(cfg)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:400]
        raise ValueError(f"{path}: weights do not fit the stored config ({detail}); "
                         "the checkpoint is damaged or was written by an incompatible version") from None
    model.to(map_location)
    model.eval()
    if return_payload:
        return model, payload["meta"], payload
    return model, payload["meta"]
