"""3-D registration with an affine stage against ANTs (affine + SyN) and elastix (affine + B-spline).

    python benchmarks/affine_3d.py --quick             # 1 seed, brain only, 3 mm grid (a try-out)
    python benchmarks/affine_3d.py                     # brain + acdc, 3 seeds, 3 ACDC patients
    python benchmarks/affine_3d.py --cases brain --seeds 5 --json out.json

Data, each with a known answer:

- ``brain``: the MNI152 2009a T1 template and its GM / WM probability maps shipped inside
  nilearn's wheel (``nilearn/datasets/data/mni_icbm152_*``, no download), block-averaged from
  1 mm to a 2 mm grid (98 x 116 x 94; ``--quick``: 3 mm, 65 x 77 x 63). Labels: the argmax of
  (background = 1 - GM - WM, GM, WM), so {1: GM, 2: WM}; no CSF map ships. Mask: GM or WM.
- ``acdc``: ED volumes of ``../shared/data/acdc`` (val split, patient number % 5 == 4; the first
  ``--patients``), arrays (H, W, slices), taken with spacing (1.5, 1.5, 8) mm (the files say 1 mm
  everywhere). Labels {1: RV, 2: Myo, 3: LV}; mask: the heart (any label).

The moving image of a pair is the fixed one under a known map. With the voxel map of a random
affine ``A`` (about the grid centre, in physical coordinates: rotation, scaling, shift) and a smooth
random displacement ``s`` (voxels), the truth is the pull-back displacement
``d(x) = A(x + s(x)) - x``: registration should find ``moving(x + d(x)) = fixed(x)``. So
``moving(y) = fixed(psi(y))`` with ``psi = (id + s)^-1 o A^-1``, the inverse of ``id + s``
found by fixed-point iteration (cubic interpolation for the image, nearest for labels).

- brain: rotation uniform in +-10 deg about a random axis, scaling uniform 0.92..1.08 per axis,
  shift uniform +-8 voxels per axis; ``s``: Gaussian-smoothed noise (sigma 16 mm) scaled to a
  peak of 3 voxels.
- acdc: rotation +-10 deg in-plane (about the slice axis) then a tilt of +-2 deg about a random
  in-plane axis; scaling 0.92..1.08 per axis; shift +-8 voxels per in-plane axis, none across
  slices; ``s``: as above with its in-plane part at a peak of 3 voxels and its through-plane
  component at a peak of 0.4 slice.

Methods: ``varreg (affine="affine")``, ``varreg (default)`` (no affine stage); on acdc also
``varreg (affine="affine", slice_axis=2)`` (the deformable part moves within the slices) and
``varreg.register_slices(..., affine="affine")`` (one 3-D affine, then 2-D slices), ANTs
``ants.registration(type_of_transform="SyN")`` (its defaults: Mattes MI affine, then SyN with
Mattes MI) in a separate virtual environment (``--ants-python``; antspyx pins an older numpy),
elastix (itk-elastix) default "affine" then "bspline" parameter maps, 4 resolutions, final
B-spline grid spacing 8 x the smallest voxel size. All get the same thread count (``--threads``;
default: the cores that other processes leave free now, as varreg's solver counts them).
Times are the registration calls only (ANTs: inside its process, import and field export
excluded; varreg after a warm-up call). Each external method's dense displacement is converted
to voxels of the fixed grid, pull-back, and ``--check`` (default on) verifies the conversion on
a pure translation before the run.

Metrics per pair: mean end-point error (voxels) against ``d`` in the mask and on the whole grid;
mean Dice over the labels of the fixed labels against the moving labels (the fixed labels under
``psi``, nearest) warped by the method's displacement (nearest); % voxels with det(I + grad u) <= 0;
seconds. Reference rows: ``identity`` (no registration) and ``truth d`` (the Dice ceiling of
nearest-neighbour resampling twice).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ACDC_ROOT = HERE.parent.parent / "shared" / "data" / "acdc"
DEFAULT_ANTS_PYTHON = "/work/venv-ants/bin/python"
ACDC_SPACING = (1.5, 1.5, 8.0)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# =========================================================================== ANTs worker (runs in the ANTs venv)
def ants_worker(argv):
    """``--ants-worker DIR``: reads DIR/{fixed,moving}.npy and DIR/params.json, writes DIR/disp.npy
    (3, *shape) float32, voxels of the fixed grid, pull-back) and DIR/meta.json. Imports only numpy and ants."""
    work = Path(argv[0])
    params = json.loads((work / "params.json").read_text())
    import ants

    sp = tuple(float(s) for s in params["spacing"])
    fixed = ants.from_numpy(np.load(work / "fixed.npy").astype(np.float32), origin=(0.0, 0.0, 0.0), spacing=sp)
    moving = ants.from_numpy(np.load(work / "moving.npy").astype(np.float32), origin=(0.0, 0.0, 0.0), spacing=sp)
    t0 = time.perf_counter()
    reg = ants.registration(fixed, moving, type_of_transform=params["type_of_transform"],
                            outprefix=str(work / "reg_"))
    dt = time.perf_counter() - t0
    # the forward transforms composed into one displacement field on the fixed grid (physical units,
    # ITK index axes = array axes here): moving is sampled at p + D(p)
    comp = ants.apply_transforms(fixed, moving, transformlist=reg["fwdtransforms"], compose=str(work / "comp_"))
    field = ants.image_read(comp).numpy()  # (X, Y, Z, 3)
    disp = np.stack([field[..., k] / sp[k] for k in range(3)]).astype(np.float32)
    np.save(work / "disp.npy", disp)
    (work / "meta.json").write_text(json.dumps(dict(time_s=dt, fwdtransforms=[Path(t).name for t in reg["fwdtransforms"]],
                                                    ants_version=getattr(ants, "__version__", "?"))))


# =========================================================================== methods (main environment)
def run_ants(fixed, moving, spacing, *, python, type_of_transform, threads, seed):
    with tempfile.TemporaryDirectory(prefix="affine3d_ants_") as tmp:
        tmp = Path(tmp)
        np.save(tmp / "fixed.npy", np.asarray(fixed, np.float32))
        np.save(tmp / "moving.npy", np.asarray(moving, np.float32))
        (tmp / "params.json").write_text(json.dumps(dict(spacing=list(spacing), type_of_transform=type_of_transform)))
        env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads), ANTS_RANDOM_SEED=str(seed))
        proc = subprocess.run([python, str(Path(__file__).resolve()), "--ants-worker", str(tmp)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ANTs worker failed (rc {proc.returncode}): {proc.stderr.strip()[-800:]}")
        meta = json.loads((tmp / "meta.json").read_text())
        return np.load(tmp / "disp.npy"), meta["time_s"], meta


def _itk_image(a, spacing):
    import itk

    img = itk.image_from_array(np.ascontiguousarray(a, dtype=np.float32))  # ITK index (i, j, k) = array axes reversed
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    img.SetOrigin((0.0, 0.0, 0.0))
    return img


def run_elastix(fixed, moving, spacing, *, threads, grid_factor=8.0, resolutions=4):
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))
    f, m = _itk_image(fixed, spacing), _itk_image(moving, spacing)
    po = itk.ParameterObject.New()
    po.AddParameterMap(po.GetDefaultParameterMap("affine", resolutions))
    po.AddParameterMap(po.GetDefaultParameterMap("bspline", resolutions, float(grid_factor * min(spacing))))
    t0 = time.perf_counter()
    _, tp = itk.elastix_registration_method(f, m, parameter_object=po, log_to_console=False,
                                            number_of_threads=int(threads))
    dt = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="affine3d_transformix_") as tmp:  # else it writes ./deformationField.nii
        field = itk.array_from_image(itk.transformix_deformation_field(m, tp, output_directory=tmp))
    # field: (a0, a1, a2, 3), components in ITK order (x, y, z) = array axes reversed
    disp = np.stack([field[..., 2 - k] / spacing[k] for k in range(3)]).astype(np.float32)
    return disp, dt


#: varreg's rows with the affine stage: 3-D; 3-D moving within the slices (slice_axis); slice by slice after one
#: 3-D affine. The last three are for thick-slice stacks and run on ACDC only. ``refine=10`` (no refine warps
#: below the finest level) was chosen on ACDC train patients 001-003 (seeds 10 and 11), not on these.
AFFINE_ROWS = ("varreg (affine)", "varreg (affine, slice axis 2)", "varreg (affine, slice axis 2, refine 10)",
               "varreg (affine, slices)")
THICK_ONLY = AFFINE_ROWS[1:]
RECOMMENDED = {"brain": "varreg (affine)", "acdc": "varreg (affine, slice axis 2, refine 10)"}


def run_varreg(fixed, moving, spacing, **kw):
    import varreg

    t0 = time.perf_counter()
    res = varreg.register(fixed, moving, spacing=spacing, **kw)
    return res, time.perf_counter() - t0


# =========================================================================== data
def _mni_dir():
    import nilearn

    return Path(nilearn.__file__).resolve().parent / "datasets" / "data"


def _block_mean(a, k):
    sh = tuple((n // k) * k for n in a.shape)
    a = a[: sh[0], : sh[1], : sh[2]].astype(np.float64)
    return a.reshape(sh[0] // k, k, sh[1] // k, k, sh[2] // k, k).mean(axis=(1, 3, 5))


def load_brain(mm: int):
    import nibabel as nib

    d = _mni_dir()

    def read(kind):
        return np.asarray(nib.load(str(d / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz")).dataobj,
                          dtype=np.float64) / 255.0

    t1, gm, wm = (_block_mean(read(k), mm) for k in ("t1", "gm", "wm"))
    bg = np.clip(1.0 - gm - wm, 0.0, 1.0)
    labels = np.argmax(np.stack([bg, gm, wm]), axis=0).astype(np.uint8)
    return dict(name="brain", id="mni152", image=t1.astype(np.float32), labels=labels, mask=labels > 0,
                spacing=(float(mm),) * 3, label_ids=(1, 2), kind="brain")


def load_acdc(n_patients: int):
    from varreg import acdc

    out = []
    for p in acdc.patients(ACDC_ROOT, "val")[:n_patients]:
        c = acdc.load_case(ACDC_ROOT, p)
        out.append(dict(name="acdc", id=p, image=c.ed.astype(np.float32), labels=c.ed_gt.astype(np.uint8),
                        mask=c.ed_gt > 0, spacing=ACDC_SPACING, label_ids=(1, 2, 3), kind="acdc"))
    return out


# =========================================================================== known transforms
def _rotation(axis, angle):
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def random_affine(rng, shape, spacing, kind):
    """A voxel matrix (4 x 4, fixed voxel -> moving voxel) about the grid centre, built in physical units."""
    if kind == "acdc":
        R = _rotation((0, 0, 1), math.radians(rng.uniform(-10, 10)))
        phi = rng.uniform(0, 2 * math.pi)
        R = _rotation((math.cos(phi), math.sin(phi), 0), math.radians(rng.uniform(-2, 2))) @ R
        shift = np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), 0.0])
    else:
        R = _rotation(rng.standard_normal(3), math.radians(rng.uniform(-10, 10)))
        shift = rng.uniform(-8, 8, size=3)
    L = R @ np.diag(rng.uniform(0.92, 1.08, size=3))
    S = np.diag(spacing)
    lin = np.linalg.inv(S) @ L @ S
    c = (np.asarray(shape, np.float64) - 1) / 2
    M = np.eye(4)
    M[:3, :3] = lin
    M[:3, 3] = c - lin @ c + shift
    return M


def smooth_field(rng, shape, spacing, kind, sigma_mm=16.0, peak=3.0, through_peak=0.4):
    from scipy import ndimage

    sig = [sigma_mm / s for s in spacing]
    s = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sig, mode="reflect") for _ in range(3)])
    if kind == "acdc":
        s[:2] *= peak / np.sqrt((s[:2] ** 2).sum(0)).max()
        s[2] *= through_peak / np.abs(s[2]).max()
    else:
        s *= peak / np.sqrt((s ** 2).sum(0)).max()
    return s


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))


def _apply(M, p):
    return np.tensordot(M[:3, :3], p, axes=1) + M[:3, 3].reshape(3, 1, 1, 1)


def make_pair(case, seed):
    """The moving image and labels and the truth ``d`` (float32, voxels, pull-back) of one case and seed."""
    from scipy import ndimage

    shape, sp = case["image"].shape, case["spacing"]
    rng = np.random.default_rng([seed, sum(map(ord, case["id"]))])
    M = random_affine(rng, shape, sp, case["kind"])
    s = smooth_field(rng, shape, sp, case["kind"])
    x = _grid(shape)
    truth = (_apply(M, x + s) - x).astype(np.float32)  # d(x) = A(x + s(x)) - x
    # psi(y) = (id + s)^-1 (A^-1 y): solve p + s(p) = z by p <- z - s(p)
    z = _apply(np.linalg.inv(M), x)
    p = z.copy()
    for _ in range(40):
        p_new = z - np.stack([ndimage.map_coordinates(s[i], p, order=1, mode="nearest") for i in range(3)])
        step = np.abs(p_new - p).max()
        p = p_new
        if step < 1e-4:
            break
    img = case["image"].astype(np.float64)
    moving = ndimage.map_coordinates(img, p, order=3, mode="nearest")
    moving = np.clip(moving, img.min(), img.max()).astype(np.float32)
    moving_labels = ndimage.map_coordinates(case["labels"], p, order=0, mode="nearest").astype(np.uint8)
    return dict(moving=moving, moving_labels=moving_labels, truth=truth, A=M, inverse_step=float(step))


# =========================================================================== scoring
def score(u, case, pair):
    import varreg
    from varreg import metrics

    u = np.asarray(u, np.float32)
    warped_labels = varreg.warp(pair["moving_labels"], u, order=0)
    d = metrics.dice(case["labels"], warped_labels, labels=case["label_ids"])
    return dict(epe_mask=metrics.endpoint_error(u, pair["truth"], mask=case["mask"]),
                epe_all=metrics.endpoint_error(u, pair["truth"]),
                dice=float(np.nanmean(list(d.values()))), dice_per_label={int(k): v for k, v in d.items()},
                folds=100.0 * metrics.folding_fraction(u))


# =========================================================================== convention check
def check_conventions(methods, args, threads):
    """Register a pure translation (voxels, per axis distinct, anisotropic grid) with every external method
    and compare the median recovered displacement (inner region) with the truth."""
    from scipy import ndimage

    from varreg import synthetic

    shape, sp, t = (48, 56, 40), (1.0, 1.5, 2.0), np.array([2.0, -3.0, 1.5])
    t_text = "(" + ", ".join(f"{v:+g}" for v in t) + ")"
    fixed = synthetic.smooth_random_image(shape, sigma=3.0, rng=7)
    x = _grid(shape)
    moving = ndimage.map_coordinates(fixed.astype(np.float64), x - t.reshape(3, 1, 1, 1), order=3,
                                     mode="nearest").astype(np.float32)  # moving(x + t) = fixed(x)
    inner = (slice(None),) + tuple(slice(8, n - 8) for n in shape)
    rows = []
    for name, fn in methods.items():
        if name.startswith("varreg"):
            continue
        log(f"[check] {name} on a translation {t_text} voxels, spacing {sp}")
        try:
            u, _ = fn(fixed, moving, sp, 0)
        except Exception as exc:  # noqa: BLE001 (reported)
            rows.append((name, None, str(exc)))
            continue
        med = np.median(u[inner].reshape(3, -1), axis=1)
        rows.append((name, med, ""))
    print(f"\n### Convention check: moving(x + t) = fixed(x), t = {t_text} voxels (axes 0, 1, 2), "
          f"grid {shape}, spacing {sp}\n")
    print("| method | median recovered u (inner region), voxels | max abs error | verdict |")
    print("|---|---|---|---|")
    ok_all = True
    for name, med, err in rows:
        if med is None:
            print(f"| {name} | failed: {err[:120]} | - | - |")
            ok_all = False
            continue
        e = float(np.abs(med - t).max())
        ok = e < 0.25
        ok_all &= ok
        print(f"| {name} | ({med[0]:+.3f}, {med[1]:+.3f}, {med[2]:+.3f}) | {e:.3f} | {'ok' if ok else 'MISMATCH'} |")
    return ok_all


# =========================================================================== tables
def _fmt(v, nd=3):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def _mean(vals):
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def print_tables(records, methods_order, args, threads, notes):
    cases = [c for c in args.cases if any(r["case"] == c for r in records)]
    print(f"\n### Per pair\n")
    print("| case | volume | seed | method | EPE mask (vox) | EPE all (vox) | Dice | folds % | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        if r.get("error"):
            print(f"| {r['case']} | {r['id']} | {r['seed']} | {r['method']} | failed: {r['error'][:80]} | | | | |")
            continue
        print(f"| {r['case']} | {r['id']} | {r['seed']} | {r['method']} | {_fmt(r['epe_mask'])} | {_fmt(r['epe_all'])} "
              f"| {_fmt(r['dice'], 4)} | {_fmt(r['folds'])} | {_fmt(r.get('seconds'), 1)} |")

    summary = {}
    print(f"\n### Mean over pairs\n")
    print("| method | case | pairs | EPE mask (vox) | EPE all (vox) | Dice | folds % | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for m in methods_order:
        for c in cases:
            rs = [r for r in records if r["method"] == m and r["case"] == c and not r.get("error")]
            n_fail = sum(1 for r in records if r["method"] == m and r["case"] == c and r.get("error"))
            if not rs and not n_fail:
                continue
            agg = {k: _mean([r.get(k) for r in rs]) for k in ("epe_mask", "epe_all", "dice", "folds", "seconds")}
            summary[(m, c)] = agg
            pairs = f"{len(rs)}" + (f" (+{n_fail} failed)" if n_fail else "")
            print(f"| {m} | {c} | {pairs} | {_fmt(agg['epe_mask'])} | {_fmt(agg['epe_all'])} | {_fmt(agg['dice'], 4)} "
                  f"| {_fmt(agg['folds'])} | {_fmt(agg['seconds'], 1)} |")

    an = "ANTs SyN"
    print(f"\n### varreg with its affine stage against ANTs affine+SyN (targets: EPE ratio <= 1.25, Dice difference "
          f">= -0.005, time ratio <= 0.333)\n")
    if not any(m == an for m, _ in summary):
        print("ANTs did not run: no ratios.")
    else:
        print("| case | varreg | EPE mask ratio | EPE all ratio | Dice difference | time ratio | EPE target | Dice target "
              "| time target |")
        print("|---|---|---|---|---|---|---|---|---|")
        rows = [(c, m) for c in cases for m in AFFINE_ROWS if (m, c) in summary]
        rows += [("all", "per case: " + ", ".join(f"{c} {RECOMMENDED[c]}" for c in cases))] if len(cases) > 1 else []
        for c, m in rows:
            def pick(meth):
                rs = [r for r in records if not r.get("error") and (
                    (r["case"] == c and r["method"] == meth) or
                    (c == "all" and r["method"] == (RECOMMENDED[r["case"]] if meth != an else an)))]
                return {k: _mean([r.get(k) for r in rs]) for k in ("epe_mask", "epe_all", "dice", "seconds")}
            a, b = pick(m), pick(an)
            if not (math.isfinite(a["epe_mask"]) and math.isfinite(b["epe_mask"])):
                continue
            er, era = a["epe_mask"] / b["epe_mask"], a["epe_all"] / b["epe_all"]
            dd, tr = a["dice"] - b["dice"], a["seconds"] / b["seconds"]
            yes = lambda ok: "met" if ok else "MISSED"  # noqa: E731
            print(f"| {c} | {m} | {er:.3f} | {era:.3f} | {dd:+.4f} | {tr:.3f} | {yes(er <= 1.25)} | {yes(dd >= -0.005)} "
                  f"| {yes(tr <= 1 / 3)} |")
        print("\n(means over the pairs each method finished; 'all' pools every pair of every case, with the "
              "configuration a user of each kind of volume is advised to take: the thick-slice stacks with "
              "slice_axis=2 and refine=10)")
    if notes:
        print("\nNotes:")
        for n in notes:
            print(f"- {n}")
    return summary


def print_affine_diagnosis(diag):
    if not diag:
        return
    print("\n### varreg's affine stage against the true affine A\n")
    print("EPE of the affine stage's displacement alone (result.affine) against the true affine part A(x) - x, "
          "and against the whole truth d, in the mask; |M - A| is the largest entry of the difference of the "
          "3 x 3 parts; shift error in voxels.\n")
    print("| case | volume | seed | affine-only EPE vs A | affine-only EPE vs d | max abs (M - A)[:3,:3] "
          "| shift error (vox) | affine stage s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in diag:
        print(f"| {r['case']} | {r['id']} | {r['seed']} | {r['epe_A']:.3f} | {r['epe_d']:.3f} | {r['lin_err']:.4f} "
              f"| {r['shift_err']:.3f} | {_fmt(r['time_s'], 1)} |")
    worst = max(diag, key=lambda r: r["epe_A"])
    np.set_printoptions(precision=4, suppress=True)
    print(f"\nWorst pair ({worst['case']} {worst['id']} seed {worst['seed']}): true A (voxel matrix)\n```\n"
          f"{np.asarray(worst['A'])}\n```\nvarreg result.affine\n```\n{np.asarray(worst['M'])}\n```")


# =========================================================================== main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", choices=("brain", "acdc"), default=["brain", "acdc"])
    ap.add_argument("--seeds", type=int, default=3, help="random transforms per volume (seeds 0 .. N-1)")
    ap.add_argument("--patients", type=int, default=3, help="ACDC val patients (the first N)")
    ap.add_argument("--brain-mm", type=int, default=2, help="brain grid (block mean of the 1 mm template)")
    ap.add_argument("--quick", action="store_true", help="1 seed, brain only, 3 mm grid")
    ap.add_argument("--ants-python", default=DEFAULT_ANTS_PYTHON if Path(DEFAULT_ANTS_PYTHON).exists() else None,
                    help="python of a virtual environment with antspyx (default /work/venv-ants/bin/python if present)")
    ap.add_argument("--ants-transform", default="SyN", help="ants.registration type_of_transform (default SyN)")
    ap.add_argument("--no-ants", action="store_true")
    ap.add_argument("--no-elastix", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip the translation check of the conventions")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for every method (default: the cores other processes leave free now)")
    ap.add_argument("--json", default=None, help="write every record to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.cases, args.brain_mm = 1, ["brain"], 3

    import numba

    import varreg
    from varreg import backend, synthetic
    from varreg.affine import displacement_of

    if args.threads is not None:
        numba.set_num_threads(args.threads)
        os.environ["VARREG_FAIR_THREADS"] = "0"
    threads = args.threads or backend.fair_share(numba.get_num_threads())
    notes = [f"threads per method: {threads} (of {os.cpu_count()} cores; "
             f"{'given' if args.threads else 'the cores left free by other processes at the start'})"]

    methods = {}
    for name in AFFINE_ROWS:
        methods[name] = None
    methods["varreg (default)"] = None
    if not args.no_ants:
        if args.ants_python and Path(args.ants_python).exists():
            methods["ANTs SyN"] = lambda f, m, sp, seed: run_ants(f, m, sp, python=args.ants_python,
                                                                  type_of_transform=args.ants_transform,
                                                                  threads=threads, seed=seed)[:2]
            ver = subprocess.run([args.ants_python, "-c", "import importlib.metadata as m; print(m.version('antspyx'))"],
                                 capture_output=True, text=True).stdout.strip()
            notes.append(f"ANTs: antspyx {ver} via {args.ants_python}, ants.registration(type_of_transform="
                         f"{args.ants_transform!r}) with its defaults, ANTS_RANDOM_SEED = seed")
        else:
            notes.append(f"ANTs row skipped: no python with antspyx at {args.ants_python!r} (--ants-python)")
    if not args.no_elastix:
        try:
            import importlib.metadata as im

            import itk  # noqa: F401

            methods["elastix affine+bspline"] = lambda f, m, sp, seed: run_elastix(f, m, sp, threads=threads)
            notes.append(f"elastix: itk-elastix {im.version('itk-elastix')} (itk {im.version('itk')}), default "
                         "'affine' then 'bspline' parameter maps, 4 resolutions, final grid spacing 8 x min(spacing)")
        except ImportError:
            notes.append("elastix row skipped: itk-elastix is not installed (pip install itk-elastix)")

    print(f"# varreg affine 3-D benchmark (varreg {varreg.__version__})")
    if not args.no_check and len(methods) > 2:
        ok = check_conventions(methods, args, threads)
        if not ok:
            notes.append("the convention check failed for at least one method: its EPE is not comparable")

    log("[warm-up] varreg (numba)")
    small = synthetic.smooth_random_image((24, 28, 20), rng=1)
    varreg.register(small, np.roll(small, 1, axis=0), affine="affine")
    varreg.register_slices(small, np.roll(small, 1, axis=0), axis=2, affine="affine")  # the 2-D kernels

    volumes = []
    for c in args.cases:
        if c == "brain":
            volumes.append(load_brain(args.brain_mm))
        else:
            if not ACDC_ROOT.is_dir():
                notes.append(f"acdc skipped: {ACDC_ROOT} does not exist")
                continue
            volumes.extend(load_acdc(args.patients))
    for v in volumes:
        log(f"[data] {v['name']} {v['id']}: shape {v['image'].shape}, spacing {v['spacing']}")

    records, diag = [], []
    print("\n### Data and truth\n")
    print("| case | volume | seed | shape | spacing | max norm of d (vox) | min det(I + grad d) "
          "| mean abs(fixed - moving warped by d) / mean abs(fixed - moving) | inverse iteration last step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v in volumes:
        for seed in range(args.seeds):
            pair = make_pair(v, seed)
            back = varreg.warp(pair["moving"], pair["truth"])
            fg = v["image"].astype(np.float64)
            res_d = float(np.abs(back - fg).mean())
            res_0 = float(np.abs(pair["moving"] - fg).mean())
            jd = varreg.metrics.jacobian_determinant(pair["truth"])
            print(f"| {v['name']} | {v['id']} | {seed} | {v['image'].shape} | {v['spacing']} "
                  f"| {np.sqrt((pair['truth'] ** 2).sum(0)).max():.2f} | {float(jd.min()):.3f} "
                  f"| {res_d:.4f} / {res_0:.4f} | {pair['inverse_step']:.1e} |", flush=True)
            base = dict(case=v["name"], id=v["id"], seed=seed)
            for name, u in (("identity", np.zeros_like(pair["truth"])), ("truth d", pair["truth"])):
                records.append(dict(base, method=name, seconds=None, **score(u, v, pair)))
            for name, fn in methods.items():
                if name in THICK_ONLY and v["name"] != "acdc":
                    continue
                log(f"[run] {v['name']} {v['id']} seed {seed}: {name}")
                try:
                    if name.startswith("varreg (affine, slice axis 2"):
                        kw = dict(refine=10) if name.endswith("refine 10)") else {}
                        res, dt = run_varreg(v["image"], pair["moving"], v["spacing"], affine="affine", slice_axis=2,
                                             **kw)
                        u = res.displacement
                        extra = dict(threads=res.info.get("threads"))
                    elif name == "varreg (affine, slices)":
                        t0 = time.perf_counter()
                        res = varreg.register_slices(v["image"], pair["moving"], axis=2, spacing=v["spacing"],
                                                     affine="affine")
                        dt = time.perf_counter() - t0
                        u = res.displacement
                        extra = dict(threads=res.info["slices"][-1].get("threads"))
                    elif name == "varreg (affine)":
                        res, dt = run_varreg(v["image"], pair["moving"], v["spacing"], affine="affine")
                        u = res.displacement
                        M = np.asarray(res.affine)
                        uA = displacement_of(M, v["image"].shape)
                        tA = displacement_of(pair["A"], v["image"].shape)
                        diag.append(dict(base, epe_A=varreg.metrics.endpoint_error(uA, tA, mask=v["mask"]),
                                         epe_d=varreg.metrics.endpoint_error(uA, pair["truth"], mask=v["mask"]),
                                         lin_err=float(np.abs(M[:3, :3] - pair["A"][:3, :3]).max()),
                                         shift_err=float(np.linalg.norm(M[:3, 3] - pair["A"][:3, 3])),
                                         time_s=(res.info.get("affine") or {}).get("time_s"),
                                         A=pair["A"].tolist(), M=M.tolist()))
                        extra = dict(threads=res.info.get("threads"))
                    elif name == "varreg (default)":
                        res, dt = run_varreg(v["image"], pair["moving"], v["spacing"])
                        u = res.displacement
                        extra = dict(threads=res.info.get("threads"))
                    else:
                        u, dt = fn(v["image"], pair["moving"], v["spacing"], seed)
                        extra = {}
                except Exception as exc:  # noqa: BLE001 (reported in the table)
                    log(f"    failed: {exc}")
                    records.append(dict(base, method=name, error=str(exc)))
                    continue
                sc = score(u, v, pair)
                log(f"    EPE mask {sc['epe_mask']:.3f}  all {sc['epe_all']:.3f}  Dice {sc['dice']:.4f}  "
                    f"folds {sc['folds']:.3f} %  {dt:.1f} s")
                records.append(dict(base, method=name, seconds=dt, **sc, **extra))

    order = ["identity", "truth d"] + list(methods)
    vthreads = sorted({r.get("threads") for r in records if r.get("threads") is not None})
    if vthreads:
        notes.append(f"varreg's solver ran with {vthreads} numba thread(s) (its fair share at each call)")
    print_tables(records, order, args, threads, notes)
    print_affine_diagnosis(diag)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(records=records, affine=diag, notes=notes), indent=1, default=float))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--ants-worker":
        ants_worker(sys.argv[2:])
    else:
        main()
