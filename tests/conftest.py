"""Suite-wide settings: one numba and one torch thread.

The suite's grids are small, where the parallel kernels' fork/join costs more
than the work (badly so on a loaded 2-core machine), and CI should spare its
cores. Tests that need several threads set them themselves.
"""
import numba
import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    n = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        import torch
    except ImportError:  # the learned extra is optional
        torch = None
    t = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(1)
    yield
    numba.set_num_threads(n)
    if torch:
        torch.set_num_threads(t)
