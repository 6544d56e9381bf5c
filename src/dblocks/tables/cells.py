"""A table cell: the text shown, the value behind it (over seeds: their mean, standard deviation and count),
why it is missing, and the runs it was read from.

Cell symbols: a number; ``n/a`` (:data:`NA`) = expected but missing, the note says why; ``—`` (:data:`DASH`) =
not applicable (the paper reports no number, or this project does not run that method)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from dblocks.tables.runs import RunInfo

DASH = "—"
NA = "n/a"


@dataclass
class Cell:
    text: str = DASH
    value: float | None = None  # over seeds: the mean
    note: str = ""
    run: RunInfo | None = None
    std: float | None = None  # over seeds: the sample standard deviation (n - 1 in the denominator)
    n: int = 1  # how many seeds' values make it
    runs: list[RunInfo] = field(default_factory=list)  # over seeds: every run behind the value

    @property
    def sources(self) -> list[RunInfo]:
        return self.runs or ([self.run] if self.run is not None else [])


def fmt(value: float | None, decimals: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{value:.{decimals}f}"


def number(value: float | None, decimals: int = 2) -> Cell:
    return Cell(text=fmt(value, decimals), value=value)


def missing(note: str, run: RunInfo | None = None) -> Cell:
    return Cell(text=NA, note=note, run=run)


def over_seeds(cells: list[Cell], decimals: int = 2) -> Cell:
    """One cell for a metric measured with several seeds: mean +- sample standard deviation over the seeds that
    have it, the seeds that lack it named in its note; no seed with a value: the first seed's cell."""
    valued = [c for c in cells if c.value is not None]
    if len(cells) == 1 or not valued:
        return cells[0]
    values = [c.value for c in valued]
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    # no spread (a cost that does not depend on the seed, e.g. layer evaluations per sample): the value alone
    text = f"{fmt(mean, decimals)} ± {fmt(std, decimals)}" if std else fmt(mean, decimals)
    lacking = [c.note or c.text for c in cells if c.value is None]
    note = f"{len(values)} of {len(cells)} seeds; missing: {'; '.join(lacking)}" if lacking else ""
    return Cell(
        text=text,
        value=mean,
        note=note,
        run=valued[0].run,
        std=std,
        n=len(values),
        runs=[r for c in valued for r in c.sources],
    )
