"""Autoregressive text as denoising of next-token embeddings (docs/method.md §5, AR row).

Every position i carries the fixed, seed-derived, L2-normalised embedding E[x_i] of its token as the target;
one sigma per sequence noises all of them. The network reads the clean tokens (causally) and the noisy
embeddings and returns logits_i for x_i from the noisy half; D is the expected embedding softmax(logits) @ E
and the loss lambda(sigma)-weighted cross-entropy, as for classification, at every position."""

from __future__ import annotations

import torch.nn.functional as F

from dblocks.tasks.classification import ClassificationTask


class ARTextTask(ClassificationTask):
    TABLE = "task/token_embedding"

    def __init__(self, vocab_size: int, seq_len: int, embedding_dim: int, seed: int, sigma_data: float = 0.5) -> None:
        super().__init__(vocab_size, embedding_dim, seed, sigma_data)
        self.seq_len = seq_len

    def condition(self, batch):
        return batch["tokens"]

    def target(self, batch):
        return self.embedding.to(batch["tokens"].device)[batch["tokens"]]

    @property
    def target_shape(self):
        return (self.seq_len, self.embedding.shape[1])

    def loss(self, raw, denoised, batch, weight):
        per_token = F.cross_entropy(raw.float().transpose(1, 2), batch["tokens"], reduction="none")
        return (weight * per_token.mean(1)).mean()


class NextTokenEmbeddingTask(ARTextTask):
    """Position i of tokens[:-1] carries the embedding of the NEXT token x_{i+1}: a single causal stream
    (no clean/noisy doubling) whose clean information enters through the conditioning, as in the
    Huginn recurrent-depth model."""

    def condition(self, batch):
        return batch["tokens"][:, :-1]

    def target(self, batch):
        return self.embedding.to(batch["tokens"].device)[batch["tokens"][:, 1:]]

    @property
    def target_shape(self):
        return (self.seq_len - 1, self.embedding.shape[1])

    def loss(self, raw, denoised, batch, weight):
        per_token = F.cross_entropy(raw.float().transpose(1, 2), batch["tokens"][:, 1:], reduction="none")
        return (weight * per_token.mean(1)).mean()
