"""A table: its columns (each with a role: label, paper, ours, cost or info), its rows of cells, its notes,
and the MLflow runs behind our numbers. The renderers (dblocks.tables.render) write it out."""

from __future__ import annotations

from dataclasses import dataclass, field

from dblocks.tables.cells import Cell
from dblocks.tables.runs import RunInfo

#: the roles of columns of numbers: right-aligned, and in the CSV their value rather than their text
NUMBER_ROLES = ("paper", "ours", "cost")


@dataclass
class Column:
    key: str
    header: str
    csv: str
    role: str  # label | paper | ours | cost (ours, inference cost beside a metric) | info


@dataclass
class Table:
    id: str
    title: str
    caption: list[str]
    columns: list[Column]
    rows: list[dict[str, Cell]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    feeders: list[str] = field(default_factory=list)
    metric: str = ""  # the MLflow metric in the "ours" column of a one-metric table (sweeps), for its figure

    def cell_notes(self) -> list[str]:
        """Each cell's note as a footnote that names its row (by the label columns) and its column."""
        out = []
        label_cols = [c for c in self.columns if c.role == "label"]
        for row in self.rows:
            label = " / ".join(row[c.key].text for c in label_cols if c.key in row)
            for col in self.columns:
                cell = row.get(col.key)
                if cell is not None and cell.note:
                    out.append(f"{cell.text} in row {label!r}, column {col.header!r}: {cell.note}")
        return out

    def sources(self) -> list[str]:
        """One line per MLflow run behind a value of ours, with the commit and hashes it was made with, so that
        a number can be traced to its run."""
        seen: dict[str, RunInfo] = {}
        for row in self.rows:
            for cell in row.values():
                if cell.value is not None:
                    for run in cell.sources:
                        seen.setdefault(run.run_id, run)
        out = []

        def order(r: RunInfo) -> tuple:  # blocks in number order (NoProp-DT's 1..10), then named parts ("head")
            block = r.tag("block")
            rank = (0, -1, "") if not block else (0, int(block), "") if block.isdigit() else (1, 0, block)
            return r.tag("experiment"), r.tag("method"), rank

        for run in sorted(seen.values(), key=order):
            block = f", block {run.tag('block')}" if run.tag("block") else ""
            commit = f", git {run.tag('git_commit')[:10]}" if run.tag("git_commit") else ""
            hashes = f", config {run.tag('config_hash')}" if run.tag("config_hash") else ""
            hashes += f", evaluation {run.tag('eval_hash')}" if run.tag("eval_hash") else ""
            out.append(
                f"run {run.run_id}: {run.tag('experiment')}, {run.tag('method')}{block}, "
                f"{run.tag('job')}{commit}{hashes}"
            )
        return out
