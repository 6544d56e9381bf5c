"""A table id the paper module does not know: every evaluate metric of every method, without paper numbers."""

from __future__ import annotations

from dblocks.tables.cells import DASH, Cell
from dblocks.tables.columns import label_column
from dblocks.tables.context import Context, unique
from dblocks.tables.experiments import ExperimentSpec
from dblocks.tables.ours import metric_cell
from dblocks.tables.table import Column, Table


def build_generic_table(ctx: Context, table_id: str, exps: list[ExperimentSpec]) -> Table:
    """A table id the paper module does not know: every evaluate metric of every method, paper '—'."""
    metrics = unique(
        m
        for e in exps
        for method in ctx.run_methods(e)
        for r in [ctx.index.latest(e.name, "evaluate", method)[0]]
        if r
        for m in sorted(r.metrics)
    )
    columns = [
        label_column("experiment", "experiment"),
        label_column("method", "method"),
        Column("paper", "paper", "paper", "paper"),
    ]
    columns += [Column(f"ours:{m}", f"ours {m} ({ctx.params.scale})", f"ours_{m}", "ours") for m in metrics]
    table = Table(
        table_id,
        f"table {table_id} (no paper numbers on record)",
        ctx.caption(table_id, None, exps),
        columns,
        feeders=[e.name for e in exps],
    )
    for exp in exps:
        for method in ctx.run_methods(exp):
            row = {"experiment": Cell(exp.name), "method": Cell(method), "paper": Cell(DASH)}
            for m in metrics:
                row[f"ours:{m}"] = metric_cell(ctx.index, exp.name, method, m, 1.0, 4)
            table.rows.append(row)
    return table
