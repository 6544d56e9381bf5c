"""Huginn recurrent depth: the DiffusionBlocks objective is one forward pass per step where the baseline
runs the recurrent block r times; inference keeps K iterations (K Euler steps); both learn; CLI round trip."""

from __future__ import annotations

import json
import math

import torch

from dblocks.blocks import AssembledModel
from dblocks.cli import main
from dblocks.config import resolve
from dblocks.experiment import Experiment
from dblocks.jobs import training_job
from dblocks.layers import counting_layer_calls
from dblocks.models.huginn import sample_recurrence
from dblocks.text_generation import recurrent_depth_logits, recurrent_next_token_quality
from dblocks.train import sample_batch, train
from tests.conftest import train_and_assemble_by_cli

MICRO = {
    "task": "recurrent_text",
    "arch": "Huginn-micro",
    "dataset": "shakespeare",
    "blocks": 1,
    "device": "cpu",
    "train": {"steps": 6, "batch_size": 8, "warmup": 2, "log_every": 3, "checkpoint_every": 3},
}


def micro_huginn(**overrides) -> Experiment:
    return Experiment(resolve(MICRO, [overrides]))


def test_training_step_is_one_pass_for_diffusion_blocks_and_r_passes_for_the_baseline():
    exp = micro_huginn()
    data = exp.load_data("validation")
    gen = torch.Generator().manual_seed(0)
    batch = sample_batch(data, 2, gen, torch.device("cpu"))
    denoiser, objective, _ = training_job(exp, "blockwise", 1)
    with counting_layer_calls(denoiser) as calls:
        objective(batch, gen)
    assert calls[0] == 2 + 4 + 2  # prelude, the recurrent block ONCE, coda
    baseline, objective, _ = training_job(exp, "e2e")
    for seed in range(4):
        r = sample_recurrence(3, torch.Generator().manual_seed(seed))
        with counting_layer_calls(baseline) as calls:
            objective(batch, torch.Generator().manual_seed(seed))  # draws r first from the same state
        assert calls[0] == 2 + 4 * r + 2  # prelude, r x the recurrent block, coda
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_recurrence(32, g) for _ in range(4000)]).float()
    assert abs(draws.mean().item() - 32) < 1.0 and draws.std() > 5  # stochastic, mean 32 (paper scale)


def test_inference_keeps_k_iterations_as_k_euler_steps():
    exp = micro_huginn()
    tokens = exp.load_data("validation").tokens[:2, :10]
    model = AssembledModel([exp.block(1)], exp.partition).eval()
    with counting_layer_calls(model) as calls:
        logits = recurrent_depth_logits(model, tokens, 4, torch.Generator().manual_seed(0))
    assert logits.shape == (2, 10, 257) and model.calls == [4] and calls[0] == 4 * 8
    baseline = exp.e2e().eval()
    with counting_layer_calls(baseline) as calls:
        recurrent_depth_logits(baseline, tokens, 4, torch.Generator().manual_seed(0))
    assert calls[0] == 2 + 4 * 4 + 2


def _denoising_ce(model, exp, tokens, sigma=0.5):
    """Cross-entropy of the denoiser's next-token logits at one fixed noise level (fixed noise draw)."""
    with torch.no_grad():
        batch = {"tokens": tokens}
        y = exp.task.target(batch)
        z = exp.task.corrupt(y, torch.full((len(tokens),), sigma), torch.Generator().manual_seed(0))
        out = model(z, torch.full((len(tokens),), sigma), exp.task.condition(batch))
        return torch.nn.functional.cross_entropy(out.raw.transpose(1, 2), tokens[:, 1:]).item()


def test_both_tiny_recurrent_models_learn():
    exp = micro_huginn(train={"steps": 30, "batch_size": 8, "lr": 5e-3, "warmup": 3, "log_every": 10})
    data, val = exp.load_data("train"), exp.load_data("validation").tokens[:24]
    denoiser, objective, steps = training_job(exp, "blockwise", 1)
    before = _denoising_ce(denoiser.eval(), exp, val)
    train(
        denoiser, objective, data, exp.config["train"], seed=0, device=torch.device("cpu"), steps=steps, progress=False
    )
    assert _denoising_ce(denoiser.eval(), exp, val) < before - 1.0
    baseline, objective, steps = training_job(exp, "e2e")
    before = recurrent_next_token_quality(baseline.eval(), val, 4, torch.Generator().manual_seed(0))
    train(
        baseline, objective, data, exp.config["train"], seed=0, device=torch.device("cpu"), steps=steps, progress=False
    )
    after = recurrent_next_token_quality(baseline.eval(), val, 4, torch.Generator().manual_seed(0))
    assert before["next_token_bits"] == pytest_approx_log2_257() and after["next_token_bits"] < math.log2(257) - 2.5


def pytest_approx_log2_257():
    import pytest

    return pytest.approx(math.log2(257), rel=1e-3)  # untrained: the zero-initialised read-out is uniform


def test_cli_round_trip_and_training_compute(tmp_path, capsys):
    cfg = tmp_path / "huginn.yaml"
    cfg.write_text(json.dumps({**MICRO, "name": "huginn-micro"}))
    train_and_assemble_by_cli(cfg, tmp_path, 1)
    for name in ("model", "e2e"):
        assert (
            main(
                [
                    "evaluate",
                    str(tmp_path / f"{name}.safetensors"),
                    "--out",
                    str(tmp_path / f"{name}.json"),
                    "--prompts",
                    "2",
                    "--continuations",
                    "1",
                    "--new-tokens",
                    "3",
                    "--max-windows",
                    "4",
                    "--mauve-features",
                ]
            )
            == 0
        )
    record = json.loads((tmp_path / "model.json").read_text())
    assert record["layer_evals_per_token"] == 3 * 8 and record["block_calls"] == [3 * 3]
    assert json.loads((tmp_path / "e2e.json").read_text())["layer_evals_per_token"] == 4 + 4 * 3
    capsys.readouterr()
    assert main(["training-compute", "--config", str(cfg), "--repeats", "3"]) == 0
    compute = json.loads(capsys.readouterr().out)
    assert compute["blockwise_block1_forward_layer_evals_per_step"] == 8
    assert compute["e2e_forward_layer_evals_per_step"] > 8
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({**MICRO, "blocks": 2}))
    assert main(["train-block", "--config", str(bad), "--block", "1", "--out", str(tmp_path / "x.safetensors")]) == 2
