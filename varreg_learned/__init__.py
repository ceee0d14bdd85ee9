"""VR-Net: the varreg engine unrolled into a network with learned denoisers (needs the 'learned' extra).

    from varreg_learned import VRNet, VRNetConfig, register_learned
    net = VRNet(VRNetConfig(ndim=2, data_term="l1", n_warps=3, n_iters=2))
    u = net(fixed, moving)                     # torch (B, H, W) -> (B, 2, H, W), voxels, pull-back
    res = register_learned(fixed_np, moving_np, "vrnet.pt", refine=2)   # NumPy in, RegistrationResult out

Training: ``varreg train`` (command line) and :mod:`varreg_learned.train` (ACDC 2D slices;
``examples/train_vrnet.py`` shows the API).
See docs/vrnet.md.
"""
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .inference import load_model, register_learned
from .loss import LossConfig, vrnet_loss
from .model import VRNet, VRNetConfig

__all__ = [
    "VRNet",
    "VRNetConfig",
    "LossConfig",
    "vrnet_loss",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "load_model",
    "register_learned",
]
