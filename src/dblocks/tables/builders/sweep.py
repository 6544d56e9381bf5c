"""Tables 8, 10, 11 and gamma: one metric against one swept parameter (B or the overlap), each of our runs
placed in the row of the value it was trained with."""

from __future__ import annotations

from typing import Any

from dblocks.tables.builders.placing import (
    Placed,
    ablation_cells,
    ablation_metrics,
    agreement_cell,
    judged,
    place,
    placed_cost_cells,
    placed_metric_cell,
)
from dblocks.tables.cells import DASH, Cell, number
from dblocks.tables.columns import (
    COST_NOTE,
    DECIMALS,
    SWEEP_COMPANIONS,
    cost_columns,
    is_fid_table,
    label_column,
    ours_header,
)
from dblocks.tables.context import Context
from dblocks.tables.experiments import ExperimentSpec
from dblocks.tables.table import Column, Table


def build_sweep_table(ctx: Context, table_id: str, paper: dict, exps: list[ExperimentSpec]) -> Table:
    """Tables 8, 10, 11 and gamma: rows by one parameter (blocks or overlap)."""
    decimals = DECIMALS.get(table_id, 2)
    param, param_label = paper["param"], paper.get("param_label", paper["param"])
    candidates = ablation_metrics(table_id)
    paper_col = next(iter(paper["columns"]))
    rows = {
        sweep_key(r["key"][param]): {"label": r["label"], "value": r["values"].get(paper_col)} for r in paper["rows"]
    }
    notes: list[str] = list(paper.get("notes", []))
    # One metric for the whole column: the first candidate that any run logged (Table 11: GPT-2 large
    # MAUVE online, else the offline reference-LM features), never a mix of feature spaces across rows.
    # When none was logged, the first candidate's (empty) cells stand, as for a one-metric table.
    tried = []
    for chosen in candidates:
        placement_notes: list[str] = []
        cells = list(ablation_cells(ctx, exps, chosen[0], chosen[1], decimals, placement_notes))
        tried.append((chosen, cells, placement_notes))
        if any(cell.value is not None for _, cell, _ in cells):
            break
    else:
        chosen, cells, placement_notes = tried[0]
    metric, _, metric_label = chosen
    notes += placement_notes
    skipped = [c[2] for c in candidates[: candidates.index(chosen)]]
    if skipped:
        notes.append(f"ours: {metric_label}; not logged by any run here: {', '.join(skipped)}")
    slots: dict[float, Placed] = {}
    for exp, cell, values in cells:
        key = sweep_key(values.get(param))
        if key is None:
            notes.append(f"{exp.name}: no {param} value; not placed")
            continue
        if key not in rows:
            label = str(int(key)) if param == "blocks" else f"{key:g}"
            rows[key] = {"label": label, "value": None}
        place(slots, key, exp, cell, notes)
    columns = [
        label_column(param, param_label),
        Column("paper", "paper", "paper", "paper"),
        Column(
            "ours",
            ours_header(ctx, exps) if len(candidates) == 1 else f"ours {metric_label} ({ctx.describe(exps)})",
            "ours",
            "ours",
        ),
        Column("experiment", "experiment", "experiment", "info"),
    ]
    companions = [
        (metric, multiplier, label)
        for metric, multiplier, label in SWEEP_COMPANIONS.get(table_id, [])
        if any(placed_metric_cell(ctx, placed, metric, multiplier).value is not None for placed in slots.values())
    ]
    columns += [Column(f"also:{metric}", f"ours: {label}", metric, "ours") for metric, _, label in companions]
    cost = is_fid_table(paper)
    with_agreement = cost and judged(exps)
    if with_agreement:
        columns.append(Column("agreement", "ours: class agreement", "agreement", "ours"))
    if cost:
        columns += cost_columns("cost:", "ours", ctx.params.scale)
        notes.append(COST_NOTE)
    table = Table(
        table_id,
        paper["title"],
        ctx.caption(table_id, paper, exps),
        columns,
        notes=notes,
        feeders=[e.name for e in exps],
        metric=metric,
    )
    for key in sorted(rows):
        placed = slots.get(key)
        # "_key" (no column shows it): the swept value as a number, for the figure's x axis
        row = {
            param: Cell(rows[key]["label"]),
            "paper": number(rows[key]["value"], decimals),
            "ours": placed.cell if placed else Cell(DASH),
            "experiment": Cell(placed.exp.name if placed else DASH),
            "_key": Cell(str(key), key),
        }
        for metric, multiplier, _ in companions:
            row[f"also:{metric}"] = placed_metric_cell(ctx, placed, metric, multiplier, decimals)
        if with_agreement:
            row["agreement"] = agreement_cell(ctx, placed)
        if cost:
            row.update(placed_cost_cells(ctx, "cost:", placed))
        table.rows.append(row)
    return table


def sweep_key(value: Any) -> float | None:
    """A swept value as a row key (rounded, so that 0.1 logged as "0.1" meets the paper's 0.1)."""
    try:
        return round(float(value), 6)
    except (TypeError, ValueError):
        return None
