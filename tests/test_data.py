"""Tests for dblocks.data: the digits split, CIFAR parquet round-trips and the error messages."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from dblocks.data import IMAGE_DATASETS, load_image_dataset, write_cifar_parquet
from dblocks.errors import DataError

# Directory of the parquet files inside each Hugging Face repo.
HF_SUBDIR = {"cifar10": "plain_text", "cifar100": "cifar100"}
LABEL_COLUMN = {"cifar10": "label", "cifar100": "fine_label"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    """Keep `datasets` offline and its cache under tmp_path; returns the `datasets` module."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    import datasets

    # datasets reads these variables once, at import; an earlier test may already have imported it.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    return datasets


def _write_split(root, name, split, n, seed):
    """Write `n` random images as {root}/<HF subdir>/{split}-00000-of-00001.parquet."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES[name], size=n)
    coarse = rng.integers(0, 20, size=n) if name == "cifar100" else None
    path = root / HF_SUBDIR[name] / f"{split}-00000-of-00001.parquet"
    write_cifar_parquet(path, images, labels, name=name, coarse_labels=coarse)
    return path, images, labels, coarse


# --- digits -------------------------------------------------------------------------------------


def test_digits_shapes_range_and_types():
    train = load_image_dataset("digits", "train")
    test = load_image_dataset("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    for ds, split in ((train, "train"), (test, "test")):
        assert (ds.name, ds.split, ds.num_classes) == ("digits", split, 10)
        assert ds.shape == (1, 8, 8)
        assert ds.images.shape == (len(ds), 1, 8, 8)
        assert ds.images.dtype == torch.float32
        assert ds.labels.dtype == torch.int64 and ds.labels.shape == (len(ds),)
        # Raw pixels span 0..16, so both ends of [-1, 1] are reached.
        assert ds.images.min().item() == -1.0 and ds.images.max().item() == 1.0
        assert set(ds.labels.tolist()) == set(range(10))


def test_digits_is_deterministic_regardless_of_global_rng():
    torch.manual_seed(1)
    np.random.seed(1)
    first = load_image_dataset("digits", "train")
    torch.manual_seed(2)
    np.random.seed(2)
    second = load_image_dataset("digits", "train")
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)


def test_digits_splits_are_disjoint_and_cover_the_dataset():
    def rows(ds):  # one row per example: 64 pixels then the label
        return np.concatenate([ds.images.reshape(len(ds), -1).numpy(), ds.labels[:, None].numpy()], axis=1)

    train = rows(load_image_dataset("digits", "train"))
    test = rows(load_image_dataset("digits", "test"))
    raw = load_digits()
    expected = np.concatenate([raw.data / 16.0 * 2.0 - 1.0, raw.target[:, None]], axis=1)

    # The 1797 digit images are pairwise distinct, so comparing rows identifies examples.
    assert not {r.tobytes() for r in train} & {r.tobytes() for r in test}
    both = np.concatenate([train, test]).astype(np.float64)
    assert np.array_equal(np.unique(both, axis=0), np.unique(expected, axis=0))
    assert len(both) == len(expected) == 1797


def test_digits_split_is_stratified():
    full = np.bincount(load_digits().target, minlength=10)
    test = np.bincount(load_image_dataset("digits", "test").labels.numpy(), minlength=10)
    assert (test > 0).all()
    # Stratification gives each class its 20% share up to rounding.
    assert np.abs(test - 0.2 * full).max() <= 1.0


# --- CIFAR from local parquet files ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_parquet_round_trip(name, tmp_path, hf_offline):
    root = tmp_path / "hf_repo"
    written = {
        "train": _write_split(root, name, "train", n=20, seed=0),
        "test": _write_split(root, name, "test", n=7, seed=1),
    }
    for split, (_path, images, labels, _) in written.items():
        ds = load_image_dataset(name, split, root=root)
        assert (ds.name, ds.split, ds.num_classes) == (name, split, NUM_CLASSES[name])
        assert ds.shape == (3, 32, 32) and len(ds) == len(images)
        assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64
        assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
        # Tolerances far below one grey level (2/255), so every pixel value is recovered.
        torch.testing.assert_close(ds.images, torch.from_numpy(images).permute(0, 3, 1, 2) / 127.5 - 1.0)
        np.testing.assert_array_equal(ds.labels.numpy(), labels)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_written_parquet_has_hugging_face_features(name, tmp_path, hf_offline):
    datasets = hf_offline
    path, images, labels, coarse = _write_split(tmp_path, name, "train", n=5, seed=2)
    ds = datasets.load_dataset("parquet", data_files=[str(path)], split="train")

    expected = {"img": datasets.Image(), LABEL_COLUMN[name]: datasets.ClassLabel(num_classes=NUM_CLASSES[name])}
    if name == "cifar100":
        expected["coarse_label"] = datasets.ClassLabel(num_classes=20)
    assert ds.features == datasets.Features(expected)
    assert ds[LABEL_COLUMN[name]] == labels.tolist()
    if name == "cifar100":
        assert ds["coarse_label"] == coarse.tolist()
    # The Image feature stores PNG bytes, which decode to the original pixels.
    raw = ds.cast_column("img", datasets.Image(decode=False))[0]["img"]
    assert raw["bytes"].startswith(b"\x89PNG")
    np.testing.assert_array_equal(np.asarray(ds[0]["img"]), images[0])


# --- errors -------------------------------------------------------------------------------------


def test_unknown_dataset_name_lists_the_allowed_names():
    with pytest.raises(ValueError, match=r"'imagenet'.*digits, digits-latent, cifar10, cifar100, imagenet256"):
        load_image_dataset("imagenet", "train")
    assert IMAGE_DATASETS == ("digits", "digits-latent", "cifar10", "cifar100", "imagenet256")


@pytest.mark.parametrize("name", IMAGE_DATASETS)
def test_unknown_split_lists_the_allowed_splits(name):
    with pytest.raises(ValueError, match=r"'val'.*train, test"):
        load_image_dataset(name, "val")


def test_root_without_parquet_files(tmp_path, hf_offline):
    _write_split(tmp_path, "cifar10", "train", n=3, seed=0)
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path))}.*test-\*\.parquet"):
        load_image_dataset("cifar10", "test", root=tmp_path)


def test_root_with_other_cifar_variant_names_the_missing_column(tmp_path, hf_offline):
    _write_split(tmp_path, "cifar10", "train", n=3, seed=0)
    with pytest.raises(ValueError, match="fine_label"):
        load_image_dataset("cifar100", "train", root=tmp_path)


def test_hub_without_network_points_at_root(monkeypatch, hf_offline):
    datasets = hf_offline
    calls = []
    offline = ConnectionError("Couldn't reach 'uoft-cs/cifar100' on the Hub (OfflineModeIsEnabled)")

    # Stands in for the hub so the test neither needs nor waits on the network; this is the
    # exception datasets raises when it cannot reach the hub.
    def unreachable_hub(path, split=None, **kwargs):
        calls.append((path, split))
        raise offline

    monkeypatch.setattr(datasets, "load_dataset", unreachable_hub)
    with pytest.raises(DataError, match=r"could not download 'cifar100'.*root=") as excinfo:
        load_image_dataset("cifar100", "test")
    assert excinfo.value.__cause__ is offline
    assert calls == [("uoft-cs/cifar100", "test")]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "cifar100"}, "coarse_labels"),
        ({"name": "cifar10", "coarse_labels": [0, 0]}, "only apply to cifar100"),
        ({"name": "svhn"}, "'svhn'"),
        ({"images_uint8_nhwc": np.zeros((2, 32, 32, 3), dtype=np.float32)}, "uint8"),
        ({"labels": [0]}, "2 images but 1 labels"),
    ],
)
def test_write_cifar_parquet_rejects_bad_input(kwargs, match, tmp_path):
    args = {
        "path": tmp_path / "train-00000-of-00001.parquet",
        "images_uint8_nhwc": np.zeros((2, 32, 32, 3), dtype=np.uint8),
        "labels": [0, 1],
    }
    with pytest.raises(ValueError, match=match):
        write_cifar_parquet(**(args | kwargs))
