"""Datasets for the DiffusionBlocks pipeline."""

from dblocks.data.dataset import ImageDataset
from dblocks.data.images import IMAGE_DATASETS, load_image_dataset, write_cifar_parquet
from dblocks.data.prepared import (
    StoredRows,
    load_prepared,
    load_prepared_text,
    prepared_path,
    save_prepared,
    save_prepared_text,
)

__all__ = [
    "IMAGE_DATASETS",
    "ImageDataset",
    "StoredRows",
    "load_image_dataset",
    "write_cifar_parquet",
    "load_prepared",
    "load_prepared_text",
    "save_prepared_text",
    "prepared_path",
    "save_prepared",
]
