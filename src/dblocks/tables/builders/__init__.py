"""One builder per kind of paper table (``dblocks.paper``: each table's ``kind``), and a generic one for a
table id the paper module does not know."""

from __future__ import annotations

from dblocks.paper import PAPER_TABLES
from dblocks.tables.builders.generic import build_generic_table
from dblocks.tables.builders.grid import build_grid_table
from dblocks.tables.builders.methods import build_methods_table
from dblocks.tables.builders.sweep import build_sweep_table
from dblocks.tables.builders.timing import build_timing_table
from dblocks.tables.context import Context
from dblocks.tables.table import Table

BUILDERS = {
    "methods": build_methods_table,
    "grid": build_grid_table,
    "sweep": build_sweep_table,
    "timing": build_timing_table,
}


def build_table(ctx: Context, table_id: str) -> Table:
    """The table ``table_id``, from the experiments of the params file that feed it."""
    exps = ctx.params.feeders(table_id)
    paper = PAPER_TABLES.get(table_id)
    if paper is None:
        return build_generic_table(ctx, table_id, exps)
    return BUILDERS[paper["kind"]](ctx, table_id, paper, exps)
