"""Autoregressive DiffusionBlocks transformer and its next-token baseline: the clean/noisy attention mask,
learning, generation cost (one block per denoising step), top-p, MAUVE and the CLI round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dblocks.blocks import AssembledModel
from dblocks.cli import main
from dblocks.config import resolve
from dblocks.experiment import Experiment
from dblocks.jobs import training_job
from dblocks.layers import clean_noisy_mask
from dblocks.metrics.mauve import mauve_from_features, minilm_features, reference_lm_features
from dblocks.text_generation import (
    continuation_nll,
    generate_baseline,
    generate_blockwise,
    next_token_quality,
    top_p_filter,
)
from dblocks.train import train
from tests.conftest import train_and_assemble_by_cli, train_job_in_process

MICRO = {
    "task": "ar_text",
    "arch": "AR-micro",
    "dataset": "shakespeare",
    "blocks": 4,
    "overlap": 0.1,
    "device": "cpu",
    "train": {"steps": 6, "batch_size": 8, "warmup": 2, "log_every": 3, "checkpoint_every": 3},
}


def micro_ar_exp(**overrides) -> Experiment:
    return Experiment(resolve(MICRO, [overrides]))


@pytest.fixture(scope="module")
def trained_baseline():
    """The end-to-end next-token model, trained briefly once for the tests of this module."""
    exp = micro_ar_exp(train={"steps": 100, "batch_size": 16, "lr": 5e-3, "warmup": 10, "log_every": 25})
    model, result = train_job_in_process(exp, "e2e")
    return exp, model.eval(), result


def test_clean_noisy_mask_structure():
    t = 6
    m = clean_noisy_mask(t)
    clean_to_clean, noisy_to_clean, noisy_to_noisy = m[:t, :t], m[t:, :t], m[t:, t:]
    assert torch.equal(clean_to_clean, torch.ones(t, t, dtype=torch.bool).tril())  # causal
    assert not m[:t, t:].any()  # clean never sees noisy
    for i in range(t):
        assert noisy_to_clean[i, :i].all() and not noisy_to_clean[i, i:].any()  # clean < i only
        assert noisy_to_noisy[i, i] and noisy_to_noisy[i].sum() == 1  # and itself


def test_ar_models_are_llama_style_rotary_rmsnorm_swiglu():
    """docs/method.md §5's Llama-style transformer under adaLN-Zero: RMSNorm, SwiGLU, no biases, rotary
    positions in every layer (period = context, so noisy i sits at clean i's position), none added by the stem."""
    from torch import nn

    from dblocks.layers import AdaLNZeroLayer, SwiGLU

    for method in ("blockwise", "e2e"):
        model = micro_ar_exp().block(1) if method == "blockwise" else micro_ar_exp().e2e()
        layers = [m for m in model.modules() if isinstance(m, AdaLNZeroLayer)]
        assert layers and all(
            isinstance(m.norm1, nn.RMSNorm)
            and isinstance(m.mlp, SwiGLU)
            and m.attn.rope_period == 24
            and m.attn.qkv.bias is None
            for m in layers
        )
        assert not any(name.endswith("pos_embed") for name, _ in model.named_parameters())


def test_a_noisy_position_never_sees_its_own_or_a_future_clean_token():
    exp = micro_ar_exp()
    block = exp.block(1)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():  # leave the zero-initialised (identity) state: every path is live
            p.normal_(0, 0.05)
    tokens = torch.randint(0, 257, (1, 24))
    z = torch.randn(1, 24, 32)
    sigma = torch.tensor([1.0])
    base = block(z, sigma, tokens).raw
    k = 10
    changed = tokens.clone()
    changed[0, k] = (changed[0, k] + 1) % 257
    moved = (block(z, sigma, changed).raw - base).abs().amax(-1)[0]
    assert moved[: k + 1].max() == 0  # noisy 0..k see clean < k+1 at most... never clean k itself
    assert moved[k + 1 :].min() > 0  # later positions do see it
    z2 = z.clone()
    z2[0, 3] += 1.0
    moved = (block(z2, sigma, tokens).raw - base).abs().amax(-1)[0]
    assert moved[3] > 0 and moved[torch.arange(24) != 3].max() == 0  # noisy slots are independent


def test_baseline_learns_next_tokens(trained_baseline):
    exp, model, result = trained_baseline
    assert result.losses[-1][1] < 0.6 * math.log(257)
    quality = next_token_quality(model, exp.load_data("validation").tokens[:100], torch.Generator())
    assert quality["next_token_bits"] < math.log2(257) - 3.0


def test_blockwise_blocks_learn_and_generation_runs_one_block_per_step():
    exp = micro_ar_exp(train={"steps": 60, "batch_size": 16, "lr": 3e-3, "warmup": 5, "log_every": 10})
    data = exp.load_data("train")
    blocks = []
    for b in (1, 4):  # the highest- and the lowest-noise block
        model, objective, steps = training_job(exp, "blockwise", b)
        result = train(
            model, objective, data, exp.config["train"], seed=b, device=torch.device("cpu"), steps=steps, progress=False
        )
        assert result.losses[-1][1] < 0.7 * result.losses[0][1], result.losses
        blocks.append(model)
    model = AssembledModel([blocks[0], exp.block(2), exp.block(3), blocks[1]], exp.partition).eval()
    prompts = exp.load_data("validation").tokens[:3, :8]
    out = generate_blockwise(model, prompts, 5, torch.Generator().manual_seed(0))
    assert out.shape == (3, 5) and model.calls == [5, 5, 5, 5]  # B = 4 steps per token, each block once
    quality = next_token_quality(model, exp.load_data("validation").tokens[:8], torch.Generator())
    assert 0 <= quality["next_token_accuracy"] <= 1 and math.isfinite(quality["next_token_bits"])


@pytest.fixture(scope="module")
def trained_blocks():
    """All four block-wise blocks of AR-micro, trained briefly and assembled."""
    exp = micro_ar_exp(train={"steps": 60, "batch_size": 16, "lr": 3e-3, "warmup": 5, "log_every": 10})
    data = exp.load_data("train")
    blocks = []
    for b in range(1, 5):
        model, objective, steps = training_job(exp, "blockwise", b)
        train(
            model, objective, data, exp.config["train"], seed=b, device=torch.device("cpu"), steps=steps, progress=False
        )
        blocks.append(model)
    return exp, AssembledModel(blocks, exp.partition).eval()


def test_blockwise_next_token_bits_score_the_models_prediction_not_the_chains_confidence(trained_blocks):
    """Plain next-token bits of the block-wise model are the cross-entropy of its next-token distribution (the
    highest-noise block at sigma_max), as the baseline's are: a trained model beats a uniform guess. The last
    block's logits after the chain only read off the token the chain committed to (near-certain, often wrong):
    their cross-entropy, once reported as the next-token bits, is above log2(257) and is now chain_bits."""
    exp, model = trained_blocks
    val = exp.load_data("validation").tokens[:64]
    quality = next_token_quality(model, val, torch.Generator().manual_seed(0))
    assert quality["next_token_bits"] < math.log2(257) - 2.0, quality
    with torch.no_grad():  # by hand: block 1 at sigma_max, whose noisy slots carry nothing of their tokens
        z = 80.0 * torch.randn(len(val), 24, 32, generator=torch.Generator().manual_seed(1))
        logits = model.blocks[0](z, torch.tensor([80.0]), val).raw[:, 1:]
    by_hand = torch.nn.functional.cross_entropy(logits.transpose(1, 2), val[:, 1:]).item() / math.log(2)
    assert quality["next_token_bits"] == pytest.approx(by_hand, abs=0.05)
    assert quality["chain_bits"] > quality["next_token_bits"] and 0 <= quality["chain_accuracy"] <= 1


def test_blockwise_sampler_steps_and_start_noise(trained_blocks):
    """More Euler steps per token walk the same equal-mass grid (8 = 2 per block, each block twice); a start
    noise of 0 makes the chain deterministic, whatever the generator."""
    exp, model = trained_blocks
    prompts = exp.load_data("validation").tokens[:3, :8]
    model.calls = [0] * 4
    out = generate_blockwise(model, prompts, 5, torch.Generator().manual_seed(0), steps=8)
    assert out.shape == (3, 5) and model.calls == [10, 10, 10, 10]
    a, b = (generate_blockwise(model, prompts, 5, torch.Generator().manual_seed(s), start_noise=0.0) for s in (0, 1))
    assert torch.equal(a, b)
    assert list(reversed(model.partition.boundaries)) == exp.partition.dist.quantile_grid(4)


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])
    kept = torch.isfinite(top_p_filter(logits, 0.75))[0].tolist()
    assert kept == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.5))[0].tolist() == [True, False, False, False]


def test_generation_and_judge(trained_baseline):
    exp, model, _ = trained_baseline
    prompts = exp.load_data("validation").tokens[:4, :10]
    cont = generate_baseline(model, prompts, 8, torch.Generator().manual_seed(0))
    assert cont.shape == (4, 8)
    nll = continuation_nll(model, prompts, cont)
    assert 0 < nll < math.log(257)
    shuffled = cont[:, torch.randperm(8, generator=torch.Generator().manual_seed(1))]
    assert continuation_nll(model, prompts, exp.load_data("validation").tokens[:4, 10:18]) < math.log(257)
    assert shuffled.shape == cont.shape


def test_mauve_is_near_one_against_itself_and_near_zero_against_shuffled_characters(trained_baseline):
    exp, model, _ = trained_baseline
    val = exp.load_data("validation")
    windows = val.tokens[:60]
    gen = torch.Generator().manual_seed(0)
    shuffled = torch.stack([w[torch.randperm(len(w), generator=gen)] for w in windows])
    text, shuffled_text = [val.decode(w) for w in windows], [val.decode(w) for w in shuffled]
    real = minilm_features(text)
    assert mauve_from_features(real, real) > 0.99
    assert mauve_from_features(minilm_features(shuffled_text), real) < 0.05
    lm = reference_lm_features(model, windows)
    assert lm.shape == (60, 64) and mauve_from_features(lm, lm) > 0.99


def test_cli_trains_assembles_and_evaluates_mauve_and_gen_ppl(tmp_path):
    cfg = tmp_path / "ar.yaml"
    cfg.write_text(json.dumps({**MICRO, "name": "ar-micro"}))
    train_and_assemble_by_cli(cfg, tmp_path, 4)
    common = [
        "--judge",
        str(tmp_path / "e2e.safetensors"),
        "--prompts",
        "6",
        "--continuations",
        "2",
        "--new-tokens",
        "6",
        "--max-windows",
        "8",
        "--mauve-features",
        "reference-lm",
    ]
    for name in ("model", "e2e"):
        assert (
            main(
                [
                    "evaluate",
                    str(tmp_path / f"{name}.safetensors"),
                    "--out",
                    str(tmp_path / f"{name}.json"),
                    "--samples-md",
                    str(tmp_path / f"{name}-samples.md"),
                    *common,
                ]
            )
            == 0
        )
    record = json.loads((tmp_path / "model.json").read_text())
    assert record["block_calls"] == [6, 6, 6, 6] and record["layer_evals_per_token"] == 4
    # samples beside the numbers: the first prompts, each with its first continuation and the real one
    shown = (tmp_path / "model-samples.md").read_text()
    assert len(record["samples"]) == 5 and shown.startswith("# Samples: ar-micro, blockwise")
    for k, sample in enumerate(record["samples"], 1):
        assert len(sample["reference"]) > 0 and f"{k}. prompt `" in shown
    assert shown.count("   - generated: `") == shown.count("   - real: `") == 5
    assert 0 <= record["mauve_reference"] <= 1 and record["gen_ppl_reference"] > 1
    assert "own end-to-end reference LM" in record["mauve_reference_label"]
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    assert e2e["sampler"] == "top-p 0.95" and "next_token_bits" in e2e
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "model.safetensors"),
                "--out",
                str(tmp_path / "x.json"),
                "--judge",
                str(tmp_path / "model.safetensors"),
            ]
        )
        == 2
    )


def test_online_judges_fail_cleanly_offline(tmp_path):
    """Llama-2 / GPT2-XL need the hub: offline the evaluation stops with one line and exit code 2."""
    cfg = tmp_path / "ar.yaml"
    cfg.write_text(json.dumps({**MICRO, "name": "ar-micro", "train": {**MICRO["train"], "steps": 2}}))
    assert (
        main(["train-baseline", "--config", str(cfg), "--no-progress", "--out", str(tmp_path / "e.safetensors")]) == 0
    )
    args = [
        "evaluate",
        str(tmp_path / "e.safetensors"),
        "--out",
        str(tmp_path / "m.json"),
        "--prompts",
        "2",
        "--continuations",
        "1",
        "--new-tokens",
        "2",
        "--max-windows",
        "2",
        "--mauve-features",
    ]
    assert main([*args, "--hf-judges", "gpt3"]) == 2
    assert main([*args, "--hf-judges", "gpt2-xl"]) == 2
    assert not (tmp_path / "m.json").exists()
