"""The evaluation-settings hash: ``dblocks evaluate`` computes it from the options it received, the tables
from the params file (``Params.eval_hash``); both go through ``dblocks.params.evaluation_settings``. These
tests hold the two sides together: the commands the workflow's evaluate rules really run give the settings
the params model expects, and cached FID reference statistics tell the command how many reference images
they summarize (``evaluation.reference_samples``, None for whole splits) from JSON records alone."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import pytest
import torch

from dblocks.checkpoint import save_checkpoint
from dblocks.cli import build_parser
from dblocks.config import resolve
from dblocks.dvcgen import snakemake_jobs
from dblocks.evaluate import fid_references
from dblocks.evaluate_model import evaluation_options
from dblocks.experiment import Experiment
from dblocks.params import EVALUATE_DEFAULTS, command_settings, evaluation_hash, evaluation_settings
from dblocks.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]
FID_KEYS = ("fid_features", "fid_reference", "reference_samples")


def _evaluate_argv(command: str) -> list[str]:
    """The arguments after ``dblocks`` in a rule's shell command, without the log redirection."""
    words = shlex.split(command)
    start = next(i for i, w in enumerate(words) if w in ("evaluate", "evaluate-local"))
    end = next((i for i, w in enumerate(words) if w.startswith(">")), len(words))
    return words[start:end]


@pytest.mark.parametrize("params_file", ["params/tiny.yaml", "params/tiny-text.yaml"])
def test_the_rules_give_evaluate_the_settings_the_params_model_hashes(params_file, monkeypatch):
    monkeypatch.chdir(REPO)  # the rules name the params file relative to the repository
    pipe = Pipeline.load(REPO / params_file)
    parser = build_parser()
    jobs = [j for j in snakemake_jobs(params_file, REPO) if j.rule.startswith("evaluate_")]
    tasks = set()
    for job in jobs:
        exp = job.wildcards["exp"]
        config = pipe.experiments[exp]
        tasks.add(config["task"])
        args = parser.parse_args(_evaluate_argv(job.command))
        assert args.params == params_file  # the protocol comes from the file, not from the command line
        if job.rule == "evaluate_local":  # a block-local baseline: test accuracy, settings split and seed only
            got = command_settings({"split": args.split, "seed": args.seed}, config)
            assert evaluation_hash(got) == pipe.eval_hash(exp), job.command
            continue
        model_config = copy.deepcopy(config)
        model_config["sample"] = {**model_config["sample"], "guidance": 99.0}  # stale settings in the model
        evaluation_options(args, Experiment(model_config))  # what the command does with --params
        config = model_config
        judge = pipe.judge(exp) if args.judge else None
        assert (judge is not None) == (pipe.judge(exp) is not None), job.command
        fid = None
        if config["task"] == "generation":  # the FID reference itself comes from the statistics' records
            fid = {
                "fid_features": pipe.evaluation["fid_features"],
                "fid_reference": sorted(s for s in ("train", "test") if getattr(args, f"{s}_stats")),
                "reference_samples": pipe.evaluation.get("reference_samples"),
            }
        got = command_settings(vars(args), config, pipe.hash(judge) if judge else None, fid)
        assert got == pipe.evaluation_settings(exp), job.command
        assert evaluation_hash(got) == pipe.eval_hash(exp)
    expected = (
        {"classification", "generation"}
        if params_file.endswith("tiny.yaml")
        else {"masked_text", "ar_text", "recurrent_text"}
    )
    assert tasks == expected


def test_the_command_defaults_are_the_params_models():
    args = build_parser().parse_args(["evaluate", "m.safetensors", "--out", "m.json"])
    evaluation_options(args, Experiment(resolve({})))  # no --params: the defaults fill what was not given
    assert {k: getattr(args, k) for k in EVALUATE_DEFAULTS} == EVALUATE_DEFAULTS


def test_settings_are_normalised_and_only_the_tasks_own():
    a = evaluation_settings("ar_text", {"mauve_features": ["minilm", "reference-lm"], "samples": 5, "prompts": 7})
    b = evaluation_settings("ar_text", {"mauve_features": ("reference-lm", "minilm"), "prompts": 7})
    assert a == b and "samples" not in a and a["prompts"] == 7 and a["continuations"] == 5
    g = evaluation_settings("generation", {"guidance": 1, "samples": 8})
    assert g["guidance"] == 1.0 and isinstance(g["guidance"], float)
    assert evaluation_hash(g) == evaluation_hash(evaluation_settings("generation", {"guidance": 1.0, "samples": 8}))
    assert evaluation_settings("classification", {"seed": 3, "samples": 9}) == {
        "task": "classification",
        "protocol": 2,
        "split": "test",
        "seed": 3,
        "weights": None,
    }


def _stats(path: Path, split: str, sha: str, samples: int) -> Path:
    key = {
        "dataset": "digits",
        "split": split,
        "data_sha256": sha,
        "extractor": "x",
        "layer": "y",
        "weights_sha256": "0" * 64,
        "samples": samples,
    }
    save_checkpoint(path, {"mu": torch.zeros(2), "sigma": torch.eye(2)}, {"kind": "fid-reference", "key": key})
    return path


def test_fid_references_read_records_only(tmp_path):
    data = tmp_path / "prepared"
    data.mkdir()
    for split, n in (("train", 20), ("test", 10)):  # JSON records only: there are no tensor files
        (data / f"{split}.json").write_text(
            json.dumps({"kind": "dataset", "name": "digits", "split": split, "examples": n, "sha256": f"{split:0<64}"})
        )
    whole = {s: _stats(tmp_path / f"all-{s}.safetensors", s, f"{s:0<64}", n) for s, n in (("train", 20), ("test", 10))}
    samples, found = fid_references(whole, [None, data])
    assert samples is None
    assert [(f["split"], f["examples"], f["prepared"]) for f in found] == [("test", 10, data), ("train", 20, data)]
    subset = {s: _stats(tmp_path / f"5-{s}.safetensors", s, f"{s:0<64}", 5) for s in ("train", "test")}
    assert fid_references(subset, [data])[0] == 5
    # the prepared split is not found (or is another one): the count is all it knows
    assert fid_references(whole, [tmp_path / "elsewhere"])[0] == [10, 20]
    assert fid_references({"test": whole["test"]}, [])[0] == 10
    other = {"test": _stats(tmp_path / "other.safetensors", "test", "f" * 64, 10)}
    samples, (info,) = fid_references(other, [data])
    assert samples == 10 and info["prepared"] is None and info["sha256"] == "f" * 64


def test_the_scale_label_is_never_guessed(tmp_path, monkeypatch):
    """--scale, else --params' scale, else the --track record's (its params file's), else the model's record's,
    else "unknown"."""
    monkeypatch.chdir(REPO)
    parser = build_parser()

    def scale(*extra, trained_at: str = "unknown") -> str:
        args = parser.parse_args(["evaluate", "m.safetensors", "--out", "m.json", *extra])
        evaluation_options(args, Experiment(resolve({"name": "vit-cifar100"}), trained_at))
        return args.scale

    record = tmp_path / "run.json"
    record.write_text(json.dumps({"scale": "paper", "experiment": "vit-cifar100"}))
    assert scale() == "unknown"
    assert scale("--track", str(record)) == "paper"
    assert scale("--params", "params/tiny.yaml", "--track", str(record)) == "tiny"
    assert scale("--scale", "paper", "--params", "params/tiny.yaml") == "paper"
    assert scale(trained_at="smoke") == "smoke"  # the model's record: the params file it was trained from
    assert scale("--track", str(record), trained_at="smoke") == "paper"
