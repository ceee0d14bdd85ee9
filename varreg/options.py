"""The classical solver's options, defined once: fields, defaults, documentation and checks.

:class:`SolverOptions` is what :func:`varreg.register` runs with; the command
line builds its solver flags and their ``--help`` from :data:`FIELDS`, and the
bench and VR-Net's refinement read their defaults here. Defaults that depend
on the data term (the weights ``theta``, ``lam``, ``refine_lam``) come from the
data term itself (:attr:`varreg.data_terms.L1.weights`); the denoisers' steps
per call from the denoiser (``default_iterations``). How the defaults were
chosen, with the measurements: README, "Defaults and how they were chosen".

A wrong value raises :class:`OptionError` (a ``ValueError``) naming the option,
when the options are built: before any image is read.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

__all__ = ["SolverOptions", "OptionError", "Options", "option", "FIELDS", "weights_of", "at_level"]

DEVICES = ("auto", "cpu", "gpu")


class OptionError(ValueError):
    """A solver option with a wrong value: ``option`` is its field name, ``str(err)`` the problem."""

    def __init__(self, option: str, problem: str):
        self.option = option
        self.problem = problem
        super().__init__(problem)


def option(default, kind: str, help: str):
    """A dataclass field with its command-line ``kind`` (how the CLI parses it) and its help text."""
    return field(default=default, metadata={"kind": kind, "help": help})


_opt = option


class Options:
    """What the option dataclasses share: :meth:`replace` with a clear error for an unknown name."""

    _what = "the"
    _unknown_hint = ""

    def replace(self, **changes):
        """A copy with ``changes`` (checked like the constructor); unknown names raise ``TypeError``."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise TypeError(f"unknown {self._what} option(s) {', '.join(unknown)}; the options are {', '.join(names)}"
                            + self._unknown_hint)
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SolverOptions(Options):
    """Options of the classical solver (:func:`varreg.register`); ``None`` means "the default of
    the data term (weights) or of the denoiser (steps)". Field by field: :data:`FIELDS`."""

    data_term: object = _opt("l1", "name", "Data term: l1 (robust, |I1(x+u) - I0|) or l2 (squared differences); "
                                          "in Python also an object following varreg.engine.DataTerm.")
    denoiser: object = _opt("tv", "name", "Regulariser solved in the denoising step, a name in "
                                          "varreg.denoisers.DENOISERS; in Python also a callable "
                                          "denoiser(u, weight) -> v.")
    window: float | None = _opt(None, "float+", "Local window (voxels) of a data term that has one (ncc; None: its "
                                                "default).")
    theta: float | None = _opt(None, "float+", "Splitting penalty θ (intensities scaled to [0, 1]).")
    lam: float | None = _opt(None, "float+", "Regularisation weight λ of the pyramid's warps; larger is smoother.")
    warps: int | tuple = _opt((2, 5), "counts1", "Gauss-Newton warps with the denoiser per pyramid level: one count "
                                                 "for every level, or one per level, finest first (the last also for "
                                                 "the coarser levels).")
    iterations: int = _opt(3, "int+", "Splitting iterations (data step + denoising step) per warp.")
    denoiser_iterations: int | None = _opt(None, "int+", "Inner steps of a built-in denoiser per call.")
    levels: int | None = _opt(None, "int+", "Pyramid levels (None: down to min_size).")
    scale: float = _opt(0.6, "fraction", "Shrink factor between pyramid levels (0.5 halves; 0.8 helps large "
                                         "motions).")
    min_size: int = _opt(16, "int+", "Smallest axis length (voxels) of the coarsest level.")
    refine: int | tuple = _opt((10, 30), "counts0", "Further warps with refine_denoiser after each level's warps: "
                                                    "a count for the finest level, or one per level, finest first "
                                                    "(levels beyond get none); 0 for none. They regularise in voxel "
                                                    "units whatever the spacing.")
    refine_denoiser: str = _opt("quadratic", "name", "Denoiser of the refine warps (a name in "
                                                     "varreg.denoisers.DENOISERS).")
    refine_lam: float | None = _opt(None, "float+", "Regularisation weight λ of the refine warps.")
    affine: object = _opt(False, "affine", "An affine stage first, on its own pyramid (varreg.affine): rigid, "
                                           "similarity or affine (True: affine); the deformable solver starts from "
                                           "it and the displacement is the whole transform.")
    slice_axis: int | None = _opt(None, "int0", "3-D only: the slice axis of a stack of thick slices (NIfTI short-axis "
                                                "stacks: 2). The deformable field then moves within the slices, "
                                                "coupled across them by the regulariser; through-slice motion comes "
                                                "from the affine stage alone. None: every axis moves.")
    normalise: bool = _opt(True, "flag", "Scale the pair jointly to [0, 1] first (the default weights assume it).")
    device: str = _opt("auto", "device", "auto: a GPU when CuPy can use one, else the CPU; cpu; gpu.")

    _what = "solver"
    _unknown_hint = " (VR-Net's, checkpoint and post_warps among them, go to varreg_learned.register_learned)"

    def __post_init__(self):
        from .data_terms import make_data_term
        from .denoisers import DENOISERS, make_denoiser

        try:
            make_data_term(self.data_term)
        except (ValueError, TypeError) as exc:
            raise OptionError("data_term", str(exc)) from None
        if isinstance(self.denoiser, str) and self.denoiser.lower() == "unet":
            raise OptionError("denoiser", "denoiser 'unet' is VR-Net, which lives in varreg_learned: "
                                          "varreg_learned.register_learned(fixed, moving, checkpoint)")
        try:
            make_denoiser(self.denoiser) if isinstance(self.denoiser, str) else None
        except ValueError as exc:
            raise OptionError("denoiser", str(exc)) from None
        if not isinstance(self.denoiser, str) and not callable(self.denoiser):
            raise OptionError("denoiser", f"denoiser must be a name or a callable denoiser(u, weight) -> v, got "
                                          f"{type(self.denoiser).__name__}")
        if not (isinstance(self.refine_denoiser, str) and self.refine_denoiser.lower() in DENOISERS):
            raise OptionError("refine_denoiser", f"refine_denoiser must be one of {sorted(DENOISERS)}, got "
                                                 f"{self.refine_denoiser!r}")
        if self.window is not None:
            if not hasattr(make_data_term(self.data_term), "window"):
                raise OptionError("window", f"the data term {self.data_term!r} has no window (ncc has one)")
            if not (_is_number(self.window) and self.window >= 2):
                raise OptionError("window", f"window must be a number of voxels >= 2, got {self.window!r}")
        for name in ("theta", "lam", "refine_lam"):
            val = getattr(self, name)
            if val is not None and not (_is_number(val) and math.isfinite(val) and val > 0):
                raise OptionError(name, f"{name} must be a positive finite number, got {val!r}")
        for name in ("iterations", "denoiser_iterations", "min_size", "levels"):
            val = getattr(self, name)
            if val is None and name in ("denoiser_iterations", "levels"):
                continue
            if not _is_count(val, 1):
                extra = " or None" if name == "levels" else ""
                raise OptionError(name, f"{name} must be a positive integer{extra}, got {val!r}")
        object.__setattr__(self, "warps", _per_level("warps", self.warps, minimum=1))
        object.__setattr__(self, "refine", _per_level("refine", self.refine, minimum=0))
        if not (_is_number(self.scale) and 0 < self.scale < 1):
            raise OptionError("scale", f"scale must be in (0, 1), got {self.scale!r}")
        affine = self.affine
        if affine is True:
            object.__setattr__(self, "affine", "affine")
        elif affine in (False, None, "none"):
            object.__setattr__(self, "affine", False)
        elif affine not in ("rigid", "similarity", "affine"):
            raise OptionError("affine", f"affine must be one of rigid, similarity, affine (or True/False), got "
                                        f"{affine!r}")
        if self.slice_axis is not None and not (isinstance(self.slice_axis, numbers.Integral)
                                                and not isinstance(self.slice_axis, bool) and 0 <= self.slice_axis <= 2):
            raise OptionError("slice_axis", f"slice_axis must be 0, 1, 2 (an axis of a 3-D image) or None, got "
                                            f"{self.slice_axis!r}")
        if not isinstance(self.normalise, bool):
            raise OptionError("normalise", f"normalise must be True or False, got {self.normalise!r}")
        if self.device not in DEVICES:
            raise OptionError("device", f"device must be one of {DEVICES}, got {self.device!r}")

    def resolved(self) -> "SolverOptions":
        """Every ``None`` filled: the data term's weights and the denoiser's steps per call."""
        w = weights_of(self.data_term, given=self)
        return dataclasses.replace(
            self, theta=w.theta, lam=w.lam, refine_lam=w.refine_lam,
            denoiser_iterations=(self.denoiser_iterations if self.denoiser_iterations is not None
                                 else default_iterations(self.denoiser)))


def weights_of(data_term, given: SolverOptions | None = None):
    """The :class:`varreg.engine.Weights` a run uses: the ones set in ``given``, the rest from the data term.

    A data term without ``weights`` (a custom one) needs ``theta`` and ``lam`` (and
    ``refine_lam`` when it has refine warps) set explicitly: an :class:`OptionError` otherwise.
    """
    from .data_terms import make_data_term
    from .engine import Weights

    term = make_data_term(data_term)
    default = getattr(term, "weights", None)
    vals = {}
    for name in ("theta", "lam", "refine_lam"):
        v = None if given is None else getattr(given, name)
        if v is None and default is not None:
            v = getattr(default, name)
        if v is None:
            needed = name != "refine_lam" or given is None or any(_as_counts(given.refine))
            if needed:
                tname = getattr(term, "name", type(term).__name__)
                raise OptionError(name, f"the data term {tname!r} has no default weights: give {name}= "
                                        "(or give the data term a .weights attribute, varreg.engine.Weights)")
        vals[name] = v
    return Weights(**vals)


def default_iterations(denoiser):
    """Inner steps per call the solver gives a built-in denoiser (its class's ``default_iterations``); None
    for a callable."""
    from .denoisers import DENOISERS

    if isinstance(denoiser, str):
        return DENOISERS[denoiser.lower()].default_iterations
    return None


def at_level(value, lvl: int, *, repeat_last: bool) -> int:
    """The count of level ``lvl`` (0: finest): an int counts for every level (``warps``) or the finest only
    (``refine``); a sequence past its end repeats its last entry (``warps``) or gives 0 (``refine``)."""
    if isinstance(value, int):
        return value if (repeat_last or lvl == 0) else 0
    if lvl < len(value):
        return value[lvl]
    return value[-1] if repeat_last else 0


def _as_counts(value) -> tuple:
    return (value,) if isinstance(value, int) else tuple(value)


def _is_number(val) -> bool:
    import numpy as np

    return isinstance(val, (int, float, np.integer, np.floating)) and not isinstance(val, bool)


def _is_count(val, minimum: int) -> bool:
    import numpy as np

    return isinstance(val, (int, np.integer)) and not isinstance(val, bool) and val >= minimum


def _per_level(name: str, value, *, minimum: int):
    """An int, or a non-empty sequence of ints (per level, finest first), each ``>= minimum``; as a tuple or int."""
    kind = "positive" if minimum >= 1 else "non-negative"
    if _is_count(value, minimum):
        return int(value)
    if isinstance(value, (list, tuple)) and value and all(_is_count(v, minimum) for v in value):
        return tuple(int(v) for v in value)
    raise OptionError(name, f"{name} must be a {kind} integer or a sequence of them (one per pyramid level, finest "
                            f"first), got {value!r}")


#: field name -> ``dataclasses.Field`` (``.default``, ``.metadata["kind"]``, ``.metadata["help"]``), in order
FIELDS = {f.name: f for f in dataclasses.fields(SolverOptions)}
