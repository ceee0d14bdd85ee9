"""A registration gives the same displacement, bit for bit, whether its numba kernels
were compiled in this process or loaded from numba's on-disk cache.

Numba optimises a freshly compiled parallel kernel differently from the cached one;
with value-changing fast-math flags the two rounded differently, and the first run on
a machine disagreed with every later one (by up to 0.5 px on ACDC with L1). Each
process below gets its own empty cache: the first compiles and writes it, the second
loads it.
"""
import os
import subprocess
import sys

import numpy as np

SCRIPT = """
import sys, numpy as np, numba, varreg
from varreg import phantom
numba.set_num_threads(1)
pair = phantom.demo_pair((80, 72), rng=3)
f, m = pair.fixed, pair.moving
out = {"l1": varreg.register(f, m).displacement,
       "l2": varreg.register(f, m, data_term="l2").displacement,
       "tgv": varreg.register(f, m, denoiser="tgv", refine=0).displacement}
np.savez(sys.argv[1], **out)
"""


def test_cold_compile_and_cached_kernels_agree_bit_for_bit(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba_cache"), NUMBA_NUM_THREADS="1")
    runs = []
    for k in ("cold", "cached"):
        out = tmp_path / f"{k}.npz"
        subprocess.run([sys.executable, "-c", SCRIPT, str(out)], check=True, env=env, timeout=600)
        runs.append(np.load(out))
    assert any((tmp_path / "numba_cache").rglob("*.nbi")), "the first run wrote no cache: the test would prove nothing"
    cold, cached = runs
    for name in cold.files:
        assert np.abs(cold[name]).max() > 0.5, name  # it registered something
        assert np.array_equal(cold[name], cached[name]), (
            f"{name}: max difference {np.abs(cold[name] - cached[name]).max()} between a cold compile and the cache")
