"""Masked diffusion LM: the masking-schedule partition, the bound (BPC), block routing when sampling,
learning on real text, and the CLI round trip (train blocks, assemble, evaluate)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dblocks.cli import main
from dblocks.config import resolve
from dblocks.errors import ConfigError
from dblocks.evaluate import as_assembled
from dblocks.experiment import Experiment
from dblocks.jobs import training_job
from dblocks.masked_diffusion import MaskingPartition, bits_by_block, bits_per_token, mask_tokens, sample_text
from dblocks.train import train
from tests.conftest import train_and_assemble_by_cli

MICRO = {
    "task": "masked_text",
    "arch": "MDM-micro",
    "dataset": "shakespeare",
    "blocks": 3,
    "overlap": 0.1,
    "device": "cpu",
    "train": {"steps": 8, "batch_size": 16, "warmup": 2, "log_every": 4, "checkpoint_every": 4},
}


def micro_text_exp(**overrides) -> Experiment:
    return Experiment(resolve(MICRO, [overrides]))


def test_masking_partition_gives_each_block_an_equal_alpha_decrement():
    p = MaskingPartition.make(4)
    assert p.boundaries == (0.0, 0.25, 0.5, 0.75, 1.0)
    # block b ends where alpha = 1 - b/B ... block 1 is the most masked (highest noise) interval
    for b in range(1, 5):
        lo, hi = p.interval(b)
        assert p.alpha(lo) == pytest.approx(b / 4) and p.alpha(hi) == pytest.approx((b - 1) / 4)
    assert p.route(0.9) == 1 and p.route(0.6) == 2 and p.route(0.3) == 3 and p.route(0.01) == 4
    assert p.route(1.0) == 1 and p.route(0.0) == 4
    q = MaskingPartition.make(3, overlap=0.1)
    assert q.train_interval(1) == pytest.approx((2 / 3 - 1 / 30, 1.0))
    assert q.train_interval(2) == pytest.approx((1 / 3 - 1 / 30, 2 / 3 + 1 / 30))
    t = q.sample_sigma(3, 1000, torch.Generator().manual_seed(0))
    assert 0 < float(t.min()) and float(t.max()) <= 1 / 3 + 1 / 30


def test_forward_process_masks_a_fraction_t():
    tokens = torch.zeros(4, 20_000, dtype=torch.long)
    z = mask_tokens(tokens, torch.tensor([0.0, 0.25, 0.5, 1.0]), 27, torch.Generator().manual_seed(0))
    frac = (z == 27).float().mean(1)
    assert frac[0] == 0 and frac[3] == 1 and abs(frac[1] - 0.25) < 0.01 and abs(frac[2] - 0.5) < 0.01


def test_bpc_of_a_uniform_model_is_log2_27():
    exp = micro_text_exp()
    data = exp.load_data("validation")
    # untrained blocks predict uniformly (zero-initialised read-out): the bound is log2(27) per character
    model = _assembled(exp)
    logits = model.blocks[0](data.tokens[:2], torch.tensor([0.5, 0.5]), None).raw
    assert torch.allclose(logits, torch.zeros_like(logits))
    bpc = bits_per_token(model, data.tokens[:1500], torch.Generator().manual_seed(0), samples_per_block=2)
    assert bpc == pytest.approx(math.log2(27), rel=0.01)
    # every stretch of masking times alone: the integrand is log2(27) at any t; the bound is the terms' mean
    terms = bits_by_block(model, data.tokens[:1500], torch.Generator().manual_seed(0), samples_per_block=2)
    assert len(terms) == exp.partition.blocks
    assert terms == pytest.approx([math.log2(27)] * len(terms), rel=0.02)
    assert sum(terms) / len(terms) == pytest.approx(bpc, rel=1e-9)


def _assembled(exp):
    from dblocks.blocks import AssembledModel

    return AssembledModel(exp.empty_blocks(), exp.partition)


def test_sampling_routes_each_step_to_the_block_owning_its_t():
    exp = micro_text_exp()
    model = _assembled(exp).eval()
    samples = sample_text(model, 3, 12, torch.Generator().manual_seed(0))
    assert samples.shape == (3, 16) and int(samples.max()) < 27  # every position unmasked at t = 0
    assert model.calls == [4, 4, 4]


def test_text_task_needs_a_text_dataset_and_an_mdm_arch():
    with pytest.raises(ConfigError, match="does not fit task='masked_text'; allowed: shakespeare"):
        resolve({**MICRO, "dataset": "digits"})
    with pytest.raises(ConfigError, match="needs one of: MDM-paper, MDM-tiny, MDM-micro"):
        resolve({**MICRO, "arch": "ViT-micro"})


def test_tiny_masked_lm_learns_real_text():
    """End-to-end over all t on the Shakespeare characters: validation BPC falls from the uniform 4.75 by more
    than half a bit (the unigram entropy of the text, the best a context-free model can do, is about 4.07)."""
    exp = micro_text_exp(train={"steps": 200, "batch_size": 32, "lr": 3e-3, "warmup": 10, "log_every": 50})
    model, objective, steps = training_job(exp, "e2e")
    data, val = exp.load_data("train"), exp.load_data("validation")
    before = bits_per_token(as_assembled(model, exp), val.tokens[:400], torch.Generator().manual_seed(1))
    train(model, objective, data, exp.config["train"], seed=0, device=torch.device("cpu"), steps=steps, progress=False)
    after = bits_per_token(as_assembled(model.eval(), exp), val.tokens[:400], torch.Generator().manual_seed(1))
    assert before == pytest.approx(math.log2(27), rel=0.05)  # untrained: uniform
    assert after < math.log2(27) - 0.5 and after < before - 0.4, (before, after)


def test_cli_trains_blocks_assembles_and_reports_bpc(tmp_path):
    cfg = tmp_path / "mdm.yaml"
    cfg.write_text(json.dumps({**MICRO, "name": "mdm-micro"}))
    train_and_assemble_by_cli(cfg, tmp_path, 3)
    for name in ("model", "e2e"):
        assert (
            main(
                [
                    "evaluate",
                    str(tmp_path / f"{name}.safetensors"),
                    "--out",
                    str(tmp_path / f"{name}.json"),
                    "--max-windows",
                    "64",
                    "--sample-steps",
                    "6",
                    "--no-progress",
                ]
            )
            == 0
        )
    record = json.loads((tmp_path / "model.json").read_text())
    assert 3.5 < record["bpc"] < 6 and record["block_calls"] == [2, 2, 2]
    assert 3.8 < record["unigram_bits"] < 4.3  # the floor the bound is read against (the scored windows' letters)
    assert record["layer_evals_per_sample"] == 6  # one layer per block, one block per step
    assert len(record["sample_text"]) == 5 and set(record["sample_text"][0]) <= set("abcdefghijklmnopqrstuvwxyz ")
    # the samples' known-word rate beside held-out text's: an untrained model writes few training-split words
    assert (
        record["train_word_rate_reference"] > 0.8
        and 0 <= record["train_word_rate"] < record["train_word_rate_reference"]
    )
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    assert e2e["block_calls"] == [6] and e2e["layer_evals_per_sample"] == 18
    assert (
        main(
            ["evaluate", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "x.json"), "--bound-samples", "0"]
        )
        == 2
    )
