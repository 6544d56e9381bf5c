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
evaluate runs."""

from __future__ import annotations

import argparse
import ast
import csv
import io
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from dblocks.config import JUDGED_DATASETS
from dblocks.paper import PAPER_TABLES, table_sort_key

TAG = "dblocks."
PARENT_TAG = "mlflow.parentRunId"
DASH = "—"
NA = "n/a"

#: our value columns per table: column key -> (MLflow metric, multiplier to the paper's unit, header)
OURS_METRICS: dict[str, dict[str, tuple[str, float, str]]] = {
    "1": {"accuracy": ("accuracy", 100.0, "accuracy (%)")},
    "2": {"fid_train": ("fid_train", 1.0, "FID (train)"), "fid_test": ("fid_test", 1.0, "FID (test)"),
          "class_agreement": ("class_agreement", 1.0, "class agreement")},
    # beside each bits figure: the unigram entropy of the scored tokens, the floor a model that learned nothing
    # beyond letter frequencies reaches
    "3": {"bpc": ("bpc", 1.0, "BPC"), "unigram_bits": ("unigram_bits", 1.0, "unigram floor (bits/char)")},
    # what evaluate_text logs: MAUVE per featurizer and generative perplexity under this project's own
    # end-to-end AR reference LM (offline) and under Llama-2 / GPT2-XL (online, evaluation.text.hf_judges)
    "4": {"mauve_gpt2_large": ("mauve_gpt2_large", 1.0, "MAUVE (GPT-2 large)"),
          "mauve_reference": ("mauve_reference", 1.0, "MAUVE (own reference-LM features)"),
          "mauve_minilm": ("mauve_minilm", 1.0, "MAUVE (MiniLM features)"),
          "mauve_ngram": ("mauve_ngram", 1.0, "MAUVE (n-gram profiles)"),
          "train_word_rate": ("train_word_rate", 1.0, "known-word rate"),
          "gen_ppl_llama2": ("gen_ppl_llama2", 1.0, "gen. PPL (Llama-2)"),
          "gen_ppl_gpt2xl": ("gen_ppl_gpt2xl", 1.0, "gen. PPL (GPT2-XL)"),
          "gen_ppl_reference": ("gen_ppl_reference", 1.0, "gen. PPL (own reference LM)"),
          "next_token_bits": ("next_token_bits", 1.0, "next-token bits/byte"),
          "unigram_bits": ("unigram_bits", 1.0, "unigram floor (bits/byte)")},
    "6": {"accuracy": ("accuracy", 100.0, "accuracy (%)")},
    "7": {"fid": ("fid", 1.0, "FID")},
    "8": {"fid": ("fid", 1.0, "FID")},
    "10": {"fid": ("fid", 1.0, "FID")},
    "11": {"mauve_gpt2_large": ("mauve_gpt2_large", 1.0, "MAUVE (GPT-2 large)"),
           "mauve_reference": ("mauve_reference", 1.0, "MAUVE (own reference-LM features)"),
           "mauve_ngram": ("mauve_ngram", 1.0, "MAUVE (n-gram profiles)"),
           "next_token_bits": ("next_token_bits", 1.0, "next-token bits/byte")},
    "gamma": {"fid": ("fid", 1.0, "FID")},
}
OURS_METRICS["5"] = OURS_METRICS["4"]
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
    "mauve_gpt2_large": ("mauve_features", "gpt2-large"), "mauve_minilm": ("mauve_features", "minilm"),
    "mauve_reference": ("mauve_features", "reference-lm"), "mauve_ngram": ("mauve_features", "ngram"),
    "train_word_rate": ("mauve_features", "ngram"), "gen_ppl_llama2": ("hf_judges", "llama2"),
    "gen_ppl_gpt2xl": ("hf_judges", "gpt2-xl")}

#: inference cost that every generator evaluation logs, shown beside each FID of ours:
#: MLflow metric -> (multiplier, header, decimals)
COST_METRICS: dict[str, tuple[float, str, int]] = {
    "layer_evals_per_sample": (1.0, "layer evals / sample", 0),
    "sample_seconds_per_sample": (1000.0, "ms / sample", 3),
}
COST_NOTE = ("Inference cost beside each FID of ours: transformer layer evaluations per generated sample (each "
             "Euler step runs only the block owning its sigma; x2 with guidance) and sampling wall time per "
             "sample in milliseconds, on the evaluation's device.")

#: the training cost of a method's jobs, shown beside our accuracy in the tables that compare training methods
#: (Table 1: Forward-Forward; Table 6: NoProp), read from the training runs: MLflow metric -> (multiplier,
#: header, decimals, how a method's several jobs (its blocks) make one number: their mean or their largest)
TRAIN_COST_TABLES = ("1", "6")
TRAIN_COST_METRICS: dict[str, tuple[float, str, int, str]] = {
    "seconds_per_step": (1000.0, "ms / training step", 1, "mean"),
    "train_memory_mb": (1.0, "training memory (MB)", 1, "max"),
}
TRAIN_COST_NOTE = ("Training cost beside our accuracy, per training job as each job measured it (dblocks.train): "
                   "milliseconds per optimizer step (a method of several jobs: the mean over its blocks, "
                   "DiffusionBlocks' B and NoProp-DT's T; NoProp-DT's head job, a linear layer, left out) and the "
                   "memory the training steps took beyond what the job held when its loop started (gradients, "
                   "optimizer state, activations; on a GPU torch's peak allocation, on a CPU the rise of the "
                   "process's peak resident memory; a method of several jobs: its largest job). The end-to-end row "
                   "is one job training the whole network; a block-local method's number is one of its jobs, which "
                   "run independently.")

#: remarks on how our numbers differ in kind from the paper's, printed under the table
OURS_NOTES = {"2": ["Ours: FID against the training set and against the test set (cached reference statistics), "
                    "each the best of the evaluation's independent sample sets (the paper: best of three)."]}

#: decimals per table (Table 12 is in seconds); the ratio row of Table 12 uses RATIO_DECIMALS
DECIMALS = {"12": 4}
RATIO_DECIMALS = 3

#: rows for methods this project runs beyond the paper's (label, paper row whose numbers it sits beside)
EXTRA_METHODS = {"paper": ("DiffusionBlocks (paper mode: shared stem, one process)", "blockwise")}
METHOD_LABELS = {"blockwise": "DiffusionBlocks", "e2e": "End-to-end backprop", "paper": "DiffusionBlocks (paper mode)",
                 "noprop-dt": "NoProp-DT", "noprop-ct": "NoProp-CT", "noprop-fm": "NoProp-FM",
                 "forward-forward": "Forward-Forward"}
#: methods trained as one job per block (DiffusionBlocks' B, NoProp-DT's T = ``blocks``) beside other jobs
BLOCK_JOB_METHODS = ("blockwise", "noprop-dt")


# ------------------------------------------------------------------------------------------ params file

@dataclass
class ExperimentSpec:
    """One experiment of the params file, resolved and validated by the params model."""

    name: str
    config: dict
    tables: list[str]
    methods: list[str]
    baseline: str | None = None  # the experiment whose end-to-end run is this one's (pipeline.baseline)
    config_hash: str | None = None  # what its runs' dblocks.config_hash must be (None: any)
    eval_hash: str | None = None  # what its evaluate runs' dblocks.eval_hash must be (None: any)
    #: the experiments that are this one with other seeds (pipeline.seeds), each with its (config, eval) hashes;
    #: its cells aggregate over them and itself
    replicates: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return str(self.config.get("task", ""))


@dataclass
class ParamsInfo:
    path: Path
    scale: str
    tracking_uri: str | None
    mlflow_experiment: str
    resources: dict
    experiments: dict[str, ExperimentSpec]

    def feeders(self, table_id: str) -> list[ExperimentSpec]:
        return [e for e in self.experiments.values() if table_id in e.tables]

    def table_ids(self) -> list[str]:
        ids = {t for e in self.experiments.values() for t in e.tables}
        return sorted(ids, key=table_sort_key)

    def hashes(self) -> dict[str, tuple[str | None, str | None]]:
        """{experiment: (config hash, evaluation hash)} that its runs must carry to be this file's (the
        experiments that repeat another with other seeds included)."""
        return {name: hashes for e in self.experiments.values()
                for name, hashes in {e.name: (e.config_hash, e.eval_hash), **e.replicates}.items()}

    def seeds(self) -> dict[str, list[str]]:
        """{experiment: itself and its repeats with other seeds}, for the experiments that have repeats."""
        return {name: [name, *e.replicates] for name, e in self.experiments.items() if e.replicates}


def read_params(path: str | Path) -> ParamsInfo:
    """What the tables need of a params file, read through the one params model (dblocks.params): the same
    validation, defaults and resolved experiments that the jobs saw."""
    from dblocks.params import Params

    params = Params.load(path)
    experiments = {name: ExperimentSpec(name=name, config=config, tables=params.tables(name),
                                        methods=params.methods(name), baseline=params.baseline(name),
                                        config_hash=params.hash(name), eval_hash=params.eval_hash(name),
                                        replicates={r: (params.hash(r), params.eval_hash(r))
                                                    for r in params.replicates(name) if r != name})
                   for name, config in params.experiments.items() if params.replicate_of(name) == name}
    return ParamsInfo(path=params.path, scale=params.scale, tracking_uri=params.tracking_uri,
                      mlflow_experiment=params.mlflow_experiment, resources=params.resources,
                      experiments=experiments)


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"steps": 5}}`` -> ``{"train.steps": 5}`` (the keys the runs log their params under)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_param(text: Any) -> Any:
    """An MLflow param string back to a value: "[4, 4, 4]" -> [4, 4, 4], "None" -> None, "0.0" -> 0.0."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        lowered = text.strip().lower()
        if lowered in ("null", "none"):
            return None
        if lowered in ("true", "false"):
            return lowered == "true"
        return text.strip()


# ----------------------------------------------------------------------------------------------- runs

@dataclass(frozen=True)
class RunInfo:
    run_id: str
    status: str
    start_time: int
    end_time: int
    tags: dict
    params: dict
    metrics: dict

    @classmethod
    def from_mlflow(cls, run) -> "RunInfo":
        return cls(run.info.run_id, run.info.status, run.info.start_time or 0, run.info.end_time or 0,
                   dict(run.data.tags), dict(run.data.params), dict(run.data.metrics))

    def tag(self, name: str) -> str:
        return str(self.tags.get(TAG + name, "") or "")

    @property
    def order(self) -> tuple:
        return (self.start_time, self.end_time, self.run_id)

    @property
    def short(self) -> str:
        return self.run_id[:8]


class RunIndex:
    """All runs of one MLflow experiment (active, of this scale), with the look-ups the tables need.

    ``hashes`` maps an experiment to the (config hash, evaluation hash) its runs must carry to count
    (:meth:`ParamsInfo.hashes`); look-ups see only those runs, and say why when they find none. An
    experiment it does not name (or a None hash) accepts any run."""

    def __init__(self, runs: Iterable[RunInfo], scale: str | None = None,
                 hashes: dict[str, tuple[str | None, str | None]] | None = None,
                 seeds: dict[str, list[str]] | None = None) -> None:
        # exactly this scale: a run without the label (or with another) never fills a cell of this table
        self.runs = [r for r in runs if scale is None or r.tag("scale") == scale]
        self.by_id = {r.run_id: r for r in self.runs}
        self.hashes = dict(hashes or {})
        #: {experiment: the experiments that train it with each seed}: a metric of it aggregates over them
        self.seeds = dict(seeds or {})

    @classmethod
    def from_mlflow(cls, client, experiment_name: str, scale: str | None = None,
                    hashes: dict[str, tuple[str | None, str | None]] | None = None,
                    seeds: dict[str, list[str]] | None = None) -> "RunIndex":
        from mlflow.entities import ViewType

        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            return cls([], scale, hashes, seeds)
        runs, token = [], None
        while True:
            page = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ACTIVE_ONLY,
                                      max_results=1000, page_token=token)
            runs.extend(RunInfo.from_mlflow(r) for r in page)
            token = page.token
            if not token:
                break
        return cls(runs, scale, hashes, seeds)

    def is_current(self, run: RunInfo, experiment: str) -> bool:
        """Whether ``run`` is of the configuration (and, for an evaluate run, the evaluation settings) that the
        params file now gives ``experiment``."""
        config_hash, eval_hash = self.hashes.get(experiment, (None, None))
        if config_hash and run.tag("config_hash") != config_hash:
            return False
        return not (eval_hash and run.tag("job") == "evaluate" and run.tag("eval_hash") != eval_hash)

    def matching(self, experiment: str, job: str, method: str | None = None, block: str | None = None,
                 current: bool = True) -> list[RunInfo]:
        """The runs of ``experiment`` of this job (method, block), newest first; with ``current`` (the default)
        only those of the experiment's current configuration and evaluation settings."""
        out = [r for r in self.runs if r.tag("experiment") == experiment and r.tag("job") == job
               and (method is None or r.tag("method") == method) and (block is None or r.tag("block") == block)
               and (not current or self.is_current(r, experiment))]
        return sorted(out, key=lambda r: r.order, reverse=True)

    def latest(self, experiment: str, job: str, method: str | None = None,
               block: str | None = None) -> tuple[RunInfo | None, str]:
        """The most recent FINISHED run of the current configuration, or None and why not."""
        current = self.matching(experiment, job, method, block)
        for run in current:
            if run.status == "FINISHED":
                return run, ""
        if current:
            return None, (f"no FINISHED {job} run of this configuration (latest is {current[0].status}, "
                          f"run {current[0].short})")
        others = self.matching(experiment, job, method, block, current=False)
        if not others:
            return None, f"no {job} run logged"
        config_hash, eval_hash = self.hashes.get(experiment, (None, None))
        same_config = [r for r in others if not config_hash or r.tag("config_hash") == config_hash]
        if same_config:  # evaluate runs of this configuration, made with other evaluation settings
            latest = same_config[0]
            recorded = (f"eval_hash {latest.tag('eval_hash')}" if latest.tag("eval_hash") else
                        "no eval_hash: logged before evaluation settings were recorded; rerun the evaluation")
            return None, (f"no {job} run with this file's evaluation settings (eval_hash {eval_hash}); "
                          f"{_runs(len(same_config))} of this configuration with other evaluation settings "
                          f"{_exist(len(same_config))} (latest: run {latest.short}, {recorded})")
        return None, (f"no {job} run of this configuration (config_hash {config_hash}); {_runs(len(others))} of "
                      f"other configurations {_exist(len(others))} (latest: run {others[0].short}, "
                      f"config_hash {others[0].tag('config_hash') or 'none'})")

    def stale(self) -> int:
        """How many runs of the experiments in :attr:`hashes` are of other configurations or settings."""
        return sum(1 for r in self.runs if r.tag("experiment") in self.hashes and r.tag("job") != "parent"
                   and not self.is_current(r, r.tag("experiment")))

    def methods(self, experiment: str, job: str) -> list[str]:
        return sorted({r.tag("method") for r in self.matching(experiment, job) if r.tag("method")})

    def blocks(self, experiment: str, method: str = "blockwise") -> list[str]:
        found = {r.tag("block") for r in self.matching(experiment, "train", method) if r.tag("block")}
        return sorted(found, key=lambda b: int(b) if b.isdigit() else 10**6)

    def logged_params(self, experiment: str, run: RunInfo | None = None) -> dict:
        """The params a run was made with: its own, its parent's, else its experiment's latest train or
        parent run's of the current configuration (finished ones first)."""
        if run is not None and run.params:
            return run.params
        parent = self.by_id.get(str(run.tags.get(PARENT_TAG, ""))) if run is not None else None
        if parent is not None and parent.params:
            return parent.params
        for job in ("train", "parent"):
            candidates = sorted(self.matching(experiment, job), key=lambda r: (r.status == "FINISHED", r.order),
                                reverse=True)
            for candidate in candidates:
                if candidate.params:
                    return candidate.params
        return {}


def _runs(n: int) -> str:
    return f"{n} run{'s' if n != 1 else ''}"


def _exist(n: int) -> str:
    return "exists" if n == 1 else "exist"


# ---------------------------------------------------------------------------------------------- cells

@dataclass
class Cell:
    text: str = DASH
    value: float | None = None  # over seeds: the mean
    note: str = ""
    run: RunInfo | None = None
    std: float | None = None  # over seeds: the sample standard deviation (n - 1 in the denominator)
    n: int = 1  # how many seeds' values make it
    runs: list[RunInfo] = field(default_factory=list)  # over seeds: every run behind the value

    @property
    def sources(self) -> list[RunInfo]:
        return self.runs or ([self.run] if self.run is not None else [])


def fmt(value: float | None, decimals: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{value:.{decimals}f}"


def number(value: float | None, decimals: int = 2) -> Cell:
    return Cell(text=fmt(value, decimals), value=value)


def missing(note: str, run: RunInfo | None = None) -> Cell:
    return Cell(text=NA, note=note, run=run)


def over_seeds(cells: list[Cell], decimals: int = 2) -> Cell:
    """One cell for a metric measured with several seeds: mean +- sample standard deviation over the seeds that
    have it, the seeds that lack it named in its note; no seed with a value: the first seed's cell."""
    valued = [c for c in cells if c.value is not None]
    if len(cells) == 1 or not valued:
        return cells[0]
    values = [c.value for c in valued]
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    # no spread (a cost that does not depend on the seed, e.g. layer evaluations per sample): the value alone
    text = f"{fmt(mean, decimals)} ± {fmt(std, decimals)}" if std else fmt(mean, decimals)
    lacking = [c.note or c.text for c in cells if c.value is None]
    note = (f"{len(values)} of {len(cells)} seeds; missing: {'; '.join(lacking)}" if lacking else "")
    return Cell(text=text, value=mean, note=note, run=valued[0].run, std=std, n=len(values),
                runs=[r for c in valued for r in c.sources])


def metric_cell(index: RunIndex, experiment: str, method: str, metric: str, multiplier: float = 1.0,
                decimals: int = 2, job: str = "evaluate", block: str | None = None,
                expected: bool = True) -> Cell:
    """The metric of ``experiment``'s latest current run of this job; for an experiment trained with several
    seeds (pipeline.seeds), :func:`over_seeds` of each seed's."""
    seeds = index.seeds.get(experiment, [experiment])
    return over_seeds([_seed_cell(index, name, method, metric, multiplier, decimals, job, block, expected)
                       for name in seeds], decimals)


def _seed_cell(index: RunIndex, experiment: str, method: str, metric: str, multiplier: float, decimals: int,
               job: str, block: str | None, expected: bool) -> Cell:
    run, why = index.latest(experiment, job, method, block)
    what = f"{experiment}, {method}" + (f", block {block}" if block else "")
    if run is None:
        if not expected:
            return Cell(text=DASH)
        return missing(f"{why} ({what})")
    if metric not in run.metrics or run.metrics[metric] is None or math.isnan(run.metrics[metric]):
        if metric not in run.metrics and (metric in ONLINE_METRICS or not _asked_for(run, metric)
                                          or (metric in DATASET_METRICS
                                              and run.params.get("dataset") not in DATASET_METRICS[metric])):
            return Cell(text=DASH)
        return missing(f"{metric} not logged (run {run.short}: {what})", run)
    return Cell(text=fmt(run.metrics[metric] * multiplier, decimals), value=run.metrics[metric] * multiplier, run=run)


def train_cost_cell(index: RunIndex, experiment: str, method: str, blocks: int, metric: str,
                    multiplier: float = 1.0, decimals: int = 2, reduce: str = "mean", expected: bool = True) -> Cell:
    """A training-cost metric of ``experiment``'s ``method`` from its latest current train runs: one job's, or
    for a method of one job per block (:data:`BLOCK_JOB_METHODS`) the mean (``reduce="mean"``) or the largest
    (``"max"``) over blocks 1..``blocks`` (a block without it makes the cell n/a, named in the note); over
    seeds, :func:`over_seeds` of each seed's."""
    seeds = index.seeds.get(experiment, [experiment])
    parts = [str(b) for b in range(1, blocks + 1)] if method in BLOCK_JOB_METHODS else [None]
    cells = []
    for name in seeds:
        per_job = [_seed_cell(index, name, method, metric, multiplier, decimals, "train", part, expected)
                   for part in parts]
        lacking = next((c for c in per_job if c.value is None), None)
        if lacking is not None or len(per_job) == 1:
            cells.append(lacking or per_job[0])
            continue
        values = [c.value for c in per_job]
        value = statistics.fmean(values) if reduce == "mean" else max(values)
        cells.append(Cell(text=fmt(value, decimals), value=value, run=per_job[0].run,
                          runs=[r for c in per_job for r in c.sources]))
    return over_seeds(cells, decimals)


def _asked_for(run: RunInfo, metric: str) -> bool:
    """Whether the run's logged evaluation settings asked for an optional metric (runs that logged none: yes)."""
    if metric not in OPTIONAL_METRICS:
        return True
    setting, value = OPTIONAL_METRICS[metric]
    logged = parse_param(run.params.get(f"evaluation.{setting}"))
    return not isinstance(logged, (list, tuple)) or value in logged


# ---------------------------------------------------------------------------------------------- table

@dataclass
class Column:
    key: str
    header: str
    csv: str
    role: str  # label | paper | ours | cost (ours, inference cost beside a metric) | info


@dataclass
class Table:
    id: str
    title: str
    caption: list[str]
    columns: list[Column]
    rows: list[dict[str, Cell]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    feeders: list[str] = field(default_factory=list)
    metric: str = ""  # the MLflow metric in the "ours" column of a one-metric table (sweeps), for its figure

    def cell_notes(self) -> list[str]:
        out = []
        label_cols = [c for c in self.columns if c.role == "label"]
        for row in self.rows:
            label = " / ".join(row[c.key].text for c in label_cols if c.key in row)
            for col in self.columns:
                cell = row.get(col.key)
                if cell is not None and cell.note:
                    out.append(f"{cell.text} in row {label!r}, column {col.header!r}: {cell.note}")
        return out

    def sources(self) -> list[str]:
        seen: dict[str, RunInfo] = {}
        for row in self.rows:
            for cell in row.values():
                if cell.value is not None:
                    for run in cell.sources:
                        seen.setdefault(run.run_id, run)
        out = []
        def order(r: RunInfo) -> tuple:  # blocks in number order (NoProp-DT's 1..10), then named parts ("head")
            block = r.tag("block")
            rank = (0, -1, "") if not block else (0, int(block), "") if block.isdigit() else (1, 0, block)
            return r.tag("experiment"), r.tag("method"), rank

        for run in sorted(seen.values(), key=order):
            block = f", block {run.tag('block')}" if run.tag("block") else ""
            commit = f", git {run.tag('git_commit')[:10]}" if run.tag("git_commit") else ""
            hashes = f", config {run.tag('config_hash')}" if run.tag("config_hash") else ""
            hashes += f", evaluation {run.tag('eval_hash')}" if run.tag("eval_hash") else ""
            out.append(f"run {run.run_id}: {run.tag('experiment')}, {run.tag('method')}{block}, "
                       f"{run.tag('job')}{commit}{hashes}")
        return out


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_md(table: Table) -> str:
    lines = [f"# Table {table.id}: {table.title}", ""]
    lines += [*table.caption, ""]
    lines.append("| " + " | ".join(_md_escape(c.header) for c in table.columns) + " |")
    lines.append("|" + "|".join("---:" if c.role in ("paper", "ours", "cost") else "---" for c in table.columns) + "|")
    for row in table.rows:
        lines.append("| " + " | ".join(_md_escape(row.get(c.key, Cell()).text) for c in table.columns) + " |")
    notes = table.cell_notes() + table.notes
    if notes:
        lines += ["", "Notes:", ""] + [f"- {_md_escape(n)}" for n in notes]
    lines += ["", f"`{NA}`: expected but missing (see notes); `{DASH}`: not reported by the paper, or not run here."]
    sources = table.sources()
    if sources:
        lines += ["", "Sources (MLflow runs behind our numbers):", ""] + [f"- {s}" for s in sources]
    return "\n".join(lines) + "\n"


def render_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    # a column measured over several seeds also gets its standard deviation and seed count
    seeded = {c.key for c in table.columns if any(row.get(c.key, Cell()).n > 1 for row in table.rows)}
    header = []
    for col in table.columns:
        header += [col.csv, f"{col.csv}_std", f"{col.csv}_n"] if col.key in seeded else [col.csv]
    writer.writerow(header + ["notes"])
    for row in table.rows:
        values = []
        for col in table.columns:
            cell = row.get(col.key, Cell())
            if col.role in ("paper", "ours", "cost"):
                values.append("" if cell.value is None else f"{cell.value:.6g}")
            else:
                values.append(cell.text)
            if col.key in seeded:
                values += ["" if cell.std is None else f"{cell.std:.6g}", "" if cell.value is None else str(cell.n)]
        notes = "; ".join(cell.note for cell in row.values() if cell.note)
        writer.writerow(values + [notes])
    return buf.getvalue()


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", DASH: "---",
                "[": "{[}", "]": "{]}", "`": ""}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def render_tex(table: Table) -> str:
    spec = "".join("l" if c.role in ("label", "info") else "r" for c in table.columns)
    lines = [f"% Table {table.id}, generated by dblocks.tables from MLflow; do not edit by hand.",
             r"\begin{table}[ht]", r"\centering",
             r"\caption{" + tex_escape(f"Table {table.id}: {table.title}. " + " ".join(table.caption)) + "}",
             r"\label{tab:dblocks-" + re.sub(r"[^A-Za-z0-9]+", "-", table.id) + "}",
             r"\begin{tabular}{" + spec + "}", r"\hline",
             " & ".join(tex_escape(c.header) for c in table.columns) + r" \\", r"\hline"]
    for row in table.rows:
        lines.append(" & ".join(tex_escape(row.get(c.key, Cell()).text) for c in table.columns) + r" \\")
    lines += [r"\hline", r"\end{tabular}"]
    notes = table.cell_notes() + table.notes
    if notes:
        lines += [r"\par\smallskip{\footnotesize"] + [tex_escape(n) + r"\par" for n in notes] + ["}"]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- context

@dataclass
class Context:
    params: ParamsInfo
    index: RunIndex

    def device(self, exp: ExperimentSpec) -> str:
        device = str(exp.config.get("device") or "auto").lower()
        if device.startswith("cuda") or device == "gpu":
            return "GPU"
        if device == "cpu":
            return "CPU"
        return "GPU" if int(self.params.resources.get("gpu") or 0) > 0 else "CPU"

    def describe(self, exps: list[ExperimentSpec]) -> str:
        """"tiny: ViT-tiny on digits, CPU" from the params file."""
        combos = _unique(f"{e.config.get('arch')} on {e.config.get('dataset')}" for e in exps)
        devices = _unique(self.device(e) for e in exps)
        return f"{self.params.scale}: {' / '.join(combos) or '?'}, {'/'.join(devices) or '?'}"

    def placement(self, exp: ExperimentSpec, run: RunInfo | None) -> tuple[dict, list[str]]:
        """Parameters for placing a run: logged ones over the params file's; notes where they disagree."""
        fallback = flatten(exp.config)
        logged = {k: parse_param(v) for k, v in self.index.logged_params(exp.name, run).items()}
        notes = []
        for key in ("partition", "layer_split", "blocks", "overlap", "arch", "dataset"):
            if key in logged and key in fallback and not _same(logged[key], fallback[key]):
                notes.append(f"{exp.name}: the run logged {key}={logged[key]!r} but {self.params.path.name} now "
                             f"has {fallback[key]!r}; placed by the logged value")
        return {**fallback, **logged}, notes

    def caption(self, table_id: str, paper: dict | None, exps: list[ExperimentSpec]) -> list[str]:
        lines = []
        if paper:
            lines.append(f"Paper: {paper['setting']}.")
        lines.append(f"Ours ({self.describe(exps)}): experiments {', '.join(e.name for e in exps)}, "
                     f"MLflow experiment `{self.params.mlflow_experiment}`.")
        if self.params.scale != "paper":
            lines.append(f"{self.params.scale.capitalize()}-scale numbers are not comparable to the paper's.")
        seeded = [f"{e.name} ({len(e.replicates) + 1} seeds: {', '.join([e.name, *e.replicates])})"
                  for e in exps if e.replicates]
        if seeded:
            lines.append(f"Ours over seeds: mean ± sample standard deviation over the seeds of {'; '.join(seeded)}; "
                         f"one value where a single seed was run.")
        # Say which FID ours is: at the tiny scale it is measured in a digits classifier's features
        fid_kinds = _unique(run.tags["fid_label"] for e in exps for run in self.index.matching(e.name, "evaluate")
                            if run.tags.get("fid_label"))
        if fid_kinds:
            lines.append(f"Our FID: {'; '.join(fid_kinds)}.")
        return lines


def _unique(items: Iterable[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _ours_header(ctx: Context, exps: list[ExperimentSpec], label: str | None = None) -> str:
    return f"ours {label} ({ctx.params.scale})" if label else f"ours ({ctx.describe(exps)})"


def _label_col(key: str, header: str) -> Column:
    return Column(key, header, re.sub(r"[^a-z0-9]+", "_", header.lower()).strip("_") or key, "label")


def _paper_columns(columns: dict[str, str]) -> list[Column]:
    if len(columns) == 1:
        return [Column(f"paper:{next(iter(columns))}", "paper", "paper", "paper")]
    return [Column(f"paper:{k}", f"paper {label}", f"paper_{k}", "paper") for k, label in columns.items()]


def _run_methods(ctx: Context, exp: ExperimentSpec) -> list[str]:
    return _unique([*exp.methods, *ctx.index.methods(exp.name, "evaluate")])


def _denoiser_method(ctx: Context, exp: ExperimentSpec) -> str:
    """The block-wise method an ablation reads (blockwise, else the paper's shared-stem mode)."""
    methods = [m for m in _run_methods(ctx, exp) if m != "e2e"]
    return "blockwise" if "blockwise" in methods or not methods else methods[0]


def _baseline_source(ctx: Context, exp: ExperimentSpec, method: str) -> ExperimentSpec:
    """The experiment whose ``method`` runs fill ``exp``'s row: ``exp`` itself, or for the end-to-end row
    the experiment named by its ``pipeline.baseline`` when it trains no baseline of its own."""
    if method == "e2e" and exp.baseline and "e2e" not in exp.methods and exp.baseline in ctx.params.experiments:
        return ctx.params.experiments[exp.baseline]
    return exp


def _is_fid_table(paper: dict | None) -> bool:
    return bool(paper) and paper.get("metric") == "FID"


def _cost_columns(prefix: str, header: str, scale: str) -> list[Column]:
    """Our inference cost beside our FID; the header names the scale, as every column of our numbers does."""
    return [Column(f"{prefix}{m}", f"{header} {h} ({scale})",
                   re.sub(r"[^a-z0-9]+", "_", f"{header} {h}".lower()).strip("_"), "cost")
            for m, (_, h, _) in COST_METRICS.items()]


def _cost_cells(ctx: Context, prefix: str, exp: ExperimentSpec | None, method: str | None,
                expected: bool = True) -> dict[str, Cell]:
    if exp is None or method is None:
        return {f"{prefix}{m}": Cell(DASH) for m in COST_METRICS}
    return {f"{prefix}{m}": metric_cell(ctx.index, exp.name, method, m, mult, dec, expected=expected)
            for m, (mult, _, dec) in COST_METRICS.items()}


# ---------------------------------------------------------------------------------- table builders

def _match_setting(settings: dict, exp: ExperimentSpec) -> tuple[str, bool]:
    """The setting an experiment belongs to, and whether that was a guess (no match word found)."""
    dataset = str(exp.config.get("dataset", "")).lower()
    for haystack in (dataset, exp.name.lower()):
        for key, setting in settings.items():
            if any(word in haystack for word in setting["match"]):
                return key, False
    return next(iter(settings)), True


def build_methods_table(ctx: Context, table_id: str, paper: dict, exps: list[ExperimentSpec]) -> Table:
    decimals = DECIMALS.get(table_id, 2)
    settings = paper.get("settings")
    ours = OURS_METRICS.get(table_id) or {k: (k, 1.0, v) for k, v in paper["columns"].items()}
    columns = ([_label_col("setting", "setting")] if settings else []) + [_label_col("method", "method")]
    columns += _paper_columns(paper["columns"])
    ours_cols = ({k: v[2] for k, v in ours.items()})
    columns += ([Column(f"ours:{k}", _ours_header(ctx, exps), "ours", "ours") for k in ours_cols]
                if len(ours_cols) == 1 else
                [Column(f"ours:{k}", _ours_header(ctx, exps, label), f"ours_{k}", "ours") for k, label in ours_cols.items()])
    cost = _is_fid_table(paper)
    if cost:
        columns += _cost_columns("cost:", "ours", ctx.params.scale)
    train_cost = table_id in TRAIN_COST_TABLES
    if train_cost:
        columns += [Column(f"train:{m}", f"ours {h} ({ctx.params.scale})",
                           re.sub(r"[^a-z0-9]+", "_", f"ours {h}".lower()).strip("_"), "cost")
                    for m, (_, h, _, _) in TRAIN_COST_METRICS.items()]
    table = Table(table_id, paper["title"], ctx.caption(table_id, paper, exps), columns,
                  notes=list(paper.get("notes", [])) + OURS_NOTES.get(table_id, []) + ([COST_NOTE] if cost else [])
                  + ([TRAIN_COST_NOTE] if train_cost else []),
                  feeders=[e.name for e in exps])

    by_setting: dict[str | None, list[ExperimentSpec]] = {}
    for exp in exps:
        key = None
        if settings:
            key, guessed = _match_setting(settings, exp)
            if guessed:
                table.notes.append(f"{exp.name} (dataset {exp.config.get('dataset')}) matches no paper setting; "
                                   f"shown as a stand-in for {settings[key]['label']}")
        by_setting.setdefault(key, []).append(exp)

    def add_row(label: str, setting: str | None, paper_values: dict, exp: ExperimentSpec | None,
                method: str | None, expected: bool) -> None:
        row = {"method": Cell(label)}
        if settings:
            row["setting"] = Cell(settings[setting]["label"])
        for key in paper["columns"]:
            row[f"paper:{key}"] = number(paper_values.get(key), decimals)
        for key, (metric, multiplier, _) in ours.items():
            row[f"ours:{key}"] = (Cell(DASH) if exp is None or method is None else
                                  metric_cell(ctx.index, exp.name, method, metric, multiplier, decimals,
                                              expected=expected))
        if cost:
            row.update(_cost_cells(ctx, "cost:", exp, method, expected))
        if train_cost:
            for m, (mult, _, dec, reduce) in TRAIN_COST_METRICS.items():
                row[f"train:{m}"] = (Cell(DASH) if exp is None or method is None else
                                     train_cost_cell(ctx.index, exp.name, method, int(exp.config.get("blocks") or 1),
                                                     m, mult, dec, reduce, expected=expected))
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
            runners = [e for e in feeding if method in _run_methods(ctx, _baseline_source(ctx, e, method))]
            if not runners:
                add_row(prow["label"], setting, prow["values"], None, None, False)
                continue
            for exp in runners:
                label = prow["label"] + (f" [{exp.name}]" if len(runners) > 1 else "")
                source = _baseline_source(ctx, exp, method)
                add_row(label, setting, prow["values"], source, method, method in _run_methods(ctx, source))
                if source is not exp:
                    table.notes.append(f"{label}: the end-to-end run of {source.name}, which {exp.name} shares "
                                       "(they differ only in block-wise settings, which end-to-end training "
                                       "does not read)")
        covered = {r["key"].get("method") for r in paper_rows}
        for exp in feeding:
            for method in _run_methods(ctx, exp):
                if method in covered:
                    continue
                label, beside = EXTRA_METHODS.get(method, (METHOD_LABELS.get(method, method), None))
                prow = next((r for r in paper_rows if r["key"].get("method") == beside), None)
                label += f" [{exp.name}]" if len(feeding) > 1 else ""
                add_row(label, setting, prow["values"] if prow else {}, exp, method, True)
                if prow is not None:
                    table.notes.append(f"{label}: the paper's number beside it is its DiffusionBlocks result, "
                                       "which the paper obtained in this shared-stem mode")
    return table


def _split_of(values: dict) -> tuple[int, ...] | None:
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


def _row_for_split(rows: list[dict], split: tuple[int, ...]) -> tuple[int | None, bool]:
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
    exp: ExperimentSpec
    cell: Cell


def _judged(exps: list[ExperimentSpec]) -> bool:
    """Whether any of these experiments draws digits, whose samples the held-out judge reads (class agreement)."""
    return any(e.config.get("dataset") in JUDGED_DATASETS for e in exps)


def _agreement_cell(ctx: Context, placed: Placed | None) -> Cell:
    """The class agreement of the run behind a placed FID cell (dblocks.metrics.class_agreement)."""
    if placed is None:
        return Cell(DASH)
    return metric_cell(ctx.index, placed.exp.name, _denoiser_method(ctx, placed.exp), "class_agreement", 1.0, 3)


def _place(slot: dict, key: Any, exp: ExperimentSpec, cell: Cell, notes: list[str]) -> None:
    """Put a cell in a slot; on a conflict the most recent finished run wins."""
    prev = slot.get(key)
    if prev is None:
        slot[key] = Placed(exp, cell)
        return
    def rank(p: Placed) -> tuple:
        return (p.cell.run is not None and p.cell.value is not None, p.cell.run.order if p.cell.run else ())
    winner, loser = (prev, Placed(exp, cell)) if rank(prev) >= rank(Placed(exp, cell)) else (Placed(exp, cell), prev)
    slot[key] = winner
    notes.append(f"{winner.exp.name} and {loser.exp.name} both fall in one cell; showing {winner.exp.name} "
                 "(the most recent finished run)")


def _ablation_cells(ctx: Context, exps: list[ExperimentSpec], metric: str, multiplier: float, decimals: int,
                    notes: list[str]):
    """(experiment, its metric cell, the params that place it) for the ablation tables; notes collect
    any mismatch between the params a run logged and the current params file."""
    for exp in exps:
        cell = metric_cell(ctx.index, exp.name, _denoiser_method(ctx, exp), metric, multiplier, decimals)
        values, mismatch = ctx.placement(exp, cell.run)
        notes += mismatch
        yield exp, cell, values


def build_grid_table(ctx: Context, table_id: str, paper: dict, exps: list[ExperimentSpec]) -> Table:
    """Table 7: rows by layer split, columns by partition."""
    decimals = DECIMALS.get(table_id, 2)
    metric, multiplier, _ = next(iter(OURS_METRICS.get(table_id, {"fid": ("fid", 1.0, "FID")}).values()))
    partitions = dict(paper["columns"])
    rows = [{"_key": tuple(r["key"]["layer_split"]), "label": r["label"], "values": r["values"]} for r in paper["rows"]]
    notes: list[str] = list(paper.get("notes", []))
    slots: dict[tuple, Placed] = {}
    for exp, cell, values in _ablation_cells(ctx, exps, metric, multiplier, decimals, notes):
        split, partition = _split_of(values), str(values.get("partition"))
        if split is None:
            notes.append(f"{exp.name}: no layer split could be derived (arch {values.get('arch')!r}); not placed")
            continue
        if partition not in partitions:
            partitions[partition] = partition
        i, proportional = _row_for_split(rows, split)
        if i is None:
            rows.append({"_key": split, "label": str(list(split)), "values": {}})
            i = len(rows) - 1
        elif proportional:
            notes.append(f"{exp.name}: our split {list(split)} placed in the paper's {rows[i]['label']} row "
                         "(same proportions of the depth)")
        _place(slots, (i, partition), exp, cell, notes)
    columns = [_label_col("layer_split", "layer split")]
    columns += [Column(f"paper:{p}", f"paper {label}", f"paper_{p}", "paper") for p, label in partitions.items()]
    columns += [Column(f"ours:{p}", f"ours {label} ({ctx.params.scale})", f"ours_{p}", "ours")
                for p, label in partitions.items()]
    judged = _judged(exps)
    if judged:
        columns += [Column(f"agree:{p}", f"ours {label}: class agreement", f"agreement_{p}", "ours")
                    for p, label in partitions.items()]
    cost = _is_fid_table(paper)
    if cost:
        for p, label in partitions.items():
            columns += _cost_columns(f"cost:{p}:", f"ours {label}", ctx.params.scale)
        notes.append(COST_NOTE)
    table = Table(table_id, paper["title"], ctx.caption(table_id, paper, exps), columns, notes=notes,
                  feeders=[e.name for e in exps])
    for i, r in enumerate(rows):
        row = {"layer_split": Cell(r["label"])}
        for p in partitions:
            row[f"paper:{p}"] = number(r["values"].get(p), decimals)
            placed = slots.get((i, p))
            row[f"ours:{p}"] = placed.cell if placed else Cell(DASH)
            if judged:
                row[f"agree:{p}"] = _agreement_cell(ctx, placed)
            if cost:
                row.update(_cost_cells(ctx, f"cost:{p}:", placed.exp if placed else None,
                                       _denoiser_method(ctx, placed.exp) if placed else None))
        table.rows.append(row)
    return table


def _sweep_key(param: str, value: Any) -> float | None:
    try:
        return round(float(value), 6)
    except (TypeError, ValueError):
        return None


def build_sweep_table(ctx: Context, table_id: str, paper: dict, exps: list[ExperimentSpec]) -> Table:
    """Tables 8, 10, 11 and gamma: rows by one parameter (blocks or overlap)."""
    decimals = DECIMALS.get(table_id, 2)
    param, param_label = paper["param"], paper.get("param_label", paper["param"])
    candidates = list(OURS_METRICS.get(table_id, {"fid": ("fid", 1.0, "FID")}).values())
    paper_col = next(iter(paper["columns"]))
    rows = {_sweep_key(param, r["key"][param]): {"label": r["label"], "value": r["values"].get(paper_col)}
            for r in paper["rows"]}
    notes: list[str] = list(paper.get("notes", []))
    # One metric for the whole column: the first candidate that any run logged (Table 11: GPT-2 large
    # MAUVE online, else the offline reference-LM features), never a mix of feature spaces across rows.
    # When none was logged, the first candidate's (empty) cells stand, as for a one-metric table.
    tried = []
    for chosen in candidates:
        placement_notes: list[str] = []
        cells = list(_ablation_cells(ctx, exps, chosen[0], chosen[1], decimals, placement_notes))
        tried.append((chosen, cells, placement_notes))
        if any(cell.value is not None for _, cell, _ in cells):
            break
    else:
        chosen, cells, placement_notes = tried[0]
    metric, _, metric_label = chosen
    notes += placement_notes
    skipped = [c[2] for c in candidates[:candidates.index(chosen)]]
    if skipped:
        notes.append(f"ours: {metric_label}; not logged by any run here: {', '.join(skipped)}")
    slots: dict[float, Placed] = {}
    for exp, cell, values in cells:
        key = _sweep_key(param, values.get(param))
        if key is None:
            notes.append(f"{exp.name}: no {param} value; not placed")
            continue
        if key not in rows:
            label = str(int(key)) if param == "blocks" else f"{key:g}"
            rows[key] = {"label": label, "value": None}
        _place(slots, key, exp, cell, notes)
    columns = [_label_col(param, param_label), Column("paper", "paper", "paper", "paper"),
               Column("ours", _ours_header(ctx, exps) if len(candidates) == 1 else f"ours {metric_label} ({ctx.describe(exps)})",
                      "ours", "ours"),
               Column("experiment", "experiment", "experiment", "info")]
    judged = _is_fid_table(paper) and _judged(exps)
    if judged:
        columns.append(Column("agreement", "ours: class agreement", "agreement", "ours"))
    cost = _is_fid_table(paper)
    if cost:
        columns += _cost_columns("cost:", "ours", ctx.params.scale)
        notes.append(COST_NOTE)
    table = Table(table_id, paper["title"], ctx.caption(table_id, paper, exps), columns, notes=notes,
                  feeders=[e.name for e in exps], metric=metric)
    for key in sorted(rows):
        placed = slots.get(key)
        row = {param: Cell(rows[key]["label"]), "paper": number(rows[key]["value"], decimals),
               "ours": placed.cell if placed else Cell(DASH),
               "experiment": Cell(placed.exp.name if placed else DASH), "_key": Cell(str(key), key)}
        if judged:
            row["agreement"] = _agreement_cell(ctx, placed)
        if cost:
            row.update(_cost_cells(ctx, "cost:", placed.exp if placed else None,
                                   _denoiser_method(ctx, placed.exp) if placed else None))
        table.rows.append(row)
    return table


def build_timing_table(ctx: Context, table_id: str, paper: dict, exps: list[ExperimentSpec]) -> Table:
    """Table 12: seconds per step of the end-to-end run vs each block's, their sum and the ratio."""
    decimals = DECIMALS.get(table_id, 4)
    pv = {r["key"]["row"]: r["values"]["seconds"] for r in paper["rows"]}
    columns = [_label_col("row", "row"), Column("paper", "paper (s / iteration)", "paper", "paper"),
               Column("ours", f"ours ({ctx.describe(exps)}) s / step", "ours", "ours"),
               Column("device", "ours: device", "device", "info")]
    notes = list(paper.get("notes", []))
    notes.append("Our timings are seconds_per_step as each training job measured it, on the device where that job "
                 "ran (column 'ours: device', from the run tag dblocks.device; 'unknown' where not tagged). Blocks "
                 "train as independent jobs, so the sum is total compute, not elapsed time.")
    table = Table(table_id, paper["title"], ctx.caption(table_id, paper, exps), columns, notes=notes,
                  feeders=[e.name for e in exps])

    def device(cell: Cell) -> Cell:
        return Cell(cell.run.tag("device") or "unknown") if cell.run is not None else Cell(DASH)

    for exp in exps:
        suffix = f" [{exp.name}]" if len(exps) > 1 else ""
        e2e = metric_cell(ctx.index, exp.name, "e2e", "seconds_per_step", 1.0, decimals, job="train",
                          expected="e2e" in exp.methods)
        table.rows.append({"row": Cell("End-to-end" + suffix), "paper": number(pv["e2e"], decimals),
                           "ours": e2e, "device": device(e2e)})
        first_train, _ = ctx.index.latest(exp.name, "train", "blockwise")
        values, mismatch = ctx.placement(exp, first_train)
        table.notes.extend(mismatch)
        split = _split_of(values)
        try:
            count = int(values.get("blocks"))
        except (TypeError, ValueError):
            count = len(split) if split else 0
        logged = [b for b in ctx.index.blocks(exp.name) if b.isdigit()]
        count = max([count] + [int(b) for b in logged])
        block_cells = []
        for b in range(1, count + 1):
            cell = metric_cell(ctx.index, exp.name, "blockwise", "seconds_per_step", 1.0, decimals, job="train",
                               block=str(b))
            block_cells.append(cell)
            layers = (f" ({split[b - 1]} layer{'s' if split[b - 1] != 1 else ''})"
                      if split and len(split) == count else "")
            table.rows.append({"row": Cell(f"block {b}{layers}{suffix}"), "paper": number(pv["block"], decimals),
                               "ours": cell, "device": device(cell)})
        if block_cells and all(c.value is not None for c in block_cells):
            total = Cell(fmt(sum(c.value for c in block_cells), decimals), sum(c.value for c in block_cells))
        else:
            total = missing("some block has no seconds_per_step (see the block rows)")
        if total.value is not None and e2e.value:
            ratio = Cell(fmt(total.value / e2e.value, RATIO_DECIMALS), total.value / e2e.value)
        else:
            ratio = missing("needs the end-to-end time and the sum over blocks")
        devices = _unique(c.run.tag("device") or "unknown" for c in block_cells if c.run is not None)
        table.rows.append({"row": Cell(f"sum over {count} blocks{suffix}"), "paper": number(pv["sum"], decimals),
                           "ours": total, "device": Cell(", ".join(devices) or DASH)})
        table.rows.append({"row": Cell(f"ratio sum / end-to-end{suffix}"),
                           "paper": number(pv["ratio"], RATIO_DECIMALS), "ours": ratio, "device": Cell(DASH)})
    return table


def build_generic_table(ctx: Context, table_id: str, exps: list[ExperimentSpec]) -> Table:
    """A table id the paper module does not know: every evaluate metric of every method, paper '—'."""
    metrics = _unique(m for e in exps for method in _run_methods(ctx, e)
                      for r in [ctx.index.latest(e.name, "evaluate", method)[0]] if r for m in sorted(r.metrics))
    columns = [_label_col("experiment", "experiment"), _label_col("method", "method"),
               Column("paper", "paper", "paper", "paper")]
    columns += [Column(f"ours:{m}", f"ours {m} ({ctx.params.scale})", f"ours_{m}", "ours") for m in metrics]
    table = Table(table_id, f"table {table_id} (no paper numbers on record)", ctx.caption(table_id, None, exps),
                  columns, feeders=[e.name for e in exps])
    for exp in exps:
        for method in _run_methods(ctx, exp):
            row = {"experiment": Cell(exp.name), "method": Cell(method), "paper": Cell(DASH)}
            for m in metrics:
                row[f"ours:{m}"] = metric_cell(ctx.index, exp.name, method, m, 1.0, 4)
            table.rows.append(row)
    return table


BUILDERS = {"methods": build_methods_table, "grid": build_grid_table, "sweep": build_sweep_table,
            "timing": build_timing_table}


def build_table(ctx: Context, table_id: str) -> Table:
    exps = ctx.params.feeders(table_id)
    paper = PAPER_TABLES.get(table_id)
    if paper is None:
        return build_generic_table(ctx, table_id, exps)
    return BUILDERS[paper["kind"]](ctx, table_id, paper, exps)


# -------------------------------------------------------------------------------------------- files

def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unnamed"


def _atomic_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _atomic_figure(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


def _new_figure(ncols: int = 1, width: float = 5.0, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def figure_curves(ctx: Context, client, exp: ExperimentSpec, path: Path) -> tuple[Path | None, str]:
    """Training loss per block and end-to-end for one experiment."""
    series = []
    for method in _unique([*exp.methods, *ctx.index.methods(exp.name, "train")]):
        blocks = ctx.index.blocks(exp.name, method) or [""]
        for block in blocks:
            run, _ = ctx.index.latest(exp.name, "train", method, block)
            if run is None:
                continue
            history = sorted(client.get_metric_history(run.run_id, "train_loss"), key=lambda m: (m.step, m.timestamp))
            if history:
                label = (f"block {block}" if block.isdigit() else block if block else  # NoProp-DT's "head"
                         {"e2e": "end-to-end"}.get(method, METHOD_LABELS.get(method, method)))
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
    return _atomic_figure(fig, path), ""


def figure_sweep(ctx: Context, table: Table, paper: dict, path: Path) -> tuple[Path | None, str]:
    """Metric vs the swept parameter: the paper's panel beside ours (different scales, so not one axis)."""
    param = paper["param"]
    ours = [(row["_key"].value, row["ours"].value) for row in table.rows if row["ours"].value is not None]
    if not ours:
        return None, f"no {table.metric} logged yet for any experiment feeding table {table.id}"
    theirs = [(row["_key"].value, row["paper"].value) for row in table.rows if row["paper"].value is not None]
    panels = [("paper", theirs, paper["setting"])] if theirs else []
    panels.append(("ours", ours, ctx.describe([ctx.params.experiments[n] for n in table.feeders])))
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
    fig.suptitle(f"Table {table.id}: {paper['title']}", fontsize=9)
    return _atomic_figure(fig, path), ""


def figure_grid(ctx: Context, table: Table, paper: dict, path: Path) -> tuple[Path | None, str]:
    """Grouped bars: partition per layer split, the paper's panel beside ours."""
    partitions = [c.key.split(":", 1)[1] for c in table.columns if c.role == "ours"]
    labels_of = dict(paper["columns"])
    if not any(row[f"ours:{p}"].value is not None for row in table.rows for p in partitions):
        return None, f"no metric logged yet for any experiment feeding table {table.id}"
    labels = [row["layer_split"].text for row in table.rows]
    fig, axes = _new_figure(2, 5.0, 3.6)
    width = 0.8 / max(1, len(partitions))
    for ax, role, name in ((axes[0], "paper", "paper: " + paper["setting"]),
                           (axes[1], "ours", f"ours ({ctx.describe([ctx.params.experiments[n] for n in table.feeders])})")):
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
    fig.suptitle(f"Table {table.id}: {paper['title']}", fontsize=9)
    return _atomic_figure(fig, path), ""


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def find_artifact(client, run_id: str, name: str, max_depth: int = 3) -> str | None:
    """The artifact path of the first file called ``name`` (the root first, then folders, breadth first)."""
    folders: list[str | None] = [None]
    for _ in range(max_depth):
        deeper: list[str | None] = []
        for folder in folders:
            for info in client.list_artifacts(run_id, folder):
                if not info.is_dir and Path(info.path).name == name:
                    return info.path
                if info.is_dir:
                    deeper.append(info.path)
        folders = deeper
        if not folders:
            break
    return None


#: the samples artifact an evaluate run logs, by task: a PNG grid of images, or Markdown text samples
SAMPLES_ARTIFACT = {"generation": "samples.png", "masked_text": "samples.md", "ar_text": "samples.md",
                    "recurrent_text": "samples.md"}


def fetch_samples(ctx: Context, client, exp: ExperimentSpec, method: str, path: Path) -> tuple[Path | None, str]:
    """Copy an evaluate run's samples artifact (:data:`SAMPLES_ARTIFACT`) to ``path``."""
    name = SAMPLES_ARTIFACT[exp.task]
    run, why = ctx.index.latest(exp.name, "evaluate", method)
    if run is None:
        return None, why
    try:
        artifact = find_artifact(client, run.run_id, name)
    except Exception as exc:  # noqa: BLE001 - an unreachable artifact store: not available
        return None, f"run {run.short}: artifacts not readable ({exc.__class__.__name__}: {_one_line(exc)})"
    if artifact is None:
        return None, f"run {run.short} has no {name} artifact"
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run.run_id, artifact, tmp))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_target = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.copyfile(local, tmp_target)
        os.replace(tmp_target, path)
    return path, ""


# ------------------------------------------------------------------------------------------- driver

def tracking_uri_for(params: ParamsInfo, tracking_uri: str | None = None) -> str | None:
    """MLFLOW_TRACKING_URI, else the argument, else the params file's ``tracking.uri``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri or params.tracking_uri


def generate(params_path: str | Path, out_dir: str | Path, tracking_uri: str | None = None) -> list[Path]:
    """Write the tables and figures for every table the params file's experiments feed; return the files."""
    from mlflow import MlflowClient

    params = read_params(params_path)
    out_dir = Path(out_dir)
    tables_dir, figures_dir = out_dir / "tables", out_dir / "figures"
    client = MlflowClient(tracking_uri=tracking_uri_for(params, tracking_uri))
    index = RunIndex.from_mlflow(client, params.mlflow_experiment, params.scale, params.hashes(), params.seeds())
    ctx = Context(params, index)
    written: list[Path] = []
    warnings: list[str] = []
    if not index.runs:
        warnings.append(f"MLflow experiment `{params.mlflow_experiment}` has no runs of scale {params.scale!r}: "
                        "every value of ours is missing")
        print(f"dblocks.tables: warning: {warnings[-1]}", file=sys.stderr)
    stale = index.stale()
    experiment = client.get_experiment_by_name(params.mlflow_experiment)

    figures: list[tuple[Path, str]] = []
    skipped: list[tuple[str, str]] = []

    def record(name: str, result: tuple[Path | None, str], what: str) -> None:
        path, why = result
        if path is None:
            skipped.append((name, why))
        else:
            written.append(path)
            figures.append((path, what))

    # samples beside every number: image grids, and for text the prompt / continuation pairs that each text
    # table links to, so that a reader sees what a BPC or a MAUVE means
    text_samples: dict[str, list[tuple[str, Path]]] = {}
    for exp in params.experiments.values():
        if exp.task not in SAMPLES_ARTIFACT:
            continue
        for method in _run_methods(ctx, exp):
            name = f"samples-{_safe(exp.name)}-{_safe(method)}{Path(SAMPLES_ARTIFACT[exp.task]).suffix}"
            result = fetch_samples(ctx, client, exp, method, figures_dir / name)
            record(name, result, f"samples, {exp.name}, {method}")
            if result[0] is not None and exp.task != "generation":
                text_samples.setdefault(exp.name, []).append((method, result[0]))

    tables: list[Table] = []
    for table_id in params.table_ids():
        table = build_table(ctx, table_id)
        links = [f"[{exp} {method}]({os.path.relpath(path, tables_dir)})"
                 for exp in table.feeders for method, path in text_samples.get(exp, [])]
        if links:
            table.notes.append("Samples behind these numbers (prompt, generated and real continuation): "
                               + ", ".join(links))
        tables.append(table)
        stem = tables_dir / f"table{_safe(table_id)}"
        written += [_atomic_text(stem.with_suffix(".md"), render_md(table)),
                    _atomic_text(stem.with_suffix(".csv"), render_csv(table)),
                    _atomic_text(stem.with_suffix(".tex"), render_tex(table))]

    for exp in params.experiments.values():
        name = f"curves-{_safe(exp.name)}.png"
        record(name, figure_curves(ctx, client, exp, figures_dir / name),
               f"training loss per block and end-to-end, {exp.name}")
    for table in tables:
        paper = PAPER_TABLES.get(table.id)
        if paper is None:
            continue
        if paper["kind"] == "sweep":
            name = f"table{_safe(table.id)}-{table.metric}-vs-{paper['param']}.png"
            record(name, figure_sweep(ctx, table, paper, figures_dir / name),
                   f"Table {table.id}: {table.metric} vs {paper.get('param_label', paper['param'])}")
        elif paper["kind"] == "grid":
            name = f"table{_safe(table.id)}-partition.png"
            record(name, figure_grid(ctx, table, paper, figures_dir / name),
                   f"Table {table.id}: partition x layer split")

    written.append(_atomic_text(tables_dir / "index.md", render_index(
        params, tables, figures, skipped, warnings, out_dir, stale, experiment.experiment_id if experiment else None)))
    return written


def render_index(params: ParamsInfo, tables: list[Table], figures: list[tuple[Path, str]],
                 skipped: list[tuple[str, str]], warnings: list[str], out_dir: Path, stale: int = 0,
                 experiment_id: str | None = None) -> str:
    lines = ["# Paper tables and figures, from MLflow", "",
             f"Params file `{params.path.name}` (scale `{params.scale}`), MLflow experiment "
             f"`{params.mlflow_experiment}`. Every number of ours is read from MLflow; the paper's numbers "
             "come from `dblocks.paper`. Only runs of this file's current configuration are used: a run's "
             "`dblocks.config_hash` tag must equal its experiment's config hash, and an evaluation run's "
             "`dblocks.eval_hash` the hash of the evaluation settings this file gives it (both listed below); "
             "where such runs were repeated, the most recent FINISHED one is used. A value with no such run is "
             f"`{NA}` (its footnote says why), never an older configuration's number."
             + (f" {_runs(stale)} of these experiments, of other configurations or evaluation settings, "
                "were left out." if stale else ""), ""]
    if params.scale == "smoke":
        lines += ["**Smoke-scale numbers measure nothing**: the paper's architectures, trained for a couple of "
                  "steps on generated stand-in data, evaluated on a handful of samples. They show that the "
                  "paper-scale pipeline runs end to end, not what it would reproduce.", ""]
    elif params.scale != "paper":
        lines += [f"**{params.scale.capitalize()}-scale numbers are not comparable to the paper's**: smaller "
                  "models, other data and far fewer steps. They check that the pipeline runs end to end and that "
                  "trends can be read, not that the paper's values are reproduced.", ""]
    lines += [f"`{NA}`: expected but missing (a footnote in the table says why); `{DASH}`: not reported by the "
              "paper, or not run here.", ""]
    lines += [f"> warning: {w}" for w in warnings] + ([""] if warnings else [])
    lines += ["## Tables", "", "| table | title | fed by | files |", "|---|---|---|---|"]
    for t in tables:
        stem = f"table{_safe(t.id)}"
        files = " · ".join(f"[{ext}]({stem}.{ext})" for ext in ("md", "csv", "tex"))
        lines.append(f"| {t.id} | {_md_escape(t.title)} | {', '.join(t.feeders)} | {files} |")
    lines += ["", "## Figures", ""]
    for path, what in figures:
        rel = os.path.relpath(path, out_dir / "tables")
        lines.append(f"- [{path.name}]({rel}): {what}")
    if not figures:
        lines.append("- none")
    if skipped:
        lines += ["", "## Figures not drawn", ""] + [f"- `{name}`: {why}" for name, why in skipped]
    lines += ["", "## Runs used", ""]
    if experiment_id is not None:
        from dblocks.tracking import runs_view_url

        lines += [f"Browse them with `dblocks ui --params {params.path}` (from the folder the pipeline runs in), "
                  f"at <{runs_view_url(experiment_id)}>: the runs table with each experiment's results and data.", ""]
    lines += ["In MLflow, find an experiment's runs with the search ``tags.`dblocks.config_hash` = '<config "
              "hash>'`` (and its evaluations with ``tags.`dblocks.eval_hash` = '<evaluation hash>'``).", "",
              "| experiment | config hash | evaluation hash |", "|---|---|---|"]
    # each seed of an experiment is a configuration of its own
    lines += [f"| {name} | `{config or 'any'}` | `{evaluation or 'any'}` |"
              for name, (config, evaluation) in params.hashes().items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dblocks.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", required=True, help="pipeline params file, e.g. params/tiny.yaml")
    parser.add_argument("--out", default="results", help="output folder (tables/ and figures/ go under it)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (MLFLOW_TRACKING_URI wins; default: the "
                                               "params file's tracking.uri)")
    args = parser.parse_args(argv)
    if not Path(args.params).is_file():
        parser.error(f"--params {args.params}: file not found")
    for path in generate(args.params, args.out, args.tracking_uri):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
