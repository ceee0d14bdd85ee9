"""Progress on the terminal: a spinner line for one long call, tqdm for loops.

Both write to stderr, only when stderr is a terminal and ``--quiet`` is not
given, so logs and pipes stay clean.
"""
from __future__ import annotations

import sys
import threading
import time


def enabled(quiet: bool) -> bool:
    if quiet:
        return False
    try:
        return bool(sys.stderr.isatty())
    except Exception:
        return False


class Spinner:
    """``with Spinner("registering 3-D 128x128x64", on):`` shows ``⠋ registering ... 3.2 s``."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, text: str, on: bool):
        self.text = text
        self.on = on
        self._stop = threading.Event()
        self._thread = None

    def _run(self):
        t0 = time.perf_counter()
        k = 0
        while not self._stop.wait(0.1):
            sys.stderr.write(f"\r{self.FRAMES[k % len(self.FRAMES)]} {self.text} {time.perf_counter() - t0:5.1f} s")
            sys.stderr.flush()
            k += 1

    def __enter__(self):
        if self.on:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
        return False


def loop(iterable, total: int, desc: str, on: bool):
    """``tqdm`` over ``iterable`` when ``on``, else the iterable itself."""
    if not on:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="slice", leave=False, file=sys.stderr, dynamic_ncols=True)
