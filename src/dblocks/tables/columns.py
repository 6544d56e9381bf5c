"""What of ours each table shows beside the paper's numbers: which metrics in which unit, the inference and
training cost beside them, decimals, method labels and notes; and the columns and cells built from them that
every kind of table shares."""

from __future__ import annotations

import re

from dblocks.tables.cells import DASH, Cell
from dblocks.tables.context import Context
from dblocks.tables.experiments import ExperimentSpec
from dblocks.tables.ours import metric_cell
from dblocks.tables.table import Column

#: our value columns per table: column key -> (MLflow metric, multiplier to the paper's unit, header)
OURS_METRICS: dict[str, dict[str, tuple[str, float, str]]] = {
    # beside the paper's sampler (the chain from a noise draw): the same blocks' chain from the noise's mean
    "1": {
        "accuracy": ("accuracy", 100.0, "accuracy (%)"),
        "accuracy_mean_start": ("accuracy_mean_start", 100.0, "accuracy, chain from the noise mean (%)"),
    },
    "2": {
        "fid_train": ("fid_train", 1.0, "FID (train)"),
        "fid_test": ("fid_test", 1.0, "FID (test)"),
        "class_agreement": ("class_agreement", 1.0, "class agreement"),
    },
    # beside each bits figure: the unigram entropy of the scored tokens, the floor a model that learned nothing
    # beyond letter frequencies reaches
    "3": {"bpc": ("bpc", 1.0, "BPC"), "unigram_bits": ("unigram_bits", 1.0, "unigram floor (bits/char)")},
    # what evaluate_text logs: MAUVE per featurizer and generative perplexity under this project's own
    # end-to-end AR reference LM (offline) and under Llama-2 / GPT2-XL (online, evaluation.text.hf_judges)
    "4": {
        "mauve_gpt2_large": ("mauve_gpt2_large", 1.0, "MAUVE (GPT-2 large)"),
        "mauve_reference": ("mauve_reference", 1.0, "MAUVE (own reference-LM features)"),
        "mauve_minilm": ("mauve_minilm", 1.0, "MAUVE (MiniLM features)"),
        "mauve_ngram": ("mauve_ngram", 1.0, "MAUVE (n-gram profiles)"),
        "train_word_rate": ("train_word_rate", 1.0, "known-word rate"),
        "gen_ppl_llama2": ("gen_ppl_llama2", 1.0, "gen. PPL (Llama-2)"),
        "gen_ppl_gpt2xl": ("gen_ppl_gpt2xl", 1.0, "gen. PPL (GPT2-XL)"),
        "gen_ppl_reference": ("gen_ppl_reference", 1.0, "gen. PPL (own reference LM)"),
        "next_token_bits": ("next_token_bits", 1.0, "next-token bits/byte"),
        "unigram_bits": ("unigram_bits", 1.0, "unigram floor (bits/byte)"),
    },
    "6": {
        "accuracy": ("accuracy", 100.0, "accuracy (%)"),
        "accuracy_mean_start": ("accuracy_mean_start", 100.0, "accuracy, chain from the noise mean (%)"),
    },
    "7": {"fid": ("fid", 1.0, "FID")},
    "8": {"fid": ("fid", 1.0, "FID")},
    "10": {"fid": ("fid", 1.0, "FID")},
    "11": {
        "mauve_gpt2_large": ("mauve_gpt2_large", 1.0, "MAUVE (GPT-2 large)"),
        "mauve_reference": ("mauve_reference", 1.0, "MAUVE (own reference-LM features)"),
        "mauve_ngram": ("mauve_ngram", 1.0, "MAUVE (n-gram profiles)"),
        "next_token_bits": ("next_token_bits", 1.0, "next-token bits/byte"),
    },
    "gamma": {"fid": ("fid", 1.0, "FID")},
}
OURS_METRICS["5"] = OURS_METRICS["4"]

#: metrics that only some training methods log; other methods' rows show "—" (never asked for), not "n/a": a
#: chain's start exists only for the assembled DiffusionBlocks models
METRIC_METHODS: dict[str, tuple[str, ...]] = {"accuracy_mean_start": ("blockwise", "paper")}


def logs_metric(method: str | None, metric: str) -> bool:
    """Whether runs of ``method`` log ``metric`` (:data:`METRIC_METHODS`; every other metric: any method)."""
    return method is not None and method in METRIC_METHODS.get(metric, (method,))


#: metrics shown beside a sweep table's one metric, from the same runs, where any run logged them: at tiny scale
#: Table 11's MAUVE sits at its floor for every B, and these still tell the rows apart
SWEEP_COMPANIONS: dict[str, list[tuple[str, float, str]]] = {
    "11": [("train_word_rate", 1.0, "known-word rate"), ("next_token_bits", 1.0, "next-token bits/byte")]
}

#: inference cost that every generator evaluation logs, shown beside each FID of ours:
#: MLflow metric -> (multiplier, header, decimals)
COST_METRICS: dict[str, tuple[float, str, int]] = {
    "layer_evals_per_sample": (1.0, "layer evals / sample", 0),
    "sample_seconds_per_sample": (1000.0, "ms / sample", 3),
}
COST_NOTE = (
    "Inference cost beside each FID of ours: transformer layer evaluations per generated sample (each "
    "Euler step runs only the block owning its sigma; x2 with guidance) and sampling wall time per "
    "sample in milliseconds, on the evaluation's device."
)

#: the training cost of a method's jobs, shown beside our accuracy in the tables that compare training methods
#: (Table 1: Forward-Forward; Table 6: NoProp), read from the training runs: MLflow metric -> (multiplier,
#: header, decimals, how a method's several jobs (its blocks) make one number: their mean or their largest)
TRAIN_COST_TABLES = ("1", "6")
TRAIN_COST_METRICS: dict[str, tuple[float, str, int, str]] = {
    "seconds_per_step": (1000.0, "ms / training step", 1, "mean"),
    "train_memory_mb": (1.0, "training memory (MB)", 1, "max"),
}
TRAIN_COST_NOTE = (
    "Training cost beside our accuracy, per training job as each job measured it (dblocks.train): "
    "milliseconds per optimizer step (a method of several jobs: the mean over its blocks, "
    "DiffusionBlocks' B and NoProp-DT's T; NoProp-DT's head job, a linear layer, left out) and the "
    "memory the training steps took beyond what the job held when its loop started (gradients, "
    "optimizer state, activations; on a GPU torch's peak allocation, on a CPU the rise of the "
    "process's peak resident memory; a method of several jobs: its largest job). The end-to-end row "
    "is one job training the whole network; a block-local method's number is one of its jobs, which "
    "run independently."
)

#: remarks on how our numbers differ in kind from the paper's, printed under the table
OURS_NOTES = {
    "2": [
        "Ours: FID against the training set and against the test set (cached reference statistics), "
        "each the best of the evaluation's independent sample sets (the paper: best of three)."
    ]
}

#: decimals per table (Table 12 is in seconds); the ratio row of Table 12 uses RATIO_DECIMALS
DECIMALS = {"12": 4}
RATIO_DECIMALS = 3

#: rows for methods this project runs beyond the paper's (label, paper row whose numbers it sits beside)
EXTRA_METHODS = {"paper": ("DiffusionBlocks (paper mode: shared stem, one process)", "blockwise")}
METHOD_LABELS = {
    "blockwise": "DiffusionBlocks",
    "e2e": "End-to-end backprop",
    "paper": "DiffusionBlocks (paper mode)",
    "noprop-dt": "NoProp-DT",
    "noprop-ct": "NoProp-CT",
    "noprop-fm": "NoProp-FM",
    "forward-forward": "Forward-Forward",
}


def method_label(method: str) -> str:
    """A method as a reader knows it ("noprop-dt" -> "NoProp-DT"), else its own name."""
    return METHOD_LABELS.get(method, method)


def csv_name(header: str) -> str:
    """A column header as a CSV column name: "ours layer evals / sample" -> "ours_layer_evals_sample"."""
    return re.sub(r"[^a-z0-9]+", "_", header.lower()).strip("_")


def label_column(key: str, header: str) -> Column:
    return Column(key, header, csv_name(header) or key, "label")


def paper_columns(columns: dict[str, str]) -> list[Column]:
    """The paper's values: one column "paper", or one per value the paper reports ("paper FID (train)")."""
    if len(columns) == 1:
        return [Column(f"paper:{next(iter(columns))}", "paper", "paper", "paper")]
    return [Column(f"paper:{k}", f"paper {label}", f"paper_{k}", "paper") for k, label in columns.items()]


def ours_header(ctx: Context, exps: list[ExperimentSpec], label: str | None = None) -> str:
    return f"ours {label} ({ctx.params.scale})" if label else f"ours ({ctx.describe(exps)})"


def ours_columns(ctx: Context, exps: list[ExperimentSpec], labels: dict[str, str]) -> list[Column]:
    """Our values beside the paper's: one column "ours (setting)", or one per metric, each labelled."""
    if len(labels) == 1:
        return [Column(f"ours:{k}", ours_header(ctx, exps), "ours", "ours") for k in labels]
    return [Column(f"ours:{k}", ours_header(ctx, exps, label), f"ours_{k}", "ours") for k, label in labels.items()]


def is_fid_table(paper: dict | None) -> bool:
    """Whether the table compares FIDs, which get our inference cost beside them."""
    return bool(paper) and paper.get("metric") == "FID"


def cost_columns(prefix: str, header: str, scale: str, metrics: dict[str, tuple] = COST_METRICS) -> list[Column]:
    """Our cost beside our numbers (inference: :data:`COST_METRICS`, training: :data:`TRAIN_COST_METRICS`,
    each metric's header second in its entry); the header names the scale, as every column of ours does."""
    return [
        Column(f"{prefix}{m}", f"{header} {spec[1]} ({scale})", csv_name(f"{header} {spec[1]}"), "cost")
        for m, spec in metrics.items()
    ]


def cost_cells(
    ctx: Context, prefix: str, exp: ExperimentSpec | None, method: str | None, expected: bool = True
) -> dict[str, Cell]:
    """Our inference cost for a row of :func:`cost_columns` (no experiment: "—")."""
    if exp is None or method is None:
        return {f"{prefix}{m}": Cell(DASH) for m in COST_METRICS}
    return {
        f"{prefix}{m}": metric_cell(ctx.index, exp.name, method, m, mult, dec, expected=expected)
        for m, (mult, _, dec) in COST_METRICS.items()
    }


def experiment_suffix(exp: ExperimentSpec, among: int) -> str:
    """ " [experiment]" after a row label that ``among`` experiments share, so that their rows differ."""
    return f" [{exp.name}]" if among > 1 else ""
