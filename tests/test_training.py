"""Block independence, reproducibility, paper mode, end-to-end baselines and a real learning check."""

from __future__ import annotations

import pytest
import torch

from dblocks.blocks import AssembledModel
from dblocks.errors import TrainingError
from dblocks.experiment import Experiment
from dblocks.sample import classify
from dblocks.train import Objective, block_objective, paper_mode_objective, train
from tests.conftest import micro_config, train_killed_at_loss

CPU = torch.device("cpu")


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("task", ["classification", "generation"])
def test_training_block_b_touches_nothing_else(task, optimizer_params):
    exp = Experiment(micro_config(task=task))
    blocks = [exp.block(b) for b in (1, 2, 3)]
    before = [_state(m) for m in blocks]
    seen = optimizer_params
    data = exp.load_data("train")

    train(
        blocks[1],
        block_objective(blocks[1], exp.partition, 2),
        data,
        exp.config["train"],
        seed=1,
        device=CPU,
        progress=False,
    )

    # the optimizer holds exactly block 2's parameters
    assert len(seen) == 1
    assert {id(p) for p in seen[0]} == {id(p) for p in blocks[1].parameters()}
    # the other blocks are bit-identical and received no gradient
    for i in (0, 2):
        after = blocks[i].state_dict()
        assert all(torch.equal(before[i][k], after[k]) for k in after)
        assert all(p.grad is None for p in blocks[i].parameters())
    # and block 2 did learn something
    assert any(not torch.equal(before[1][k], v) for k, v in blocks[1].state_dict().items())


def test_block_sigmas_stay_in_the_block_interval(vit_exp, monkeypatch):
    seen = []
    blk = vit_exp.block(2)
    real_forward = type(blk).forward

    def spy(self, z, sigma, cond):
        seen.append(sigma.clone())
        return real_forward(self, z, sigma, cond)

    monkeypatch.setattr(type(blk), "forward", spy)
    train(
        blk,
        block_objective(blk, vit_exp.partition, 2),
        vit_exp.load_data("train"),
        vit_exp.config["train"],
        seed=0,
        device=CPU,
        progress=False,
    )
    lo, hi = vit_exp.partition.train_interval(2)
    sigmas = torch.cat(seen)
    assert len(sigmas) == 8 * 16
    assert sigmas.min() >= lo * (1 - 1e-6) and sigmas.max() <= hi * (1 + 1e-6)


def test_building_a_block_builds_only_that_block(vit_exp):
    blk = vit_exp.block(2)
    assert len(blk.layers) == vit_exp.split[1] == 1
    whole = vit_exp.e2e()
    layer_params = sum(p.numel() for p in blk.layers.parameters())
    assert layer_params * vit_exp.arch.spec.depth == sum(p.numel() for p in whole.layers.parameters())


def _train_block(exp, b, seed=5):
    m = exp.block(b)
    train(
        m,
        block_objective(m, exp.partition, b),
        exp.load_data("train"),
        exp.config["train"],
        seed=seed,
        device=CPU,
        progress=False,
    )
    return m.state_dict()


@pytest.mark.parametrize("task", ["classification", "generation"])
def test_same_seed_gives_bit_identical_block_weights(task):
    exp = Experiment(micro_config(task=task))
    a, b = _train_block(exp, 1), _train_block(exp, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = _train_block(exp, 1, seed=6)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_after_interruption_is_bit_identical(vit_exp, tmp_path):
    data, cfg = vit_exp.load_data("train"), vit_exp.config["train"]
    reference = _train_block(vit_exp, 1)

    state = tmp_path / "block-1.state.safetensors"
    m = vit_exp.block(1)
    train_killed_at_loss(m, block_objective(m, vit_exp.partition, 1), data, cfg, state)
    assert state.exists()

    resumed = vit_exp.block(1)
    result = train(
        resumed,
        block_objective(resumed, vit_exp.partition, 1),
        data,
        cfg,
        seed=5,
        device=CPU,
        state_path=state,
        progress=False,
    )
    assert result.resumed_from == 4
    after = resumed.state_dict()
    assert all(torch.equal(reference[k], after[k]) for k in after)


def test_a_training_state_of_another_config_is_dropped_not_resumed(vit_exp, tmp_path, capsys):
    """A job killed under one config and started again under another (the workflow reruns it: its experiment
    changed) must not resume the former's state, whose shapes match and whose optimizer holds the former
    learning rate; the same config still resumes."""
    data, cfg = vit_exp.load_data("train"), vit_exp.config["train"]
    state = tmp_path / "block-1.state.safetensors"

    def run(config, tag):
        m = vit_exp.block(1)
        objective = block_objective(m, vit_exp.partition, 1)
        return train(m, objective, data, config, seed=5, device=CPU, state_path=state, progress=False, state_tag=tag)

    m = vit_exp.block(1)
    train_killed_at_loss(m, block_objective(m, vit_exp.partition, 1), data, cfg, state, tag="a" * 16)
    assert run({**cfg, "lr": 2 * cfg["lr"]}, "b" * 16).resumed_from == 0
    assert "interrupted run of another config (aaaaaaaaaaaaaaaa)" in capsys.readouterr().err
    m = vit_exp.block(1)
    train_killed_at_loss(m, block_objective(m, vit_exp.partition, 1), data, cfg, state, tag="a" * 16)
    assert run(cfg, "a" * 16).resumed_from == 4


def test_nan_loss_stops_training(vit_exp):
    m = vit_exp.block(1)
    with pytest.raises(TrainingError, match="loss is nan"):
        train(
            m,
            Objective(lambda batch: torch.tensor(float("nan"), requires_grad=True)),
            vit_exp.load_data("train"),
            vit_exp.config["train"],
            seed=0,
            device=CPU,
            progress=False,
        )


def test_paper_mode_shares_stem_and_head_and_samples_blocks(vit_exp, optimizer_params):
    model = vit_exp.shared_blocks()
    assert model.blocks[0].stem is model.blocks[2].stem and model.blocks[0].head is model.blocks[1].head
    before = _state(model)
    seen = optimizer_params
    cfg = vit_exp.config["train"]
    picked = []
    objective = paper_mode_objective(model)

    def spy(batch, gen):
        state = gen.get_state()
        picked.append(int(torch.randint(3, (1,), generator=gen)))
        gen.set_state(state)
        return objective.draw(batch, gen)

    train(model, Objective(objective.loss, spy), vit_exp.load_data("train"), cfg, seed=0, device=CPU, progress=False)
    # one optimizer over the union (shared parameters counted once)
    assert {id(p) for p in seen[0]} == {id(p) for p in model.parameters()}
    after = model.state_dict()
    changed_blocks = {int(k.split(".")[1]) for k in after if ".layers." in k and not torch.equal(before[k], after[k])}
    assert changed_blocks == set(picked)  # only the sampled blocks' own layers moved
    # the shared head and stem are trained on every step, whichever block was picked
    for key in ("blocks.0.head.final.linear.weight", "blocks.0.stem.target_embed.weight"):
        assert not torch.equal(before[key], after[key])


def test_end_to_end_classifier_is_a_plain_vit(vit_exp):
    model = vit_exp.e2e()
    assert len(model.layers) == vit_exp.arch.spec.depth
    assert not model.stem.noisy_target
    images = vit_exp.load_data("test").images[:5]
    assert model.network(None, images, None).shape == (5, 10)


def test_blockwise_vit_learns_digits():
    """A tiny ViT trained block-wise on digits beats chance (10%) by a wide margin on held-out data."""
    exp = Experiment(
        micro_config(
            arch="ViT-tiny", blocks=3, train={"steps": 400, "batch_size": 64, "lr": 2e-3, "warmup": 20, "log_every": 50}
        )
    )
    data, test = exp.load_data("train"), exp.load_data("test")
    blocks = []
    for b in (1, 2, 3):
        m = exp.block(b)
        train(m, block_objective(m, exp.partition, b), data, exp.config["train"], seed=b, device=CPU, progress=False)
        blocks.append(m)
    model = AssembledModel(blocks, exp.partition)
    accuracy = (classify(model, test.images, torch.Generator().manual_seed(0)) == test.labels).float().mean()
    assert model.calls == [1, 1, 1]
    assert accuracy > 0.5, f"block-wise accuracy {accuracy:.3f}"
