"""Block denoisers and the converter from a residual layer stack to B of them.

A block denoiser is stem -> its contiguous slice of layers -> head, wrapped in EDM preconditioning:
``D(z, x, sigma) = task.denoise(F(c_in z, x, c_noise), z, sigma)``. In the independent (default) mode every
block owns its own stem and head; in the paper's single-process mode the blocks share one stem and head.
The same converter builds both, so they differ only in whether the stem/head objects are shared.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dblocks.noise import Partition, layer_ranges, layer_split
from dblocks.tasks import Task


@dataclass
class DenoiserOutput:
    raw: torch.Tensor  # what the head returned: logits (classification) or F (images)
    denoised: torch.Tensor  # D, in target space


class BlockDenoiser(nn.Module):
    def __init__(self, stem: nn.Module, layers: Sequence[nn.Module], head: nn.Module, task: Task) -> None:
        super().__init__()
        self.stem = stem
        self.layers = nn.ModuleList(layers)
        self.head = head
        self.task = task  # not a module: the target space is fixed, never trained

    def network(
        self, z_in: torch.Tensor | None, cond: torch.Tensor | None, c_noise: torch.Tensor | None, cache=None
    ) -> torch.Tensor:
        """F: the raw network, with its inputs already preconditioned. A KV cache (dblocks.layers.KVCache; text
        generation) reaches the stem, every layer and the head; none is passed without one, so parts without
        the argument (other families, user layers) keep their signatures."""
        with_cache = {} if cache is None else {"cache": cache}
        h, c = self.stem(z_in, cond, c_noise, **with_cache)
        for layer in self.layers:
            h = layer(h, c, **with_cache)
        return self.head(h, c, **with_cache)

    def forward(self, z: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None, cache=None) -> DenoiserOutput:
        sigma = sigma.reshape(-1).expand(z.shape[0])
        z_in, c_noise = self.task.network_inputs(z, sigma)
        raw = self.network(z_in, cond, c_noise, cache)
        return DenoiserOutput(raw=raw, denoised=self.task.denoise(raw, z, sigma))


def convert_stack(
    layers: Sequence[nn.Module],
    partition: Partition,
    stem: nn.Module,
    head: nn.Module,
    task: Task,
    split: Sequence[int] | None = None,
    share_stem_head: bool = False,
) -> AssembledModel:
    """Turn a stack of L residual layers ``layer(h, c) -> h`` into B block denoisers for ``partition``.

    ``split`` gives the layers per block, block 1 (highest noise) first, and must sum to L (default: an
    equal contiguous split). With ``share_stem_head=False`` each block gets its own deep copy of the stem
    and head, so the blocks share no parameter and can be trained in separate processes; with True they
    share the given instances (the paper's single-process mode). The result routes each sigma to its
    block."""
    layers = list(layers)
    split = layer_split(len(layers), partition.blocks, split)
    blocks = []
    for index, span in enumerate(layer_ranges(split)):
        own_stem = stem if share_stem_head or index == 0 else copy.deepcopy(stem)
        own_head = head if share_stem_head or index == 0 else copy.deepcopy(head)
        blocks.append(BlockDenoiser(own_stem, [layers[i] for i in span], own_head, task))
    return AssembledModel(blocks, partition)


class AssembledModel(nn.Module):
    """B block denoisers behind one denoiser interface that routes each sigma to the block owning it."""

    def __init__(self, blocks: Sequence[BlockDenoiser], partition: Partition) -> None:
        super().__init__()
        if len(blocks) != partition.blocks:
            raise ValueError(f"{len(blocks)} blocks given for a partition into {partition.blocks}")
        self.blocks = nn.ModuleList(blocks)
        self.partition = partition
        self.calls = [0] * partition.blocks  # per-block evaluation counter (sampling cost, tests)

    @property
    def task(self) -> Task:
        return self.blocks[0].task

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> BlockDenoiser:
        return self.blocks[index]

    def __iter__(self):
        return iter(self.blocks)

    def block_for(self, sigma: float) -> int:
        return self.partition.route(float(sigma))

    def forward(self, z: torch.Tensor, sigma: float, cond: torch.Tensor | None, cache=None) -> DenoiserOutput:
        """Denoise at one noise level shared by the batch: exactly one block runs (``cache``: BlockDenoiser.network)."""
        b = self.block_for(sigma)
        self.calls[b - 1] += 1
        return self.blocks[b - 1](z, torch.full((z.shape[0],), float(sigma), device=z.device), cond, cache)
