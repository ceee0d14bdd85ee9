"""``varreg register --slices`` on one real ACDC patient agrees with the core API and with metrics.json.

Reads ``../shared/data/acdc`` (relative to the repository root); skipped when absent.
The whole validation split: ``python benchmarks/cli_acdc.py``.
"""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

import varreg
from varreg import acdc
from varreg_cli.main import main

ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "acdc"
PATIENT = "patient004"  # validation split (number % 5 == 4)

pytestmark = [
    pytest.mark.acdc,
    pytest.mark.skipif(not (ROOT / f"{PATIENT}_ED.nii.gz").exists(), reason="../shared/data/acdc is absent"),
]


def _dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_slices_cli_matches_core_api_and_its_metrics(tmp_path):
    out = tmp_path / "out"
    f = lambda s: str(ROOT / f"{PATIENT}_{s}.nii.gz")  # noqa: E731
    res = CliRunner().invoke(main, ["register", f("ED"), f("ES"), "-o", str(out), "--slices",
                                    "--fixed-labels", f("ED_gt"), "--moving-labels", f("ES_gt")])
    assert res.exit_code == 0, res.stderr
    m = json.loads((out / "metrics.json").read_text())
    warped_labels = np.asarray(nib.load(str(out / "warped_labels.nii.gz")).dataobj)
    assert warped_labels.dtype == np.uint8

    # independent computation: the paper's 2-D protocol with the core API, own Dice
    case = acdc.load_case(ROOT, PATIENT)
    per_label = {k: [] for k in acdc.LABELS}
    used = []
    for z, fixed, moving, fixed_gt, moving_gt in acdc.slice_pairs(case):
        r = varreg.register(fixed, moving)
        wl = np.asarray(varreg.warp(moving_gt, r.displacement, order=0))
        np.testing.assert_array_equal(warped_labels[..., z], wl)  # the CLI registered this slice the same way
        for k in acdc.LABELS:
            per_label[k].append(_dice(fixed_gt == k, wl == k))
        used.append(z)
    assert used and m["slices"]["indices"] == used
    for k in acdc.LABELS:
        assert m["slices"]["dice"][str(k)] == pytest.approx(np.mean(per_label[k]), abs=1e-12)
    # volume Dice from the written label map
    ed_gt = case.ed_gt
    for k in acdc.LABELS:
        assert m["dice"][str(k)] == pytest.approx(_dice(ed_gt == k, warped_labels == k), abs=1e-12)
    assert m["slices"]["mean_dice"] > m["slices"]["mean_dice_before"]
    assert m["time_s"]["solver"] > 0 and m["time_s"]["total"] >= m["time_s"]["solver"]
