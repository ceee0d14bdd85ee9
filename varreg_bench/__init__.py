"""The comparison behind ``varreg bench`` (issue #5): methods, pairs, runs, tables, plots, the report folder.

Above :mod:`varreg`, :mod:`varreg_learned` and :mod:`varreg_cli`: it may import
each of them, and the peer libraries (when their methods run). Modules:
``methods``, ``peers``, ``pairs``, ``run`` (scoring by :func:`varreg.acdc.score_pair`),
``tables``, ``plots``, ``machine`` (threads, versions, header, memory),
``scaling`` (a process per size: ``python -m varreg_bench.scaling``), ``tuning``
(the peers' grids) and ``report`` (the folder; :mod:`varreg_cli.bench` parses
the options). See docs/bench.md.
"""
from __future__ import annotations

import importlib

# The names below load their module on first use, so that importing the package stays cheap and
# ``python -m varreg_bench.scaling`` finds its module not yet imported.
_EXPORTS = {
    "methods": ("Method", "Unavailable", "VARREG_CONFIGS", "QUICK_METHODS", "registry", "default_methods",
                "select_methods", "installed"),
    "peers": ("SKIMAGE_PARAMS", "DEMONS_PARAMS", "ANTS_PARAMS", "ELASTIX_PARAMS", "PEERS", "skimage_tvl1",
              "sitk_demons", "ants_syn", "elastix_ffd"),
    "pairs": ("STRUCTURES", "SUITES", "DEFAULT_SPACING_3D", "Pair", "acdc_pairs", "synthetic_pair"),
    "run": ("score", "run_suite", "summarise"),
    "tables": ("results_table", "epe_table", "runtime_table", "write_csv", "csv_text"),
    "plots": ("boxplots", "scaling_plot"),
    "machine": ("apply_threads", "header_info", "rss_gib", "reset_peak_rss"),
    "scaling": ("SCALING_METHODS", "scaling_run", "scaling_table"),
    "tuning": ("TUNING_GRIDS", "tune_methods", "tuning_table"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
