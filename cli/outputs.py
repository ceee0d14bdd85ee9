"""Writing a group of outputs atomically: all under their final names, or none.

Every output of a ``varreg`` command goes through :class:`OutputSet`: a
temporary file in the target folder, then ``os.replace``; nothing exists under
the final names until every output is ready, and an existing file is replaced
only with ``--force``.
"""
from __future__ import annotations

import math
import os
import secrets

import numpy as np

from varreg.io import InputError, error_text, split_ext

__all__ = ["OutputSet", "jsonable"]


def jsonable(v):
    """``v`` with NumPy scalars as Python numbers, tuples as lists, keys as strings, and
    non-finite floats (an undefined distance, say) as ``None``; other objects as ``str``."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    return str(v)


class OutputSet:
    """Write a group of outputs atomically: all under their final names, or none.

    ``plan(path)`` checks a final name (existing file and no ``force``: an
    :class:`InputError`); ``stage(path)`` returns a temporary name in the same
    folder with the same extension to write to; ``commit()`` renames every
    staged file with ``os.replace``; leaving the ``with`` block by an exception
    removes the temporary files (and the output folder if this set created it
    and it is empty).
    """

    def __init__(self, force: bool = False, background: bool = True):
        self.force = force
        self._staged: list[tuple[str, str]] = []
        self._created_dirs: list[str] = []
        self._planned: list[str] = []
        self._background = background
        self._pool = None
        self._jobs = []

    def _submit(self, fn, *args):
        """Run a writer (gzip compression releases the GIL) in one background thread; ``commit`` waits."""
        if not self._background:
            fn(*args)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="varreg-write")
        self._jobs.append(self._pool.submit(fn, *args))

    def _wait(self, raise_errors: bool) -> None:
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            try:
                job.result()
            except BaseException:
                if raise_errors:
                    for other in jobs:
                        other.cancel()
                    raise
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def plan(self, path) -> str:
        path = str(path)
        if os.path.isdir(path):
            raise InputError(path, "is a directory; give a file name for this output")
        if os.path.lexists(path) and not self.force:
            raise InputError(path, "exists already; pass --force to overwrite (nothing was written)")
        if path in self._planned:
            raise InputError(path, "is named for two outputs")
        self._planned.append(path)
        return path

    def make_dir(self, folder) -> None:
        folder = str(folder)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise InputError(folder, "exists and is not a directory")
        missing = []
        d = os.path.abspath(folder)
        while not os.path.exists(d):
            missing.append(d)
            d = os.path.dirname(d)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise InputError(folder, f"cannot create the output folder ({error_text(exc)})") from None
        self._created_dirs.extend(missing)  # deepest first

    def stage(self, path) -> str:
        path = str(path)
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):
            self.make_dir(folder)
        if not os.access(folder, os.W_OK):
            raise InputError(folder, "the output folder is not writable")
        _, ext = split_ext(path)
        tmp = os.path.join(folder, f".{os.path.basename(path)[: -len(ext) or None]}.{secrets.token_hex(4)}.tmp{ext}")
        self._staged.append((tmp, path))
        return tmp

    def commit(self) -> list[str]:
        self._wait(raise_errors=True)
        done = []
        for tmp, final in self._staged:
            os.replace(tmp, final)
            done.append(final)
        self._staged = []
        return done

    def abort(self) -> None:
        self._wait(raise_errors=False)
        for tmp, _ in self._staged:
            try:
                os.remove(tmp)
            except OSError:
                pass
        self._staged = []
        for d in self._created_dirs:
            try:
                os.rmdir(d)  # only if empty
            except OSError:
                pass
        self._created_dirs = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False

    # convenience writers --------------------------------------------------
    def save_nifti(self, img, path) -> None:
        import nibabel as nib

        self._submit(nib.save, img, self.stage(path))

    def save_json(self, obj, path) -> None:
        import json

        with open(self.stage(path), "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, allow_nan=False)
            fh.write("\n")

    def save_text(self, text: str, path) -> None:
        with open(self.stage(path), "w", encoding="utf-8") as fh:
            fh.write(text)

    def save_plain(self, array, path) -> None:
        """A 2-D (or ``(H, W, C)`` colour) array as PNG/TIFF/JPEG/BMP, or any array as ``.npy``."""
        _, ext = split_ext(path)
        tmp = self.stage(path)
        if ext == ".npy":
            np.save(tmp, np.asarray(array))
            return
        from PIL import Image as PILImage

        PILImage.fromarray(np.ascontiguousarray(array)).save(tmp)

    def save_figure(self, fig, path, dpi=100) -> None:
        _, ext = split_ext(path)
        fig.savefig(self.stage(path), dpi=dpi, format=(ext[1:] or "png"))
