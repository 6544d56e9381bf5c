"""The KV cache of text generation (dblocks.layers.KVCache): cached generation gives the tokens and logits of the
full recompute (``cache=False``) for the end-to-end AR baseline, the block-wise AR model (default grid and 2B
steps) and Huginn (both methods), while every layer call after the prompt computes O(1) positions and block-wise
sampling still runs one block per step. Micro models with every parameter perturbed (the zero-initialised
adaLN gates would otherwise make every layer the identity and hide a wrong key or mask)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dblocks.blocks import AssembledModel
from dblocks.config import resolve
from dblocks.experiment import Experiment
from dblocks.layers import AdaLNZeroLayer, KVCache
from dblocks.models import ARCHITECTURES
from dblocks.text_generation import (
    _recurrent_logits,
    _recurrent_start,
    denoised_logits,
    generate_baseline,
    generate_blockwise,
    generate_recurrent,
    recurrent_depth_logits,
)

# B = 2: two layers per block, so a wrong clean key in the first layer reaches the noisy slot through the second
AR = {"task": "ar_text", "arch": "AR-micro", "dataset": "shakespeare", "blocks": 2, "overlap": 0.1, "device": "cpu"}
HUGINN = {"task": "recurrent_text", "arch": "Huginn-micro", "dataset": "shakespeare", "blocks": 1, "device": "cpu"}
PROMPT, NEW = 7, 6


def live(model, seed: int = 0):
    """``model`` with every parameter moved off its initial value, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def prompts(n: int = 3) -> torch.Tensor:
    return torch.randint(0, 257, (n, PROMPT), generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=["llama", "dit"])
def ar_exp(request, monkeypatch):
    """AR-micro, and its DiT-style twin (learned positions added by the stem instead of rotary ones)."""
    if request.param == "dit":
        monkeypatch.setitem(
            ARCHITECTURES, "AR-micro-dit", dataclasses.replace(ARCHITECTURES["AR-micro"], layer_style="dit")
        )
        return Experiment(resolve({**AR, "arch": "AR-micro-dit"}))
    return Experiment(resolve(AR))


class RowCount:
    """Positions (rows of h) each AdaLNZeroLayer call of ``module`` computes, call by call."""

    def __init__(self, module) -> None:
        self.rows: list[int] = []
        self.handles = [
            m.register_forward_pre_hook(lambda _, args: self.rows.append(args[0].shape[1]))
            for m in module.modules()
            if isinstance(m, AdaLNZeroLayer)
        ]

    def __enter__(self):
        return self

    def __exit__(self, *_):
        for h in self.handles:
            h.remove()


def per_token(rows: list[int], tokens: int) -> list[list[int]]:
    calls = len(rows) // tokens
    assert calls * tokens == len(rows)
    return [rows[i * calls : (i + 1) * calls] for i in range(tokens)]


def test_baseline_cache_matches_full_recompute(ar_exp):
    model = live(ar_exp.e2e())
    with RowCount(model) as count:
        cached = generate_baseline(model, prompts(), NEW, torch.Generator().manual_seed(1))
    full = generate_baseline(model, prompts(), NEW, torch.Generator().manual_seed(1), cache=False)
    assert torch.equal(cached, full)
    calls = per_token(count.rows, NEW)
    assert calls[0] == [PROMPT] * 4 and all(c == [1] * 4 for c in calls[1:])  # the prompt once, then 1 position

    tokens, kv = torch.cat([prompts(), cached], dim=1), KVCache()
    with torch.no_grad():
        whole = model.network(None, tokens, None)
        kv.advance(torch.arange(PROMPT))
        pieces = [model.network(None, tokens[:, :PROMPT], None, kv)]
        for i in range(PROMPT, tokens.shape[1]):
            kv.advance(torch.tensor([i]))
            pieces.append(model.network(None, tokens[:, i : i + 1], None, kv))
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [None, 4])
def test_blockwise_cache_matches_full_recompute_one_block_per_step(ar_exp, steps):
    model = live(AssembledModel(ar_exp.empty_blocks(), ar_exp.partition))
    with RowCount(model) as count:
        cached = generate_blockwise(model, prompts(), NEW, torch.Generator().manual_seed(1), steps)
    calls, model.calls = model.calls, [0] * 2
    full = generate_blockwise(model, prompts(), NEW, torch.Generator().manual_seed(1), steps, cache=False)
    assert torch.equal(cached, full)
    per_block = 1 if steps is None else steps // 2
    assert calls == model.calls == [per_block * NEW] * 2  # each step runs only the block owning its sigma
    layer_calls = per_token(count.rows, NEW)
    assert all(len(c) == per_block * 4 for c in layer_calls)  # the two layers of one block per step
    # the first token computes the prompt's clean tokens and its noisy slot, then the last token and the slot
    assert set(layer_calls[0]) == {PROMPT + 1} and all(set(c) == {2} for c in layer_calls[1:])


def test_blockwise_cached_logits_agree(ar_exp):
    """The last block's logits of noisy slot k, cached and recomputed over the whole context, token by token."""
    model = live(AssembledModel(ar_exp.empty_blocks(), ar_exp.partition))
    tokens = torch.zeros(3, 24, dtype=torch.long)
    tokens[:, :PROMPT] = prompts()
    kv = KVCache()
    for k in range(PROMPT, PROMPT + NEW):
        whole = denoised_logits(model, tokens, torch.Generator().manual_seed(k))[:, k]
        start = kv.length
        kv.advance(torch.cat([torch.arange(start, k), torch.tensor([24 + k])]), keep=k - start)
        cached = denoised_logits(model, tokens[:, start:k], torch.Generator().manual_seed(k), cache=kv)[:, -1]
        torch.testing.assert_close(cached, whole, rtol=1e-4, atol=1e-4)
        tokens[:, k] = whole.argmax(-1)


@pytest.mark.parametrize("method", ["e2e", "blockwise"])
def test_huginn_cache_matches_full_recompute(method):
    exp = Experiment(resolve(HUGINN))
    model = live(exp.e2e() if method == "e2e" else AssembledModel([exp.block(1)], exp.partition))
    k = 3
    with RowCount(model) as count:
        cached = generate_recurrent(model, prompts(), NEW, k, torch.Generator().manual_seed(1))
    full = generate_recurrent(model, prompts(), NEW, k, torch.Generator().manual_seed(1), cache=False)
    assert torch.equal(cached, full)
    calls = per_token(count.rows, NEW)
    per = 2 + 4 * k + 2 if method == "e2e" else k * (2 + 4 + 2)  # prelude, recurrent block, coda
    assert calls[0] == [PROMPT] * per and all(c == [1] * per for c in calls[1:])
    # every position's start is drawn once and the first token's equals the one-shot logits' draw: the first
    # token is the one the whole-sequence function gives
    if method == "blockwise":
        first = recurrent_depth_logits(model, prompts(), k, torch.Generator().manual_seed(1))[:, -1].argmax(-1)
        assert torch.equal(cached[:, 0], first)

    tokens = torch.cat([prompts(), cached], dim=1)
    starts = _recurrent_start(model, 3, tokens.shape[1], k, torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = _recurrent_logits(model, tokens, starts, k)
        kv = KVCache()
        kv.advance(torch.arange(PROMPT))
        pieces = [_recurrent_logits(model, tokens[:, :PROMPT], starts[:, :PROMPT], k, kv)]
        for i in range(PROMPT, tokens.shape[1]):
            kv.advance(torch.tensor([i]))
            pieces.append(_recurrent_logits(model, tokens[:, i : i + 1], starts[:, i : i + 1], k, kv))
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-4, atol=1e-4)


def test_a_token_making_other_calls_is_caught():
    """Runs are told apart by call order; a token whose calls differ from the earlier ones' cannot reuse them."""
    model = live(Experiment(resolve(AR)).e2e())
    kv = KVCache()
    with torch.no_grad():
        kv.advance(torch.arange(PROMPT))
        model.network(None, prompts(), None, kv)
        kv.advance(torch.tensor([PROMPT]))
        model.network(None, prompts()[:, :1], None, kv)
        with pytest.raises(RuntimeError, match="out of step"):
            model.network(None, prompts()[:, :1], None, kv)  # a second run this token, which no earlier token made
