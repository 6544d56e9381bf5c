"""Classification as denoising of a label embedding (docs/method.md §5, ViT row).

The target is the class's L2-normalised embedding E[y]: fixed and seed-derived for independent blocks, learned
in the paper's shared-stem mode (:class:`LabelTable`). The network reads the image and the noisy
embedding and returns class logits; the denoiser output is the expected embedding softmax(logits) @ E,
the posterior mean of a discrete target, and the loss is lambda(sigma)-weighted cross-entropy on the logits.
"""

from __future__ import annotations

import torch
from torch import nn

from dblocks import edm
from dblocks.tasks.base import Task


def label_embeddings(num_classes: int, dim: int, seed: int) -> torch.Tensor:
    """The shared target space: a fixed, seed-derived, L2-normalised embedding per class.

    Every block job derives the same table from the experiment seed with its own generator, so blocks
    agree on the target space without communicating."""
    g = torch.Generator().manual_seed(int(seed))
    table = torch.randn(num_classes, dim, generator=g, dtype=torch.float32)
    return table / table.norm(dim=1, keepdim=True)


class LabelTable(nn.Module):
    """The label embedding as a learned table, the authors' shared-stem ViT: ``nn.Embedding(classes, dim)``
    initialised N(0, 0.02) and L2-normalised where it is used as the target. Its gradient reaches it through
    the noisy input z = E[y] + sigma * eps (the loss is cross-entropy on the logits)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.02)

    def normalised(self) -> torch.Tensor:
        return nn.functional.normalize(self.weight, dim=1)


class ClassificationTask(Task):
    #: the checkpoint name of the target space (the embedding table)
    TABLE = "task/label_embedding"

    def __init__(self, num_classes: int, embedding_dim: int, seed: int, sigma_data: float = 0.5) -> None:
        self.num_classes = num_classes
        self.fixed = label_embeddings(num_classes, embedding_dim, seed)
        self.table: LabelTable | None = None
        self.sigma_data = sigma_data

    def learn_embedding(self) -> LabelTable:
        """Make the target space a learned table (the paper's single-process mode, where one process trains
        every block and can share it); the caller registers it with the module it trains. Independent block
        jobs keep the fixed seed-derived table: a table learned per job would give each block its own target
        space and the assembled chain no common one."""
        self.table = LabelTable(*self.fixed.shape)
        return self.table

    @property
    def embedding(self) -> torch.Tensor:
        return self.table.normalised() if self.table is not None else self.fixed

    def condition(self, batch):
        return batch["image"]

    def target(self, batch):
        return self.embedding.to(batch["label"].device)[batch["label"]]

    @property
    def target_shape(self):
        return (self.fixed.shape[1],)

    def denoise(self, raw, z, sigma):
        return raw.softmax(dim=-1) @ self.embedding.to(raw.device, raw.dtype)

    def loss(self, raw, denoised, batch, weight):
        return edm.weighted_cross_entropy(raw, batch["label"], weight)

    def buffers(self):
        return {self.TABLE: self.embedding.detach()}

    def load_buffers(self, tensors):
        """A trained model's target space as its checkpoint stores it (learned or fixed), fixed from now on."""
        self.fixed, self.table = tensors[self.TABLE], None
