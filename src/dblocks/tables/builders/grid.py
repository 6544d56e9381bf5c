"""Table 7: FID by layer split (rows) and noise partition (columns), each of our runs placed by the split and
partition it was trained with."""

from __future__ import annotations

from dblocks.tables.builders.placing import (
    Placed,
    ablation_cells,
    ablation_metrics,
    agreement_cell,
    judged,
    place,
    placed_cost_cells,
    row_for_split,
    split_of,
)
from dblocks.tables.cells import DASH, Cell, number
from dblocks.tables.columns import COST_NOTE, DECIMALS, cost_columns, is_fid_table, label_column
from dblocks.tables.context import Context
from dblocks.tables.experiments import ExperimentSpec
from dblocks.tables.table import Column, Table


def build_grid_table(ctx: Context, table_id: str, paper: dict, exps: list[ExperimentSpec]) -> Table:
    """Table 7: rows by layer split, columns by partition."""
    decimals = DECIMALS.get(table_id, 2)
    metric, multiplier, _ = ablation_metrics(table_id)[0]
    partitions = dict(paper["columns"])
    rows = [{"_key": tuple(r["key"]["layer_split"]), "label": r["label"], "values": r["values"]} for r in paper["rows"]]
    notes: list[str] = list(paper.get("notes", []))
    slots: dict[tuple, Placed] = {}
    for exp, cell, values in ablation_cells(ctx, exps, metric, multiplier, decimals, notes):
        split, partition = split_of(values), str(values.get("partition"))
        if split is None:
            notes.append(f"{exp.name}: no layer split could be derived (arch {values.get('arch')!r}); not placed")
            continue
        if partition not in partitions:
            partitions[partition] = partition
        i, proportional = row_for_split(rows, split)
        if i is None:
            rows.append({"_key": split, "label": str(list(split)), "values": {}})
            i = len(rows) - 1
        elif proportional:
            notes.append(
                f"{exp.name}: our split {list(split)} placed in the paper's {rows[i]['label']} row "
                "(same proportions of the depth)"
            )
        place(slots, (i, partition), exp, cell, notes)
    columns = [label_column("layer_split", "layer split")]
    columns += [Column(f"paper:{p}", f"paper {label}", f"paper_{p}", "paper") for p, label in partitions.items()]
    columns += [
        Column(f"ours:{p}", f"ours {label} ({ctx.params.scale})", f"ours_{p}", "ours")
        for p, label in partitions.items()
    ]
    with_agreement = judged(exps)
    if with_agreement:
        columns += [
            Column(f"agree:{p}", f"ours {label}: class agreement", f"agreement_{p}", "ours")
            for p, label in partitions.items()
        ]
    cost = is_fid_table(paper)
    if cost:
        for p, label in partitions.items():
            columns += cost_columns(f"cost:{p}:", f"ours {label}", ctx.params.scale)
        notes.append(COST_NOTE)
    table = Table(
        table_id,
        paper["title"],
        ctx.caption(table_id, paper, exps),
        columns,
        notes=notes,
        feeders=[e.name for e in exps],
    )
    for i, r in enumerate(rows):
        row = {"layer_split": Cell(r["label"])}
        for p in partitions:
            row[f"paper:{p}"] = number(r["values"].get(p), decimals)
            placed = slots.get((i, p))
            row[f"ours:{p}"] = placed.cell if placed else Cell(DASH)
            if with_agreement:
                row[f"agree:{p}"] = agreement_cell(ctx, placed)
            if cost:
                row.update(placed_cost_cells(ctx, f"cost:{p}:", placed))
        table.rows.append(row)
    return table
