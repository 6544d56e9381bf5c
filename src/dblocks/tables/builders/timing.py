"""Table 12: seconds per training step of the end-to-end run beside each block's, their sum and the ratio
(block-wise training does the same work as backprop, spread over independent jobs)."""

from __future__ import annotations

from dblocks.tables.builders.placing import split_of
from dblocks.tables.cells import DASH, Cell, fmt, missing, number
from dblocks.tables.columns import DECIMALS, RATIO_DECIMALS, experiment_suffix, label_column
from dblocks.tables.context import Context, unique
from dblocks.tables.experiments import ExperimentSpec
from dblocks.tables.ours import metric_cell
from dblocks.tables.table import Column, Table


def build_timing_table(ctx: Context, table_id: str, paper: dict, exps: list[ExperimentSpec]) -> Table:
    """Table 12: seconds per step of the end-to-end run vs each block's, their sum and the ratio."""
    decimals = DECIMALS.get(table_id, 4)
    pv = {r["key"]["row"]: r["values"]["seconds"] for r in paper["rows"]}
    columns = [
        label_column("row", "row"),
        Column("paper", "paper (s / iteration)", "paper", "paper"),
        Column("ours", f"ours ({ctx.describe(exps)}) s / step", "ours", "ours"),
        Column("device", "ours: device", "device", "info"),
    ]
    notes = list(paper.get("notes", []))
    notes.append(
        "Our timings are seconds_per_step as each training job measured it, on the device where that job "
        "ran (column 'ours: device', from the run tag dblocks.device; 'unknown' where not tagged). Blocks "
        "train as independent jobs, so the sum is total compute, not elapsed time."
    )
    table = Table(
        table_id,
        paper["title"],
        ctx.caption(table_id, paper, exps),
        columns,
        notes=notes,
        feeders=[e.name for e in exps],
    )

    def device(cell: Cell) -> Cell:
        return Cell(cell.run.tag("device") or "unknown") if cell.run is not None else Cell(DASH)

    for exp in exps:
        suffix = experiment_suffix(exp, len(exps))
        e2e = metric_cell(
            ctx.index, exp.name, "e2e", "seconds_per_step", 1.0, decimals, job="train", expected="e2e" in exp.methods
        )
        table.rows.append(
            {
                "row": Cell("End-to-end" + suffix),
                "paper": number(pv["e2e"], decimals),
                "ours": e2e,
                "device": device(e2e),
            }
        )
        first_train, _ = ctx.index.latest(exp.name, "train", "blockwise")
        values, mismatch = ctx.placement(exp, first_train)
        table.notes.extend(mismatch)
        split = split_of(values)
        try:
            count = int(values.get("blocks"))
        except (TypeError, ValueError):
            count = len(split) if split else 0
        # every block that logged a train run gets a row, even beyond the B the params give
        logged = [b for b in ctx.index.blocks(exp.name) if b.isdigit()]
        count = max([count] + [int(b) for b in logged])
        block_cells = []
        for b in range(1, count + 1):
            cell = metric_cell(
                ctx.index, exp.name, "blockwise", "seconds_per_step", 1.0, decimals, job="train", block=str(b)
            )
            block_cells.append(cell)
            layers = (
                f" ({split[b - 1]} layer{'s' if split[b - 1] != 1 else ''})" if split and len(split) == count else ""
            )
            table.rows.append(
                {
                    "row": Cell(f"block {b}{layers}{suffix}"),
                    "paper": number(pv["block"], decimals),
                    "ours": cell,
                    "device": device(cell),
                }
            )
        if block_cells and all(c.value is not None for c in block_cells):
            total = Cell(fmt(sum(c.value for c in block_cells), decimals), sum(c.value for c in block_cells))
        else:
            total = missing("some block has no seconds_per_step (see the block rows)")
        if total.value is not None and e2e.value:
            ratio = Cell(fmt(total.value / e2e.value, RATIO_DECIMALS), total.value / e2e.value)
        else:
            ratio = missing("needs the end-to-end time and the sum over blocks")
        devices = unique(c.run.tag("device") or "unknown" for c in block_cells if c.run is not None)
        table.rows.append(
            {
                "row": Cell(f"sum over {count} blocks{suffix}"),
                "paper": number(pv["sum"], decimals),
                "ours": total,
                "device": Cell(", ".join(devices) or DASH),
            }
        )
        table.rows.append(
            {
                "row": Cell(f"ratio sum / end-to-end{suffix}"),
                "paper": number(pv["ratio"], RATIO_DECIMALS),
                "ours": ratio,
                "device": Cell(DASH),
            }
        )
    return table
