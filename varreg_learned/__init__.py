"""VR-Net: the varreg engine unrolled into a network with learned denoisers (needs the 'learned' extra).

    from varreg_learned import VRNet, VRNetConfig, register_learned
    net = VRNet(VRNetConfig(ndim=2, data_term="l1", n_warps=3, n_iters=2))
    u = net(fixed, moving)                     # torch (B, H, W) -> (B, 2, H, W), voxels, pull-back
    res = register_learned(fixed_np, moving_np, "vrnet.pt", post_warps=5)   # NumPy in, RegistrationResult out

Training: ``varreg train`` (command line) and :mod:`varreg_learned.train` (ACDC 2D slices;
``examples/train_vrnet.py`` shows the API).
See docs/vrnet.md.
"""
import importlib

#: public name -> submodule; imported on first use, so that ``varreg_learned.options`` (the command line's
#: --help) does not load torch
_LAZY = {"load_checkpoint": "checkpoint", "read_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
         "load_model": "inference", "register_learned": "inference", "LossConfig": "loss", "vrnet_loss": "loss",
         "VRNet": "model", "VRNetConfig": "model", "VRNetOptions": "options"}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
