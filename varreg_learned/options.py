"""VR-Net's inference options, defined once: fields, defaults, documentation and checks.

:class:`VRNetOptions` is what :func:`varreg_learned.register_learned` runs with;
``varreg register --denoiser unet`` builds its VR-Net flags from :data:`FIELDS`.
The classical warps after the network (``post_warps``) take the data term's
``theta`` and, unless ``post_lam`` is set, its ``refine_lam``
(:attr:`varreg.data_terms.L1.weights`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from varreg.denoisers import DENOISERS
from varreg.options import OptionError, Options
from varreg.options import option as _opt

__all__ = ["VRNetOptions", "FIELDS", "PRECISIONS", "DEVICES"]

#: Precisions of the U-Nets at inference (:func:`varreg_learned.model.resolve_precision`).
PRECISIONS = ("auto", "float32", "bfloat16")
#: ``auto``: CUDA when torch sees a device, else the CPU; ``gpu``: CUDA or an error; or a torch device name
DEVICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class VRNetOptions(Options):
    """Options of a VR-Net registration (:func:`varreg_learned.register_learned`); field by field: :data:`FIELDS`."""

    post_warps: int = _opt(5, "int0", "Classical Gauss-Newton warps at full resolution after the network, started "
                                      "from its displacement (0: the network alone). The default was chosen on "
                                      "ACDC val-select (docs/vrnet.md).")
    post_denoiser: str = _opt("quadratic", "name", "Denoiser of the post warps: after the network the remaining "
                                                   "correction is small and smooth (docs/vrnet.md compares them).")
    post_lam: float | None = _opt(None, "float+", "Regularisation weight λ of the post warps (None: the data term's "
                                                  "refine_lam).")
    precision: str = _opt("auto", "precision", "Arithmetic of the U-Nets: auto (bfloat16 on CPUs that compute it in "
                                               "hardware, float32 elsewhere), float32 or bfloat16.")
    normalise: bool = _opt(True, "flag", "Scale the pair jointly to [0, 1] first, as in training.")
    device: str = _opt("auto", "device", "auto: CUDA when torch sees a device, else the CPU; cpu; gpu; or a torch "
                                         "device name (cuda:1).")

    _what = "VR-Net"

    def __post_init__(self):
        pw = self.post_warps
        if not (isinstance(pw, int) and not isinstance(pw, bool) and pw >= 0):
            raise OptionError("post_warps", f"post_warps must be a non-negative integer, got {pw!r}")
        if not (isinstance(self.post_denoiser, str) and self.post_denoiser.lower() in DENOISERS):
            raise OptionError("post_denoiser", f"post_denoiser must be one of {sorted(DENOISERS)}, got "
                                               f"{self.post_denoiser!r}")
        lam = self.post_lam
        if lam is not None and not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
            raise OptionError("post_lam", f"post_lam must be a positive finite number, got {lam!r}")
        if self.precision not in PRECISIONS:
            raise OptionError("precision", f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.normalise, bool):
            raise OptionError("normalise", f"normalise must be True or False, got {self.normalise!r}")
        if not isinstance(self.device, str) or not (self.device in DEVICES or self.device.startswith(("cpu", "cuda"))):
            raise OptionError("device", f"device must be one of {DEVICES} or a torch device name, got {self.device!r}")


def check_checkpoint(path) -> None:
    """A checkpoint path that exists (read later, without executing pickled code: :mod:`.checkpoint`)."""
    if path is None:
        raise OptionError("checkpoint", "VR-Net needs a checkpoint (the package ships "
                                        "varreg_learned/checkpoints/vrnet2d_acdc.pt, 2-D)")
    if isinstance(path, (str, os.PathLike)) and not os.path.isfile(path):
        raise OptionError("checkpoint", f"{path}: checkpoint file not found")


#: field name -> ``dataclasses.Field`` (``.default``, ``.metadata["kind"]``, ``.metadata["help"]``), in order
FIELDS = {f.name: f for f in dataclasses.fields(VRNetOptions)}
