"""Images on disk in physical space: NIfTI (nibabel), plain 2-D images, world-space displacement fields.

Conventions
-----------
* An :class:`Image` always holds a 3-D array in NIfTI voxel-axis order
  ``(X, Y, Z)`` (nibabel's ``(i, j, k)``) and the 4x4 ``affine`` mapping voxel
  indices to RAS+ millimetres. A 2-D image is a 3-D one with a single slice.
* Plain 2-D images (PNG, TIFF, JPEG, BMP, NPY) are read as ``(rows, columns, 1)``
  with the identity affine (1 mm pixels): axis 0 is the row, axis 1 the column.
* The solver's displacement ``u`` is in voxels of the fixed image along its
  array axes (``(3, X, Y, Z)`` here, a zero component on an axis of length 1).
  Its world (RAS, mm) form is ``d = A[:3, :3] @ u``; see :func:`displacement_to_world`.
* Displacement files (:func:`displacement_nifti`) follow ITK's convention, which
  SimpleITK and ANTs read as-is: a 5-D NIfTI ``(X, Y, Z, 1, 3)`` of float32,
  intent ``NIFTI_INTENT_VECTOR`` (1007), vector components in **LPS** mm
  (RAS with the first two components negated), on the fixed image's grid. ITK
  converts the grid (not the vectors) from RAS to LPS when it reads a NIfTI
  file; vectors of intent 1007 are taken as stored, and intent 1006
  (``NIFTI_INTENT_DISPVECT``) vectors are converted RAS -> LPS by ITK >= 5.4.
  So a ``DisplacementFieldTransform`` built from the file maps a fixed-grid
  point ``p`` to ``p + d(p)`` and ``Resample(moving, fixed, transform)``
  reproduces ``moving(x + u(x))`` (tested in ``tests/test_io.py``). One axial
  slice gets a 2-D field ``(X, Y, 1, 1, 2)``, as ITK writes 2-D fields.

Every problem with an input raises :class:`InputError` naming the file.
Writing outputs (atomically, never over a user's file unless asked) is the
command line's business: :class:`varreg_cli.outputs.OutputSet`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "InputError",
    "Image",
    "load_image",
    "load_displacement",
    "itk_affine_text",
    "same_grid",
    "describe_grid",
    "voxel_sizes",
    "sample_coords",
    "sample",
    "displacement_to_world",
    "world_to_displacement",
    "displacement_nifti",
    "image_nifti",
    "split_ext",
    "NIFTI_EXTS",
    "PLAIN_EXTS",
]

NIFTI_EXTS = (".nii.gz", ".nii", ".hdr", ".img", ".img.gz")
PLAIN_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".npy")
INTENT_DISPVECT = 1006
INTENT_VECTOR = 1007
_RAS_LPS = np.array([-1.0, -1.0, 1.0])


class InputError(ValueError):
    """A problem with one file: ``str(err)`` is ``"<path>: <problem>"``; ``option`` names the
    argument that would fix it (``"frame"``), if one does."""

    def __init__(self, path, problem: str, option: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.option = option
        super().__init__(f"{self.path}: {problem}")


def split_ext(path) -> tuple[str, str]:
    """``("dir/name", ".nii.gz")``: the stem and the (double) extension, lower-cased extension."""
    p = str(path)
    low = p.lower()
    for ext in (".nii.gz", ".img.gz", ".tar.gz"):
        if low.endswith(ext):
            return p[: -len(ext)], ext
    stem, ext = os.path.splitext(p)
    return stem, ext.lower()


@dataclass
class Image:
    """A 3-D array ``data`` ``(X, Y, Z)`` with its voxel-to-RAS ``affine`` (mm).

    ``header``: the nibabel header (NIfTI input) or ``None``; ``disk_dtype``:
    the stored dtype; ``fmt``: ``"nifti"`` or the plain extension (``".png"``
    ...); ``colour``: for colour plain images, the original ``(H, W, C)`` array.
    """

    data: np.ndarray
    affine: np.ndarray
    path: str
    header: object = None
    disk_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    fmt: str = "nifti"
    colour: np.ndarray | None = None

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def spacing(self) -> tuple:
        """Voxel sizes (mm) along the three array axes."""
        return voxel_sizes(self.affine)

    @property
    def active_axes(self) -> tuple:
        """The axes longer than one voxel (two for a 2-D image)."""
        return tuple(i for i, n in enumerate(self.data.shape) if n > 1)


def voxel_sizes(affine) -> tuple:
    """Lengths of the affine's first three columns: voxel sizes in mm."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.sqrt((a * a).sum(axis=0)))


# --------------------------------------------------------------------------- reading
def _check_readable(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(path, "no such file")
    if p.is_dir():
        raise InputError(path, "is a directory, not an image file")
    if not os.access(p, os.R_OK):
        raise InputError(path, "permission denied: the file cannot be read")
    if p.stat().st_size == 0:
        raise InputError(path, "is empty (0 bytes)")
    return p


def error_text(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    msg = msg[:160]
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _read_nifti(path):
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise InputError(path, f"cannot be read as NIfTI: corrupt or not a NIfTI file ({error_text(exc)})") from None
    try:
        arr = np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated gzip (EOFError), bad gzip (zlib/OSError), short data (ValueError)
        raise InputError(path, f"corrupt or truncated image data ({error_text(exc)})") from None
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "has a singular or non-finite affine (voxel-to-world matrix) in its header")
    return arr, affine, img.header, np.dtype(img.get_data_dtype())


def _read_plain(path, ext):
    if ext == ".npy":
        try:
            arr = np.load(str(path), allow_pickle=False)
        except Exception as exc:
            raise InputError(path, f"cannot be read as a .npy array ({error_text(exc)})") from None
        return arr, None
    try:
        from PIL import Image as PILImage

        with PILImage.open(str(path)) as im:
            n = getattr(im, "n_frames", 1)
            frames = []
            for k in range(n):
                im.seek(k)
                fr = im
                if fr.mode in ("P", "PA"):
                    fr = fr.convert("RGBA" if "transparency" in fr.info or fr.mode == "PA" else "RGB")
                elif fr.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                    fr = fr.convert("L" if fr.mode == "1" else "RGB")
                frames.append(np.array(fr))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"cannot be read as a {ext[1:].upper()} image: corrupt or unsupported ({error_text(exc)})") from None
    if len(frames) == 1:
        return frames[0], None
    if frames[0].ndim != 2:
        raise InputError(path, f"multi-page {ext[1:].upper()} of colour pages is not supported; save a grayscale stack")
    return np.stack(frames, axis=-1), None


def _palette_labels(path, ext):
    """Indexed (palette) PNG/TIFF label maps keep their indices."""
    from PIL import Image as PILImage

    with PILImage.open(str(path)) as im:
        if im.mode == "P":
            return np.array(im)
    return None


def load_image(path, *, frame: int | None = None, labels: bool = False) -> Image:
    """Read an image or a label map as an :class:`Image` (3-D array + affine).

    Parameters
    ----------
    path : NIfTI (``.nii``, ``.nii.gz``, Analyze ``.hdr/.img``) or a plain image
        (``.png``, ``.tif``, ``.tiff``, ``.jpg``, ``.bmp``, ``.npy``).
    frame : the frame of a 4-D series to take (0-based); ignored for 3-D images.
    labels : read a label map: values must be integers (integral floats pass),
        the data keep their stored dtype; otherwise intensities as float32.

    Raises
    ------
    InputError
        A missing, unreadable, empty, corrupt or truncated file; a 4-D input
        without ``frame``; more than 4 dimensions; NaN/Inf voxels; a label map
        with non-integer values; an unsupported dtype.
    """
    p = _check_readable(path)
    stem, ext = split_ext(p)
    header, fmt, colour = None, "nifti", None
    if ext in PLAIN_EXTS:
        arr, _ = _read_plain(p, ext)
        fmt = ext
        affine = np.eye(4)
        disk_dtype = np.dtype(arr.dtype)
        if labels and ext != ".npy":
            pal = _palette_labels(p, ext)
            if pal is not None:
                arr, disk_dtype = pal, np.dtype(pal.dtype)
        if ext != ".npy" and arr.ndim == 3 and arr.shape[-1] in (2, 3, 4) and arr.dtype != object:
            # colour (RGB/RGBA) or gray+alpha: register the luminance, keep the colours for output
            if labels:
                raise InputError(path, f"is a colour image ({arr.shape[-1]} channels), not a label map; save labels as a single-channel integer image")
            colour = arr
            rgb = arr[..., :3].astype(np.float32) if arr.shape[-1] >= 3 else arr[..., :1].astype(np.float32)
            arr = rgb @ np.array([0.299, 0.587, 0.114], np.float32) if rgb.shape[-1] == 3 else rgb[..., 0]
    elif ext in NIFTI_EXTS or ext in (".gz",):
        arr, affine, header, disk_dtype = _read_nifti(p)
    else:
        raise InputError(path, f"unknown file type {ext or '(no extension)'!r}; expected NIfTI (.nii, .nii.gz) or a 2-D image ({', '.join(PLAIN_EXTS)})")

    arr = np.asarray(arr)
    kind = arr.dtype.kind
    if kind == "c":
        raise InputError(path, f"holds complex values ({arr.dtype}); save the magnitude instead")
    if kind not in "biuf":
        raise InputError(path, f"has unsupported data type {arr.dtype}")

    # dimensions: drop trailing singleton axes beyond 3, pick a frame of a 4-D series
    shape = arr.shape
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 4:
        n = arr.shape[3]
        if frame is None:
            raise InputError(path, f"is a 4-D series of {n} frames (shape {shape}); choose one frame (0..{n - 1})",
                             option="frame")
        if not 0 <= frame < n:
            raise InputError(path, f"has {n} frames; frame {frame} is out of range 0..{n - 1}", option="frame")
        arr = arr[..., frame]
    if arr.ndim > 3:
        raise InputError(path, f"has {len(shape)} dimensions (shape {shape}); varreg reads 2-D and 3-D images, and "
                               "4-D series (one frame of them)")
    if arr.ndim == 1:
        raise InputError(path, f"is 1-D (shape {shape}); varreg reads 2-D and 3-D images")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if min(arr.shape) < 1:
        raise InputError(path, f"is empty (shape {shape})")

    if kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise InputError(path, f"contains {bad} NaN/Inf voxel(s); replace or mask them first (e.g. with 0)")
    if labels:
        if kind == "b":
            arr = arr.astype(np.uint8)
            disk_dtype = np.dtype(np.uint8)
        elif kind == "f":
            frac = arr != np.round(arr)
            if frac.any():
                example = float(arr[frac].flat[0])
                raise InputError(path, f"is not a label map: it holds non-integer values (e.g. {example:g}); labels must be integers")
            arr = arr.astype(np.int64) if np.abs(arr).max(initial=0) >= 2**31 else arr.astype(np.int32)
    else:
        arr = arr.astype(np.float32, copy=False)
    return Image(data=arr, affine=affine, path=str(path), header=header, disk_dtype=disk_dtype, fmt=fmt, colour=colour)


# --------------------------------------------------------------------------- grids
def same_grid(a: Image, b: Image, atol: float = 1e-3) -> bool:
    """Same shape and the same affine (to ``atol`` mm)."""
    return a.shape == b.shape and np.allclose(a.affine, b.affine, rtol=0, atol=atol)


def describe_grid(img: Image) -> str:
    sp = "x".join(f"{s:g}" for s in np.round(img.spacing, 4))
    org = ", ".join(f"{v:g}" for v in np.round(img.affine[:3, 3], 3))
    return f"shape {img.shape}, voxels {sp} mm, origin ({org})"


def sample_coords(out_shape, out_affine, src_affine, u=None) -> np.ndarray:
    """Voxel coordinates in a source grid of the points ``x + u(x)`` of an output grid.

    ``u`` ``(3, *out_shape)`` in output voxels or ``None``; returns float32 ``(3, *out_shape)``.
    """
    m = np.linalg.solve(np.asarray(src_affine, np.float64), np.asarray(out_affine, np.float64))
    grid = np.indices(out_shape, dtype=np.float32)
    if u is not None:
        grid += np.asarray(u, np.float32)
    out = np.einsum("ij,j...->i...", m[:3, :3].astype(np.float32), grid)
    out += m[:3, 3].astype(np.float32).reshape(3, 1, 1, 1)
    return out


def sample(data, coords, order: int) -> np.ndarray:
    """``data`` at voxel ``coords`` ``(3, ...)``: linear (``order=1``) or nearest (0, dtype kept); border replicated."""
    if order == 0:
        idx = tuple(np.clip(np.floor(coords[i] + 0.5), 0, n - 1).astype(np.intp) for i, n in enumerate(data.shape))
        return data[idx]
    from scipy import ndimage

    src = data if data.dtype.kind == "f" else data.astype(np.float32)
    return ndimage.map_coordinates(src, coords, order=1, mode="nearest").astype(np.float32, copy=False)


# --------------------------------------------------------------------------- displacements
def displacement_to_world(u, affine) -> np.ndarray:
    """Voxel displacement ``(3, ...)`` -> RAS mm ``A[:3, :3] @ u`` (float32)."""
    a = np.asarray(affine, np.float64)[:3, :3]
    return np.einsum("ij,j...->i...", a, np.asarray(u, np.float64)).astype(np.float32)


def world_to_displacement(d, affine) -> np.ndarray:
    """RAS mm ``(3, ...)`` -> voxel displacement ``A[:3, :3]^-1 @ d`` (float32)."""
    ainv = np.linalg.inv(np.asarray(affine, np.float64)[:3, :3])
    return np.einsum("ij,j...->i...", ainv, np.asarray(d, np.float64)).astype(np.float32)


def _copy_geometry(dst_img, ref_header, affine):
    """qform/sform codes of ``ref_header`` (scanner = 1 when absent) on ``dst_img``; units mm."""
    scode = qcode = 1
    if ref_header is not None and hasattr(ref_header, "get_sform"):
        _, scode = ref_header.get_sform(coded=True)
        _, qcode = ref_header.get_qform(coded=True)
        scode = int(scode) or 0
        qcode = int(qcode) or 0
        if scode == 0 and qcode == 0:
            scode = 1
    dst_img.set_sform(affine, code=scode or 1)
    try:
        dst_img.set_qform(affine, code=qcode or 1)
    except Exception:  # an affine with shear has no quaternion form
        dst_img.set_qform(None, code=0)
    dst_img.header.set_xyzt_units("mm", "sec")


def displacement_nifti(u, ref: Image):
    """The ITK/SimpleITK/ANTs displacement file for a voxel displacement ``u`` ``(3, *ref.shape)``.

    A ``nibabel.Nifti1Image`` of shape ``(X, Y, Z, 1, 3)`` float32, intent
    vector (1007), LPS components in mm, with ``ref``'s affine. A single
    slice (``Z == 1``) whose displacement stays in the world x-y plane (an
    axial slice, the usual 2-D case) gets ``(X, Y, 1, 1, 2)``: ITK reads a
    vector image with one slice as a 2-D image, whose transform needs two
    components (read the fixed and moving images as 2-D too, e.g.
    ``sitk.ReadImage(f)[:, :, 0]``).
    """
    import nibabel as nib

    u = np.asarray(u)
    if u.shape != (3, *ref.shape):
        raise ValueError(f"displacement of shape {u.shape} does not fit the grid {ref.shape}")
    d = displacement_to_world(u, ref.affine) * _RAS_LPS.astype(np.float32).reshape(3, 1, 1, 1)
    if is_two_d_field(u, ref):
        # one axial slice: ITK reads a (X, Y, 1, 1, C) vector image as 2-D, so write its 2-D field (x, y)
        d = d[:2]
    arr = np.ascontiguousarray(np.moveaxis(d, 0, -1)[:, :, :, None, :], dtype=np.float32)
    img = nib.Nifti1Image(arr, ref.affine)
    img.header.set_intent("vector", (), name="LPS disp mm")
    _copy_geometry(img, ref.header, ref.affine)
    img.header["descrip"] = b"varreg displacement, LPS mm (ITK)"
    return img


def itk_affine_text(voxel: np.ndarray, ref: Image, *, two_d: bool = False) -> str:
    """An ITK transform file (text, ``#Insight Transform File V1.0``) of a voxel transform on ``ref``'s grid.

    ``voxel``: ``(4, 4)``, a fixed voxel index ``x`` -> ``voxel @ [x, 1]`` (voxel indices of the
    same grid, as :attr:`varreg.registration.ImageRegistration.affine`). Written as the
    world map ``p -> W p + t`` of LPS millimetres (``W = F B M B^-1 F`` with ``B`` = ``ref.affine``
    and ``F`` = diag(-1, -1, 1)), an ``AffineTransform_double_3_3`` with centre 0 that
    SimpleITK (``sitk.ReadTransform``), ITK and ANTs (``antsApplyTransforms -t``) read. ``two_d``:
    the in-plane ``AffineTransform_double_2_2`` for one axial slice, matching the 2-D field
    that :func:`displacement_nifti` writes then (the map must leave z alone).
    """
    B = np.asarray(ref.affine, np.float64)
    F = np.diag([*_RAS_LPS, 1.0])
    W = F @ B @ np.asarray(voxel, np.float64) @ np.linalg.inv(B) @ F
    d = 3
    if two_d:
        if not (np.allclose(W[2, :3], [0, 0, 1], atol=1e-6) and np.allclose(W[:2, 2], 0, atol=1e-6)
                and abs(W[2, 3]) < 1e-6):
            raise ValueError("the affine moves points out of the slice's plane; it has no 2-D form")
        W = W[np.ix_([0, 1, 3], [0, 1, 3])]
        d = 2
    params = [*W[:d, :d].ravel(), *W[:d, d]]
    fmt = " ".join(repr(float(v)) for v in params)
    return ("#Insight Transform File V1.0\n#Transform 0\n"
            f"Transform: AffineTransform_double_{d}_{d}\nParameters: {fmt}\n"
            f"FixedParameters: {' '.join(['0'] * d)}\n")


def is_two_d_field(u, ref: Image) -> bool:
    """Whether :func:`displacement_nifti` writes ``u`` as a 2-D field (one slice, no world z component)."""
    if ref.shape[2] != 1:
        return False
    return bool(np.all(displacement_to_world(u, ref.affine)[2] == 0))


def load_displacement(path) -> tuple[np.ndarray, Image]:
    """Read a displacement file (varreg, ITK, SimpleITK, ANTs) as voxels of its grid.

    Accepts NIfTI vector images ``(X, Y, Z, 1, 3)`` (3-D vectors) or
    ``(X, Y, Z, 1, 2)`` (2-D ITK fields), also without the singleton time
    axis. Components are LPS mm (ITK's convention, intent 1007 or unset), or
    RAS mm for intent 1006 (``NIFTI_INTENT_DISPVECT``).

    Returns
    -------
    u : float32 ``(3, X, Y, Z)`` in voxels of the field's grid (array-axis components).
    grid : an :class:`Image` holding the field's grid (``data`` is ``|u|``, float32).
    """
    p = _check_readable(path)
    _, ext = split_ext(p)
    if ext not in NIFTI_EXTS and ext != ".gz":
        raise InputError(path, f"a displacement must be a NIfTI vector image (.nii or .nii.gz), got {ext or 'no extension'!r}")
    arr, affine, header, _ = _read_nifti(p)
    shape = arr.shape
    intent = int(header["intent_code"]) if "intent_code" in header else 0
    if arr.ndim == 5 and arr.shape[3] == 1 and arr.shape[4] in (2, 3):
        vec = arr[:, :, :, 0, :]
    elif arr.ndim == 4 and arr.shape[3] in (2, 3) and intent in (INTENT_VECTOR, INTENT_DISPVECT):
        vec = arr
    else:
        raise InputError(path, f"is not a displacement field: shape {shape}; expected a vector NIfTI (X, Y, Z, 1, 3) as written by varreg register, ITK or ANTs")
    if vec.dtype.kind not in "fiu":
        raise InputError(path, f"displacement has unsupported data type {vec.dtype}")
    vec = np.asarray(vec, dtype=np.float64)
    if not np.all(np.isfinite(vec)):
        raise InputError(path, f"displacement contains {int(np.count_nonzero(~np.isfinite(vec)))} NaN/Inf value(s)")
    d = np.zeros((3,) + vec.shape[:3], np.float64)
    for c in range(vec.shape[-1]):
        d[c] = vec[..., c]
    if intent != INTENT_DISPVECT:  # LPS -> RAS
        d[0] *= -1
        d[1] *= -1
    u = world_to_displacement(d, affine)
    mag = np.sqrt((u.astype(np.float64) ** 2).sum(axis=0)).astype(np.float32)
    grid = Image(data=mag, affine=affine, path=str(path), header=header, disk_dtype=np.dtype(np.float32), fmt="nifti")
    return u, grid


def image_nifti(data, ref: Image, dtype=None):
    """A NIfTI image of ``data`` (3-D, ``ref.shape``) on ``ref``'s grid, with ``ref``'s header when it has one."""
    import nibabel as nib

    data = np.asarray(data)
    dtype = np.dtype(dtype or data.dtype)
    if dtype == np.dtype(bool):
        dtype = np.dtype(np.uint8)
    if dtype.kind in "iu" and data.dtype.kind in "iu":
        data = data.astype(dtype, copy=False)
    hdr = None
    if ref.header is not None and isinstance(ref.header, nib.Nifti1Header):
        hdr = ref.header.copy()
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), ref.affine, header=hdr)
    img.header.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0) if dtype.kind == "f" else img.header.set_slope_inter(None, None)
    img.header.set_intent("none", ())
    if hdr is None:
        _copy_geometry(img, None, ref.affine)
    return img


def to_plain_dtype(array, like_dtype, ext: str) -> np.ndarray:
    """Cast ``array`` back to the dtype of a plain input (uint8/uint16 rounded and clipped)."""
    dt = np.dtype(like_dtype)
    if ext in (".jpg", ".jpeg", ".bmp") and dt != np.uint8:
        dt = np.dtype(np.uint8)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return np.clip(np.round(array), info.min, info.max).astype(dt)
    if dt.kind == "b":
        return np.asarray(array) > 0.5
    return np.asarray(array, dtype=np.float32)
