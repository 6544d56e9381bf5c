"""The ImageNet-256 latent path (DiT-L/2): encode images with a VAE, train and sample in latent space,
decode for FID; tested with a small randomly initialised autoencoder of sd-vae-ft-ema's interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dblocks.data import load_image_dataset, load_prepared, save_prepared
from dblocks.data.latents import (LATENT_SCALE, LatentCodec, TinyAutoencoder, center_crop_arr, encode_folder,
                                  load_imagenet_latents)
from dblocks.evaluate import evaluate_generator
from dblocks.experiment import Experiment
from dblocks.metrics.fid import save_feature_net, train_feature_net
from dblocks.metrics.reference import FeatureSpace, reference_statistics
from tests.conftest import micro_config


@pytest.fixture(scope="module")
def codec():
    return LatentCodec(TinyAutoencoder())


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


def test_center_crop_and_folder_encoding(codec, imagenet_root):
    img = Image.fromarray(np.zeros((700, 280, 3), dtype=np.uint8))
    assert center_crop_arr(img).shape == (256, 256, 3)
    latents, labels, classes = encode_folder(codec, imagenet_root / "train", batch_size=2)
    assert latents.shape == (3, 4, 32, 32) and labels.tolist() == [0, 0, 1] and classes == ["n00000000", "n00000001"]


def test_latent_dataset_prepares_trains_samples_and_scores(codec, imagenet_root, tmp_path):
    prepared = tmp_path / "imagenet256"
    for split in ("train", "test"):
        ds = load_imagenet_latents(split, imagenet_root, codec=codec)
        assert ds.name == "imagenet256" and ds.images.shape[1:] == (4, 32, 32) and ds.num_classes == 1000
        save_prepared(ds, prepared)
        torch.testing.assert_close(load_prepared(prepared, split).images, ds.images, rtol=0, atol=0)  # floats kept
    with pytest.raises(ValueError, match="data_root"):
        load_image_dataset("imagenet256", "train")

    digits = load_image_dataset("digits", "train")
    net = tmp_path / "net.safetensors"
    save_feature_net(train_feature_net(digits.images, digits.labels, steps=5, seed=0), net)
    space = FeatureSpace.from_weights(net)
    stats = {split: tmp_path / f"{split}.safetensors" for split in ("train", "test")}
    for split, out in stats.items():  # reference statistics of the decoded latents
        reference_statistics(prepared, split, space, out, decode=codec.decode)

    exp = Experiment(micro_config(task="generation", dataset="imagenet256"))
    assert exp.arch.image_shape == (4, 32, 32) and exp.arch.num_classes == 1000
    grid = tmp_path / "grid.png"
    result = evaluate_generator(exp.e2e(), exp, None, features=net, samples=12, steps=2, grid_path=grid,
                                reference_stats=stats, decode=codec.decode)
    assert result["fid_train"] > 0 and result["fid_test"] > 0
    with Image.open(grid) as img:  # one row of the first 10 classes, decoded to 256x256 RGB
        assert img.size == (10 * (256 + 2) + 2, 256 + 4) and img.mode == "RGB"
