"""The ACDC ED/ES layout of ``../shared/data/acdc`` and the paper's 2D evaluation protocol.

Files per patient: ``patientNNN_{ED,ES}.nii.gz`` (float32 images in [0, 1]) and
``patientNNN_{ED,ES}_gt.nii.gz`` (uint8 labels: 1 RV, 2 Myo, 3 LV), arrays
``(H, W, slices)``. Split by patient number: train ``n % 5 in {1, 2, 3}``,
validation ``n % 5 == 4``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["LABELS", "TABLE_ORDER", "SPLITS", "split_rule", "Case", "patients", "load_case", "all_present", "slice_pairs",
           "score_pair"]

#: label value -> structure name
LABELS = {1: "RV", 2: "Myo", 3: "LV"}
#: the column order of the paper's tables (LV, Myo, RV)
TABLE_ORDER = (3, 2, 1)
#: patient splits as ``(modulus, residues)`` of the patient number: train and val as the data's README
#: suggests; val-select / val-test halve val (two patients of each pathology group in each) so that
#: checkpoints and settings are chosen on one half and reported on the other
SPLITS = {"train": (5, {1, 2, 3}), "val": (5, {4}), "val-select": (10, {4}), "val-test": (10, {9}),
          "all": (1, {0})}


def split_rule(split: str) -> str:
    """``"patient number % 5 in {1, 2, 3}"``: the rule of ``split`` in words."""
    mod, rems = SPLITS[split]
    if mod == 1:
        return "every patient"
    rems = sorted(rems)
    return f"patient number % {mod} " + (f"== {rems[0]}" if len(rems) == 1 else "in {" + ", ".join(map(str, rems)) + "}")


@dataclass
class Case:
    """One patient: ``ed``/``es`` images and labels, arrays ``(H, W, slices)``; ``spacing`` in mm (or 1s)."""

    patient: str
    ed: np.ndarray
    es: np.ndarray
    ed_gt: np.ndarray
    es_gt: np.ndarray
    spacing: tuple


def patients(root, split: str = "all") -> list[str]:
    """Patient ids (``patient004`` ...) under ``root`` in ``split`` (a key of :data:`SPLITS`), sorted."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ACDC folder {root} does not exist")
    out = []
    for p in sorted(root.glob("patient*_ED.nii.gz")):
        m = re.match(r"(patient(\d+))_ED\.nii\.gz$", p.name)
        if m and int(m.group(2)) % SPLITS[split][0] in SPLITS[split][1]:
            out.append(m.group(1))
    return out


def load_case(root, patient: str) -> Case:
    """Read one patient's ED/ES images and labels with nibabel."""
    import nibabel as nib

    root = Path(root)

    def read(suffix, dtype):
        img = nib.load(str(root / f"{patient}_{suffix}.nii.gz"))
        return np.asarray(img.dataobj, dtype=dtype), tuple(float(z) for z in img.header.get_zooms()[:3])

    ed, spacing = read("ED", np.float32)
    es, _ = read("ES", np.float32)
    ed_gt, _ = read("ED_gt", np.uint8)
    es_gt, _ = read("ES_gt", np.uint8)
    return Case(patient, ed, es, ed_gt, es_gt, spacing)


def all_present(fixed_labels, moving_labels, labels=LABELS) -> bool:
    """The protocol's rule for a slice: every one of ``labels`` is present in both label maps."""
    return bool(labels) and all(bool((fixed_labels == k).any()) and bool((moving_labels == k).any()) for k in labels)


def slice_pairs(case: Case):
    """The paper's 2D protocol: slice indices where LV, Myo and RV are present in both phases.

    Yields ``(z, fixed=ED slice, moving=ES slice, fixed_labels=ED gt, moving_labels=ES gt)``.
    """
    for z in range(case.ed.shape[2]):
        a, b = case.ed_gt[..., z], case.es_gt[..., z]
        if all_present(a, b):
            yield z, case.ed[..., z], case.es[..., z], a, b


def score_pair(fixed_labels, moving_labels, u, *, spacing=None, labels=TABLE_ORDER) -> dict:
    """The protocol's metrics of one registered pair (2-D slices or 3-D volumes).

    ``moving_labels`` are warped by ``u`` (``(ndim, *fixed_labels.shape)``, voxels,
    pull-back) with nearest neighbour and compared with ``fixed_labels``.

    Returns ``{"dice": {label: float}, "hd": {...}, "hd95": {...}, "fold_pct": %
    det(I + grad u) <= 0, "jgrad": mean |grad det| per voxel}``; distances in the
    units of ``spacing`` (voxels when None), ``inf`` for a structure warped away.
    """
    from . import metrics
    from .resample import warp

    u = np.asarray(u)
    warped = warp(np.asarray(moving_labels), u, order=0)
    out = metrics.label_metrics(fixed_labels, warped, labels=list(labels), spacing=spacing)
    out["fold_pct"] = 100.0 * metrics.folding_fraction(u)
    out["jgrad"] = metrics.jacobian_gradient_magnitude(u)
    return out
