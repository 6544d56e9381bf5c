"""The tables that compare training methods (Tables 1-6): one row per method of the paper, per setting
(data set) where it has several, ours beside the paper's number; a method run here that the paper does not
list gets a row of its own."""

from __future__ import annotations

from dblocks.tables.cells import DASH, Cell, number
from dblocks.tables.columns import (
    COST_NOTE,
    DECIMALS,
    EXTRA_METHODS,
    OURS_METRICS,
    OURS_NOTES,
    TRAIN_COST_METRICS,
    TRAIN_COST_NOTE,
    TRAIN_COST_TABLES,
    cost_cells,
    cost_columns,
    experiment_suffix,
    is_fid_table,
    label_column,
    logs_metric,
    method_label,
    ours_columns,
    paper_columns,
)
from dblocks.tables.context import Context
from dblocks.tables.experiments import ExperimentSpec
from dblocks.tables.ours import metric_cell, train_cost_cell
from dblocks.tables.table import Table


def build_methods_table(ctx: Context, table_id: str, paper: dict, exps: list[ExperimentSpec]) -> Table:
    decimals = DECIMALS.get(table_id, 2)
    settings = paper.get("settings")
    ours = OURS_METRICS.get(table_id) or {k: (k, 1.0, v) for k, v in paper["columns"].items()}
    columns = ([label_column("setting", "setting")] if settings else []) + [label_column("method", "method")]
    columns += paper_columns(paper["columns"])
    columns += ours_columns(ctx, exps, {k: v[2] for k, v in ours.items()})
    cost = is_fid_table(paper)
    if cost:
        columns += cost_columns("cost:", "ours", ctx.params.scale)
    train_cost = table_id in TRAIN_COST_TABLES
    if train_cost:
        columns += cost_columns("train:", "ours", ctx.params.scale, TRAIN_COST_METRICS)
    table = Table(
        table_id,
        paper["title"],
        ctx.caption(table_id, paper, exps),
        columns,
        notes=list(paper.get("notes", []))
        + OURS_NOTES.get(table_id, [])
        + ([COST_NOTE] if cost else [])
        + ([TRAIN_COST_NOTE] if train_cost else []),
        feeders=[e.name for e in exps],
    )

    by_setting: dict[str | None, list[ExperimentSpec]] = {}
    for exp in exps:
        key = None
        if settings:
            key, guessed = _match_setting(settings, exp)
            if guessed:
                table.notes.append(
                    f"{exp.name} (dataset {exp.config.get('dataset')}) matches no paper setting; "
                    f"shown as a stand-in for {settings[key]['label']}"
                )
        by_setting.setdefault(key, []).append(exp)

    def add_row(
        label: str,
        setting: str | None,
        paper_values: dict,
        exp: ExperimentSpec | None,
        method: str | None,
        expected: bool,
    ) -> None:
        """A row: the paper's values, and ours read from ``exp``'s ``method`` runs (None: "—", not run here)."""
        row = {"method": Cell(label)}
        if settings:
            row["setting"] = Cell(settings[setting]["label"])
        for key in paper["columns"]:
            row[f"paper:{key}"] = number(paper_values.get(key), decimals)
        for key, (metric, multiplier, _) in ours.items():
            row[f"ours:{key}"] = (
                Cell(DASH)
                if exp is None or not logs_metric(method, metric)
                else metric_cell(ctx.index, exp.name, method, metric, multiplier, decimals, expected=expected)
            )
        if cost:
            row.update(cost_cells(ctx, "cost:", exp, method, expected))
        if train_cost:
            for m, (mult, _, dec, reduce) in TRAIN_COST_METRICS.items():
                row[f"train:{m}"] = (
                    Cell(DASH)
                    if exp is None or method is None
                    else train_cost_cell(
                        ctx.index,
                        exp.name,
                        method,
                        int(exp.config.get("blocks") or 1),
                        m,
                        mult,
                        dec,
                        reduce,
                        expected=expected,
                    )
                )
        table.rows.append(row)

    setting_keys = list(settings) if settings else [None]
    for setting in setting_keys:
        paper_rows = [r for r in paper["rows"] if r["key"].get("setting") == setting]
        feeding = by_setting.get(setting, [])
        for prow in paper_rows:
            method = prow["key"].get("method")
            if method is None or not feeding:
                add_row(prow["label"], setting, prow["values"], None, None, False)
                continue
            # the experiments that train this row's method (a block-local baseline is an experiment of its own);
            # none: one row that reads "not run here"
            runners = [e for e in feeding if method in ctx.run_methods(ctx.baseline_source(e, method))]
            if not runners:
                add_row(prow["label"], setting, prow["values"], None, None, False)
                continue
            for exp in runners:
                label = prow["label"] + experiment_suffix(exp, len(runners))
                source = ctx.baseline_source(exp, method)
                add_row(label, setting, prow["values"], source, method, method in ctx.run_methods(source))
                if source is not exp:
                    table.notes.append(
                        f"{label}: the end-to-end run of {source.name}, which {exp.name} shares "
                        "(they differ only in block-wise settings, which end-to-end training "
                        "does not read)"
                    )
        covered = {r["key"].get("method") for r in paper_rows}
        for exp in feeding:
            for method in ctx.run_methods(exp):
                if method in covered:
                    continue
                label, beside = EXTRA_METHODS.get(method, (method_label(method), None))
                prow = next((r for r in paper_rows if r["key"].get("method") == beside), None)
                label += experiment_suffix(exp, len(feeding))
                add_row(label, setting, prow["values"] if prow else {}, exp, method, True)
                if prow is not None:
                    table.notes.append(
                        f"{label}: the paper's number beside it is its DiffusionBlocks result, "
                        "which the paper obtained in this shared-stem mode"
                    )
    return table


def _match_setting(settings: dict, exp: ExperimentSpec) -> tuple[str, bool]:
    """The setting an experiment belongs to, and whether that was a guess (no match word found)."""
    dataset = str(exp.config.get("dataset", "")).lower()
    for haystack in (dataset, exp.name.lower()):
        for key, setting in settings.items():
            if any(word in haystack for word in setting["match"]):
                return key, False
    return next(iter(settings)), True
