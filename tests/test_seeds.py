"""pipeline.seeds: an experiment trained and evaluated with several seeds. Each further seed is a whole experiment
of its own (name, config hash, jobs, checkpoints, DVC stages, MLflow runs), linked to its baseline's run with the
same seed; the tables aggregate them (tests/test_tables.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dblocks.cli import main
from dblocks.errors import ConfigError
from dblocks.params import Params, experiment_config
from dblocks.pipeline import Pipeline

PARAMS = {
    "scale": "tiny",
    "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "seeds"},
    "resources": {"gpu": 0, "mem_mb": 1000, "runtime": 10, "threads": 1},
    "evaluation": {"samples": 8, "sample_steps": 2, "fid_features": "digits"},
    "defaults": {"dataset": "digits", "seed": 0},
    "experiments": {
        "vit": {
            "task": "classification",
            "arch": "ViT-micro",
            "blocks": 3,
            "train": {"steps": 1, "batch_size": 8},
            "pipeline": {"tables": ["1"], "methods": ["blockwise", "e2e"], "seeds": 3},
        },
        "noprop": {
            "task": "classification",
            "arch": "ViT-micro",
            "blocks": 3,
            "overlap": 0.1,
            "train": {"steps": 1, "batch_size": 8},
            "pipeline": {"tables": ["6"], "methods": ["blockwise"], "baseline": "vit", "seeds": 3},
        },
    },
}


def _write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_each_further_seed_is_an_experiment_of_its_own(tmp_path):
    params = Params.load(_write(tmp_path, PARAMS))
    assert list(params.experiments) == ["vit", "vit-seed1", "vit-seed2", "noprop", "noprop-seed1", "noprop-seed2"]
    assert [params.experiments[n]["seed"] for n in params.replicates("vit")] == [0, 1, 2]
    assert params.replicates("vit") == ["vit", "vit-seed1", "vit-seed2"]
    assert params.replicate_of("vit-seed2") == "vit" and params.replicate_of("vit") == "vit"
    assert len({params.hash(n) for n in params.experiments}) == 6
    # a seed's block-wise model is compared with the baseline trained with the same seed
    assert [params.baseline(n) for n in params.replicates("noprop")] == ["vit", "vit-seed1", "vit-seed2"]
    # the jobs see the repeat's config: same settings, its own seed and name
    config = experiment_config(tmp_path / "params.yaml", "vit-seed1")
    assert (config["seed"], config["name"], config["train"]) == (1, "vit-seed1", params.experiments["vit"]["train"])
    pipeline = Pipeline.load(tmp_path / "params.yaml")
    targets = pipeline.targets()
    assert any("vit-seed2/block-3" in t for t in targets) and any("vit-seed1/e2e" in t for t in targets)


def test_a_name_clash_or_a_baseline_without_the_seed_is_a_clear_error(tmp_path):
    clash = {**PARAMS, "experiments": {**PARAMS["experiments"], "vit-seed1": PARAMS["experiments"]["vit"]}}
    with pytest.raises(ConfigError, match=r"experiments\.vit-seed1: the name of vit's run with seed 1"):
        Params.load(_write(tmp_path, clash))
    one_seed = {**PARAMS["experiments"]["vit"], "pipeline": {"tables": ["1"], "methods": ["blockwise", "e2e"]}}
    short = {**PARAMS, "experiments": {**PARAMS["experiments"], "vit": one_seed}}
    with pytest.raises(ConfigError, match=r"noprop-seed1\.pipeline\.baseline='vit-seed1'"):
        Params.load(_write(tmp_path, short))


def test_two_seeds_train_different_checkpoints(tmp_path):
    path = _write(tmp_path, PARAMS)
    weights = []
    for name in ("vit", "vit-seed1"):
        out = tmp_path / name / "block-2.safetensors"
        assert (
            main(
                [
                    "train-block",
                    "--config",
                    str(path),
                    "--experiment",
                    name,
                    "--block",
                    "2",
                    "--no-progress",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        weights.append(load_file(out))
    assert weights[0].keys() == weights[1].keys()
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
