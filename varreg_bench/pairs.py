"""The suites' pairs: ACDC slices and volumes (labels), the synthetic 3-D pair (known displacement)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from varreg import acdc

__all__ = ["STRUCTURES", "SUITES", "DEFAULT_SPACING_3D", "Pair", "acdc_pairs", "synthetic_pair", "crop"]

#: (label value, name) in the column order of the paper's Tables III-V
STRUCTURES = tuple((k, acdc.LABELS[k]) for k in acdc.TABLE_ORDER)
SUITES = ("acdc-2d", "acdc-3d", "synthetic-3d")
DEFAULT_SPACING_3D = (1.5, 1.5, 10.0)


@dataclass
class Pair:
    """A fixed/moving pair of one suite, with labels (ACDC) or the true displacement (synthetic)."""

    suite: str
    patient: str
    index: int | None
    fixed: np.ndarray
    moving: np.ndarray
    fixed_labels: np.ndarray | None = None
    moving_labels: np.ndarray | None = None
    spacing: tuple | None = None  # given to methods that use it and to the distances
    truth: np.ndarray | None = None

    @property
    def key(self) -> str:
        return self.patient if self.index is None else f"{self.patient}:{self.index}"


def acdc_pairs(root, patients, *, dims=(2, 3), spacing_3d=DEFAULT_SPACING_3D) -> dict:
    """``{"acdc-2d": [Pair], "acdc-3d": [Pair]}`` for ``patients`` (the suites in ``dims``).

    2-D: :func:`varreg.acdc.slice_pairs` (ES slice -> ED slice where LV, Myo, RV
    are in both), in-plane spacing from the header (1 here: pixels), so 2-D
    numbers equal those of ``benchmarks/acdc_2d.py``. 3-D: ES volume -> ED
    volume with ``spacing_3d``.
    """
    out = {f"acdc-{d}d": [] for d in dims}
    for pid in patients:
        case = acdc.load_case(root, pid)
        if 2 in dims:
            sp2 = tuple(case.spacing[:2])
            sp2 = None if all(s == 1.0 for s in sp2) else sp2
            for z, f, m, fl, ml in acdc.slice_pairs(case):
                out["acdc-2d"].append(Pair("acdc-2d", pid, z, f, m, fl, ml, sp2))
        if 3 in dims:
            out["acdc-3d"].append(Pair("acdc-3d", pid, None, case.ed, case.es, case.ed_gt, case.es_gt,
                                       tuple(float(s) for s in spacing_3d)))
    return out


def synthetic_pair(shape=(128, 128, 96), amplitude: float = 3.0, seed: int = 0) -> Pair:
    """A smooth random volume and its copy deformed by a known sinusoidal displacement (``synthetic_3d.py``)."""
    from varreg import synthetic

    fixed = synthetic.smooth_random_image(tuple(shape), rng=seed)
    truth = synthetic.sinusoidal_displacement(tuple(shape), amplitude=amplitude)
    moving = synthetic.deform(fixed, truth)
    return Pair("synthetic-3d", f"synthetic{tuple(shape)}", None, fixed, moving, truth=truth)


def crop(pair: Pair, size: int = 64) -> Pair:
    """A centre crop (axes of at least ``size``) for the warm-up call: compiles/imports, costs little."""
    sl = tuple(slice((n - size) // 2, (n - size) // 2 + size) if n > size else slice(None) for n in pair.fixed.shape)
    c = lambda a: None if a is None else np.ascontiguousarray(a[sl])  # noqa: E731
    return Pair(pair.suite, pair.patient, pair.index, c(pair.fixed), c(pair.moving), spacing=pair.spacing)
