"""Text model parts. The masked diffusion LM (MDM) is a DiT-style bidirectional transformer: token
embeddings of z_t (the vocabulary plus one mask id) with learned positions, conditioning c = embedding of
the masking time t, adaLN-Zero layers (dblocks.layers) and an adaLN final layer to logits over the
vocabulary. The final layer is zero-initialised, so an untrained model predicts the uniform distribution."""

from __future__ import annotations

import torch
from torch import nn

from dblocks.layers import FinalLayer, NoiseEmbedding


class MDMStem(nn.Module):
    def __init__(self, vocab_size: int, seq_len: int, width: int) -> None:
        super().__init__()
        self.token_embed = nn.Embedding(vocab_size + 1, width)  # last id: the mask
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, width))
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.time_embed = NoiseEmbedding(width)

    def forward(self, z, cond, t):
        if z.shape[1] > self.pos_embed.shape[1]:
            raise ValueError(f"sequence of {z.shape[1]} tokens is longer than the context {self.pos_embed.shape[1]}")
        return self.token_embed(z) + self.pos_embed[:, : z.shape[1]], self.time_embed(t)


class TokenHead(nn.Module):
    """Logits over the vocabulary at every position."""

    def __init__(self, width: int, vocab_size: int) -> None:
        super().__init__()
        self.final = FinalLayer(width, vocab_size)

    def forward(self, h, c):
        return self.final(h, c)
