"""The latent path. ImageNet-256 (DiT-L/2): encode images with a VAE, train and sample in latent space,
decode for FID; tested with a small randomly initialised autoencoder of sd-vae-ft-ema's interface. Its
tiny twin digits-latent: the autoencoder that prepare trains, its checkpoint, and a run through the CLI
that decodes with it."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dblocks.checkpoint import load_metadata
from dblocks.cli import main
from dblocks.config import AUTOENCODER_FILE
from dblocks.data import load_image_dataset, load_prepared, save_prepared
from dblocks.data.autoencoder import ConvAutoencoder, Geometry, reconstruction_mse
from dblocks.data.latents import (
    LATENT_SCALE,
    LatentCodec,
    center_crop_arr,
    decoder_for,
    encode_folder,
    geometry_of,
    load_autoencoder,
    load_imagenet_latents,
)
from dblocks.errors import CheckpointError, DataError
from dblocks.evaluate import evaluate_generator
from dblocks.experiment import Experiment
from dblocks.metrics.fid import save_feature_net, train_feature_net
from dblocks.metrics.reference import FeatureSpace, reference_statistics
from tests.conftest import micro_config


def run(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def codec():
    return LatentCodec(ConvAutoencoder())  # untrained, sd-vae-ft-ema's geometry


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    """An ImageNet-style folder: train/ and val/, two classes, JPEGs of odd sizes."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, sizes in (("train", [(300, 280), (600, 520), (256, 400)]), ("val", [(320, 300), (280, 700)])):
        for i, (w, h) in enumerate(sizes):
            folder = root / split / f"n0000000{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.JPEG")
    return root


def test_codec_scales_latents_and_has_the_vae_shapes(codec):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 4, 8, 8)  # 8x downsampling, 4 channels
    torch.testing.assert_close(z, codec.vae.encode(x).latent_dist.mean * LATENT_SCALE)
    sampled = codec.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == z.shape and not torch.equal(sampled, z)
    images = codec.decode(z)
    assert images.shape == (2, 3, 64, 64) and images.abs().max() <= 1
    torch.testing.assert_close(images, codec.vae.decode(z / LATENT_SCALE).sample.clamp(-1, 1))
    with pytest.raises(ValueError, match="divisible by 8"):
        codec.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match="latents"):
        codec.decode(torch.zeros(1, 3, 8, 8))
    # diffusers' AutoencoderKL states its geometry in its config (sd-vae-ft-ema's: four blocks, 8x)
    sd_vae = SimpleNamespace(
        config=SimpleNamespace(in_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512])
    )
    assert geometry_of(sd_vae) == codec.geometry == Geometry(3, 4, 8)


def test_center_crop_and_folder_encoding(codec, imagenet_root):
    img = Image.fromarray(np.zeros((700, 280, 3), dtype=np.uint8))
    assert center_crop_arr(img).shape == (256, 256, 3)
    latents, labels, classes, none = encode_folder(codec, imagenet_root / "train", batch_size=2)
    assert latents.shape == (3, 4, 32, 32) and labels.tolist() == [0, 0, 1] and classes == ["n00000000", "n00000001"]
    assert none is None
    # both flips kept: the second set encodes the mirrored images (not mirrored latents)
    again, _, _, flipped = encode_folder(codec, imagenet_root / "train", batch_size=2, mirrored=True)
    assert torch.equal(again, latents) and flipped.shape == latents.shape
    assert not torch.allclose(flipped, latents.flip(-1))


def test_latent_dataset_prepares_trains_samples_and_scores(codec, imagenet_root, tmp_path, digits_feature_net):
    prepared = tmp_path / "imagenet256"
    for split in ("train", "test"):
        ds = load_imagenet_latents(split, imagenet_root, codec=codec)
        assert ds.name == "imagenet256" and ds.images.shape[1:] == (4, 32, 32) and ds.num_classes == 1000
        assert (ds.flipped is not None) == (split == "train")  # train.augment: flip picks these
        save_prepared(ds, prepared)
        loaded = load_prepared(prepared, split)
        torch.testing.assert_close(loaded.images[:], ds.images, rtol=0, atol=0)  # floats kept
        if split == "train":
            torch.testing.assert_close(loaded.flipped[:], ds.flipped, rtol=0, atol=0)
    with pytest.raises(ValueError, match="data_root"):
        load_image_dataset("imagenet256", "train")

    net = digits_feature_net
    space = FeatureSpace.from_weights(net)
    stats = {split: tmp_path / f"{split}.safetensors" for split in ("train", "test")}
    for split, out in stats.items():  # reference statistics of the decoded latents
        reference_statistics(prepared, split, space, out, decode=codec.decode)

    exp = Experiment(micro_config(task="generation", dataset="imagenet256"))
    assert exp.arch.image_shape == (4, 32, 32) and exp.arch.num_classes == 1000
    grid = tmp_path / "grid.png"
    result = evaluate_generator(
        exp.e2e(),
        exp,
        None,
        features=net,
        samples=12,
        steps=2,
        grid_path=grid,
        reference_stats=stats,
        decode=codec.decode,
    )
    assert result["fid_train"] > 0 and result["fid_test"] > 0
    with Image.open(grid) as img:  # one row of the first 10 classes, decoded to 256x256 RGB
        assert img.size == (10 * (256 + 2) + 2, 256 + 4) and img.mode == "RGB"


# ------------------------------------------------------------------------------ digits-latent (tiny)


def _prepare(out, steps, seed=0):
    assert run("prepare", "--dataset", "digits-latent", "--autoencoder-steps", steps, "--seed", seed, "--out", out) == 0
    return out


@pytest.fixture(scope="module")
def digits_latent(tmp_path_factory):
    """digits-latent prepared by the CLI with a short autoencoder training (the pipeline's default is longer)."""
    return _prepare(tmp_path_factory.mktemp("digits-latent"), steps=200)


@pytest.fixture(scope="module")
def feature_net(tmp_path_factory):
    digits = load_image_dataset("digits", "train")
    path = tmp_path_factory.mktemp("features") / "net.safetensors"
    save_feature_net(train_feature_net(digits.images, digits.labels, steps=5, seed=0), path)
    return path


def test_trained_autoencoder_reconstructs_held_out_digits_far_better_than_untrained(digits_latent):
    codec, meta = load_autoencoder(digits_latent / AUTOENCODER_FILE)
    test = load_image_dataset("digits", "test").images
    untrained = ConvAutoencoder(1, 4, 2, meta["width"], seed=1)
    trained_mse, untrained_mse = reconstruction_mse(codec.vae, test), reconstruction_mse(untrained, test)
    assert trained_mse < untrained_mse / 10 and trained_mse < 0.08, (trained_mse, untrained_mse)
    assert math.isclose(meta["test_reconstruction_mse"], trained_mse, rel_tol=1e-5)
    # the stored latents: 4x4x4 of the digits, scaled to unit variance by the scale computed from them
    train = load_prepared(digits_latent, "train", expected_name="digits-latent")
    assert train.images.shape == (1437, 4, 4, 4) and train.latent_scale == meta["latent_scale"] != LATENT_SCALE
    assert abs(train.images[:].std().item() - 1.0) < 1e-4
    assert torch.equal(train.labels, load_image_dataset("digits", "train").labels)
    decoded = codec.decode(train.images[:64])
    assert decoded.shape == (64, 1, 8, 8)
    assert (decoded - load_image_dataset("digits", "train").images[:64]).pow(2).mean() < untrained_mse / 10


def test_prepare_is_deterministic_per_seed(tmp_path):
    first, again, other = (_prepare(tmp_path / name, 30, seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    for name in (AUTOENCODER_FILE, "train.safetensors", "test.safetensors"):
        assert load_metadata(first / name)["sha256"] == load_metadata(again / name)["sha256"], name
    assert load_metadata(first / AUTOENCODER_FILE)["sha256"] != load_metadata(other / AUTOENCODER_FILE)["sha256"]
    # an autoencoder beside latents it did not encode is refused, not used to decode them
    shutil.copy(other / AUTOENCODER_FILE, first / AUTOENCODER_FILE)
    shutil.copy(other / "autoencoder.json", first / "autoencoder.json")
    with pytest.raises(CheckpointError, match="was encoded by autoencoder"):
        decoder_for("digits-latent", first)


def test_autoencoder_loads_without_pickle_and_refuses_tampering(digits_latent, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle must never run")

    with monkeypatch.context() as m:
        for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
            m.setattr(target, name, refuse)
        codec, _ = load_autoencoder(digits_latent / AUTOENCODER_FILE)
    assert codec.geometry.downsample == 2
    tampered = tmp_path / AUTOENCODER_FILE
    shutil.copy(digits_latent / "autoencoder.json", tmp_path / "autoencoder.json")
    data = bytearray((digits_latent / AUTOENCODER_FILE).read_bytes())
    data[-10] ^= 0xFF  # one weight's bits
    tampered.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_autoencoder(tampered)
    with pytest.raises(CheckpointError, match="not an autoencoder"):  # a file of another kind
        load_autoencoder(digits_latent / "train.safetensors")
    with pytest.raises(DataError, match="prepare --dataset digits-latent"):  # never retrained behind our back
        load_image_dataset("digits-latent", "train")


def test_digits_latent_through_the_cli_scores_decoded_samples(digits_latent, feature_net, tmp_path, capsys):
    ck = tmp_path / "ck"
    common = [
        "--task",
        "generation",
        "--arch",
        "DiT-tiny/1",
        "--dataset",
        "digits-latent",
        "--blocks",
        2,
        "--data",
        digits_latent,
        "--steps",
        3,
        "--batch-size",
        16,
        "--device",
        "cpu",
        "--no-progress",
        "--set",
        "train.warmup=1",
        "--set",
        "sample.guidance=2.0",
    ]
    for b in (1, 2):
        assert run("train-block", *common, "--block", b, "--out", ck / f"block-{b}.safetensors") == 0
    model = tmp_path / "model.safetensors"
    assert run("assemble", ck / "block-1.safetensors", ck / "block-2.safetensors", "--out", model) == 0
    stats = {split: tmp_path / f"{split}-stats.safetensors" for split in ("train", "test")}
    assert (
        run(
            "reference-stats",
            "--data",
            digits_latent,
            "--features",
            feature_net,
            "--split",
            "train",
            "--out",
            stats["train"],
            "--split",
            "test",
            "--out",
            stats["test"],
            "--no-progress",
        )
        == 0
    )
    capsys.readouterr()
    evaluate = [
        "evaluate",
        model,
        "--features",
        feature_net,
        "--train-stats",
        stats["train"],
        "--test-stats",
        stats["test"],
        "--samples",
        20,
        "--sample-steps",
        4,
        "--no-progress",
    ]
    assert run(*evaluate, "--out", tmp_path / "no-decoder.json") == 2  # without the autoencoder: refused
    assert "pass the prepared directory (--data)" in capsys.readouterr().err
    assert not (tmp_path / "no-decoder.json").exists()
    grid = tmp_path / "grid.png"
    assert run(*evaluate, "--data", digits_latent, "--grid", grid, "--out", tmp_path / "m.json") == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert math.isfinite(metrics["fid_test"]) and metrics["fid_test"] > 0 and metrics["guidance"] == 2.0
    with Image.open(grid) as img:  # decoded 8x8 gray digits (upscaled 4x), not 4-channel latents
        assert img.size == (10 * (32 + 2) + 2, 2 * (32 + 2) + 2)
    assert run("sample", model, "--num", 10, "--steps", 2, "--data", digits_latent, "--out", tmp_path / "s.png") == 0
    with Image.open(tmp_path / "s.png") as img:
        assert img.size == (10 * (32 + 2) + 2, 32 + 4)
    # the reference statistics are the trained decoder's reconstructions: the split decoded by it
    codec, _ = load_autoencoder(digits_latent / AUTOENCODER_FILE)
    space = FeatureSpace.from_weights(feature_net)
    recomputed, _, reused = reference_statistics(
        digits_latent, "test", space, tmp_path / "again.safetensors", decode=codec.decode
    )
    cached, _, _ = reference_statistics(digits_latent, "test", space, stats["test"])
    assert not reused and np.allclose(recomputed["mu"], cached["mu"], atol=1e-5)
