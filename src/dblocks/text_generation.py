"""Autoregressive text: block-wise generation (B Euler steps per token, each step running only its block,
greedy read-out), the baseline's top-p sampling, plain next-token quality of both, and the negative
log-likelihood of continuations under a judge model (generative perplexity).

The B-step chain from sigma_max noise is a sampler: the probability-flow ODE carries the random start to one
token, and the argmax of the last block's logits only reads off the token the chain has committed to. Those
last logits are the lowest-noise block's answer given an almost clean z, so they are as confident as a
copy of z and say nothing about the other tokens the chain could have produced. The model's next-token
distribution p(x_i | x_<i) is the denoiser's posterior at sigma_max, where the noisy slot carries nothing of
its token (:func:`predictive_logits`); that is what plain next-token quality scores.

Block-wise runs always use the full context (the clean/noisy mask is built for it): to produce token k the
clean half holds the prefix (later positions hold padding, which the noisy slot k cannot see: it attends to
clean j < k only) and noisy slot k starts from sigma_max noise.

Generation keeps a KV cache by default (dblocks.layers.KVCache): each token runs the layers on the positions it
adds only (the baseline: the new token; block-wise: the clean token committed last and noisy slot k; Huginn: the
new position), attending to the keys the earlier positions left, instead of recomputing the whole context.
adaLN modulates every layer by c, so a block-wise model keeps the clean prefix's keys once per grid step (c
depends on sigma) and Huginn once per recurrence iteration or Euler step (its positions keep the random start
they were first given: :func:`generate_recurrent`). ``cache=False`` recomputes everything and gives the same
tokens (up to float rounding); it is what the tests compare the cache against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dblocks.blocks import AssembledModel, BlockDenoiser
from dblocks.layers import KVCache
from dblocks.sample import euler_sample, initial_noise


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _new_rows(cache: KVCache | None, length: int) -> int:
    """Where the positions a causal sequence now ``length`` long needs computed begin: 0 without a cache; with one,
    after those it kept, and the cache's next token computes (and keeps) the rest."""
    if cache is None:
        return 0
    start = cache.length
    cache.advance(torch.arange(start, length))
    return start


def sigma_grid(model: AssembledModel, steps: int | None = None) -> list[float]:
    """One Euler step per block: from sigma_max down the partition's boundaries (the equi-quantile grid); or
    ``steps`` steps on the equal-mass grid (a multiple of B lands on the boundaries: each block runs steps / B)."""
    if steps is None:
        return list(reversed(model.partition.boundaries))
    if steps < 1:
        raise ValueError(f"steps per token must be >= 1, got {steps}")
    return model.partition.dist.quantile_grid(steps)


@torch.no_grad()
def predictive_logits(model: AssembledModel, tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """logits_i for token x_i at every position (teacher forcing) from the highest-noise block at sigma_max: the
    model's next-token distribution p(x_i | x_<i). At sigma_max the noisy slot holds noise alone (signal to noise
    1 / sigma_max), so the optimal denoiser's posterior over the token is its prediction from the clean prefix,
    which the blocks' cross-entropy trains there; it is what the chain starts from. ``tokens`` is what the
    network reads (the AR model: the window; Huginn's single stream: the window less its last token), one
    noisy slot per token."""
    sigma = model.partition.boundaries[-1]
    shape = (tokens.shape[0], tokens.shape[1], model.task.embedding.shape[1])
    z = initial_noise(shape, sigma, generator, _device(model))
    return model(z, sigma, tokens.to(_device(model))).raw


@torch.no_grad()
def denoised_logits(
    model: AssembledModel,
    tokens: torch.Tensor,
    generator: torch.Generator,
    steps: int | None = None,
    start_noise: float = 1.0,
    cache: KVCache | None = None,
) -> torch.Tensor:
    """logits_i for token x_i at every position at once (teacher forcing: noisy slots are independent given
    the clean tokens), after the B-step chain (or ``steps`` steps, :func:`sigma_grid`) from sigma_max noise; the last
    step's block gives the logits. ``start_noise`` scales the starting noise (1: the sampler; below 1 it
    leans toward the most likely token, as a temperature below 1 does; 0: a deterministic chain). With a KV
    ``cache`` (generation), ``tokens`` are the clean tokens of its current rows and only its noisy slots run, from
    the noise drawn for every slot all the same (the generator's draws do not depend on the cache)."""
    grid = sigma_grid(model, steps)
    z = start_noise * initial_noise((tokens.shape[0], *model.task.target_shape), grid[0], generator, _device(model))
    if cache is not None:
        z = z[:, cache.positions[cache.keep :] - model.task.seq_len]
    _, out = euler_sample(model, z, grid, tokens.to(_device(model)), cache=cache)
    return out.raw


@torch.no_grad()
def generate_blockwise(
    model: AssembledModel,
    prompts: torch.Tensor,
    new_tokens: int,
    generator: torch.Generator,
    steps: int | None = None,
    start_noise: float = 1.0,
    cache: bool = True,
) -> torch.Tensor:
    """Continuations (N, new_tokens) of ``prompts`` (N, P): B denoising steps per token (or ``steps``), each
    token the argmax of the last block's logits. The chain from noise samples the token (the argmax reads off
    what it committed to); ``start_noise`` below 1 makes it greedier (:func:`denoised_logits`). ``cache``: a KV
    cache per grid step and layer (module docstring); each step runs its block on two positions."""
    model.eval()
    context = model.task.seq_len
    n, p = prompts.shape
    if p + new_tokens > context:
        raise ValueError(f"prompt ({p}) + new tokens ({new_tokens}) exceed the context of {context} tokens")
    tokens = torch.zeros(n, context, dtype=torch.long, device=_device(model))
    tokens[:, :p] = prompts.to(tokens.device)
    kv = KVCache() if cache else None
    for k in range(p, p + new_tokens):
        rows, slot = tokens, k
        if kv is not None:  # the clean tokens the cache lacks (the prompt, then the one committed last), noisy slot k
            start = kv.length
            kv.advance(torch.cat([torch.arange(start, k), torch.tensor([context + k])]), keep=k - start)
            rows, slot = tokens[:, start:k], -1
        tokens[:, k] = denoised_logits(model, rows, generator, steps, start_noise, kv)[:, slot].argmax(-1)
    return tokens[:, p : p + new_tokens].cpu()


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches top_p (Holtzman et al.)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


@torch.no_grad()
def generate_baseline(
    model: BlockDenoiser,
    prompts: torch.Tensor,
    new_tokens: int,
    generator: torch.Generator,
    top_p: float = 0.95,
    cache: bool = True,
) -> torch.Tensor:
    """Top-p samples (N, new_tokens) from the end-to-end next-token model (``cache``: a KV cache, one new
    position per token)."""
    model.eval()
    tokens = prompts.to(_device(model))
    kv = KVCache() if cache else None
    for _ in range(new_tokens):
        logits = model.network(None, tokens[:, _new_rows(kv, tokens.shape[1]) :], None, kv)[:, -1].float()
        probs = top_p_filter(logits, top_p).softmax(-1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(tokens.device)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens[:, prompts.shape[1] :].cpu()


def _next_token_record(tokens: torch.Tensor, batch_size: int, device: torch.device, scored) -> dict:
    """Bits per token and top-1 accuracy over windows (N, T), positions 1..T-1, of the logits that
    ``scored(chunk)`` gives as (prefix, logits of positions 1..T-1) pairs: prefix "" for the model's next-token
    distribution, "chain_" for a block-wise chain's read-out (``chain_bits`` / ``chain_accuracy``)."""
    totals: dict[str, float] = {}
    count = 0
    for chunk in tokens.split(batch_size):
        chunk = chunk.to(device)
        target = chunk[:, 1:]
        for prefix, logits in scored(chunk):
            nll = F.cross_entropy(logits.float().transpose(1, 2), target, reduction="sum").item()
            totals[prefix + "nll"] = totals.get(prefix + "nll", 0.0) + nll
            totals[prefix + "correct"] = totals.get(prefix + "correct", 0) + (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    names = {"": ("next_token_bits", "next_token_accuracy"), "chain_": ("chain_bits", "chain_accuracy")}
    record = {}
    for prefix, (bits, accuracy) in names.items():
        if prefix + "nll" in totals:
            record[bits] = totals[prefix + "nll"] / count / math.log(2)
            record[accuracy] = totals[prefix + "correct"] / count
    return record


@torch.no_grad()
def next_token_quality(model, tokens: torch.Tensor, generator: torch.Generator, batch_size: int = 64) -> dict:
    """Plain next-token quality on windows (N, T), positions 1..T-1 (each predicted from all earlier tokens):
    bits per token and top-1 accuracy of the model's next-token distribution. End-to-end: the causal model's
    logits. Block-wise: :func:`predictive_logits` (the highest-noise block at sigma_max), and besides it what the
    B-step chain from noise does under teacher forcing: ``chain_accuracy``, how often the token it emits (the
    argmax of the last block's logits, as generation reads it) is the true one, and ``chain_bits``, the
    cross-entropy of those last logits, which scores how confidently the chain reads off the token it has
    committed to, not a prediction (it exceeds log2 V once the chain commits to wrong tokens)."""
    if isinstance(model, AssembledModel):

        def scored(chunk):
            return [
                ("", predictive_logits(model, chunk, generator)[:, 1:]),
                ("chain_", denoised_logits(model, chunk, generator)[:, 1:]),
            ]
    else:

        def scored(chunk):
            return [("", model.network(None, chunk, None)[:, :-1])]

    return _next_token_record(tokens, batch_size, _device(model), scored)


@torch.no_grad()
def continuation_nll(judge: BlockDenoiser, prompts: torch.Tensor, continuations: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats per token) of ``continuations`` given ``prompts`` under a causal
    next-token judge; exp() of it is the generative perplexity."""
    judge.eval()
    seq = torch.cat([prompts, continuations], dim=1).to(_device(judge))
    logits = judge.network(None, seq[:, :-1], None)[:, prompts.shape[1] - 1 :]
    return F.cross_entropy(logits.float().transpose(1, 2), seq[:, prompts.shape[1] :]).item()


# --- recurrent depth (Huginn) --------------------------------------------------------------------------


@torch.no_grad()
def recurrent_depth_logits(model, tokens: torch.Tensor, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Next-token logits at every position of ``tokens`` (N, t) after K = ``iterations`` iterations.
    Block-wise: K Euler steps from sigma_max on the equal-mass grid, one denoiser call (one pass of the
    recurrent block) each; end-to-end: K recurrences of the block from a random state."""
    tokens = tokens.to(_device(model))
    return _recurrent_logits(model, tokens, _recurrent_start(model, *tokens.shape, iterations, generator), iterations)


def _recurrent_start(model, n: int, positions: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Starting states of ``positions`` positions: the block-wise chain's sigma_max noise, the baseline's random
    latent state (as dblocks.models.huginn.recurrent_logits draws it)."""
    if isinstance(model, AssembledModel):
        sigma_max = model.partition.dist.quantile_grid(iterations)[0]
        return initial_noise((n, positions, model.task.embedding.shape[1]), sigma_max, generator, _device(model))
    return torch.randn(n, positions, model.stem.width, generator=generator)


def _recurrent_logits(
    model, tokens: torch.Tensor, start: torch.Tensor, iterations: int, cache: KVCache | None = None
) -> torch.Tensor:
    """:func:`recurrent_depth_logits` from given starting states (with a KV cache: of its current rows)."""
    from dblocks.models.huginn import recurrent_logits

    if isinstance(model, AssembledModel):
        _, out = euler_sample(model, start, model.partition.dist.quantile_grid(iterations), tokens, cache=cache)
        return out.raw
    return recurrent_logits(model, tokens, iterations, state=start, cache=cache)


@torch.no_grad()
def generate_recurrent(
    model,
    prompts: torch.Tensor,
    new_tokens: int,
    iterations: int,
    generator: torch.Generator,
    top_p: float = 0.95,
    cache: bool = True,
) -> torch.Tensor:
    """Continuations (N, new_tokens): the block-wise model decodes greedily, the baseline with top-p.

    Every position's starting state (:func:`_recurrent_start`) is drawn once, when the position first runs, and
    kept: a new token leaves the earlier positions as they were computed (Huginn's own decoding; they attend
    causally, so appending a token changes none of them). That is what lets ``cache`` keep their keys per Euler
    step or iteration and layer and run each token's new position only; False recomputes every position from
    the same kept starts (the same tokens)."""
    model.eval()
    tokens = prompts.to(_device(model))
    kv = KVCache() if cache else None
    starts = None
    for _ in range(new_tokens):
        done = 0 if starts is None else starts.shape[1]
        new = _recurrent_start(model, tokens.shape[0], tokens.shape[1] - done, iterations, generator)
        starts = new if starts is None else torch.cat([starts, new], dim=1)
        first = _new_rows(kv, tokens.shape[1])
        logits = _recurrent_logits(model, tokens[:, first:], starts[:, first:], iterations, kv)[:, -1].float()
        if isinstance(model, AssembledModel):
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial(top_p_filter(logits, top_p).softmax(-1).cpu(), 1, generator=generator)
        tokens = torch.cat([tokens, nxt.to(tokens.device)], dim=1)
    return tokens[:, prompts.shape[1] :].cpu()


@torch.no_grad()
def recurrent_next_token_quality(
    model, tokens: torch.Tensor, iterations: int, generator: torch.Generator, batch_size: int = 64
) -> dict:
    """Bits per token and top-1 accuracy of the next-token prediction at every position: the baseline's after K
    iterations; block-wise, the model's next-token distribution (the denoiser at sigma_max,
    :func:`predictive_logits`), with ``chain_accuracy`` and ``chain_bits`` of the K-step chain's last logits
    as in :func:`next_token_quality`."""
    blockwise = isinstance(model, AssembledModel)

    def scored(chunk):
        read = chunk[:, :-1]  # Huginn's single stream: the window less its last token
        if not blockwise:
            return [("", recurrent_depth_logits(model, read, iterations, generator))]
        return [
            ("", predictive_logits(model, read, generator)),  # in this order: both draw from ``generator``
            ("chain_", recurrent_depth_logits(model, read, iterations, generator)),
        ]

    return _next_token_record(tokens, batch_size, _device(model), scored)
