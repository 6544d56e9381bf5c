"""Our numbers: one cell read from the latest current run of an experiment (over its seeds where it has
several), and whether a metric the run lacks was expected (``n/a``) or never asked for here (``—``)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

from dblocks.config import JUDGED_DATASETS
from dblocks.tables.cells import DASH, Cell, fmt, missing, over_seeds
from dblocks.tables.runs import RunIndex, RunInfo, parse_param

#: metrics that need a download (GPT-2 large features; Llama-2 / GPT2-XL judges): a finished run without
#: them was not asked for them (offline, or not configured), so their cell reads "not run here", not n/a
ONLINE_METRICS = frozenset({"mauve_gpt2_large", "gen_ppl_llama2", "gen_ppl_gpt2xl"})
#: metrics computed only for some data sets (class agreement: digit samples, dblocks.metrics.class_agreement):
#: a run of another data set reads "not run here"
DATASET_METRICS: dict[str, tuple[str, ...]] = {"class_agreement": JUDGED_DATASETS}
#: metrics an evaluation computes only when its settings ask for them: metric -> (evaluation setting, the
#: value that asks); a finished run whose logged settings leave it out was not asked, so "not run here" too
#: (e.g. a smoke run's mauve_features: [reference-lm] has no MiniLM MAUVE)
OPTIONAL_METRICS: dict[str, tuple[str, str]] = {
    "mauve_gpt2_large": ("mauve_features", "gpt2-large"),
    "mauve_minilm": ("mauve_features", "minilm"),
    "mauve_reference": ("mauve_features", "reference-lm"),
    "mauve_ngram": ("mauve_features", "ngram"),
    "train_word_rate": ("mauve_features", "ngram"),
    "gen_ppl_llama2": ("hf_judges", "llama2"),
    "gen_ppl_gpt2xl": ("hf_judges", "gpt2-xl"),
}
#: methods trained as one job per block (DiffusionBlocks' B, NoProp-DT's T = ``blocks``) beside other jobs
BLOCK_JOB_METHODS = ("blockwise", "noprop-dt")


def metric_cell(
    index: RunIndex,
    experiment: str,
    method: str,
    metric: str,
    multiplier: float = 1.0,
    decimals: int = 2,
    job: str = "evaluate",
    block: str | None = None,
    expected: bool = True,
) -> Cell:
    """The metric of ``experiment``'s latest current run of this job; for an experiment trained with several
    seeds (pipeline.seeds), :func:`over_seeds` of each seed's."""
    return _over_seeds_of(
        index,
        experiment,
        decimals,
        lambda name: _run_cell(index, name, method, metric, multiplier, decimals, job, block, expected),
    )


def train_cost_cell(
    index: RunIndex,
    experiment: str,
    method: str,
    blocks: int,
    metric: str,
    multiplier: float = 1.0,
    decimals: int = 2,
    reduce: str = "mean",
    expected: bool = True,
) -> Cell:
    """A training-cost metric of ``experiment``'s ``method`` from its latest current train runs: one job's, or
    for a method of one job per block (:data:`BLOCK_JOB_METHODS`) the mean (``reduce="mean"``) or the largest
    (``"max"``) over blocks 1..``blocks`` (a block without it makes the cell n/a, named in the note); over
    seeds, :func:`over_seeds` of each seed's."""
    parts = [str(b) for b in range(1, blocks + 1)] if method in BLOCK_JOB_METHODS else [None]

    def one_seed(name: str) -> Cell:
        per_job = [
            _run_cell(index, name, method, metric, multiplier, decimals, "train", part, expected) for part in parts
        ]
        lacking = next((c for c in per_job if c.value is None), None)
        if lacking is not None or len(per_job) == 1:
            return lacking or per_job[0]
        values = [c.value for c in per_job]
        value = statistics.fmean(values) if reduce == "mean" else max(values)
        return Cell(
            text=fmt(value, decimals), value=value, run=per_job[0].run, runs=[r for c in per_job for r in c.sources]
        )

    return _over_seeds_of(index, experiment, decimals, one_seed)


def _over_seeds_of(index: RunIndex, experiment: str, decimals: int, one_seed: Callable[[str], Cell]) -> Cell:
    """``one_seed`` of the experiment and of each of its repeats with other seeds, as one cell."""
    return over_seeds([one_seed(name) for name in index.seeds.get(experiment, [experiment])], decimals)


def _run_cell(
    index: RunIndex,
    experiment: str,
    method: str,
    metric: str,
    multiplier: float,
    decimals: int,
    job: str,
    block: str | None,
    expected: bool,
) -> Cell:
    """The metric of one experiment's (one seed's) latest current run of this job, or why there is none."""
    run, why = index.latest(experiment, job, method, block)
    what = f"{experiment}, {method}" + (f", block {block}" if block else "")
    if run is None:
        if not expected:
            return Cell(text=DASH)
        return missing(f"{why} ({what})")
    if metric not in run.metrics or run.metrics[metric] is None or math.isnan(run.metrics[metric]):
        if metric not in run.metrics and (
            metric in ONLINE_METRICS
            or not _asked_for(run, metric)
            or (metric in DATASET_METRICS and run.params.get("dataset") not in DATASET_METRICS[metric])
        ):
            return Cell(text=DASH)
        return missing(f"{metric} not logged (run {run.short}: {what})", run)
    return Cell(text=fmt(run.metrics[metric] * multiplier, decimals), value=run.metrics[metric] * multiplier, run=run)


def _asked_for(run: RunInfo, metric: str) -> bool:
    """Whether the run's logged evaluation settings asked for an optional metric (runs that logged none: yes)."""
    if metric not in OPTIONAL_METRICS:
        return True
    setting, value = OPTIONAL_METRICS[metric]
    logged = parse_param(run.params.get(f"evaluation.{setting}"))
    return not isinstance(logged, (list, tuple)) or value in logged
