"""Small helpers shared by the I/O and CLI tests."""
import numpy as np


def interior(u, shape, margin=1.0):
    """Voxels whose sample point x + u(x) lies inside the grid with a margin (where border rules do not matter)."""
    g = np.indices(shape, dtype=np.float64) + u
    ok = np.ones(shape, bool)
    for i, n in enumerate(shape):
        if n > 1:
            ok &= (g[i] >= margin) & (g[i] <= n - 1 - margin)
    return ok
