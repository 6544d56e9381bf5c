"""Figures beside the tables: training loss curves per experiment, metric vs the swept parameter, and
grouped bars per partition and layer split, the paper's panel beside ours (different scales, so never one
axis). Each returns the file it wrote, or None and why it drew nothing."""

from __future__ import annotations

from pathlib import Path

from dblocks.io import write_atomic
from dblocks.tables.cells import NA
from dblocks.tables.columns import method_label
from dblocks.tables.context import Context, unique
from dblocks.tables.experiments import ExperimentSpec
from dblocks.tables.table import Table


def _new_figure(ncols: int = 1, width: float = 5.0, height: float = 3.6):
    """A figure of ``ncols`` panels side by side; matplotlib's object API, so that no pyplot state or GUI
    backend is involved."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig, path: Path) -> Path:
    """The figure as a PNG at 100 dpi, rendered by Agg (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _save_table_figure(fig, table: Table, paper: dict, path: Path) -> Path:
    fig.suptitle(f"Table {table.id}: {paper['title']}", fontsize=9)
    return _save(fig, path)


def _ours_described(ctx: Context, table: Table) -> str:
    """The setting of the experiments that feed ``table``, for the title of our panel."""
    return ctx.describe([ctx.params.experiments[n] for n in table.feeders])


def figure_curves(ctx: Context, client, exp: ExperimentSpec, path: Path) -> tuple[Path | None, str]:
    """Training loss per block and end-to-end for one experiment."""
    series = []
    for method in unique([*exp.methods, *ctx.index.methods(exp.name, "train")]):
        blocks = ctx.index.blocks(exp.name, method) or [""]
        for block in blocks:
            run, _ = ctx.index.latest(exp.name, "train", method, block)
            if run is None:
                continue
            history = sorted(client.get_metric_history(run.run_id, "train_loss"), key=lambda m: (m.step, m.timestamp))
            if history:
                label = (
                    f"block {block}"
                    if block.isdigit()
                    else block
                    if block
                    # NoProp-DT's "head"
                    else {"e2e": "end-to-end"}.get(method, method_label(method))
                )
                series.append((label, [m.step for m in history], [m.value for m in history]))
    if not series:
        return None, "no finished train run of this configuration with a train_loss history"
    fig, (ax,) = _new_figure(1, 6.0, 4.0)
    for label, steps, values in series:
        ax.plot(steps, values, label=label, linewidth=1.2)
    if all(v > 0 for _, _, vals in series for v in vals):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("train_loss")
    ax.set_title(f"{exp.name}: training loss ({ctx.describe([exp])})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path), ""


def figure_sweep(ctx: Context, table: Table, paper: dict, path: Path) -> tuple[Path | None, str]:
    """Metric vs the swept parameter: the paper's panel beside ours (different scales, so not one axis)."""
    param = paper["param"]
    ours = [(row["_key"].value, row["ours"].value) for row in table.rows if row["ours"].value is not None]
    if not ours:
        return None, f"no {table.metric} logged yet for any experiment feeding table {table.id}"
    theirs = [(row["_key"].value, row["paper"].value) for row in table.rows if row["paper"].value is not None]
    panels = [("paper", theirs, paper["setting"])] if theirs else []
    panels.append(("ours", ours, _ours_described(ctx, table)))
    fig, axes = _new_figure(len(panels), 4.5, 3.4)
    for ax, (name, points, subtitle) in zip(axes, panels):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o")
        ax.set_xlabel(paper.get("param_label", param))
        ax.set_ylabel(paper["metric"])
        ax.set_title(f"{name}\n{subtitle}", fontsize=8)
        ax.grid(alpha=0.3)
        if param == "blocks":
            ax.set_xticks(sorted(set(xs)))
    return _save_table_figure(fig, table, paper, path), ""


def figure_grid(ctx: Context, table: Table, paper: dict, path: Path) -> tuple[Path | None, str]:
    """Grouped bars: partition per layer split, the paper's panel beside ours."""
    # the metric's own columns: the class-agreement columns beside them share the "ours" role, not the key
    partitions = [c.key.split(":", 1)[1] for c in table.columns if c.key.startswith("ours:")]
    labels_of = dict(paper["columns"])
    if not any(row[f"ours:{p}"].value is not None for row in table.rows for p in partitions):
        return None, f"no metric logged yet for any experiment feeding table {table.id}"
    labels = [row["layer_split"].text for row in table.rows]
    fig, axes = _new_figure(2, 5.0, 3.6)
    width = 0.8 / max(1, len(partitions))
    for ax, role, name in (
        (axes[0], "paper", "paper: " + paper["setting"]),
        (axes[1], "ours", f"ours ({_ours_described(ctx, table)})"),
    ):
        for j, p in enumerate(partitions):
            values = [row[f"{role}:{p}"].value for row in table.rows]
            xs = [i + (j - (len(partitions) - 1) / 2) * width for i in range(len(labels))]
            ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=labels_of.get(p, p))
            for x, v in zip(xs, values):
                if v is None:
                    ax.text(x, 0, NA, ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_xlabel("layer split")
        ax.set_ylabel(paper["metric"])
        ax.set_title(name, fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    return _save_table_figure(fig, table, paper, path), ""
