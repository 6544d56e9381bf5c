"""Placing our runs in the paper's rows of an ablation table (Tables 7, 8, 10, 11, 12, gamma): by the params
each run was made with (layer split, partition, B, overlap), one run per slot, and what sits beside a placed
FID (class agreement, inference cost)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dblocks.config import JUDGED_DATASETS
from dblocks.tables.cells import DASH, Cell
from dblocks.tables.columns import OURS_METRICS, cost_cells
from dblocks.tables.context import Context
from dblocks.tables.experiments import ExperimentSpec
from dblocks.tables.ours import metric_cell
from dblocks.tables.runs import parse_param


def ablation_metrics(table_id: str) -> list[tuple[str, float, str]]:
    """The (MLflow metric, multiplier, header) candidates for an ablation table's one column of ours: FID
    unless :data:`OURS_METRICS` names others."""
    return list(OURS_METRICS.get(table_id, {"fid": ("fid", 1.0, "FID")}).values())


def split_of(values: dict) -> tuple[int, ...] | None:
    """The layers per block a run's params give: its layer_split, else the even split of its arch's depth."""
    split = values.get("layer_split")
    if isinstance(split, str):
        split = parse_param(split)
    if split:
        return tuple(int(n) for n in split)
    try:
        from dblocks.models import get_arch
        from dblocks.noise import layer_split

        return tuple(layer_split(get_arch(str(values["arch"])).depth, int(values["blocks"]), None))
    except Exception:  # unknown arch or blocks: not placeable
        return None


def row_for_split(rows: list[dict], split: tuple[int, ...]) -> tuple[int | None, bool]:
    """Index of the paper row with this split: exact match first, else the same proportions."""
    for i, row in enumerate(rows):
        if tuple(row["_key"]) == split:
            return i, False
    total = sum(split)
    for i, row in enumerate(rows):
        key = tuple(row["_key"])
        if len(key) == len(split) and all(math.isclose(a / sum(key), b / total) for a, b in zip(key, split)):
            return i, True
    return None, False


@dataclass
class Placed:
    """The experiment whose cell fills a slot."""

    exp: ExperimentSpec
    cell: Cell


def ablation_cells(
    ctx: Context, exps: list[ExperimentSpec], metric: str, multiplier: float, decimals: int, notes: list[str]
) -> Iterator[tuple[ExperimentSpec, Cell, dict]]:
    """(experiment, its metric cell, the params that place it) for the ablation tables; notes collect
    any mismatch between the params a run logged and the current params file."""
    for exp in exps:
        cell = metric_cell(ctx.index, exp.name, ctx.denoiser_method(exp), metric, multiplier, decimals)
        values, mismatch = ctx.placement(exp, cell.run)
        notes += mismatch
        yield exp, cell, values


def place(slot: dict, key: Any, exp: ExperimentSpec, cell: Cell, notes: list[str]) -> None:
    """Put a cell in a slot; on a conflict the most recent finished run wins."""
    prev = slot.get(key)
    if prev is None:
        slot[key] = Placed(exp, cell)
        return

    def rank(p: Placed) -> tuple:
        return (p.cell.run is not None and p.cell.value is not None, p.cell.run.order if p.cell.run else ())

    winner, loser = (prev, Placed(exp, cell)) if rank(prev) >= rank(Placed(exp, cell)) else (Placed(exp, cell), prev)
    slot[key] = winner
    notes.append(
        f"{winner.exp.name} and {loser.exp.name} both fall in one cell; showing {winner.exp.name} "
        "(the most recent finished run)"
    )


def judged(exps: list[ExperimentSpec]) -> bool:
    """Whether any of these experiments draws digits, whose samples the held-out judge reads (class agreement)."""
    return any(e.config.get("dataset") in JUDGED_DATASETS for e in exps)


def placed_metric_cell(
    ctx: Context, placed: Placed | None, metric: str, multiplier: float = 1.0, decimals: int = 3
) -> Cell:
    """Another metric of the runs behind a placed cell ("—" for an empty slot)."""
    if placed is None:
        return Cell(DASH)
    return metric_cell(ctx.index, placed.exp.name, ctx.denoiser_method(placed.exp), metric, multiplier, decimals)


def agreement_cell(ctx: Context, placed: Placed | None) -> Cell:
    """The class agreement of the run behind a placed FID cell (dblocks.metrics.class_agreement)."""
    return placed_metric_cell(ctx, placed, "class_agreement")


def placed_cost_cells(ctx: Context, prefix: str, placed: Placed | None) -> dict[str, Cell]:
    """The inference cost of the run behind a placed FID cell ("—" for an empty slot)."""
    if placed is None:
        return cost_cells(ctx, prefix, None, None)
    return cost_cells(ctx, prefix, placed.exp, ctx.denoiser_method(placed.exp))
