"""The five works' claims as experiments: ``medexplore experiment NAME`` writes a run directory with
``report.md`` (verdicts, tables of mean ± sd over seeds, figures) and the raw metrics; finished
training runs are reused, so an interrupted experiment continues where it stopped."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..errors import UserError
from .adaptation import adaptation
from .base import BUDGETS, RECIPES, Experiment, ExperimentSettings
from .imax import imax_vs_dmax
from .multitask import multitask_vs_single
from .packing import packing_vs_padding
from .report import Report, mean_spread, summarise
from .ssl import ssl_benefit

__all__ = ["EXPERIMENTS", "run_experiment", "Experiment", "ExperimentSettings", "Report",
           "BUDGETS", "RECIPES", "mean_spread", "summarise"]


def _imax(exp):
    return imax_vs_dmax(exp)


def _multitask(exp):
    return multitask_vs_single(exp)


def _ssl(exp):
    return ssl_benefit(exp)


def _packing(exp):
    return packing_vs_padding(exp)


def _adaptation(exp):
    return adaptation(exp)


EXPERIMENTS: dict[str, Callable[[Experiment], Report]] = {
    "imax-vs-dmax": _imax, "multitask-vs-single": _multitask, "ssl-benefit": _ssl, "packing": _packing,
    "adaptation": _adaptation,
}


def run_experiment(name: str, out: str | Path, settings: ExperimentSettings | None = None,
                   callbacks: Sequence = (), control=None) -> Path:
    """Run (or continue) experiment ``name`` into ``out``; returns the report's path."""
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    exp = Experiment(name, out, settings or ExperimentSettings(), callbacks, control)
    report = EXPERIMENTS[name](exp)
    changes = [f"`{section}.{key}={value}`" for section, values in exp.settings.overrides.items()
               for key, value in values.items()]
    if changes:
        report.summary += f" Recipe changed with `--set`: {', '.join(changes)}."
    return report.write(exp.out)
