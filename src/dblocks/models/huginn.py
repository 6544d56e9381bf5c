"""Huginn-style recurrent depth (Geiping et al. 2025): prelude (2 layers) -> a recurrent block (4 layers,
applied r times to a latent state s together with the prelude's output e through an adapter) -> coda
(2 layers) -> next-token logits. All layers are causal adaLN-Zero layers (dblocks.layers) of the architecture's
layer style: Llama layers (Huginn's own) carry rotary positions and the stem adds none; DiT layers get learned
absolute positions from the stem, which a narrow model learns slowly (Huginn-tiny with them stayed near the
byte unigram entropy after its training budget).

The parts fit dblocks.blocks.BlockDenoiser: the stem holds the token embedding, the prelude and the adapter;
``layers`` are the recurrent block; the head holds the coda and the read-out. Two ways to run them:

* DiffusionBlocks (``noisy_target=True``): s is the noisy next-token embedding at every position (EDM),
  the recurrent block runs ONCE per denoiser call conditioned on sigma; training is one forward pass per
  step with sigma from the whole range, and inference keeps K iterations as K Euler steps from sigma_max.
* End-to-end baseline (``noisy_target=False``): s_0 is random, r ~ a log-normal Poisson around the mean
  recurrence, and gradients flow through the last ``backprop_depth`` iterations only (truncated BPTT):
  :func:`recurrent_logits`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dblocks.layers import AdaLNZeroLayer, FinalLayer, KVCache, NoiseEmbedding


def _causal_layers(count: int, width: int, heads: int, mlp_ratio: float, context: int, style: str) -> nn.ModuleList:
    mask = torch.ones(context, context, dtype=torch.bool).tril()
    rope = context if style == "llama" else None
    layers = nn.ModuleList(AdaLNZeroLayer(width, heads, mlp_ratio, style=style, rope_period=rope) for _ in range(count))
    for layer in layers:
        layer.attn_mask = mask
    return layers


class HuginnStem(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        context: int,
        width: int,
        heads: int,
        target_dim: int,
        noisy_target: bool,
        prelude: int = 2,
        mlp_ratio: float = 4.0,
        style: str = "dit",
    ) -> None:
        super().__init__()
        self.token_embed = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        if style == "llama":
            self.pos_embed = None  # rotary positions in the layers
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, context, width))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.prelude = _causal_layers(prelude, width, heads, mlp_ratio, context, style)
        self.adapter = nn.Linear(2 * width, width)  # [s; e] -> the recurrent block's input
        self.noisy_target = noisy_target
        self.width = width
        if noisy_target:
            self.target_embed = nn.Linear(target_dim, width)
            self.noise_embed = NoiseEmbedding(width)
        else:
            self.constant_cond = nn.Parameter(torch.zeros(1, width))

    def condition(self, tokens: torch.Tensor, c_noise: torch.Tensor | None) -> torch.Tensor:
        if self.noisy_target:
            return self.noise_embed(c_noise)
        return self.constant_cond.expand(tokens.shape[0], -1)

    def encode(self, tokens: torch.Tensor, c: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """e: the prelude's output, computed once per sequence (with a KV cache: for its current rows,
        ``tokens`` being theirs)."""
        at = slice(None, tokens.shape[1]) if cache is None else cache.positions
        e = self.token_embed(tokens)
        if self.pos_embed is not None:
            e = e + self.pos_embed[:, at]
        for layer in self.prelude:
            e = layer(e, c, cache)
        return e

    def inject(self, state: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.adapter(torch.cat([state, e], dim=-1))

    def forward(self, z_in, tokens, c_noise, cache=None):
        """DiffusionBlocks mode: the recurrent block's input from the noisy target embeddings."""
        c = self.condition(tokens, c_noise)
        return self.inject(self.target_embed(z_in), self.encode(tokens, c, cache)), c


class HuginnHead(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        context: int,
        width: int,
        heads: int,
        coda: int = 2,
        mlp_ratio: float = 4.0,
        style: str = "dit",
    ) -> None:
        super().__init__()
        self.coda = _causal_layers(coda, width, heads, mlp_ratio, context, style)
        self.final = FinalLayer(width, vocab_size)

    def forward(self, h, c, cache=None):
        for layer in self.coda:
            h = layer(h, c, cache)
        return self.final(h, c)


def sample_recurrence(mean: int, generator: torch.Generator, sigma: float = 0.5) -> int:
    """r ~ 1 + Poisson(exp(tau)), tau ~ N(log(mean - 1) - sigma^2/2, sigma): Huginn's log-normal Poisson, mean r."""
    if mean <= 1:
        return 1
    tau = torch.randn(1, generator=generator).item() * sigma + math.log(mean - 1) - sigma**2 / 2
    return 1 + int(torch.poisson(torch.tensor([math.exp(tau)]), generator=generator).item())


def recurrent_logits(
    model,
    tokens: torch.Tensor,
    recurrence: int,
    backprop_depth: int | None = None,
    generator: torch.Generator | None = None,
    state: torch.Tensor | None = None,
    cache: KVCache | None = None,
) -> torch.Tensor:
    """End-to-end Huginn: prelude once, the recurrent block ``recurrence`` times from a random state (``state``,
    else drawn from ``generator``), coda. Only the last ``backprop_depth`` iterations are differentiated
    (truncated BPTT; None: all). With a KV cache (generation), ``tokens`` and ``state`` are its current rows:
    iteration i's calls are the recurrent layers' i-th run, which keeps the keys of iteration i."""
    stem, head = model.stem, model.head
    c = stem.condition(tokens, None)
    e = stem.encode(tokens, c, cache)
    device = tokens.device
    if state is None:
        state = torch.randn(*e.shape, generator=generator, device="cpu" if generator is not None else device)
    state = state.to(device)
    frozen = recurrence - (backprop_depth if backprop_depth is not None else recurrence)
    for i in range(recurrence):
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= frozen):
            h = stem.inject(state, e)
            for layer in model.layers:
                h = layer(h, c, cache)
            state = h
    return head(state, c, cache)
