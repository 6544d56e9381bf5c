"""Autoregressive text: block-wise generation (B Euler steps per token, each step running only its block,
greedy read-out), the baseline's top-p sampling, plain next-token quality of both, and the negative
log-likelihood of continuations under a judge model (generative perplexity).

Block-wise runs always use the full context (the clean/noisy mask is built for it): to produce token k the
clean half holds the prefix (later positions hold padding, which the noisy slot k cannot see: it attends to
clean j < k only) and noisy slot k starts from sigma_max noise."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dblocks.blocks import AssembledModel, BlockDenoiser
from dblocks.sample import euler_sample, initial_noise


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _grid(model: AssembledModel) -> list[float]:
    """One Euler step per block: from sigma_max down the partition's boundaries (the equi-quantile grid)."""
    return list(reversed(model.partition.boundaries))


@torch.no_grad()
def denoised_logits(model: AssembledModel, tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """logits_i for token x_i at every position at once (teacher forcing: noisy slots are independent given
    the clean tokens), after the B-step chain from sigma_max noise; the last step's block gives the logits."""
    grid = _grid(model)
    z = initial_noise((tokens.shape[0], *model.task.target_shape), grid[0], generator, _device(model))
    _, out = euler_sample(model, z, grid, tokens.to(_device(model)))
    return out.raw


@torch.no_grad()
def generate_blockwise(model: AssembledModel, prompts: torch.Tensor, new_tokens: int,
                       generator: torch.Generator) -> torch.Tensor:
    """Greedy continuations (N, new_tokens) of ``prompts`` (N, P): B denoising steps per token."""
    model.eval()
    context = model.task.seq_len
    n, p = prompts.shape
    if p + new_tokens > context:
        raise ValueError(f"prompt ({p}) + new tokens ({new_tokens}) exceed the context of {context} tokens")
    tokens = torch.zeros(n, context, dtype=torch.long, device=_device(model))
    tokens[:, :p] = prompts.to(tokens.device)
    for k in range(p, p + new_tokens):
        tokens[:, k] = denoised_logits(model, tokens, generator)[:, k].argmax(-1)
    return tokens[:, p:p + new_tokens].cpu()


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches top_p (Holtzman et al.)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


@torch.no_grad()
def generate_baseline(model: BlockDenoiser, prompts: torch.Tensor, new_tokens: int, generator: torch.Generator,
                      top_p: float = 0.95) -> torch.Tensor:
    """Top-p samples (N, new_tokens) from the end-to-end next-token model."""
    model.eval()
    tokens = prompts.to(_device(model))
    for _ in range(new_tokens):
        logits = model.network(None, tokens, None)[:, -1].float()
        probs = top_p_filter(logits, top_p).softmax(-1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(tokens.device)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens[:, prompts.shape[1]:].cpu()


@torch.no_grad()
def next_token_quality(model, tokens: torch.Tensor, generator: torch.Generator, batch_size: int = 64) -> dict:
    """Plain next-token quality on windows (N, T), positions 1..T-1 (each predicted from all earlier tokens):
    bits per token and top-1 accuracy. Block-wise: the final logits of the B-step chain from noise;
    end-to-end: the causal model's logits."""
    nll, correct, count = 0.0, 0, 0
    for chunk in tokens.split(batch_size):
        chunk = chunk.to(_device(model))
        if isinstance(model, AssembledModel):
            logits, target = denoised_logits(model, chunk, generator)[:, 1:], chunk[:, 1:]
        else:
            logits, target = model.network(None, chunk, None)[:, :-1], chunk[:, 1:]
        nll += F.cross_entropy(logits.float().transpose(1, 2), target, reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    return {"next_token_bits": nll / count / math.log(2), "next_token_accuracy": correct / count}


@torch.no_grad()
def continuation_nll(judge: BlockDenoiser, prompts: torch.Tensor, continuations: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats per token) of ``continuations`` given ``prompts`` under a causal
    next-token judge; exp() of it is the generative perplexity."""
    judge.eval()
    seq = torch.cat([prompts, continuations], dim=1).to(_device(judge))
    logits = judge.network(None, seq[:, :-1], None)[:, prompts.shape[1] - 1:]
    return F.cross_entropy(logits.float().transpose(1, 2), seq[:, prompts.shape[1]:]).item()


# --- recurrent depth (Huginn) --------------------------------------------------------------------------

@torch.no_grad()
def recurrent_depth_logits(model, tokens: torch.Tensor, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Next-token logits at every position of ``tokens`` (N, t) after K = ``iterations`` iterations.
    Block-wise: K Euler steps from sigma_max on the equal-mass grid, one denoiser call (one pass of the
    recurrent block) each; end-to-end: K recurrences of the block from a random state."""
    from dblocks.models.huginn import recurrent_logits

    tokens = tokens.to(_device(model))
    if isinstance(model, AssembledModel):
        grid = model.partition.dist.quantile_grid(iterations)
        z = initial_noise((tokens.shape[0], tokens.shape[1], model.task.embedding.shape[1]), grid[0], generator,
                          tokens.device)
        _, out = euler_sample(model, z, grid, tokens)
        return out.raw
    return recurrent_logits(model, tokens, iterations, None, generator)


@torch.no_grad()
def generate_recurrent(model, prompts: torch.Tensor, new_tokens: int, iterations: int, generator: torch.Generator,
                       top_p: float = 0.95) -> torch.Tensor:
    """Continuations (N, new_tokens): the block-wise model decodes greedily, the baseline with top-p."""
    model.eval()
    tokens = prompts.to(_device(model))
    for _ in range(new_tokens):
        logits = recurrent_depth_logits(model, tokens, iterations, generator)[:, -1].float()
        if isinstance(model, AssembledModel):
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial(top_p_filter(logits, top_p).softmax(-1).cpu(), 1, generator=generator)
        tokens = torch.cat([tokens, nxt.to(tokens.device)], dim=1)
    return tokens[:, prompts.shape[1]:].cpu()


@torch.no_grad()
def recurrent_next_token_quality(model, tokens: torch.Tensor, iterations: int, generator: torch.Generator,
                                 batch_size: int = 64) -> dict:
    """Bits per token and top-1 accuracy of the next-token prediction at every position after K iterations."""
    nll, correct, count = 0.0, 0, 0
    for chunk in tokens.split(batch_size):
        chunk = chunk.to(_device(model))
        logits, target = recurrent_depth_logits(model, chunk[:, :-1], iterations, generator), chunk[:, 1:]
        nll += F.cross_entropy(logits.float().transpose(1, 2), target, reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    return {"next_token_bits": nll / count / math.log(2), "next_token_accuracy": correct / count}
