"""What a user browsing the store sees: the headline metrics that each parent run carries per method
(``<method>.<metric>``) and the saved runs-table view of the MLflow experiment (:func:`runs_view`, opened by
:func:`runs_view_url`)."""

from __future__ import annotations

import json
from typing import Any

from dblocks.tracking.store import _retry

#: the evaluation metrics a parent run carries per method, as ``<method>.<metric>`` (when the evaluation made them)
HEADLINE_METRICS = (
    "accuracy",
    "fid",
    "fid_train",
    "fid_test",
    "bpc",
    "mauve_reference",
    "mauve_minilm",
    "mauve_ngram",
    "mauve_gpt2_large",
    "gen_ppl_reference",
    "gen_ppl_llama2",
    "gen_ppl_gpt2xl",
    "next_token_bits",
)
#: the saved runs-table view (an experiment tag the MLflow UI reads): the Dataset column and the parents'
#: headline metrics; open it with :func:`runs_view_url`
RUNS_VIEW_KEY = "dblocks"
_SHARED_VIEW_TAG = "mlflow.sharedViewState."


def headline_metrics(method: str | None, metrics: dict[str, Any]) -> dict[str, float]:
    """An evaluation's headline numbers as its parent run carries them: ``{"<method>.<metric>": value}`` for
    each of :data:`HEADLINE_METRICS` among ``metrics`` (child and parent share the metric names)."""
    return {
        f"{method or 'model'}.{k}": float(metrics[k])
        for k in HEADLINE_METRICS
        if isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool)
    }


def headline_metric_names(task: str, settings: dict) -> list[str]:
    """The :data:`HEADLINE_METRICS` that an evaluation of a ``task`` model with these evaluation settings
    (:func:`dblocks.params.evaluation_settings`) logs."""
    if task == "classification":
        return ["accuracy"]
    if task == "generation":
        return ["fid_train", "fid_test"]  # fid is fid_test when there are both
    if task == "masked_text":
        return ["bpc"]
    features, judged = set(settings.get("mauve_features") or []), settings.get("judge") is not None
    names = [
        ("mauve_reference", "reference-lm" in features and judged),
        ("mauve_minilm", "minilm" in features),
        ("mauve_ngram", "ngram" in features),
        ("mauve_gpt2_large", "gpt2-large" in features),
        ("gen_ppl_reference", judged),
        ("gen_ppl_llama2", "llama2" in (settings.get("hf_judges") or [])),
        ("gen_ppl_gpt2xl", "gpt2-xl" in (settings.get("hf_judges") or [])),
        ("next_token_bits", True),
    ]
    return [name for name, logged in names if logged]


def runs_view(params) -> dict:
    """The runs-table view of a params file's MLflow experiment (MLflow's shared view state): the Dataset
    column, then every ``<method>.<metric>`` that its parent runs will carry."""
    columns = []
    for exp, config in params.experiments.items():
        for metric in headline_metric_names(config["task"], params.evaluation_settings(exp)):
            columns += [f"{method}.{metric}" for method in params.methods(exp)]
    methods = ["blockwise", "paper", "e2e"]
    ordered = sorted(
        dict.fromkeys(columns), key=lambda c: (methods.index(c.split(".")[0]) if c.split(".")[0] in methods else 9, c)
    )
    return {"selectedColumns": ["attributes.`Dataset`", *(f"metrics.`{c}`" for c in ordered)]}


def runs_view_url(experiment_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """Where the MLflow UI (``dblocks ui``) shows the runs table with :func:`runs_view` (MLflow 3.17's UI
    opens an experiment on its GenAI overview unless asked for the model-training view)."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={RUNS_VIEW_KEY}"


def _set_runs_view(client, experiment_id: str, view: dict) -> None:
    value = json.dumps(view)
    exp = _retry(client.get_experiment, experiment_id)
    if (exp.tags or {}).get(_SHARED_VIEW_TAG + RUNS_VIEW_KEY) != value:
        _retry(client.set_experiment_tag, experiment_id, _SHARED_VIEW_TAG + RUNS_VIEW_KEY, value)
