"""Image datasets: float32 (N, C, H, W) scaled to [-1, 1] with int64 labels (a prepared split's images are
read from its files a batch at a time, :mod:`dblocks.data.prepared`).

* ``digits``: scikit-learn's 8x8 handwritten digits. They ship inside scikit-learn, so this is the
  offline default; the train/test split is a fixed stratified 80/20 split.
* ``digits-latent``: the same digits as 4x4x4 latents of an autoencoder that ``dblocks prepare`` trains
  (:mod:`dblocks.data.digits_latent`); it exists only as prepared data.
* ``imagenet256``: ImageNet as sd-vae-ft-ema latents (:mod:`dblocks.data.latents`).
* ``cifar10`` / ``cifar100``: the Hugging Face ``uoft-cs/cifar10`` / ``uoft-cs/cifar100`` datasets,
  either from the hub or, with ``root=``, from a local copy of their parquet files.
  :func:`write_cifar_parquet` writes such files from raw arrays.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dblocks.data.dataset import ImageDataset
from dblocks.data.latents import load_imagenet_latents
from dblocks.errors import DataError

IMAGE_DATASETS = ("digits", "digits-latent", "cifar10", "cifar100", "imagenet256")
SPLITS = ("train", "test")

# Per CIFAR variant: Hugging Face repo, label column used as the class, number of classes.
_CIFAR = {"cifar10": ("uoft-cs/cifar10", "label", 10), "cifar100": ("uoft-cs/cifar100", "fine_label", 100)}
_CIFAR100_COARSE_CLASSES = 20


def load_image_dataset(name: str, split: str, root: str | os.PathLike | None = None) -> ImageDataset:
    """Load one split of an image dataset.

    ``root`` is only used by the CIFAR datasets: a directory holding the Hugging Face parquet files
    (``{root}/**/{split}-*.parquet``); without it they are loaded from the Hugging Face hub.
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; expected one of {', '.join(IMAGE_DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for dataset {name!r}; expected one of {', '.join(SPLITS)}")
    if name == "digits":
        return _load_digits(split)
    if name == "imagenet256":
        return load_imagenet_latents(split, root)
    if name == "digits-latent":  # its autoencoder is trained once, by prepare; never silently again here
        raise DataError(
            "digits-latent exists only as prepared data: 'dblocks prepare --dataset digits-latent "
            "--out DIR' trains its autoencoder and encodes the digits; then pass --data DIR"
        )
    return _load_cifar(name, split, root)


def _load_digits(split: str) -> ImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    labels = digits.target
    # A fixed random_state makes the split independent of any global RNG state, and stratifying
    # keeps every class in both splits with the same proportions.
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels)
    idx = train_idx if split == "train" else test_idx
    # Pixel values are integers in 0..16.
    images = torch.from_numpy(digits.images[idx]).float().div(16.0).mul(2.0).sub(1.0).unsqueeze(1)
    return ImageDataset(
        name="digits",
        split=split,
        images=images.contiguous(),
        labels=torch.from_numpy(labels[idx]).long(),
        num_classes=10,
    )


def _load_cifar(name: str, split: str, root: str | os.PathLike | None) -> ImageDataset:
    # datasets is imported here because importing it is slow and digits does not need it.
    import datasets
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, label_column, num_classes = _CIFAR[name]
    if root is None:
        try:
            ds = datasets.load_dataset(repo_id, split=split)
        # Without network datasets raises ConnectionError (OfflineModeIsEnabled when HF offline
        # mode is on); huggingface_hub raises LocalEntryNotFoundError when a file is neither
        # reachable nor cached.
        except (ConnectionError, LocalEntryNotFoundError) as exc:
            raise DataError(
                f"could not download {name!r} ({repo_id}) from the Hugging Face hub: {exc}. "
                f"Pass root= pointing at a local copy of its parquet files ({split}-*.parquet)."
            ) from exc
    else:
        pattern = os.path.join(os.fspath(root), "**", f"{split}-*.parquet")
        files = sorted(glob.glob(pattern, recursive=True))
        if not files:
            raise DataError(
                f"no parquet files for {name!r} split {split!r} under root {os.fspath(root)!r}; "
                f"expected files matching {pattern!r}"
            )
        ds = datasets.load_dataset("parquet", data_files=files, split="train")

    missing = {"img", label_column} - set(ds.column_names)
    if missing:
        raise DataError(
            f"{name!r} data has columns {ds.column_names}, missing {sorted(missing)}; is it a copy of {repo_id}?"
        )
    # Forcing RGB makes every decoded image (H, W, 3) even if a file holds grayscale or RGBA PNGs.
    ds = ds.select_columns(["img", label_column]).cast_column("img", datasets.Image(mode="RGB"))
    # The numpy format decodes the whole column into one stacked uint8 (N, H, W, 3) array, which
    # avoids building a PIL image and a tensor per example.
    arrays = ds.with_format("numpy")[:]
    # Reorder while still uint8 and scale in place: a 50k-image split is 600 MB as float32, so
    # every avoided float temporary matters.
    images = torch.from_numpy(arrays["img"]).permute(0, 3, 1, 2).contiguous().float()
    images.div_(127.5).sub_(1.0)
    return ImageDataset(
        name=name,
        split=split,
        images=images,
        labels=torch.from_numpy(arrays[label_column]).long(),
        num_classes=num_classes,
    )


def write_cifar_parquet(
    path: str | os.PathLike,
    images_uint8_nhwc: np.ndarray,
    labels: Sequence[int],
    name: str = "cifar10",
    coarse_labels: Sequence[int] | None = None,
) -> None:
    """Write images and labels as one parquet file in the format of the Hugging Face CIFAR repos.

    ``images_uint8_nhwc`` is a uint8 array (N, H, W, 3). For ``cifar10`` ``labels`` fill ``label``;
    for ``cifar100`` they fill ``fine_label`` and ``coarse_labels`` (required) fill ``coarse_label``.
    Parent directories of ``path`` are created.
    """
    import datasets

    if name not in _CIFAR:
        raise ValueError(f"unknown CIFAR dataset {name!r}; expected one of {', '.join(_CIFAR)}")
    images = np.asarray(images_uint8_nhwc)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected a uint8 array (N, H, W, 3), got {images.dtype} {images.shape}")
    n = images.shape[0]
    if len(labels) != n:
        raise ValueError(f"got {n} images but {len(labels)} labels")

    _, label_column, num_classes = _CIFAR[name]
    columns = {"img": list(images), label_column: [int(y) for y in labels]}
    features = {"img": datasets.Image(), label_column: datasets.ClassLabel(num_classes=num_classes)}
    if name == "cifar100":
        if coarse_labels is None or len(coarse_labels) != n:
            raise ValueError(f"cifar100 needs coarse_labels, one per image ({n})")
        columns["coarse_label"] = [int(y) for y in coarse_labels]
        features["coarse_label"] = datasets.ClassLabel(num_classes=_CIFAR100_COARSE_CLASSES)
    elif coarse_labels is not None:
        raise ValueError(f"coarse_labels only apply to cifar100, not {name!r}")

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    ds.to_parquet(os.fspath(path))
