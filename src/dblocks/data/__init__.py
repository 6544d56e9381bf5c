"""Datasets for the DiffusionBlocks pipeline."""

from dblocks.data.images import (
    IMAGE_DATASETS,
    ImageDataset,
    load_image_dataset,
    write_cifar_parquet,
)

__all__ = ["IMAGE_DATASETS", "ImageDataset", "load_image_dataset", "write_cifar_parquet"]
