"""Text model parts. The masked diffusion LM (MDM) is a DiT-style bidirectional transformer: token
embeddings of z_t (the vocabulary plus one mask id), conditioning c = embedding of the masking time t,
adaLN-Zero layers (dblocks.layers) and an adaLN final layer to logits over the vocabulary. Positions are
rotary in Llama-style layers (MDLM's backbone has them too) or learned and added by the stem in DiT-style
ones; a narrow MDM with learned positions did not get past single-letter statistics in its training budget
(the attention has to learn from scratch where a neighbour is). The final layer is zero-initialised, so an
untrained model predicts the uniform distribution."""

from __future__ import annotations

import torch
from torch import nn

from dblocks.layers import FinalLayer, NoiseEmbedding


class MDMStem(nn.Module):
    def __init__(self, vocab_size: int, seq_len: int, width: int, absolute_positions: bool = True) -> None:
        super().__init__()
        self.context = seq_len
        self.token_embed = nn.Embedding(vocab_size + 1, width)  # last id: the mask
        nn.init.normal_(self.token_embed.weight, std=0.02)
        if absolute_positions:
            self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, width))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.pos_embed = None  # rotary positions in the layers
        self.time_embed = NoiseEmbedding(width)

    def forward(self, z, cond, t):
        if z.shape[1] > self.context:
            raise ValueError(f"sequence of {z.shape[1]} tokens is longer than the context {self.context}")
        h = self.token_embed(z)
        if self.pos_embed is not None:
            h = h + self.pos_embed[:, : z.shape[1]]
        return h, self.time_embed(t)


class TokenHead(nn.Module):
    """Logits over the vocabulary at every position."""

    def __init__(self, width: int, vocab_size: int) -> None:
        super().__init__()
        self.final = FinalLayer(width, vocab_size)

    def forward(self, h, c):
        return self.final(h, c)


class ARStem(nn.Module):
    """Autoregressive transformer stem. Block-wise (``noisy_target=True``): the sequence is [clean token
    embeddings; projected noisy target embeddings], both halves at the same positions and a learned marker
    on the noisy half, and c = embedding of c_noise; the layers carry dblocks.layers.clean_noisy_mask.
    End-to-end (``noisy_target=False``): the clean half only (its causal corner of the same mask) and a learned
    constant c, the ordinary next-token transformer. Positions are learned and added here, or, with
    ``absolute_positions=False``, left to the layers' rotary embedding (Llama style)."""

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        width: int,
        target_dim: int,
        noisy_target: bool = True,
        absolute_positions: bool = True,
    ) -> None:
        super().__init__()
        self.context = seq_len
        self.token_embed = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        if absolute_positions:
            self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, width))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.pos_embed = None
        self.noisy_target = noisy_target
        if noisy_target:
            self.target_embed = nn.Linear(target_dim, width)
            self.noisy_marker = nn.Parameter(torch.zeros(1, 1, width))
            self.noise_embed = NoiseEmbedding(width)
        else:
            self.constant_cond = nn.Parameter(torch.zeros(1, width))

    def forward(self, z_in, tokens, c_noise, cache=None):
        """With a KV cache (dblocks.layers.KVCache, generation), the rows of its current token only: ``tokens``
        are the clean tokens at its first positions, ``z_in`` the noisy slots after them (at context + i)."""
        t = tokens.shape[1]
        if cache is None:
            clean_at = noisy_at = slice(None, t)
            end = t
        else:
            clean_at, noisy_at = cache.positions[:t], cache.positions[t:] - self.context
            end = int(clean_at[-1]) + 1 if t else 0
        if end > self.context:
            raise ValueError(f"sequence of {end} tokens is longer than the context {self.context}")
        clean = self.token_embed(tokens) + self._positions(clean_at)
        if not self.noisy_target:
            return clean, self.constant_cond.expand(tokens.shape[0], -1)
        if cache is None and (z_in.shape[1] != self.context or t != z_in.shape[1]):
            # the clean/noisy mask is built for the full context: block-wise runs always use all of it
            raise ValueError(
                f"block-wise AR runs need {self.context} clean and noisy positions, got {t} and {z_in.shape[1]}"
            )
        noisy = self.target_embed(z_in) + self._positions(noisy_at) + self.noisy_marker
        return torch.cat([clean, noisy], dim=1), self.noise_embed(c_noise)

    def _positions(self, at):
        """The learned position embeddings at ``at`` (a slice or positions), or 0: rotary positions instead."""
        return self.pos_embed[:, at] if self.pos_embed is not None else 0.0


class LastPositionsHead(nn.Module):
    """Logits over the vocabulary for the last ``seq_len`` positions: the noisy half of a block-wise AR
    sequence (logits_i for token x_i), or every position of a clean-only one (logits_i for x_{i+1})."""

    def __init__(self, width: int, vocab_size: int, seq_len: int) -> None:
        super().__init__()
        self.final = FinalLayer(width, vocab_size)
        self.seq_len = seq_len

    def forward(self, h, c, cache=None):
        if cache is not None:  # a KV cache's rows (dblocks.layers.KVCache): the noisy slots among them, if any
            noisy = cache.positions >= self.seq_len
            return self.final(h[:, noisy.to(h.device)] if noisy.any() else h, c)
        half = h.shape[1] // 2 if h.shape[1] == 2 * self.seq_len else h.shape[1]
        return self.final(h[:, -half:], c)
