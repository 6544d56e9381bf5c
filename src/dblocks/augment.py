"""Data augmentation as a property of the data, applied to each training batch on the training device.

``train.augment`` names one of :data:`AUGMENTATIONS`. Every random choice (which image is flipped, where
each crop lands, the seed of RandAugment's draws) comes from the job's data generator, the same one that
picks the batch, so a run is reproducible from its seed and a resumed run, which restores that
generator, continues bit-identically. ``none`` draws nothing, so turning augmentation off leaves a
run's random stream exactly as it was before augmentation existed.

- ``flip``: random horizontal flip with probability 1/2 (DiT's recipe). Pixels are mirrored; autoencoder
  latents are not (the encoder is not flip-equivariant), so a latent dataset must carry the latents of
  the mirrored images too (``ImageDataset.flipped``, written by its prepare step), and a flip picks those.
- ``crop_flip``: ``RandomCrop(32, padding=4)`` then the flip, the CIFAR recipe of the authors' ViT code.
  The padding is black (-1 in this project's [-1, 1] pixel range), as torchvision pads a PIL image.
- ``randaugment``: ``crop_flip`` then torchvision's ``RandAugment`` (2 ops, magnitude 9: its defaults, which
  the authors' longer recipe uses), ops drawn per image, on 8-bit pixels as the PIL pipeline sees them.
"""

from __future__ import annotations

import torch

AUGMENTATIONS = ("none", "flip", "crop_flip", "randaugment")
#: what a latent dataset can take: only mirroring has a latent counterpart (the stored mirrored encoding)
LATENT_AUGMENTATIONS = ("none", "flip")
CROP_PADDING = 4
_BLACK = -1.0


def _coin(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=gen) < 0.5).to(device)


def random_flip(images: torch.Tensor, gen: torch.Generator, flipped: torch.Tensor | None = None) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2; ``flipped``, when given, holds each image's
    mirrored version (a latent dataset's encodings of the mirrored images) and is used instead of
    mirroring ``images`` themselves."""
    mask = _coin(images.shape[0], gen, images.device).view(-1, 1, 1, 1)
    return torch.where(mask, images.flip(-1) if flipped is None else flipped, images)


def random_crop(images: torch.Tensor, gen: torch.Generator, padding: int = CROP_PADDING) -> torch.Tensor:
    """``RandomCrop(size, padding)`` for every image of a batch at once: pad with black, then cut the original
    size at an offset drawn per image."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4, value=_BLACK)
    top = torch.randint(2 * padding + 1, (n,), generator=gen).to(images.device)
    left = torch.randint(2 * padding + 1, (n,), generator=gen).to(images.device)
    rows = (top[:, None] + torch.arange(h, device=images.device)).view(n, 1, h, 1)
    cols = (left[:, None] + torch.arange(w, device=images.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    chans = torch.arange(c, device=images.device).view(1, c, 1, 1)
    return padded[batch, chans, rows, cols]


def rand_augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """torchvision's RandAugment (its defaults: 2 ops of magnitude 9 from its 14-op space), every image drawing
    its own ops and signs from ``gen``, as one RandAugment call per image would.

    One call on a batch would give every image the same ops, and a call per image costs ~10 ms of small
    kernels each (over a second per CIFAR batch of 128, many times the ViT's own step). So the images are
    grouped by (op, sign) and each group goes through torchvision's op in one batched call: the ops
    themselves are torchvision's (``_apply_image_or_video_transform``, the method RandAugment calls; its
    per-image statistics, e.g. autocontrast's range, are computed per image in a batch too); only the
    drawing is done here, so the draws come from the job's generator."""
    from torchvision.transforms import v2

    transform = v2.RandAugment()
    space = list(transform._AUGMENTATION_SPACE.items())
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # 8-bit, as PIL holds an image
    n, _, height, width = pixels.shape
    for _ in range(transform.num_ops):
        ops = torch.randint(len(space), (n,), generator=gen)
        negative = torch.rand(n, generator=gen) <= 0.5
        out = pixels.clone()
        for op in ops.unique().tolist():
            name, (magnitudes_of, signed) = space[op]
            magnitudes = magnitudes_of(transform.num_magnitude_bins, height, width)
            magnitude = float(magnitudes[transform.magnitude]) if magnitudes is not None else 0.0
            signs = (1.0, -1.0) if signed and magnitudes is not None else (1.0,)
            for sign in signs:
                chosen = (ops == op) & (negative == (sign < 0)) if len(signs) == 2 else ops == op
                index = chosen.nonzero().squeeze(1).to(pixels.device)
                if len(index):
                    out[index] = transform._apply_image_or_video_transform(
                        pixels[index],
                        name,
                        sign * magnitude,
                        interpolation=transform.interpolation,
                        fill=transform._fill,
                    )
        pixels = out
    return pixels.to(images.dtype) / 127.5 - 1


def augment(images: torch.Tensor, kind: str, gen: torch.Generator, flipped: torch.Tensor | None = None) -> torch.Tensor:
    """A training batch augmented by ``kind`` (one of :data:`AUGMENTATIONS`) with draws from ``gen``."""
    if kind == "none":
        return images
    if kind == "flip":
        return random_flip(images, gen, flipped)
    if flipped is not None:
        raise ValueError(
            f"train.augment={kind!r} cannot be applied to latents; allowed: {', '.join(LATENT_AUGMENTATIONS)}"
        )
    if kind not in AUGMENTATIONS:
        raise ValueError(f"train.augment={kind!r}; allowed: {', '.join(AUGMENTATIONS)}")
    images = random_flip(random_crop(images, gen), gen)
    return rand_augment(images, gen) if kind == "randaugment" else images
