"""The paper's tables and figures, regenerated from MLflow, with ours beside the paper's numbers.

``generate(params_path, out_dir)`` reads a params file (its scale, its MLflow experiment, and which of its
experiments feeds which table through ``experiments.<name>.pipeline.tables``) and the MLflow runs that the
pipeline logged, and writes::

    out_dir/tables/table<ID>.{md,csv,tex}   one per table id some experiment feeds
    out_dir/tables/index.md                 what was written, what was not drawn and why
    out_dir/figures/*.png                   training curves, metric vs B / gamma, partition bars, sample grids

Every number of ours comes from MLflow (never from loose metric files); the paper's come from
``dblocks.paper``. Only runs of the params file's *current* configuration count: a run's
``dblocks.config_hash`` tag must equal its experiment's config hash (``Params.hash``; for a shared
end-to-end baseline, the hash of the experiment that trains it), and an evaluate run's ``dblocks.eval_hash``
must equal the hash of the evaluation settings that the file gives that experiment (``Params.eval_hash``:
samples, sample steps, FID features, reference statistics, text protocol, judge...). Among the matching
runs of a cell, the most recent FINISHED one wins; runs of other configurations or evaluation settings are
never shown, however recent. The same holds for the training curves, the sample grids, which methods and
blocks an experiment has, and the parameters that place a run (its own, else its parent's, else its
experiment's latest matching training run's, falling back to the params file).

Cell symbols: a number; ``n/a`` = expected but missing (no matching finished run, or the metric was not
logged; a footnote says which, e.g. "no evaluate run of this configuration (config_hash ...); 2 runs of
other configurations exist"); ``—`` = not applicable (the paper reports no number, or this project does
not run that method).

The run contract (tags on every run): ``dblocks.experiment``, ``dblocks.scale``, ``dblocks.method``
(blockwise | e2e | paper, or a block-local baseline: noprop-dt | noprop-ct | noprop-fm | forward-forward; "" for
parents), ``dblocks.block`` ("1".."B" for block training, NoProp-DT's "1".."T" and "head", else ""),
``dblocks.job`` (parent | train | evaluate), ``dblocks.config_hash``, ``dblocks.git_commit``,
``dblocks.eval_hash`` (evaluate runs), optional ``dblocks.device``; ``mlflow.parentRunId`` on children.
Metrics: train runs ``train_loss`` (history), ``seconds_per_step``, ``train_memory_mb``; evaluate runs
``accuracy`` (fraction),
``fid``, ``bpc``, ``mauve``, ``gen_ppl_llama2``, ``gen_ppl_gpt2xl``; artifact ``samples.png`` on generation
evaluate runs.

Modules, from where the numbers come to where they go: ``experiments`` (what the tables need of a params
file), ``runs`` (the MLflow runs and which of them count), ``cells`` (a cell: value, spread over seeds,
provenance), ``ours`` (a cell of ours read from the runs), ``table`` (columns, rows, notes, sources),
``context`` and ``columns`` (what every builder shares), ``builders`` (one per kind of paper table),
``render`` (Markdown, CSV, LaTeX and the index page), ``figures``, ``samples`` (artifacts fetched beside the
figures), ``files`` (atomic writes) and ``driver`` (:func:`generate`, which ``dblocks tables`` runs)."""

from dblocks.io import flatten
from dblocks.tables.builders import BUILDERS, build_table
from dblocks.tables.cells import DASH, NA, Cell, fmt, missing, number, over_seeds
from dblocks.tables.context import Context
from dblocks.tables.driver import generate
from dblocks.tables.experiments import ExperimentSpec, ParamsInfo, read_params
from dblocks.tables.ours import ONLINE_METRICS, metric_cell, train_cost_cell
from dblocks.tables.render import render_csv, render_index, render_md, render_tex
from dblocks.tables.runs import RunIndex, RunInfo, parse_param, tracking_uri_for
from dblocks.tables.table import Column, Table

__all__ = [
    "BUILDERS",
    "DASH",
    "NA",
    "ONLINE_METRICS",
    "Cell",
    "Column",
    "Context",
    "ExperimentSpec",
    "ParamsInfo",
    "RunIndex",
    "RunInfo",
    "Table",
    "build_table",
    "flatten",
    "fmt",
    "generate",
    "metric_cell",
    "missing",
    "number",
    "over_seeds",
    "parse_param",
    "read_params",
    "render_csv",
    "render_index",
    "render_md",
    "render_tex",
    "tracking_uri_for",
    "train_cost_cell",
]
