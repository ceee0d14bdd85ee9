"""The machine the benchmark runs on: threads, versions, the report's header, resident memory."""
from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata, util

__all__ = ["apply_threads", "versions", "gpu_description", "header_info", "rss_gib", "reset_peak_rss"]

#: distributions whose versions the header lists (when installed)
VERSIONED = ("numpy", "scipy", "numba", "scikit-image", "SimpleITK", "antspyx", "torch", "cupy-cuda12x", "matplotlib")


def apply_threads(n: int | None, torch_too: bool = False) -> int:
    """Give every method the same CPU threads: numba, SimpleITK/ITK, torch (when used). Returns the count."""
    import numba

    if n is not None:
        numba.set_num_threads(int(n))
    n = int(numba.get_num_threads())
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(n)  # ANTs (read when it loads)
    if util.find_spec("SimpleITK") is not None:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    if torch_too:
        import torch

        torch.set_num_threads(n)
    return n


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Python, varreg and the installed distributions of :data:`VERSIONED`: name -> version."""
    import varreg

    out = {"python": platform.python_version(), "varreg": varreg.__version__}
    for dist in VERSIONED:
        v = _version(dist)
        if v is not None:
            out[dist] = v
    return out


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gib():
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        return None


def gpu_description() -> str | None:
    """The GPU varreg can use (CuPy), or torch's CUDA device, or ``None``."""
    from varreg.backend import gpu_available

    if gpu_available():
        try:
            import cupy

            return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        except Exception:  # noqa: BLE001
            return "CuPy GPU"
    if util.find_spec("torch") is not None and "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    return None


def header_info(command: str, threads: int, seed: int, extra: dict | None = None) -> dict:
    """Machine, versions, seeds and the command, for the report's header."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    info = dict(
        command=command,
        started=time.strftime("%Y-%m-%d %H:%M:%S %z"),
        machine=dict(platform=platform.platform(), cpu=_cpu_model(), cpus_usable=cpus, memory_gib=_mem_gib(),
                     gpu=gpu_description(), load_average_at_start=load),
        threads=threads,
        seeds=dict(synthetic=seed, note="every method is deterministic for a fixed thread count; VR-Net's noise "
                                        "initialisation (if any) uses a fixed seed in evaluation mode"),
        versions=versions(),
    )
    info.update(extra or {})
    return info


def rss_gib():
    """(current RSS, peak RSS since the last reset) in GiB, from /proc (ru_maxrss elsewhere)."""
    try:
        vals = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS", "VmHWM")):
                    vals[line.split(":")[0]] = int(line.split()[1]) / 2**20
        return vals["VmRSS"], vals["VmHWM"]
    except (OSError, KeyError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return peak, peak


def reset_peak_rss() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS; False where the OS does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False
