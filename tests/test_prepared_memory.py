"""Prepared datasets that do not fill memory (issue 16, item 3): training reads a prepared split's rows from
its files a batch at a time, so a job's resident memory does not grow with the dataset; a large latent
dataset is prepared in shards, never whole in memory; and a batch is the same, for the same generator,
however the split is sharded. Peak memory is measured in fresh processes (VmHWM, the kernel's peak resident
set), never mocked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dblocks.checkpoint import sidecar_path
from dblocks.data import ImageDataset, load_prepared, load_prepared_text, save_prepared
from dblocks.data.autoencoder import ConvAutoencoder
from dblocks.data.latents import LatentCodec, encode_folder, prepare_imagenet_latents, write_imagenet_split
from dblocks.data.prepared import (
    DEFAULT_SHARD_EXAMPLES,
    SHARD_EXAMPLES_ENV,
    StoredRows,
    pixels_to_unit,
    save_prepared_text,
    shard_examples,
)
from dblocks.data.text import load_text_dataset
from dblocks.errors import CheckpointError
from dblocks.pipeline import Pipeline
from dblocks.train import sample_batch

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
PIXELS = (3, 32, 32)  # CIFAR-shaped: 3,072 bytes a row as stored (uint8)
LATENT = (4, 8, 8)
MIB = 1 << 20

needs_proc = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak RSS is read from /proc")


def peak_rss_of(script: str, *args) -> int:
    """The peak resident set (VmHWM, bytes) of a fresh Python process that runs ``script`` with ``args``."""
    probe = (
        script + "\nimport re\nprint(re.search(r'VmHWM:\\s*(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run(
        [sys.executable, "-c", probe, *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1]) * 1024


def pixel_split(rows: int, seed: int = 0, split: str = "train") -> ImageDataset:
    """A CIFAR-shaped split of random pixels whose float images are read from a uint8 tensor a chunk at a time
    (so that writing the 10x split never builds its 4x larger floats here either)."""
    raw = torch.randint(0, 256, (rows, *PIXELS), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    images = StoredRows([raw], partial(pixels_to_unit, pixel_max=255), torch.float32)
    labels = torch.randint(0, 10, (rows,), generator=torch.Generator().manual_seed(seed + 1))
    return ImageDataset("cifar10", split, images, labels, 10)


def latent_split(rows: int, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    return ImageDataset(
        "imagenet256",
        "train",
        torch.randn(rows, *LATENT, generator=g),
        torch.randint(0, 1000, (rows,), generator=g),
        1000,
        latent_scale=0.18215,
        flipped=torch.randn(rows, *LATENT, generator=g),
    )


TRAIN_20_BATCHES = """
import sys, torch
from dblocks.data import load_prepared
from dblocks.train import sample_batch
data = load_prepared(sys.argv[1], "train")
gen = torch.Generator().manual_seed(0)
for _ in range(20):
    batch = sample_batch(data, 64, gen, torch.device("cpu"))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (64, 3, 32, 32)
"""


@needs_proc
def test_a_jobs_peak_memory_does_not_grow_with_the_prepared_dataset(tmp_path):
    """Twenty training batches from a prepared split of N and of 10 N CIFAR-shaped images (12 MB and 123 MB
    as stored). The margin, 10 % of the larger file (12 MB), is what the process may differ by for reasons
    other than the dataset: its labels (8 bytes an example, 0.3 MB here) and allocator noise (measured: the
    peaks, ~550 MiB, differ by under 2 MiB). The loader before held the split as float32, 4 bytes per stored
    byte, so its peaks differed by more than 4 x the 111 MB between the files (measured: 950 MiB)."""
    n = 4000
    small, large = save_prepared(pixel_split(n), tmp_path / "n"), save_prepared(pixel_split(10 * n), tmp_path / "10n")
    margin = 0.10 * large.stat().st_size
    peak_small = peak_rss_of(TRAIN_20_BATCHES, small.parent)
    peak_large = peak_rss_of(TRAIN_20_BATCHES, large.parent)
    assert abs(peak_large - peak_small) < margin, (
        f"peak RSS {peak_small / MIB:.1f} MiB with {n} examples ({small.stat().st_size / MIB:.1f} MiB stored), "
        f"{peak_large / MIB:.1f} MiB with {10 * n} ({large.stat().st_size / MIB:.1f} MiB stored): they differ by "
        f"{(peak_large - peak_small) / MIB:.1f} MiB, allowed < {margin / MIB:.1f} MiB"
    )


WRITE_SHARDS = """
import sys, torch
from dblocks.data.prepared import ShardWriter, dataset_record
rows, out = int(sys.argv[1]), sys.argv[2]
meta = dataset_record("imagenet256", "train", 1000, rows, 0.18215)
writer = ShardWriter(out, meta, shard_size=200)
gen = torch.Generator().manual_seed(0)
for start in range(0, rows, 64):  # the encoder's batches, as write_imagenet_split hands them over
    k = min(64, rows - start)
    writer.add({"images": torch.randn(k, 4, 32, 32, generator=gen), "flipped": torch.randn(k, 4, 32, 32, generator=gen)})
writer.finish(torch.zeros(rows, dtype=torch.long))
"""


@needs_proc
def test_prepare_writes_shards_without_holding_the_split(tmp_path):
    """The writer that prepare streams its encoded batches into holds one shard (200 rows of latents and mirrored
    latents, 6.6 MB) at a time: writing 10 x the rows (8,000: 262 MB) peaks where writing 800 (26 MB) does,
    within 10 % of the larger split (measured: within 4 MB); holding the split would add the 236 MB difference."""
    peak_small = peak_rss_of(WRITE_SHARDS, 800, tmp_path / "small")
    peak_large = peak_rss_of(WRITE_SHARDS, 8000, tmp_path / "large")
    stored = sum(p.stat().st_size for p in (tmp_path / "large/shards").glob("*.safetensors"))
    assert len(list((tmp_path / "large/shards").glob("*.safetensors"))) == 40
    assert abs(peak_large - peak_small) < 0.10 * stored, (
        f"peak RSS {peak_small / MIB:.1f} MiB writing 800 rows, {peak_large / MIB:.1f} MiB writing 8000 "
        f"({stored / MIB:.1f} MiB stored); allowed difference < {0.10 * stored / MIB:.1f} MiB"
    )
    assert len(load_prepared(tmp_path / "large", "train")) == 8000


def test_shards_give_the_rows_of_one_file_and_each_is_verified(tmp_path):
    ds = latent_split(10)
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    save_prepared(ds, one)
    save_prepared(ds, sharded, shard_size=3)
    assert sorted(p.name for p in (sharded / "shards").iterdir()) == [
        f"train-0000{i}.{ext}" for i in range(4) for ext in ("json", "safetensors")
    ]
    record = json.loads((sharded / "train.json").read_text())
    assert [s["examples"] for s in record["shards"]] == [3, 3, 3, 1] and record["examples"] == 10
    a, b = load_prepared(one, "train"), load_prepared(sharded, "train")
    assert len(b.images.parts) == 4 and len(a.images.parts) == 1
    idx = torch.tensor([9, 0, 3, 3, 2, -1, 5])
    for rows in (idx, slice(None), slice(2, 9, 3), 4, -2, torch.arange(10) % 2 == 0, [7, 1]):
        assert torch.equal(a.images[rows], b.images[rows]) and torch.equal(a.flipped[rows], b.flipped[rows])
    assert torch.equal(b.images[:], ds.images) and torch.equal(b.flipped[:], ds.flipped)
    assert torch.equal(a.labels, b.labels) and a.latent_scale == b.latent_scale == 0.18215
    with pytest.raises(IndexError, match="row 10 is out of range for 10 rows"):
        b.images[torch.tensor([1, 10])]

    # one flipped byte in one shard: the error names that shard
    shard = sharded / "shards/train-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"shards/train-00002\.safetensors \(field 'sha256'\): checksum"):
        load_prepared(sharded, "train")
    # a valid shard that is not the one listed (another's file and record put in its place)
    for path in (shard, sidecar_path(shard)):
        path.write_bytes((sharded / "shards" / path.name.replace("00002", "00001")).read_bytes())
    with pytest.raises(CheckpointError, match=r"train-00002\.safetensors.*is not the shard train\.safetensors lists"):
        load_prepared(sharded, "train")
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"shards/train-00002\.safetensors"):
        load_prepared(sharded, "train")
    # written again in fewer shards: the earlier ones beyond them are removed (DVC would version them)
    save_prepared(ds, sharded, shard_size=6)
    assert sorted(p.name for p in (sharded / "shards").glob("*.safetensors")) == [
        "train-00000.safetensors",
        "train-00001.safetensors",
    ]
    assert torch.equal(load_prepared(sharded, "train").images[:], ds.images)


def test_a_batch_is_the_same_from_a_sharded_and_an_unsharded_copy(tmp_path):
    for name, ds, augment in (("pixels", pixel_split(300), "crop_flip"), ("latents", latent_split(40), "flip")):
        save_prepared(ds, tmp_path / name / "one")
        save_prepared(ds, tmp_path / name / "sharded", shard_size=7)
        one, sharded = (
            load_prepared(tmp_path / name / "one", "train"),
            load_prepared(tmp_path / name / "sharded", "train"),
        )
        in_memory = ImageDataset(
            ds.name,
            ds.split,
            ds.images[:],
            ds.labels,
            ds.num_classes,
            ds.latent_scale,
            None if ds.flipped is None else ds.flipped[:],
        )
        batches = {}
        for seed in (0, 1):
            a, b, c = (
                sample_batch(data, 32, torch.Generator().manual_seed(seed), CPU, augment)
                for data in (one, sharded, in_memory)
            )
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], c["image"]), (name, seed)
            assert torch.equal(a["label"], b["label"]) and torch.equal(a["label"], c["label"]), (name, seed)
            batches[seed] = a["image"]
        assert not torch.equal(batches[0], batches[1])


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    """An ImageNet-style folder: train/ (5 images) and val/ (3), two classes, JPEGs of odd sizes."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", 5), ("val", 3)):
        for i in range(count):
            folder = root / split / f"n0000000{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            size = (260 + 7 * i, 300 - 5 * i)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"img{i}.JPEG")
    return root


def test_imagenet_prepare_streams_into_shards_that_read_as_the_encoded_folder(imagenet_root, tmp_path, monkeypatch):
    """prepare encodes each split straight into shards (here of 2 examples, set by the environment); read back,
    they are the latents (and mirrored latents) that encoding the whole folder in memory gives."""
    monkeypatch.setenv(SHARD_EXAMPLES_ENV, "2")
    written = prepare_imagenet_latents(imagenet_root, tmp_path, "untrained-conv", batch_size=2)
    assert [p.name for p in written] == ["autoencoder.safetensors", "train.safetensors", "test.safetensors"]
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.safetensors")) == [
        "test-00000.safetensors",
        "test-00001.safetensors",
        "train-00000.safetensors",
        "train-00001.safetensors",
        "train-00002.safetensors",
    ]
    codec = LatentCodec(ConvAutoencoder(seed=0))
    train = load_prepared(tmp_path, "train", "imagenet256")
    latents, labels, _, flipped = encode_folder(codec, imagenet_root / "train", batch_size=2, mirrored=True)
    torch.testing.assert_close(train.images[:], latents, rtol=0, atol=0)
    torch.testing.assert_close(train.flipped[:], flipped, rtol=0, atol=0)
    assert torch.equal(train.labels, labels) and train.latent_scale == codec.scale
    test = load_prepared(tmp_path, "test", "imagenet256")
    assert test.flipped is None and len(test) == 3
    record = json.loads((tmp_path / "train.json").read_text())
    assert record["autoencoder"] == "untrained-conv" and len(record["shards"]) == 3
    # the shard size comes from the call before the environment
    write_imagenet_split(codec, imagenet_root, "test", tmp_path / "one", shard_size=10, batch_size=2)
    assert torch.equal(load_prepared(tmp_path / "one", "test").images[:], test.images[:])


def test_shard_size_setting(monkeypatch):
    monkeypatch.delenv(SHARD_EXAMPLES_ENV, raising=False)
    assert shard_examples() == DEFAULT_SHARD_EXAMPLES and shard_examples(7) == shard_examples("7") == 7
    monkeypatch.setenv(SHARD_EXAMPLES_ENV, "12")
    assert shard_examples() == 12
    for bad in ("0", "many", "2.5"):
        monkeypatch.setenv(SHARD_EXAMPLES_ENV, bad)
        with pytest.raises(ValueError, match=rf"{SHARD_EXAMPLES_ENV}='{re.escape(bad)}': allowed: an integer >= 1"):
            shard_examples()


def test_prepared_text_windows_are_read_per_batch_as_int64(tmp_path):
    save_prepared_text("shakespeare", "test", tmp_path)
    for tokenizer in ("char27", "bytes"):
        prepared = load_prepared_text(tmp_path, "test", 64, tokenizer, expected_name="shakespeare")
        source = load_text_dataset("shakespeare", "test", 64, tokenizer)
        assert isinstance(prepared.tokens, StoredRows) and prepared.tokens.stored_dtype != torch.int64
        idx = torch.randint(len(source), (16,), generator=torch.Generator().manual_seed(0))
        batch = prepared.batch(idx)["tokens"]
        assert batch.dtype == torch.int64 and torch.equal(batch, source.tokens[idx])
        assert torch.equal(prepared.tokens[:3, 5:9], source.tokens[:3, 5:9]) and len(prepared) == len(source)


def test_verify_checks_every_listed_shard_and_sets_a_corrupt_ones_folder_aside(imagenet_root, tmp_path, monkeypatch):
    """`dblocks verify` hashes the shards a sharded split's record lists; a corrupt shard sets aside the whole
    shards/ folder (the prepare job's directory output), so the next run prepares the data set again."""
    monkeypatch.setenv(SHARD_EXAMPLES_ENV, "2")
    monkeypatch.chdir(tmp_path)
    prepared = tmp_path / "data/prepared/imagenet256"
    prepare_imagenet_latents(imagenet_root, prepared, "untrained-conv", batch_size=2)
    params = tmp_path / "part.yaml"
    params.write_text(f"base: {REPO / 'params/smoke.yaml'}\nonly: [dit-imagenet256]\ndata_dir: data\n")
    shards = sorted(
        f"data/prepared/imagenet256/shards/{p.name}"
        for p in (prepared / "shards").iterdir()
        if p.suffix == ".safetensors"
    )
    assert len(shards) == 5 and set(shards) <= set(Pipeline.load(params).artefacts())

    dblocks = str(Path(sys.executable).parent / "dblocks")
    ok = subprocess.run([dblocks, "verify", "--params", str(params)], capture_output=True, text=True)
    assert ok.returncode == 0 and "0 corrupt" in ok.stdout, ok.stdout + ok.stderr
    shard = prepared / "shards/train-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = subprocess.run([dblocks, "verify", "--params", str(params), "--quarantine"], capture_output=True, text=True)
    assert "CORRUPT  data/prepared/imagenet256/shards/train-00001.safetensors" in bad.stdout, bad.stdout + bad.stderr
    assert not (prepared / "shards").exists() and (prepared / "shards.corrupt").is_dir()
