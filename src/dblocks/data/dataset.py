"""The image split every loader returns (:mod:`dblocks.data.images` from the sources,
:mod:`dblocks.data.latents` encoded, :mod:`dblocks.data.prepared` from prepared files): a module of its own, below
all of them, so that none has to import another just to name it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: prepared builds ImageDatasets, so it imports this module
    from dblocks.data.prepared import StoredRows


@dataclass
class ImageDataset:
    """One split; ``images`` are in [-1, 1], ``labels`` in [0, num_classes). For a latent dataset ``images`` are
    autoencoder latents multiplied by ``latent_scale`` (None for pixels).

    A split loaded from its source holds ``images`` (and ``flipped``) as tensors; a prepared split
    (:func:`dblocks.data.prepared.load_prepared`) as :class:`dblocks.data.prepared.StoredRows`, read from its
    files when indexed. Both give float32 rows for ``images[index]`` and batches for ``images.split(n)``, so
    code that works a batch at a time takes either; ``images[:]`` is the whole split in memory (small data)."""

    name: str
    split: str
    images: torch.Tensor | StoredRows
    labels: torch.Tensor
    num_classes: int
    latent_scale: float | None = None
    #: a latent dataset's encodings of the mirrored images (train.augment=flip picks them), else None
    flipped: torch.Tensor | StoredRows | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"expected images (N, C, H, W) and labels (N,), got {tuple(self.images.shape)} "
                f"and {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one image, (C, H, W)."""
        c, h, w = self.images.shape[1:]
        return c, h, w
