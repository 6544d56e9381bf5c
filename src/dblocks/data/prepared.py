"""The prepared on-disk form of a dataset split: what the pipeline's prepare step writes once, DVC
versions, and every training job reads. Pixels are stored as the original integers (uint8) with
their maximum value, so the round trip to the [-1, 1] floats is exact, in a hashed safetensors file
(no pickle)."""

from __future__ import annotations

from pathlib import Path

import torch

from dblocks.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dblocks.config import LATENT_DATASETS  # datasets of autoencoder latents: stored as float32 with their scale
from dblocks.data.images import ImageDataset
from dblocks.data.text import TextDataset, text_dataset_from_stream, token_streams

#: largest raw pixel value per dataset: digits count ink in 0..16, CIFAR is 8-bit
PIXEL_MAX = {"digits": 16, "cifar10": 255, "cifar100": 255}


def prepared_path(directory: str | Path, split: str) -> Path:
    return Path(directory) / f"{split}.safetensors"


def save_prepared(ds: ImageDataset, directory: str | Path, provenance: dict | None = None) -> Path:
    """Write one split; ``provenance`` is recorded in its metadata (e.g. the sha256 of the autoencoder that
    encoded a latent dataset)."""
    meta = {**(provenance or {}), "kind": "dataset", "name": ds.name, "split": ds.split,
            "num_classes": ds.num_classes, "examples": len(ds)}
    if ds.name in LATENT_DATASETS:  # latents are real-valued: stored as they are, with their scale
        if ds.latent_scale is None:
            raise ValueError(f"{ds.name} {ds.split}: a latent dataset needs its latent_scale")
        images, meta["latent_scale"] = ds.images.float().contiguous(), float(ds.latent_scale)
    else:  # pixels go back to their original integers, so the round trip is exact
        meta["pixel_max"] = PIXEL_MAX[ds.name]
        images = torch.round((ds.images + 1) / 2 * meta["pixel_max"]).to(torch.uint8)
    tensors = {"images": images, "labels": ds.labels}
    if ds.flipped is not None:  # a latent dataset's encodings of the mirrored images (train.augment: flip)
        tensors["flipped"] = ds.flipped.float().contiguous()
    path = prepared_path(directory, ds.split)
    save_checkpoint(path, tensors, meta)
    return path


def _load_split(directory: str | Path, split: str, kind: str, expected_name: str | None):
    """(path, tensors, metadata) of a prepared split, checked to be a ``kind`` file of ``expected_name``."""
    path = prepared_path(directory, split)
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != kind:
        raise CheckpointError(path, f"is a {meta.get('kind')!r} file, not a prepared {kind}", field="kind")
    if expected_name is not None and meta["name"] != expected_name:
        raise CheckpointError(path, f"holds dataset {meta['name']!r}, the config asks for {expected_name!r}",
                              field="name")
    return path, tensors, meta


def load_prepared(directory: str | Path, split: str, expected_name: str | None = None) -> ImageDataset:
    path, tensors, meta = _load_split(directory, split, "dataset", expected_name)
    if not {"images", "labels"} <= set(tensors) <= {"images", "labels", "flipped"}:
        raise CheckpointError(path, f"holds tensors {sorted(tensors)}; allowed: images and labels (and, for "
                                    f"latents, flipped)", field="tensors")
    images, labels, flipped = tensors["images"], tensors["labels"], tensors.get("flipped")
    if flipped is not None and ("latent_scale" not in meta or flipped.shape != images.shape):
        raise CheckpointError(path, f"has mirrored encodings of shape {tuple(flipped.shape)}; allowed: latents of "
                                    f"the images' shape {tuple(images.shape)}", field="flipped")
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise CheckpointError(path, f"has {labels.shape[0] if labels.ndim else 0} labels for images of shape "
                                    f"{tuple(images.shape)}; allowed: images (N, C, H, W) with N labels",
                              field="labels")
    if images.shape[0] == 0:
        raise CheckpointError(path, "holds no examples; allowed: a split with at least one example",
                              field="examples")
    if "latent_scale" in meta:  # autoencoder latents, already scaled
        images = images.float()
    else:
        images = images.float() / meta["pixel_max"] * 2 - 1
    return ImageDataset(meta["name"], meta["split"], images, labels.long(), meta["num_classes"],
                        latent_scale=meta.get("latent_scale"), flipped=flipped)


def save_prepared_text(name: str, split: str, directory: str | Path, root=None) -> Path:
    """A text split as its token streams (every tokenizer), windowed at load time for any context length."""
    streams = token_streams(name, split, root)
    path = prepared_path(directory, split)
    save_checkpoint(path, streams, {"kind": "text-dataset", "name": name, "split": split,
                                    "tokens": {k: int(v.numel()) for k, v in streams.items()}})
    return path


def load_prepared_text(directory: str | Path, split: str, seq_len: int, tokenizer: str,
                       expected_name: str | None = None) -> TextDataset:
    path, tensors, meta = _load_split(directory, split, "text-dataset", expected_name)
    if tokenizer not in tensors:
        raise CheckpointError(path, f"has no {tokenizer!r} tokens; allowed: {', '.join(sorted(tensors))}",
                              field="tensors")
    return text_dataset_from_stream(meta["name"], meta["split"], tensors[tokenizer], seq_len, tokenizer)
