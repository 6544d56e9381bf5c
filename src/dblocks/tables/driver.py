"""``generate``: every table and figure a params file's experiments feed, written from its MLflow runs."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from dblocks.io import write_text_atomic
from dblocks.paper import PAPER_TABLES
from dblocks.tables.builders import build_table
from dblocks.tables.context import Context
from dblocks.tables.experiments import read_params
from dblocks.tables.figures import figure_curves, figure_grid, figure_sweep
from dblocks.tables.files import safe_name
from dblocks.tables.render import render_csv, render_index, render_md, render_tex
from dblocks.tables.runs import RunIndex, tracking_uri_for
from dblocks.tables.samples import SAMPLES_ARTIFACT, fetch_samples, links_note, samples_file_name
from dblocks.tables.table import Table

#: the formats each table is written in
RENDERERS = {".md": render_md, ".csv": render_csv, ".tex": render_tex}


@dataclass
class _Outputs:
    """What a generation wrote, in order, and the figures it could not draw, with why (for the index page)."""

    written: list[Path] = field(default_factory=list)
    figures: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def figure(self, name: str, result: tuple[Path | None, str], what: str) -> None:
        path, why = result
        if path is None:
            self.skipped.append((name, why))
        else:
            self.written.append(path)
            self.figures.append((path, what))


def generate(params_path: str | Path, out_dir: str | Path, tracking_uri: str | None = None) -> list[Path]:
    """Write the tables and figures for every table the params file's experiments feed; return the files."""
    from mlflow import MlflowClient

    params = read_params(params_path)
    out_dir = Path(out_dir)
    tables_dir, figures_dir = out_dir / "tables", out_dir / "figures"
    client = MlflowClient(tracking_uri=tracking_uri_for(params, tracking_uri))
    index = RunIndex.from_mlflow(client, params.mlflow_experiment, params.scale, params.hashes(), params.seeds())
    ctx = Context(params, index)
    out = _Outputs()
    warnings: list[str] = []
    if not index.runs:
        warnings.append(
            f"MLflow experiment `{params.mlflow_experiment}` has no runs of scale {params.scale!r}: "
            "every value of ours is missing"
        )
        print(f"dblocks.tables: warning: {warnings[-1]}", file=sys.stderr)
    stale = index.stale()
    experiment = client.get_experiment_by_name(params.mlflow_experiment)

    text_samples = _fetch_samples(ctx, client, figures_dir, out)
    tables: list[Table] = []
    for table_id in params.table_ids():
        table = build_table(ctx, table_id)
        note = links_note(table.feeders, text_samples, tables_dir)
        if note:
            table.notes.append(note)
        tables.append(table)
        stem = tables_dir / f"table{safe_name(table_id)}"
        out.written += [_written(stem.with_suffix(suffix), render(table)) for suffix, render in RENDERERS.items()]
    _draw_figures(ctx, client, tables, figures_dir, out)

    out.written.append(
        _written(
            tables_dir / "index.md",
            render_index(
                params,
                tables,
                out.figures,
                out.skipped,
                warnings,
                out_dir,
                stale,
                experiment.experiment_id if experiment else None,
            ),
        )
    )
    return out.written


def _fetch_samples(ctx: Context, client, figures_dir: Path, out: _Outputs) -> dict[str, list[tuple[str, Path]]]:
    """Samples beside every number: image grids, and for text the prompt / continuation pairs that each text
    table links to; returns {experiment: [(method, file)]} of the text samples."""
    text_samples: dict[str, list[tuple[str, Path]]] = {}
    for exp in ctx.params.experiments.values():
        if exp.task not in SAMPLES_ARTIFACT:
            continue
        for method in ctx.run_methods(exp):
            name = samples_file_name(exp, method)
            result = fetch_samples(ctx, client, exp, method, figures_dir / name)
            out.figure(name, result, f"samples, {exp.name}, {method}")
            if result[0] is not None and exp.task != "generation":
                text_samples.setdefault(exp.name, []).append((method, result[0]))
    return text_samples


def _draw_figures(ctx: Context, client, tables: list[Table], figures_dir: Path, out: _Outputs) -> None:
    """Training curves per experiment, then a figure per sweep and grid table."""
    for exp in ctx.params.experiments.values():
        name = f"curves-{safe_name(exp.name)}.png"
        out.figure(
            name,
            figure_curves(ctx, client, exp, figures_dir / name),
            f"training loss per block and end-to-end, {exp.name}",
        )
    for table in tables:
        paper = PAPER_TABLES.get(table.id)
        if paper is None:
            continue
        if paper["kind"] == "sweep":
            name = f"table{safe_name(table.id)}-{table.metric}-vs-{paper['param']}.png"
            out.figure(
                name,
                figure_sweep(ctx, table, paper, figures_dir / name),
                f"Table {table.id}: {table.metric} vs {paper.get('param_label', paper['param'])}",
            )
        elif paper["kind"] == "grid":
            name = f"table{safe_name(table.id)}-partition.png"
            out.figure(
                name, figure_grid(ctx, table, paper, figures_dir / name), f"Table {table.id}: partition x layer split"
            )


def _written(path: Path, text: str) -> Path:
    """``text`` written whole to ``path``, which is returned (the list of files a run of the tables wrote)."""
    write_text_atomic(path, text)
    return path
