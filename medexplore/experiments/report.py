"""Markdown reports of experiments: a verdict per claim, tables of mean and spread over seeds, figures inline."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ..errors import UserError

__all__ = ["Report", "mean_spread", "summarise", "markdown_table"]


def mean_spread(values: Iterable[float], digits: int = 3) -> str:
    """``"0.912 ± 0.010"`` (mean ± sample standard deviation), the bare value for one seed, ``"–"`` for none;
    integers (counts) without decimals."""
    values = [v for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return "–"
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):  # counts: no decimals
        digits = 0
    values = [float(v) for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def summarise(rows: Sequence[dict] | pd.DataFrame, by: Sequence[str], values: Sequence[str], digits: int = 3) -> pd.DataFrame:
    """One line per combination of ``by`` with each of ``values`` as mean ± spread over the rows
    (the seeds), and the number of seeds ``n``."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    missing = [c for c in (*by, *values) if c not in frame.columns]
    if missing:
        raise UserError(f"summarise: rows have no column(s) {missing}")
    out = []
    for key, group in frame.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        out.append({**dict(zip(by, key)), **{v: mean_spread(group[v], digits) for v in values}, "n": len(group)})
    return pd.DataFrame(out)


def _cell(value) -> str:
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value).replace("|", "\\|")


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub markdown table (floats to 3 decimals, NaN as a dash)."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


class Report:
    """A readable report: title, what was run, verdicts, tables and figures, written as ``report.md``."""

    def __init__(self, title: str, summary: str = ""):
        self.title, self.summary = title, summary
        self.verdicts: list[str] = []
        self.sections: list[str] = []

    def verdict(self, claim: str, held: bool | str | None, evidence: str) -> None:
        """One line per claim: held, did not hold, ``"not shown"`` (differences within the seed spread), or
        could not be tested here (``None``)."""
        marks = {True: "HELD", False: "DID NOT HOLD", "not shown": "NOT SHOWN (within the seed spread)",
                 None: "NOT TESTED"}
        if held not in marks:
            raise UserError(f"verdict: held must be one of {list(marks)}, got {held!r}")
        mark = marks[held]
        self.verdicts.append(f"- **{mark}**: {claim} ({evidence})")

    def text(self, markdown: str) -> None:
        self.sections.append(markdown.strip())

    def table(self, heading: str, frame: pd.DataFrame, note: str = "") -> None:
        body = markdown_table(frame) if len(frame) else "(no rows)"
        self.sections.append(f"### {heading}\n\n{body}" + (f"\n\n{note}" if note else ""))

    def figure(self, path: str | Path, caption: str, folder: str | Path) -> None:
        """A figure already saved under the report's ``folder``, linked relative to it."""
        relative = Path(path).resolve().relative_to(Path(folder).resolve())
        self.sections.append(f"![{caption}]({relative.as_posix()})\n\n*{caption}*")

    def markdown(self) -> str:
        parts = [f"# {self.title}", self.summary.strip(), "## Verdict", "\n".join(self.verdicts) or "(none)",
                 "## Results", *self.sections]
        return "\n\n".join(p for p in parts if p) + "\n"

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / "report.md"
        path.write_text(self.markdown())
        return path
