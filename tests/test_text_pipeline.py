"""The language models in the pipeline: params/tiny-text.yaml (kept out of the default DAG for time)
validates, fans out one job per block, evaluates text with the right judge, and a bad judge is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dblocks.dvcgen import snakemake_jobs
from dblocks.errors import ConfigError
from dblocks.pipeline import Pipeline

pytestmark = pytest.mark.slow  # whole pipelines: `pytest -m 'not slow'` leaves them out

REPO = Path(__file__).resolve().parents[1]


def test_text_params_fan_out_per_block_and_evaluate_with_the_judge():
    pipe = Pipeline.load(REPO / "params/tiny-text.yaml")
    # Tables 3, 4 and 5 run 3 seeds (pipeline.seeds): each is an experiment of its own, <name>-seed<k>
    seeded = {
        "mdm-text8": ("masked_text", [1, 2, 3]),
        "ar-lm1b": ("ar_text", [1, 2, 3, 4]),
        "huginn-lm1b": ("recurrent_text", [1]),
    }
    expected = {f"{e}{suffix}": spec for e, spec in seeded.items() for suffix in ("", "-seed1", "-seed2")}
    expected.update(
        {
            "ar-t11-b2": ("ar_text", [1, 2]),
            "ar-t11-b3": ("ar_text", [1, 2, 3]),
            "ar-t11-b6": ("ar_text", [1, 2, 3, 4, 5, 6]),
        }
    )
    assert {e: c["task"] for e, c in pipe.experiments.items()} == {e: task for e, (task, _) in expected.items()}
    jobs = snakemake_jobs("params/tiny-text.yaml", REPO)
    blocks = {
        e: sorted(int(j.wildcards["block"]) for j in jobs if j.rule == "train_block" and j.wildcards["exp"] == e)
        for e in pipe.experiments
    }
    assert blocks == {e: b for e, (_, b) in expected.items()}
    evaluations = {(j.wildcards["exp"], j.wildcards["method"]): j for j in jobs if j.rule == "evaluate_text"}
    assert len(evaluations) == 9 * 2 + 3  # Table 11's B sweep is block-wise only
    assert "--judge checkpoints/tiny-text/ar-lm1b/e2e.safetensors" in evaluations[("ar-t11-b6", "blockwise")].command
    # every seed is judged by the same model, the seed-0 baseline
    assert "--judge checkpoints/tiny-text/ar-lm1b/e2e.safetensors" in evaluations[("huginn-lm1b-seed2", "e2e")].command
    huginn = evaluations[("huginn-lm1b", "blockwise")]
    assert "--judge checkpoints/tiny-text/ar-lm1b/e2e.safetensors" in huginn.command
    assert "checkpoints/tiny-text/ar-lm1b/e2e.safetensors" in huginn.inputs
    assert "--judge" not in evaluations[("mdm-text8", "e2e")].command
    assert any(j.rule == "prepare_data" and j.wildcards["dataset"] == "shakespeare" for j in jobs)


def test_a_judge_must_be_an_autoregressive_experiment_with_a_baseline(tmp_path):
    raw = yaml.safe_load((REPO / "params/tiny-text.yaml").read_text())
    raw["experiments"]["huginn-lm1b"]["pipeline"]["judge"] = "mdm-text8"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"huginn-lm1b.pipeline.judge='mdm-text8' .* allowed: ar-lm1b"):
        Pipeline.load(bad)
