"""varreg: variational deformable image registration on one iteration engine.

Public API: :func:`register`, :func:`register_slices`, :func:`register_images`,
:func:`warp`, :class:`SolverOptions` (every option, documented once) and
:mod:`varreg.metrics`. New regularisers and data terms plug into
:mod:`varreg.engine` (protocols), :mod:`varreg.denoisers` and
:mod:`varreg.data_terms`; docs/architecture.md shows where everything lives.
"""
from . import backend, data_terms, denoisers, engine, metrics, synthetic  # noqa: F401  (public submodules)
from .options import OptionError, SolverOptions
from .registration import RegistrationResult, register, register_images, register_slices
from .resample import warp as _warp_any

__version__ = "0.1.0"
__all__ = ["register", "register_slices", "register_images", "warp", "RegistrationResult", "SolverOptions",
           "OptionError", "__version__"]


def warp(image, displacement, order: int = 1):
    """Resample ``image`` at ``x + displacement(x)`` (pull-back), border replicated.

    Parameters
    ----------
    image : array ``(*spatial)``, 2-D or 3-D, NumPy or CuPy.
    displacement : array ``(ndim, *spatial)`` in voxels, as ``RegistrationResult.displacement``.
    order : 1 linear (images), 0 nearest neighbour (label maps; dtype kept).
    """
    import numpy as np

    if type(image).__module__.startswith("numpy") or not hasattr(image, "__cuda_array_interface__"):
        image = np.asarray(image)
        displacement = np.asarray(displacement)
        if image.dtype.kind not in "fiub":
            raise TypeError(f"image has dtype {image.dtype}; expected a real array")
        if image.dtype.kind == "b":
            image = image.astype(np.uint8)
    if image.ndim not in (2, 3):
        raise ValueError(f"image has {image.ndim} dimensions; expected 2-D or 3-D")
    if tuple(displacement.shape) != (image.ndim, *image.shape):
        raise ValueError(f"displacement of shape {tuple(displacement.shape)} does not fit image of shape {tuple(image.shape)}: expected {(image.ndim, *image.shape)}")
    if displacement.dtype.kind != "f":
        displacement = displacement.astype("float32")
    return _warp_any(image, displacement, order=order)
