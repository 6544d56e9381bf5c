"""Forward-Forward on the ViT (dblocks.baselines.forward_forward): the local objective by hand, no gradient
across unit boundaries, and that it learns the digits."""

from __future__ import annotations

import math

import pytest
import torch

from dblocks.baselines import evaluate_accuracy
from dblocks.baselines.forward_forward import (
    ForwardForwardViT,
    ff_loss,
    forward_forward,
    goodness,
    normalise,
    train_forward_forward,
)
from dblocks.data import load_image_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small models, one thread


def _batch(n: int = 4) -> dict:
    torch.manual_seed(0)
    return {"image": torch.randn(n, 1, 8, 8), "label": torch.arange(n) % 10}


def test_goodness_and_loss_by_hand():
    # one example, 2 tokens x 2 channels: (1, 2, 3, 4) -> mean square (1 + 4 + 9 + 16) / 4 = 7.5
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert goodness(h).item() == 7.5
    # threshold 1: positive goodness 3 -> softplus(1 - 3) = log(1 + e^-2) = 0.12692801;
    # negative goodness 0.5 -> softplus(0.5 - 1) = log(1 + e^-0.5) = 0.47407698
    loss = ff_loss(torch.tensor([3.0]), torch.tensor([0.5]), threshold=1.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2)) + math.log1p(math.exp(-0.5)), abs=1e-6)
    # normalised tokens have RMS 1: (3, 4) -> (3, 4) / sqrt(12.5)
    assert torch.allclose(normalise(torch.tensor([[3.0, 4.0]])), torch.tensor([[3.0, 4.0]]) / math.sqrt(12.5))


def test_label_token_is_the_one_hot_label():
    model = ForwardForwardViT("ViT-micro", (1, 8, 8), 10)
    tokens = model.embed(torch.zeros(2, 1, 8, 8), torch.tensor([3, 7])) - model.pos_embed
    assert torch.allclose(tokens[:, 0], torch.nn.functional.one_hot(torch.tensor([3, 7]), 32).float(), atol=1e-6)
    with pytest.raises(ValueError, match="width >= 100"):
        ForwardForwardViT("ViT-micro", (1, 8, 8), 100)


def test_paper_vit_runs_on_cifar100_shapes():
    model = ForwardForwardViT("ViT-paper", (3, 32, 32), 100).eval()
    assert len(model.units) == 12 and model.classify(torch.zeros(2, 3, 32, 32)).shape == (2,)
    with pytest.raises(ValueError, match="does not divide depth 12"):
        ForwardForwardViT("ViT-paper", (3, 32, 32), 100, layers_per_unit=5)


def test_negative_labels_are_wrong_and_cover_every_other_class():
    model = ForwardForwardViT("ViT-micro", (1, 8, 8), 10)
    labels = torch.zeros(2000, dtype=torch.long)
    negative = model.draw({"label": labels}, torch.Generator().manual_seed(0))["negative"]
    assert not bool((negative == labels).any()) and set(negative.tolist()) == set(range(1, 10))


@pytest.mark.parametrize("layers_per_unit", [1, 4])
def test_no_gradient_crosses_a_unit_boundary(layers_per_unit):
    model = ForwardForwardViT("ViT-tiny", (1, 8, 8), 10, layers_per_unit=layers_per_unit)
    batch = model.draw(_batch(), torch.Generator().manual_seed(0))
    # every unit after the first receives a tensor outside autograd's graph
    received = []
    hooks = [
        unit.register_forward_pre_hook(lambda m, args: received.append(args[0].requires_grad)) for unit in model.units
    ]
    losses = model.unit_losses(batch["image"], batch["label"], batch["negative"])
    for hook in hooks:
        hook.remove()
    assert received == [True] + [False] * (len(model.units) - 1)
    # each unit's loss has a gradient on its own parameters only (the stem's belong to the first unit)
    stem = [model.patch_embed.weight, model.patch_embed.bias, model.pos_embed]
    groups = [stem + list(model.units[0].parameters())] + [list(u.parameters()) for u in model.units[1:]]
    everything = [p for group in groups for p in group]
    for k, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, everything, allow_unused=True, retain_graph=True)
        own = {id(p) for p in groups[k]}
        for p, g in zip(everything, grads):
            if id(p) not in own:
                assert g is None or not g.any(), f"unit {k}'s loss reaches another unit's parameter"
        assert any(g is not None and g.any() for p, g in zip(everything, grads) if id(p) in own)
    # and the total's gradient is the sum of the units' own: a backward hook on a later unit's output sees
    # only that unit's loss
    seen = []
    outputs = list(model.unit_outputs(batch["image"], batch["label"]))
    outputs[1].register_hook(lambda g: seen.append(g.clone()))
    sum(goodness(h).sum() for h in outputs).backward()
    assert len(seen) == 1 and torch.allclose(seen[0], 2 * outputs[1].detach() / outputs[1][0].numel())


def test_forward_forward_learns_digits():
    """ViT-micro (3 layers, width 32), 300 steps of batch 64. Measured: 80.0 % test accuracy, chance 10 %."""
    train, test = load_image_dataset("digits", "train"), load_image_dataset("digits", "test")
    state = train_forward_forward("ViT-micro", train, steps=300)
    model = forward_forward("ViT-micro", train.shape, 10, state)
    assert evaluate_accuracy(model, test) > 0.6
