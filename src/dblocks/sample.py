"""Samplers over an assembled model. Every step evaluates the denoiser at one sigma, and the assembled
model runs only the block that owns that sigma: sampling with B blocks costs 1/B of the end-to-end
network per step."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from dblocks import distributed, edm
from dblocks.blocks import AssembledModel, BlockDenoiser, DenoiserOutput
from dblocks.io import write_atomic


@torch.no_grad()
def euler_sample(
    model: AssembledModel,
    z: torch.Tensor,
    grid: list[float],
    cond: torch.Tensor | None,
    guidance: float = 1.0,
    null_cond: torch.Tensor | None = None,
    progress: bool = False,
    cache=None,
) -> tuple[torch.Tensor, DenoiserOutput]:
    """Integrate the probability-flow ODE along ``grid`` (descending sigmas, len = steps + 1).

    With ``guidance != 1`` and a ``null_cond``, classifier-free guidance combines conditional and
    unconditional predictions, D = D_u + s (D_c - D_u), in one batched call of the same block. A KV cache
    (dblocks.layers.KVCache; text generation, unguided) goes to every step's call, each a run of its block's
    layers with keys of its own (they depend on sigma)."""
    guided = guidance != 1.0 and null_cond is not None
    out = None
    for sigma, sigma_next in tqdm(list(zip(grid[:-1], grid[1:])), desc="sample", disable=not progress, mininterval=1.0):
        if guided:
            both = model(torch.cat([z, z]), sigma, torch.cat([cond, null_cond]))
            d_cond, d_uncond = both.denoised.chunk(2)
            out = DenoiserOutput(raw=both.raw.chunk(2)[0], denoised=d_uncond + guidance * (d_cond - d_uncond))
        else:
            out = model(z, sigma, cond, cache) if cache is not None else model(z, sigma, cond)
        z = edm.euler_step(z, out.denoised, sigma, sigma_next)
    return z, out


#: where a classifier's chain starts at sigma_max (:func:`classify`)
CLASSIFY_STARTS = ("noise", "mean")


def initial_noise(
    shape: tuple[int, ...], sigma_max: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    return (sigma_max * torch.randn(shape, generator=generator)).to(device)


@torch.no_grad()
def classify(
    model: AssembledModel,
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    batch_size: int = 512,
    start: str = "noise",
) -> torch.Tensor:
    """Predicted labels: start at sigma_max and take one Euler step per block over the partition's
    boundaries (the equi-quantile grid for an equi-probability partition), so each block runs exactly once;
    the prediction is the argmax of the last block's logits.

    ``start``: ``"noise"``, a draw of the sigma_max noise (the paper's sampler: the chain then draws a label
    from the model's predictive distribution, and a label embedding pushed by the noise towards a wrong class
    can be committed to), or ``"mean"``, the noise's mean z = 0, which makes the chain deterministic: the
    first block's posterior-mean embedding reaches the later blocks without noise (CLASSIFY_STARTS). Only the
    noise start draws from ``generator``."""
    if start not in CLASSIFY_STARTS:
        raise ValueError(f"unknown start {start!r}; allowed: {', '.join(CLASSIFY_STARTS)}")
    if start == "noise" and generator is None:
        raise ValueError("start='noise' draws the chain's start: pass a generator")
    model.eval()
    grid = list(reversed(model.partition.boundaries))
    device = next(model.parameters()).device
    preds = []
    for chunk in images.split(batch_size):
        shape = (chunk.shape[0], *model.task.target_shape)
        z = initial_noise(shape, grid[0], generator, device) if start == "noise" else torch.zeros(shape, device=device)
        _, out = euler_sample(model, z, grid, chunk.to(device))
        preds.append(out.raw.argmax(dim=-1).cpu())
    return torch.cat(preds)


@torch.no_grad()
def classify_direct(model: BlockDenoiser, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels of the end-to-end classifier (a single forward pass, no noise)."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model.network(None, c.to(device), None).argmax(-1).cpu() for c in images.split(batch_size)])


@torch.no_grad()
def generate(
    model: AssembledModel,
    labels: torch.Tensor,
    grid: list[float],
    generator: torch.Generator,
    guidance: float = 1.0,
    null_label: int | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor | None:
    """Class-conditional images in [-1, 1] from N Euler steps on ``grid``.

    In a data-parallel job (dblocks.distributed) the chunks of ``batch_size`` are dealt round-robin over the
    ranks and gathered on rank 0, which returns them all (the others return None). Every rank draws every
    chunk's initial noise from ``generator``, so each image starts from the noise one process would give it:
    the samples are those of one process, whatever the number of ranks."""
    model.eval()
    device = next(model.parameters()).device
    world = distributed.world()
    chunks = labels.split(batch_size)
    mine = {}
    for i, chunk in enumerate(chunks):
        chunk = chunk.to(device)
        z = initial_noise((chunk.shape[0], *model.task.target_shape), grid[0], generator, device)
        if i % world.size != world.rank:
            continue
        null = None if null_label is None else torch.full_like(chunk, null_label)
        x, _ = euler_sample(model, z, grid, chunk, guidance, null, progress and world.main)
        mine[i] = x.clamp(-1, 1).cpu()  # off the device: only one chunk is there at a time
    return distributed.collect_chunks(mine, [len(c) for c in chunks], device)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 4) -> Path:
    """Write images in [-1, 1] as one PNG grid (upscaled with nearest neighbours so 8x8 digits are visible)."""
    from torchvision.utils import save_image

    x = (images.float() + 1) / 2
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    nrow = nrow or max(1, int(len(x) ** 0.5))
    return write_atomic(path, lambda tmp: save_image(x, tmp, nrow=nrow, padding=2, pad_value=1.0, format="png"))
