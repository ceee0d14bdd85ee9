"""A quality-control figure of one registration, read at a glance.

Columns: fixed, moving, warped, |fixed - moving| (before), |fixed - warped|
(after), the deformation as a grid over the fixed image, the displacement as
colour (hue: direction in the plane, brightness: magnitude) and the Jacobian
determinant of ``x -> x + u(x)`` with folds (``det <= 0``) marked. One row for
a 2-D image; for 3-D, one row per plane through the middle of the volume
(axes 0-1, 0-2 and 1-2).

Matplotlib is used through :class:`matplotlib.figure.Figure` (Agg), so no
display and no pyplot global state are involved.
"""
from __future__ import annotations

import numpy as np

__all__ = ["qc_figure", "save_qc"]


def _planes(shape):
    """``[(axis_h, axis_v, fixed_axis, index, name)]`` for the rows of the figure."""
    active = [i for i, n in enumerate(shape) if n > 1]
    names = {(0, 1): "axes 0-1", (0, 2): "axes 0-2", (1, 2): "axes 1-2"}
    if len(active) <= 2:
        a, b = (active + [i for i in range(3) if i not in active])[:2]
        a, b = sorted((a, b))
        c = 3 - a - b
        return [(a, b, c, 0, names[(a, b)])]
    return [(a, b, 3 - a - b, shape[3 - a - b] // 2, names[(a, b)]) for a, b in ((0, 1), (0, 2), (1, 2))]


def _cut(vol, c, idx):
    sl = [slice(None)] * 3
    sl[c] = idx
    return vol[tuple(sl)]


def qc_figure(fixed, moving, warped, u, *, spacing=(1.0, 1.0, 1.0), det=None, title: str | None = None,
              layout: str = "nifti", grid_lines: int = 24, unit: str = "mm"):
    """Build the QC figure.

    Parameters
    ----------
    fixed, moving, warped : 3-D arrays ``(X, Y, Z)`` on the fixed grid (a 2-D
        image has one axis of length 1).
    u : displacement ``(3, X, Y, Z)`` in voxels of the fixed grid (pull-back).
    spacing : voxel sizes (mm) of the three axes: the aspect ratio of the
        panels and the units of the colour panel.
    det : optional precomputed Jacobian determinant ``(X, Y, Z)``.
    title : a line above the panels (e.g. the Dice summary).
    layout : ``"nifti"`` (axis 0 to the right, axis 1 up, as radiology viewers
        show a RAS-ish array) or ``"image"`` (rows down, columns right: photos,
        microscopy).
    grid_lines : about how many grid lines per panel side.
    unit : the unit of ``spacing`` shown on the colour panel (``"px"`` for plain images).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.colors import hsv_to_rgb
    from matplotlib.figure import Figure

    fixed = np.asarray(fixed, np.float32)
    moving = np.asarray(moving, np.float32)
    warped = np.asarray(warped, np.float32)
    u = np.asarray(u, np.float32)
    if fixed.ndim != 3 or u.shape != (3, *fixed.shape):
        raise ValueError(f"qc_figure wants 3-D images and u of shape (3, *shape); got {fixed.shape} and {u.shape}")
    spacing = tuple(float(s) for s in spacing)
    if det is None:
        from .metrics import jacobian_determinant

        active = [i for i, n in enumerate(fixed.shape) if n > 1]
        if len(active) == 3:
            det = jacobian_determinant(u)
        else:
            sub = np.stack([u[i] for i in active]).reshape((len(active),) + tuple(fixed.shape[i] for i in active))
            det = np.asarray(jacobian_determinant(sub)).reshape(fixed.shape)
    det = np.asarray(det)

    planes = _planes(fixed.shape)
    lo, hi = np.percentile(np.concatenate([fixed.ravel(), moving.ravel()]), [0.5, 99.5])
    hi = hi if hi > lo else lo + 1
    diff_before = np.abs(fixed - moving)
    diff_after = np.abs(fixed - warped)
    dmax = float(np.percentile(diff_before, 99.5)) or 1.0
    umm = u * np.asarray(spacing, np.float32).reshape(3, 1, 1, 1)
    mag_max = float(np.sqrt((umm**2).sum(axis=0)).max()) or 1.0

    cols = ["fixed", "moving", "warped", "|fixed − moving|", "|fixed − warped|", "deformation grid",
            "displacement (hue: direction,\nbrightness: size)", "Jacobian det (folds: green)"]
    nrow, ncol = len(planes), len(cols)
    if nrow == 1:  # one plane: two rows of four panels
        fig = Figure(figsize=(2.6 * 4, 2.8 * 2 + (0.5 if title else 0.2)))
        grid = fig.subplots(2, 4, squeeze=False)
        axes = np.array([[grid[k // 4, k % 4] for k in range(ncol)]], dtype=object)
    else:
        fig = Figure(figsize=(2.3 * ncol, 2.5 * nrow + (0.5 if title else 0.2)))
        axes = fig.subplots(nrow, ncol, squeeze=False)

    for r, (a, b, c, idx, pname) in enumerate(planes):
        def prep(img2d):
            # to display orientation: rows = vertical axis
            return img2d.T if layout == "nifti" else img2d

        if layout == "nifti":
            origin, h_ax, v_ax = "lower", a, b
        else:
            origin, h_ax, v_ax = "upper", b, a
        aspect = spacing[v_ax] / spacing[h_ax]
        show = dict(origin=origin, aspect=aspect, interpolation="nearest")
        f2, m2, w2 = (_cut(v, c, idx) for v in (fixed, moving, warped))
        axes[r, 0].imshow(prep(f2), cmap="gray", vmin=lo, vmax=hi, **show)
        axes[r, 1].imshow(prep(m2), cmap="gray", vmin=lo, vmax=hi, **show)
        axes[r, 2].imshow(prep(w2), cmap="gray", vmin=lo, vmax=hi, **show)
        db, da = _cut(diff_before, c, idx), _cut(diff_after, c, idx)
        axes[r, 3].imshow(prep(db), cmap="magma", vmin=0, vmax=dmax, **show)
        axes[r, 3].set_xlabel(f"mean {db.mean():.3g}", fontsize=7)
        axes[r, 4].imshow(prep(da), cmap="magma", vmin=0, vmax=dmax, **show)
        axes[r, 4].set_xlabel(f"mean {da.mean():.3g}", fontsize=7)

        # deformation grid: the points x + u(x) along grid lines of the fixed image
        uh, uv = _cut(u[h_ax], c, idx), _cut(u[v_ax], c, idx)
        if layout != "nifti":
            uh, uv = uh.T, uv.T  # index [h, v]
        nh, nv = uh.shape
        H, V = np.meshgrid(np.arange(nh, dtype=np.float32), np.arange(nv, dtype=np.float32), indexing="ij")
        PH, PV = H + uh, V + uv
        ax = axes[r, 5]
        ax.imshow(prep(f2), cmap="gray", vmin=lo, vmax=hi, alpha=0.35, **show)
        step_h = max(1, nh // grid_lines)
        step_v = max(1, nv // grid_lines)
        for i in range(0, nh, step_h):
            ax.plot(PH[i, :], PV[i, :], color="tab:blue", lw=0.5)
        for j in range(0, nv, step_v):
            ax.plot(PH[:, j], PV[:, j], color="tab:blue", lw=0.5)
        ax.set_xlim(-0.5, nh - 0.5)
        ax.set_ylim((-0.5, nv - 0.5) if origin == "lower" else (nv - 0.5, -0.5))

        # displacement colour (components in mm along the two display axes)
        dh = _cut(umm[h_ax], c, idx)
        dv = _cut(umm[v_ax], c, idx)
        if layout != "nifti":
            dh, dv = dh.T, dv.T
        ang = np.arctan2(dv if origin == "lower" else -dv, dh)
        hsv = np.stack([(ang + np.pi) / (2 * np.pi), np.ones_like(ang), np.clip(np.hypot(dh, dv) / mag_max, 0, 1)], -1)
        axes[r, 6].imshow(np.transpose(hsv_to_rgb(hsv), (1, 0, 2)), **show)
        axes[r, 6].set_xlabel(f"max {mag_max:.3g} {unit}", fontsize=7)

        d2 = _cut(det, c, idx)
        axes[r, 7].imshow(prep(d2), cmap="RdBu_r", vmin=0, vmax=2, **show)
        folds = prep(d2 <= 0)
        n_fold = int(folds.sum())
        if n_fold:
            overlay = np.zeros(folds.shape + (4,), np.float32)
            overlay[folds] = (0.0, 1.0, 0.0, 1.0)
            axes[r, 7].imshow(overlay, **show)
        axes[r, 7].set_xlabel(f"det ≤ 0: {n_fold} px ({100 * n_fold / d2.size:.2f} %)", fontsize=7)

        for k in range(ncol):
            axes[r, k].set_xticks([])
            axes[r, k].set_yticks([])
            if r == 0:
                axes[r, k].set_title(cols[k], fontsize=8)
        if nrow > 1:
            axes[r, 0].set_ylabel(f"{pname}, slice {idx}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    if nrow == 1:
        fig.subplots_adjust(left=0.02, right=0.98, bottom=0.05, top=0.88 if title else 0.93, wspace=0.08, hspace=0.3)
    else:
        fig.subplots_adjust(left=0.03, right=0.99, bottom=0.05, top=0.88 if title else 0.92, wspace=0.05, hspace=0.3)
    return fig


def save_qc(path, *args, dpi: int = 100, **kwargs) -> None:
    """Build :func:`qc_figure` and write it to ``path`` (format from the extension)."""
    fig = qc_figure(*args, **kwargs)
    fig.savefig(str(path), dpi=dpi)
