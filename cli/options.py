"""The solver flags of ``varreg register``, made from the libraries' option dataclasses.

Every flag comes from a field of :class:`varreg.options.SolverOptions` (the
classical solver) or :class:`varreg_learned.options.VRNetOptions` (VR-Net,
``--denoiser unet --ckpt F``): its name (``refine_lam`` -> ``--refine-lam``), its
help and its default are read there, when a command that takes them runs or
shows its help (so ``varreg --help`` imports no solver). The libraries check
the values; :func:`method_from_flags` turns their :class:`varreg.options.OptionError`
into one ``error: --flag: ...`` line (:class:`varreg.io.InputError`).
"""
from __future__ import annotations

import functools
import os

import click

#: fields shown under another flag name
_FLAG_NAMES = {"checkpoint": "--ckpt"}
#: VR-Net: the denoiser name that selects it
UNET = "unet"


def flag(field_name: str) -> str:
    """The command-line flag of an option field."""
    return _FLAG_NAMES.get(field_name, "--" + field_name.replace("_", "-"))


class Counts(click.ParamType):
    """``N`` or ``N1,N2,...`` (one count per pyramid level, finest first): an int or a tuple of ints."""

    name = "counts"

    def __init__(self, minimum: int):
        self.minimum = minimum

    def convert(self, value, param, ctx):
        if isinstance(value, (int, tuple)):
            return value
        try:
            vals = tuple(int(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not N or N1,N2,... (integers, one per pyramid level, finest first)", param, ctx)
        if any(v < self.minimum for v in vals):
            self.fail(f"{value!r}: counts must be >= {self.minimum}", param, ctx)
        return vals[0] if len(vals) == 1 else vals


_POS_FLOAT = click.FloatRange(min=0, min_open=True)


def _click_type(kind: str):
    """``(type, metavar)`` of a field ``kind`` (the ``metadata["kind"]`` of the option dataclasses)."""
    return {
        "name": (str, "NAME"),
        "float+": (_POS_FLOAT, "X"),
        "fraction": (click.FloatRange(0, 1, min_open=True, max_open=True), "X"),
        "int+": (click.IntRange(min=1), "N"),
        "int0": (click.IntRange(min=0), "N"),
        "counts1": (Counts(1), "N[,N...]"),
        "counts0": (Counts(0), "N[,N...]"),
        "device": (str, "DEVICE"),
        "precision": (click.Choice(["auto", "float32", "bfloat16"]), None),
        "affine": (click.Choice(["rigid", "similarity", "affine"]), None),
    }[kind]


#: what a ``None`` default means, per field
_NONE = {"levels": "all (down to --min-size)", "post_lam": "the data term's refine_lam"}


def _show(v, name: str = "") -> str:
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return _NONE.get(name, "none") if v is None else str(v)


def _classical_default(name: str, f) -> str:
    from varreg.data_terms import DATA_TERMS
    from varreg.denoisers import DENOISERS

    if name in ("theta", "lam", "refine_lam"):
        return ", ".join(f"{getattr(cls.weights, name)} for {dt}" for dt, cls in DATA_TERMS.items())
    if name == "denoiser_iterations":
        return "; ".join(f"{cls.default_iterations} for {dn}" for dn, cls in DENOISERS.items())
    return _show(f.default, name)


def _names_help(name: str) -> str:
    from varreg.data_terms import DATA_TERMS
    from varreg.denoisers import DENOISERS

    if name == "data_term":
        return f" Choices: {', '.join(DATA_TERMS)}."
    if name == "denoiser":
        return f" Choices: {', '.join(DENOISERS)}, {UNET} (VR-Net: needs --ckpt; then the VR-Net flags apply)."
    if name in ("refine_denoiser", "post_denoiser"):
        return f" Choices: {', '.join(DENOISERS)}."
    return ""


def solver_params() -> list[click.Option]:
    """The click options of every solver field: classical first, then VR-Net's (shared names once)."""
    from varreg.options import FIELDS as CLASSICAL
    from varreg_learned.options import FIELDS as LEARNED

    params, seen = [], set()
    for group, fields in (("classical", CLASSICAL), ("VR-Net", LEARNED)):
        for name, f in fields.items():
            if name in seen:
                continue
            seen.add(name)
            kind, text = f.metadata["kind"], f.metadata["help"]
            default = _classical_default(name, f) if group == "classical" else _show(f.default, name)
            where = "" if name in ("normalise", "device") else (" [VR-Net]" if group == "VR-Net" else "")
            text = f"{text}{_names_help(name)} Default: {default}.{where}"
            if kind == "flag":
                params.append(click.Option([f"{flag(name)}/--no-{name}"], default=None, help=text))
                continue
            typ, metavar = _click_type(kind)
            params.append(click.Option([flag(name), name], type=typ, metavar=metavar, default=None, help=text))
    params.insert(2, click.Option(["--ckpt", "checkpoint"], metavar="PATH", default=None,
                                  help="VR-Net checkpoint for --denoiser unet (the package ships "
                                       "varreg_learned/checkpoints/vrnet2d_acdc.pt, 2-D, for --slices or 2-D images)."))
    return params


def solver_field_names() -> tuple[set, set]:
    """``(classical fields, VR-Net fields)``, ``normalise`` and ``device`` in both."""
    from varreg.options import FIELDS as CLASSICAL
    from varreg_learned.options import FIELDS as LEARNED

    return set(CLASSICAL), set(LEARNED) | {"checkpoint"}


class SolverCommand(click.Command):
    """A command whose solver flags are made from the option dataclasses on first use (lazy import)."""

    _made = False

    def get_params(self, ctx):
        if not self._made:
            self.params.extend(solver_params())
            self._made = True
        return super().get_params(ctx)


def method_from_flags(given: dict):
    """``(method, kind)`` for :func:`varreg.register_images` from the solver flags given (None: unset);
    ``kind`` is ``"classical"`` or ``"vrnet"``.

    ``--denoiser unet`` selects VR-Net (:func:`varreg_learned.register_learned` with the
    checkpoint bound); anything else the classical :func:`varreg.register`. A flag of the
    other solver, or a value a library refuses, is an :class:`varreg.io.InputError` naming the flag.
    """
    from varreg.io import InputError
    from varreg.options import OptionError, SolverOptions

    given = {k: v for k, v in given.items() if v is not None}
    classical, learned = solver_field_names()
    unet = str(given.get("denoiser", "")).lower() == UNET
    try:
        if unet:
            stray = sorted(set(given) - learned - {"denoiser"}, key=list(given).index)
            if stray:
                raise InputError(flag(stray[0]), f"is a classical solver option; it does not apply to --denoiser unet "
                                                 f"(VR-Net takes {', '.join(flag(n) for n in sorted(learned))})")
            try:
                from varreg_learned.inference import register_learned
                from varreg_learned.options import VRNetOptions, check_checkpoint
            except ImportError as exc:
                raise InputError("--denoiser unet", f"VR-Net needs torch: install the learned extra, "
                                                    f"pip install 'varreg[learned]' ({exc})") from None
            ckpt = given.pop("checkpoint", None)
            given.pop("denoiser")
            check_checkpoint(ckpt)
            opts = VRNetOptions(**given)
            return functools.partial(register_learned, checkpoint=os.fspath(ckpt), options=opts), "vrnet"
        stray = sorted(set(given) - classical, key=list(given).index)
        if stray:
            raise InputError(flag(stray[0]), "goes with --denoiser unet (VR-Net); the classical denoisers do not take it")
        import varreg

        opts = SolverOptions(**given)
        return functools.partial(varreg.register, options=opts), "classical"
    except OptionError as exc:
        raise InputError(flag(exc.option), exc.problem) from None
