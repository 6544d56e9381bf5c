"""Masked (absorbing-state) diffusion for text, MD4 (Shi et al. 2024) with the linear schedule
alpha(t) = 1 - t: the forward process, its partition into blocks, the bound (BPC) and the sampler.

* Forward process: each token is independently replaced by the mask id with probability 1 - alpha(t) = t.
* Training loss (the continuous-time negative ELBO): ``E_t [ w(t) * sum_{masked i} -log p(x_i | z_t) ]`` with
  ``w(t) = -alpha'(t) / (1 - alpha(t)) = 1/t`` and t ~ U[0, 1]; divided by the sequence length it is in
  nats per token, so for t drawn over the whole range it IS the bound, and BPC = bound / ln 2.
* Partition (docs/method.md §3): each block gets an equal decrement of alpha, alpha_b = 1 - b/B, i.e. block b
  owns t in ((B-b)/B, (B-b+1)/B] (block 1 = the most-masked, highest-noise interval, as for sigma). In
  training the interval widens by gamma x its width on each side (clipped to [0, 1]); a ratio widening as
  for sigma is undefined at t = 0.
* The bound with blocks: t ~ U[0, 1] is routed to the block owning it. Because every block owns 1/B of
  [0, 1], the bound is exactly the mean over blocks of each block's bound with t ~ U(its interval); the
  evaluation computes it that way (stratified, the same expectation with less variance), so each
  evaluation of the bound runs exactly one block.
* Sampling: from all-masked at t = 1 to t = 0 over a uniform grid; going from t to s < t, each still-masked
  token is revealed with probability (t - s)/t, drawn from the denoiser at t, which is the block owning t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dblocks.noise import Partition, uniform_draws
from dblocks.tasks.base import Task


@dataclass(frozen=True)
class MaskingPartition(Partition):
    """A Partition of the masking time t in [0, 1] (boundaries ascending, t_b = b/B), routed like sigma."""

    kind: str = "masking"

    @classmethod
    def make(cls, blocks: int, kind: str = "masking", overlap: float = 0.0, dist=None) -> MaskingPartition:
        if blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {blocks}")
        if not 0.0 <= overlap < 0.5:
            raise ValueError(f"overlap gamma must be in [0, 0.5); got {overlap}")
        return cls(tuple(b / blocks for b in range(blocks + 1)), overlap)

    def alpha(self, t):
        """alpha(t) = 1 - t: the probability that a token is still unmasked at time t."""
        return 1.0 - t

    def train_interval(self, block: int) -> tuple[float, float]:
        lo, hi = self.interval(block)
        pad = self.overlap * (hi - lo)
        return max(lo - pad, 0.0), min(hi + pad, 1.0)

    def sample_sigma(
        self,
        block: int,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        stratified: bool = False,
    ) -> torch.Tensor:
        """n masking times t ~ U(the block's widened interval); never exactly 0 (w(t) = 1/t)."""
        lo, hi = self.train_interval(block)
        u = 1.0 - uniform_draws(n, generator, stratified)  # in (0, 1]
        return (lo + u * (hi - lo)).clamp(min=1e-6).to(device=device, dtype=torch.float32)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "blocks": self.blocks,
            "overlap": self.overlap,
            "boundaries": list(self.boundaries),
            "alpha": "1 - t",
            "train_intervals": [list(self.train_interval(b)) for b in range(1, self.blocks + 1)],
        }


def mask_tokens(
    tokens: torch.Tensor, t: torch.Tensor, mask_id: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z_t: each token replaced by ``mask_id`` independently with probability t (per example)."""
    return masked_where(tokens, t, torch.rand(tokens.shape, generator=generator), mask_id)


def masked_where(tokens: torch.Tensor, t: torch.Tensor, u: torch.Tensor, mask_id: int) -> torch.Tensor:
    """``tokens`` with ``mask_id`` wherever the uniform draw ``u`` (one per token) is below the example's t."""
    u = u.to(tokens.device)
    return torch.where(u < t.reshape(-1, 1).to(tokens.device), torch.full_like(tokens, mask_id), tokens)


class MaskedTextTask(Task):
    """The target is the token sequence; the network reads z_t and t and returns logits over the vocabulary
    (never the mask); D is p(x | z_t) with revealed tokens carried over unchanged."""

    def __init__(self, vocab_size: int, seq_len: int) -> None:
        self.vocab_size = vocab_size
        self.mask_id = vocab_size  # the extra input id
        self.seq_len = seq_len

    def condition(self, batch):
        return None

    def target(self, batch):
        return batch["tokens"]

    @property
    def target_shape(self):
        return (self.seq_len,)

    def draw_noise(self, shape, generator, device="cpu"):
        return torch.rand(shape, generator=generator)  # u per token: masked where u < t (mask_tokens)

    def apply_noise(self, y, sigma, noise):
        return masked_where(y, sigma, noise, self.mask_id)

    def network_inputs(self, z, sigma):
        return z, sigma.float()  # no preconditioning: the network embeds the token ids and t itself

    def loss_weight(self, sigma, max_weight=None):
        w = 1.0 / sigma  # -alpha'(t) / (1 - alpha(t)) for alpha = 1 - t
        return w if max_weight is None else w.clamp(max=max_weight)

    def denoise(self, raw, z, sigma):
        probs = raw.float().softmax(-1)
        revealed = z != self.mask_id
        onehot = F.one_hot(z.clamp(max=self.vocab_size - 1), self.vocab_size).to(probs.dtype)
        return torch.where(revealed.unsqueeze(-1), onehot, probs)

    def loss(self, raw, denoised, batch, weight):
        """w(t) * sum over masked positions of -log p(x_i | z_t), per token (nats), mean over the batch."""
        ce = F.cross_entropy(raw.float().transpose(1, 2), batch["tokens"], reduction="none")
        masked = (batch["noisy"] == self.mask_id).to(ce.dtype)
        per_example = (ce * masked).sum(1) / batch["tokens"].shape[1]
        return (weight * per_example).mean()


@torch.no_grad()
def bits_per_token(
    model, tokens: torch.Tensor, generator: torch.Generator, samples_per_block: int = 1, batch_size: int = 256
) -> float:
    """The negative ELBO in bits per token on ``tokens`` (N, T), an AssembledModel over a MaskingPartition:
    the mean of its blocks' terms (``bits_by_block``)."""
    terms = bits_by_block(model, tokens, generator, samples_per_block, batch_size)
    return sum(terms) / len(terms)


def bits_by_block(
    model, tokens: torch.Tensor, generator: torch.Generator, samples_per_block: int = 1, batch_size: int = 256
) -> list[float]:
    """Each block's term of the negative ELBO in bits per token: the mean of ``w(t) * sum_masked CE`` over
    t ~ U(the block's interval), which is the bound's integrand averaged over that stretch of masking times
    (so the bound is the terms' mean, and an end-to-end model wrapped in the same partition gives terms that
    compare with a block-wise model's stretch by stretch).

    For each window and each block, ``samples_per_block`` times t (stratified over a batch of windows) are
    drawn and the block owning them evaluates the weighted CE (see the module docstring). The last block's
    interval ends at t = 0, where w(t) = 1/t is unbounded but the expected number of masked tokens (t * T)
    cancels it."""
    partition = model.partition
    task = model.task
    device = next(model.parameters()).device
    totals, count = [0.0] * partition.blocks, 0
    for chunk in tokens.split(batch_size):
        chunk = chunk.to(device)
        for b in range(1, partition.blocks + 1):
            lo, hi = partition.interval(b)
            block = model.blocks[b - 1]
            for _ in range(samples_per_block):
                # stratified over the windows of the chunk: each t is still U(lo, hi), with less variance
                n = chunk.shape[0]
                strata = torch.randperm(n, generator=generator).double()
                u = (strata + 1.0 - torch.rand(n, generator=generator, dtype=torch.float64)) / n
                t = (lo + u * (hi - lo)).clamp(min=1e-6).float().to(device)
                z = task.corrupt(chunk, t, generator)
                out = block(z, t, None)
                nats = task.loss(out.raw, out.denoised, {"tokens": chunk, "noisy": z}, task.loss_weight(t))
                totals[b - 1] += nats.item() * n
        count += chunk.shape[0] * samples_per_block
    return [total / count / math.log(2) for total in totals]


@torch.no_grad()
def sample_text(model, num: int, steps: int, generator: torch.Generator, batch_size: int = 64) -> torch.Tensor:
    """Unconditional samples (num, T): ``steps`` unmasking steps from t = 1 to 0, each step run by the block
    that owns its t (the AssembledModel routes it and counts the call)."""
    task = model.task
    device = next(model.parameters()).device
    grid = [(steps - i) / steps for i in range(steps + 1)]  # exact at the block boundaries b/B
    out = []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        z = torch.full((n, task.seq_len), task.mask_id, dtype=torch.long, device=device)
        for t, s in zip(grid[:-1], grid[1:]):
            probs = model(z, t, None).denoised
            draw = torch.multinomial(probs.reshape(-1, task.vocab_size).cpu(), 1, generator=generator)
            draw = draw.reshape(n, task.seq_len).to(device)
            reveal = torch.rand(z.shape, generator=generator).to(device) < (t - s) / t
            z = torch.where((z == task.mask_id) & reveal, draw, z)
        out.append(z.cpu())
    return torch.cat(out)
