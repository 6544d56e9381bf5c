"""The prepared on-disk form of a dataset split: what the pipeline's prepare step writes once, DVC
versions, and every training job reads. Pixels are stored as the original integers (uint8) with
their maximum value, so the round trip to the [-1, 1] floats is exact, in a hashed safetensors file
(no pickle)."""

from __future__ import annotations

from pathlib import Path

import torch

from dblocks.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dblocks.data.images import ImageDataset

#: largest raw pixel value per dataset: digits count ink in 0..16, CIFAR is 8-bit
PIXEL_MAX = {"digits": 16, "cifar10": 255, "cifar100": 255}
#: datasets of VAE latents (dblocks.data.latents), stored as float32 with their scale factor
LATENT_DATASETS = ("imagenet256",)


def prepared_path(directory: str | Path, split: str) -> Path:
    return Path(directory) / f"{split}.safetensors"


def save_prepared(ds: ImageDataset, directory: str | Path) -> Path:
    if ds.name in LATENT_DATASETS:
        from dblocks.data.latents import LATENT_SCALE

        path = prepared_path(directory, ds.split)
        save_checkpoint(path, {"images": ds.images.float().contiguous(), "labels": ds.labels},
                        {"kind": "dataset", "name": ds.name, "split": ds.split, "num_classes": ds.num_classes,
                         "latent_scale": LATENT_SCALE, "examples": len(ds)})
        return path
    pixel_max = PIXEL_MAX[ds.name]
    raw = torch.round((ds.images + 1) / 2 * pixel_max)
    path = prepared_path(directory, ds.split)
    save_checkpoint(path, {"images": raw.to(torch.uint8), "labels": ds.labels},
                    {"kind": "dataset", "name": ds.name, "split": ds.split, "num_classes": ds.num_classes,
                     "pixel_max": pixel_max, "examples": len(ds)})
    return path


def load_prepared(directory: str | Path, split: str, expected_name: str | None = None) -> ImageDataset:
    path = prepared_path(directory, split)
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != "dataset":
        raise CheckpointError(path, f"is a {meta.get('kind')!r} file, not a prepared dataset", field="kind")
    if expected_name is not None and meta["name"] != expected_name:
        raise CheckpointError(path, f"holds dataset {meta['name']!r}, the config asks for {expected_name!r}",
                              field="name")
    if "latent_scale" in meta:  # VAE latents, already scaled
        images = tensors["images"].float()
    else:
        images = tensors["images"].float() / meta["pixel_max"] * 2 - 1
    return ImageDataset(meta["name"], meta["split"], images, tensors["labels"].long(), meta["num_classes"])
