"""Array backends: which namespace an array lives in, device selection, transfers.

The solver is written once against the array API standard (through
``array_api_compat``) and runs on NumPy arrays (CPU, with fused numba kernels),
CuPy arrays (GPU) and torch tensors (VR-Net, autograd). Operations that the
standard does not define (interpolation, Gaussian filtering, resizing) live in
:mod:`varreg.resample`, which dispatches on the namespace.

``device="auto"`` picks a GPU only when CuPy can really allocate on one:
importing CuPy succeeds on machines with no driver, so an import is no proof.
"""
from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
from array_api_compat import array_namespace, is_cupy_namespace, is_numpy_namespace, is_torch_namespace

__all__ = [
    "namespace",
    "is_numpy",
    "is_cupy",
    "is_torch",
    "gpu_available",
    "resolve_device",
    "to_device",
    "to_numpy",
    "spatial_ndim",
    "host_float",
    "takes_kernel",
    "busy_cores",
    "fair_threads",
    "fair_share",
]

DEVICES = ("auto", "cpu", "gpu")


def namespace(*arrays):
    """The array-API namespace shared by ``arrays`` (numpy, cupy, torch, array_api_strict...)."""
    return array_namespace(*arrays)


def is_numpy(xp) -> bool:
    return is_numpy_namespace(xp)


def is_cupy(xp) -> bool:
    return is_cupy_namespace(xp)


def is_torch(xp) -> bool:
    return is_torch_namespace(xp)


@functools.lru_cache(maxsize=1)
def _gpu_probe() -> str | None:
    """``None`` when CuPy can allocate on a GPU, else the reason it cannot."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        return f"CuPy is not installed or failed to import ({type(exc).__name__}: {exc}); install the 'gpu' extra"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy found no CUDA device"
        x = cupy.arange(4, dtype=cupy.float32)
        float((x * 2).sum())
    except Exception as exc:  # no driver, no device, out of memory
        return f"CuPy cannot use a GPU ({type(exc).__name__}: {exc})"
    return None


def gpu_available() -> bool:
    """True when CuPy is installed and can allocate and compute on a GPU."""
    return _gpu_probe() is None


def resolve_device(device: str) -> str:
    """Map ``"auto" | "cpu" | "gpu"`` to ``"cpu"`` or ``"gpu"``.

    ``"gpu"`` where no GPU is usable raises a ``RuntimeError`` naming the reason;
    ``"auto"`` falls back to the CPU.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return "cpu"
    reason = _gpu_probe()
    if device == "gpu" and reason is not None:
        raise RuntimeError(f"device='gpu' was asked for but no GPU is usable: {reason}. Use device='cpu' or 'auto'.")
    return "cpu" if reason is not None else "gpu"


def to_device(array, device: str):
    """Copy a NumPy-compatible array to ``"cpu"`` (NumPy) or ``"gpu"`` (CuPy)."""
    if device == "gpu":
        import cupy

        return cupy.asarray(array)
    return to_numpy(array)


def to_numpy(array) -> np.ndarray:
    """A NumPy view or copy of a NumPy, CuPy or torch array."""
    if isinstance(array, np.ndarray):
        return array
    mod = type(array).__module__
    if mod.startswith("cupy"):
        return array.get()
    if mod.startswith("torch"):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def spatial_ndim(u, like=None) -> int:
    """The number of spatial axes (2 or 3) of a displacement ``u`` of shape ``(*batch, ndim, *spatial)``.

    With ``like`` (an image or a point-wise field ``(*batch, *spatial)``), its
    spatial and batch axes must be those of ``u``; a ``ValueError`` otherwise.
    """
    for k in (3, 2):
        if u.ndim < k + 1 or u.shape[u.ndim - k - 1] != k:
            continue
        if like is None:
            return k
        if (tuple(like.shape[like.ndim - k:]) == tuple(u.shape[u.ndim - k:])
                and tuple(like.shape[: like.ndim - k]) == tuple(u.shape[: u.ndim - k - 1])):
            return k
    fit = "" if like is None else f" does not fit an array of shape {tuple(like.shape)}"
    raise ValueError(f"displacement of shape {tuple(u.shape)}{fit}: expected (ndim, *spatial) with ndim 2 or 3")


def host_float(x):
    """A NumPy scalar or 0-d NumPy array as a Python float (NumPy would promote float32 data to
    its float64 dtype, and a Python float selects the fused kernels); anything else (a tensor) as is."""
    if isinstance(x, (np.generic, np.ndarray)) and np.ndim(x) == 0:
        return float(x)
    return x


def takes_kernel(u, ndim: int, *scalars) -> bool:
    """Whether a numba kernel of :mod:`varreg.kernels` takes this call: an unbatched NumPy field
    ``(ndim, *spatial)`` (or image) and Python-number parameters (no tensors)."""
    return isinstance(u, np.ndarray) and u.ndim == ndim + 1 and not any(hasattr(s, "shape") for s in scalars)


# --------------------------------------------------------------------------- threads on a shared machine
#: ``VARREG_FAIR_THREADS=0`` turns :func:`fair_threads` off (every call then uses the configured threads)
_FAIR = os.environ.get("VARREG_FAIR_THREADS", "1") != "0"


def _running_threads_elsewhere() -> int | None:
    """Threads of other processes that are running or runnable now (Linux ``/proc``), or None where unknown.

    ``/proc/loadavg``'s fourth field counts every runnable thread on the machine, this
    process's own included (the caller, and OpenMP workers still spinning after a parallel
    region); those of this process are read from ``/proc/self/task/*/stat`` and subtracted.
    """
    try:
        with open("/proc/loadavg") as fh:
            total = int(fh.read().split()[3].split("/")[0])
        own = 0
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as fh:
                    own += fh.read().rsplit(")", 1)[1].split()[0] == "R"
            except OSError:  # the thread ended meanwhile
                continue
    except (OSError, ValueError, IndexError):
        return None
    return max(total - max(own, 1), 0)


def busy_cores() -> int:
    """How many of this process's usable cores other processes keep busy now (0 where unknown)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    reads = [_running_threads_elsewhere() for _ in range(3)]  # a snapshot is noisy: the least of three
    known = [r for r in reads if r is not None]
    return min(min(known), cores) if known else 0


def fair_share(configured: int) -> int:
    """The threads a parallel solve should use now: ``configured``, less the cores that other
    processes keep busy, at least 1. On a loaded machine a parallel region waits at every barrier
    for a thread the OS has descheduled; fewer threads than cores that are free avoids it."""
    if not _FAIR or configured <= 1:
        return max(int(configured), 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    free = cores - busy_cores()
    return max(1, min(int(configured), free))


@contextlib.contextmanager
def fair_threads(torch_too: bool = False):
    """Within the block, numba's kernels (and torch's, with ``torch_too``) use :func:`fair_share` of their
    configured thread count; the setting is restored on exit. numba's count is per calling thread."""
    import numba

    n = numba.get_num_threads()
    k = fair_share(n)
    tn = None
    if torch_too:
        import torch

        tn = torch.get_num_threads()
        torch.set_num_threads(fair_share(tn))
    if k != n:
        numba.set_num_threads(k)
    try:
        yield k
    finally:
        if k != n:
            numba.set_num_threads(n)
        if tn is not None:
            import torch

            torch.set_num_threads(tn)
