"""Domain FID (digits-classifier features) through torch-fidelity, with a feature net trained here."""

from __future__ import annotations

import pytest
import torch
import torch_fidelity
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from dblocks.checkpoint import save_checkpoint
from dblocks.data import load_image_dataset
from dblocks.errors import CheckpointError
from dblocks.metrics import fid as fid_module
from dblocks.metrics.fid import (
    FEATURE_EXTRACTOR_NAME,
    FEATURE_LAYER,
    DigitsFeatureExtractor,
    ImageTensorDataset,
    feature_net_accuracy,
    load_feature_net,
    register_digits_feature_extractor,
    save_feature_net,
    train_feature_net,
)
from dblocks.metrics.reference import domain_fid


@pytest.fixture(scope="module")
def digits():
    return load_image_dataset("digits", "train"), load_image_dataset("digits", "test")


@pytest.fixture(scope="module")
def net_path(digits_feature_net):
    return digits_feature_net


@pytest.fixture(scope="module")
def trained(net_path):
    return load_feature_net(net_path)


@pytest.fixture(scope="module")
def fids(digits, net_path):
    train, test = digits
    noise = torch.rand(len(test), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return {
        "self": domain_fid(test.images, test.images, net_path),
        "train_test": domain_fid(train.images, test.images, net_path),
        "noise": domain_fid(noise, test.images, net_path),
    }


class ForwardCounter:
    """Counts the images that the registered extractor embeds, by wrapping its class's forward."""

    def __init__(self, monkeypatch):
        self.images = 0
        original = DigitsFeatureExtractor.forward

        def counting_forward(extractor, x):
            self.images += x.shape[0]
            return original(extractor, x)

        monkeypatch.setattr(DigitsFeatureExtractor, "forward", counting_forward)


def test_feature_net_accuracy(trained, digits):
    _, test = digits
    assert feature_net_accuracy(trained, test.images, test.labels) > 0.95
    assert trained.features(test.images[:5]).shape == (5, 64)
    assert trained(test.images[:5]).shape == (5, 10)


def test_training_is_deterministic(digits):
    train, _ = digits
    threads = torch.get_num_threads()
    a = train_feature_net(train.images[:256], train.labels[:256], steps=5, seed=3)
    assert torch.get_num_threads() == threads  # training pins one thread, then restores the setting
    b = train_feature_net(train.images[:256], train.labels[:256], steps=5, seed=3)
    c = train_feature_net(train.images[:256], train.labels[:256], steps=5, seed=4)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_extractor_is_registered_once():
    assert FEATURE_EXTRACTORS_REGISTRY[FEATURE_EXTRACTOR_NAME] is DigitsFeatureExtractor
    register_digits_feature_extractor()  # idempotent
    register_digits_feature_extractor()
    assert FEATURE_EXTRACTORS_REGISTRY[FEATURE_EXTRACTOR_NAME] is DigitsFeatureExtractor
    with pytest.raises(ValueError, match="already registered"):
        torch_fidelity.register_feature_extractor(FEATURE_EXTRACTOR_NAME, DigitsFeatureExtractor)


def test_self_fid_is_zero(fids):
    assert abs(fids["self"]) < 1e-3


def test_train_vs_test_fid_small_but_positive(fids):
    assert fids["train_test"] > 100 * abs(fids["self"]) + 1e-3
    assert fids["train_test"] < 50


def test_noise_fid_is_large(fids):
    assert fids["noise"] > 10 * fids["train_test"]


def test_fid_separates_a_degraded_copy(digits, net_path, fids):
    # Blurred digits are further from the test split than the train split is, but much closer than noise.
    train, test = digits
    blurred = torch.nn.functional.avg_pool2d(train.images, 3, stride=1, padding=1, count_include_pad=False)
    value = domain_fid(blurred, test.images, net_path)
    assert fids["train_test"] < value < fids["noise"]


def test_extractor_input_formats(net_path, digits):
    _, test = digits
    extractor = DigitsFeatureExtractor(
        FEATURE_EXTRACTOR_NAME, [FEATURE_LAYER], feature_extractor_weights_path=str(net_path)
    )
    gray = ImageTensorDataset(test.images[:16]).data
    assert gray.dtype == torch.uint8 and gray.shape == (16, 1, 8, 8)
    (features,) = extractor(gray)
    assert features.shape == (16, 64) and features.dtype == torch.float32
    # RGB copies of a gray image are averaged back to it.
    (rgb_features,) = extractor(gray.expand(-1, 3, -1, -1).contiguous())
    torch.testing.assert_close(rgb_features, features)
    # Larger images are resized to 8x8: a nearest 4x upsampling comes back to nearly the same features.
    big = gray.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    (big_features,) = extractor(big)
    assert big_features.shape == (16, 64)
    assert (big_features - features).norm() < 0.5 * features.norm()
    with pytest.raises(ValueError, match="uint8"):
        extractor(test.images[:2])
    with pytest.raises(ValueError, match="weights_path"):
        DigitsFeatureExtractor(FEATURE_EXTRACTOR_NAME, [FEATURE_LAYER])


def test_image_tensor_dataset():
    images = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2)
    ds = ImageTensorDataset(images)
    assert len(ds) == 1
    assert ds[0].dtype == torch.uint8 and ds[0].shape == (1, 2, 2)
    assert ds[0].flatten().tolist() == [0, 128, 255, 255]  # clamped above 1
    with pytest.raises(ValueError, match="NaN"):
        ImageTensorDataset(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError):
        ImageTensorDataset(torch.zeros(1, 2, 2))


def test_save_load_round_trip_without_torch_load(trained, digits, tmp_path, monkeypatch):
    train, test = digits
    fresh = train_feature_net(train.images[:256], train.labels[:256], steps=5, seed=3).eval()  # held in memory
    net_path = tmp_path / "net.safetensors"
    save_feature_net(fresh, net_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must not be used to load the feature net")

    monkeypatch.setattr(torch, "load", forbidden)
    loaded = load_feature_net(net_path)
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(test.images), fresh.features(test.images), rtol=0, atol=0)
        # The extractor that torch-fidelity builds loads the same way.
        extractor = DigitsFeatureExtractor(
            FEATURE_EXTRACTOR_NAME, [FEATURE_LAYER], feature_extractor_weights_path=str(net_path)
        )
        (features,) = extractor(ImageTensorDataset(test.images).data)
        torch.testing.assert_close(features, fresh.features(fid_module.from_uint8(fid_module.to_uint8(test.images))))

    # A checkpoint of something else is refused.
    foreign = tmp_path / "foreign.safetensors"
    save_checkpoint(foreign, {"w": torch.zeros(2)}, {"kind": "block"})
    with pytest.raises(CheckpointError, match="kind"):
        load_feature_net(foreign)
    with pytest.raises(CheckpointError, match="kind"):
        save_feature_net(trained, tmp_path / "x.safetensors", {"kind": "other"})
