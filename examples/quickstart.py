"""Register a synthetic pair with a known displacement and report the error.

Run: python examples/quickstart.py   (no data needed)
"""
import time

import numpy as np

import varreg
from varreg import metrics, synthetic

rng = np.random.default_rng(0)
fixed = synthetic.smooth_random_image((256, 256), rng=rng)
truth = synthetic.sinusoidal_displacement(fixed.shape, amplitude=3.0)
moving = synthetic.deform(fixed, truth)  # moving(x + truth(x)) = fixed(x)

varreg.register(fixed, moving)  # warm-up: compiles (or loads) the numba kernels
t0 = time.perf_counter()
res = varreg.register(fixed, moving)
dt = time.perf_counter() - t0
print(f"varreg.register on a 256x256 pair: {dt * 1000:.0f} ms")
print(f"end-point error: {metrics.endpoint_error(res.displacement, truth):.3f} px (motion up to 3 px)")
print(f"mean |fixed - moving| {np.abs(fixed - moving).mean():.4f} -> |fixed - warped| {np.abs(fixed - res.warped).mean():.4f}")
print(f"folded pixels: {100 * metrics.folding_fraction(res.displacement):.3f} %")
