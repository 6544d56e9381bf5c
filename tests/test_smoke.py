"""The smoke run of the paper DAG (``make smoke``, ``params/smoke.yaml``): its generated data in the datasets'
real on-disk formats, read by the real loaders, and its ViT (Table 1) and DiT-S/2 (Table 2) part run through
Snakemake at full width and depth: generated CIFAR parquet, prepare, 2 optimizer steps per job, assembly,
Inception FID at 299x299 with the converted offline weights, MLflow and the tables, which say "smoke"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dblocks.checkpoint import load_checkpoint, load_metadata
from dblocks.cli import main
from dblocks.config import AUTOENCODER_FILE
from dblocks.data import load_image_dataset, load_prepared
from dblocks.data.autoencoder import ConvAutoencoder, save_autoencoder
from dblocks.data.latents import IMAGE_SIZE, LATENT_SCALE, decoder_for
from dblocks.data.synthetic import CIFAR_SIZES, IMAGENET_CLASSES, IMAGENET_PER_CLASS, write_smoke_data
from dblocks.data.text import load_text_dataset
from dblocks.errors import CheckpointError
from dblocks.params import Params
from dblocks.pipeline import Pipeline

pytestmark = pytest.mark.slow  # whole pipelines: `pytest -m 'not slow'` leaves them out

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_smoke_params_keep_every_paper_experiment_at_full_size():
    paper, smoke = Params.load(REPO / "params/paper.yaml"), Params.load(REPO / "params/smoke.yaml")
    assert smoke.scale == "smoke" and list(smoke.experiments) == list(paper.experiments)
    for name, config in smoke.experiments.items():
        ours, theirs = dict(config), dict(paper.experiments[name])
        # only the number of steps, the batch, how often state is saved and logged, and the samples differ
        for key in ("steps", "batch_size", "checkpoint_every", "log_every"):
            assert ours["train"].pop(key) <= theirs["train"].pop(key), (name, key)
        for key in ("num_images", "batch_size"):
            ours["sample"].pop(key), theirs["sample"].pop(key)
        assert ours.pop("data_root").startswith("data/smoke/raw/")
        theirs.pop("data_root")
        assert ours == theirs, name


def test_a_job_asks_for_its_share_of_the_memory_so_two_whole_dit_l_never_train_at_once():
    """make smoke gives Snakemake SMOKE_MEM_MB (20 GB): a whole DiT-L/2 (end to end, or B=1) asks for
    resources.mem_mb, a block for its share of the layers, never less than the runtime's floor."""
    import re

    pipe = Pipeline.load(REPO / "params/smoke.yaml")
    whole = pipe.resources["mem_mb"]
    assert pipe.training_memory("dit-imagenet256", "e2e") == pipe.training_memory("dit-t8-b1", "blockwise", 1) == whole
    assert pipe.training_memory("dit-t8-b6", "blockwise", 2) == -(-whole * 4 // 24)
    assert pipe.training_memory("dit-t7-equiprob-363", "blockwise", 2) == -(-whole * 6 // 12)
    assert pipe.training_memory("vit-cifar100", "paper") == whole  # the shared-stem process holds every block
    budget = int(re.search(r"SMOKE_MEM_MB \?= (\d+)", (REPO / "Makefile").read_text()).group(1))
    assert whole <= budget < 2 * whole and budget <= 22000  # the 24 GB machine, with room for Snakemake
    tiny = Pipeline.load(REPO / "params/tiny-ablations.yaml")
    assert tiny.training_memory("dit-t10-b6", "blockwise", 1) == Pipeline.RUNTIME_MB


def test_generated_data_is_deterministic_and_reads_through_the_real_loaders(tmp_path):
    written = write_smoke_data(tmp_path / "a")
    assert write_smoke_data(tmp_path / "a") == []  # same bytes: nothing rewritten
    write_smoke_data(tmp_path / "b")
    for path in written:
        assert (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes() == path.read_bytes(), path
    root = tmp_path / "a"
    for name in ("cifar10", "cifar100"):
        for split, n in CIFAR_SIZES[name].items():
            ds = load_image_dataset(name, split, root / name)
            assert ds.images.shape == (n, 3, 32, 32) and ds.images.min() >= -1 and ds.images.max() <= 1
            assert ds.num_classes == (10 if name == "cifar10" else 100) and int(ds.labels.max()) < ds.num_classes
    with zipfile.ZipFile(root / "text8/text8.zip") as archive:
        assert archive.namelist() == ["text8"]
    text8 = load_text_dataset("text8", "test", 256, "char27", root / "text8")
    assert len(text8) >= 50
    for name in ("lm1b", "openwebtext"):
        for split in ("train", "test"):
            assert len(load_text_dataset(name, split, 512, "bytes", root / name)) >= 10, (name, split)


def test_imagenet_folders_encode_through_the_latent_path_with_the_test_autoencoder(tmp_path, monkeypatch):
    """prepare --autoencoder untrained-conv: the ImageNet folder loader, the 256 center crop, the encoder of
    sd-vae-ft-ema's geometry and its scale; the autoencoder is written beside the splits, recorded in them,
    and is what decodes samples (never sd-vae-ft-ema, which would need the network)."""
    import dblocks.data.latents as latents

    write_smoke_data(tmp_path / "raw", ["imagenet"])
    out = tmp_path / "prepared"
    assert (
        main(
            [
                "prepare",
                "--dataset",
                "imagenet256",
                "--data-root",
                str(tmp_path / "raw/imagenet"),
                "--autoencoder",
                "untrained-conv",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    train, test = load_prepared(out, "train", "imagenet256"), load_prepared(out, "test", "imagenet256")
    per = IMAGENET_PER_CLASS
    assert train.images.shape == (per["train"] * len(IMAGENET_CLASSES), 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)
    assert len(test) == per["val"] * len(IMAGENET_CLASSES) and train.num_classes == 1000
    assert train.latent_scale == LATENT_SCALE
    record = load_metadata(out / "train.safetensors")
    assert record["autoencoder"] == "untrained-conv"
    assert record["autoencoder_sha256"] == load_metadata(out / AUTOENCODER_FILE)["sha256"]

    def no_download(*args, **kwargs):
        raise AssertionError("sd-vae-ft-ema must not be loaded")

    monkeypatch.setattr(latents, "load_sd_vae", no_download)
    images = decoder_for("imagenet256", out)(train.images[:2])
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    # another autoencoder beside the splits is refused, not used
    save_autoencoder(out / AUTOENCODER_FILE, ConvAutoencoder(seed=1), LATENT_SCALE, {"seed": 1})
    with pytest.raises(CheckpointError, match="was encoded by autoencoder"):
        decoder_for("imagenet256", out)


# ------------------------------------------------------------------------- the ViT and DiT-S/2 part

PART = f"""
base: {REPO / "params/smoke.yaml"}
only: [vit-cifar100, dit-cifar10]
evaluation: {{samples: 2, sample_steps: 2, reference_samples: 2, fid_batch_size: 2}}
override: {{sample: {{num_images: 2, batch_size: 2}}}}
"""


@pytest.fixture(scope="module")
def smoke_part(tmp_path_factory) -> Path:
    """params/smoke.yaml's ViT and DiT-S/2 experiments (the test's own overlay on it: two samples each),
    run by Snakemake in a fresh folder on data that `dblocks smoke-data` writes there."""
    work = tmp_path_factory.mktemp("smoke")
    (work / "part.yaml").write_text(PART)
    env = dict(
        os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    for argv in (
        [
            str(BIN / "dblocks"),
            "smoke-data",
            "--out",
            "data/smoke/raw",
            "--dataset",
            "cifar10",
            "--dataset",
            "cifar100",
        ],
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--cores", "2", "--config", "params=part.yaml"],
    ):
        proc = subprocess.run(argv, cwd=work, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work


def test_smoke_part_trains_the_paper_architectures_for_two_steps(smoke_part):
    for exp, arch in (("vit-cifar100", "ViT-paper"), ("dit-cifar10", "DiT-S/2")):
        for name in ("block-1", "block-3", "e2e"):
            meta = load_metadata(smoke_part / f"checkpoints/smoke/{exp}/{name}.safetensors")
            assert meta["config"]["arch"] == arch and meta["config"]["train"]["steps"] == 2, (exp, name)
            # keep_weights: false: Snakemake deleted the weights once evaluated; their records stay
            assert not (smoke_part / f"checkpoints/smoke/{exp}/{name}.safetensors").exists()
        assert not (smoke_part / f"models/smoke/{exp}/blockwise.safetensors").exists()
    # the prepared data came from the generated parquet files through the real CIFAR loader
    prepared = load_metadata(smoke_part / "data/smoke/prepared/cifar100/train.safetensors")
    assert prepared["examples"] == CIFAR_SIZES["cifar100"]["train"] and prepared["num_classes"] == 100


def test_smoke_part_evaluates_with_inception_fid_and_labels_every_number_smoke(smoke_part):
    from dblocks.metrics.inception import EXTRACTOR
    from dblocks.metrics.reference import INCEPTION_LABEL

    records = {
        (e, m): json.loads((smoke_part / f"metrics/smoke/{e}/{m}.json").read_text())
        for e, m in (
            ("vit-cifar100", "blockwise"),
            ("vit-cifar100", "e2e"),
            ("vit-cifar100", "paper"),
            ("dit-cifar10", "blockwise"),
            ("dit-cifar10", "e2e"),
        )
    }
    assert all(r["scale"] == "smoke" for r in records.values())
    for method in ("blockwise", "e2e"):
        fid = records[("dit-cifar10", method)]
        assert fid["fid_label"] == INCEPTION_LABEL and fid["samples"] == 2 and fid["fid_test"] > 0
    # the reference statistics are Inception pool features (torch-fidelity resizes every image to 299x299)
    reference = smoke_part / "data/smoke/reference/cifar10/inception-2"
    key = load_metadata(reference / "test.safetensors")["key"]
    assert key["extractor"] == EXTRACTOR and key["layer"] == "2048" and key["samples"] == 2
    assert load_checkpoint(reference / "test.safetensors")[0]["mu"].shape == (2048,)

    table1 = (smoke_part / "results/smoke/tables/table1.md").read_text()
    table2 = (smoke_part / "results/smoke/tables/table2.md").read_text()
    assert f"{100 * records[('vit-cifar100', 'blockwise')]['accuracy']:.2f}" in table1
    assert f"{records[('dit-cifar10', 'blockwise')]['fid_test']:.2f}" in table2
    for table in (table1, table2):
        header = next(line for line in table.splitlines() if line.startswith("|"))
        assert all("smoke" in cell for cell in header.split("|") if "ours" in cell), header
        assert "Smoke-scale numbers are not comparable to the paper's." in table

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{smoke_part / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("diffusion-blocks-smoke")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    evaluations = [r for r in runs if r.data.tags.get("dblocks.job") == "evaluate"]
    assert len(evaluations) == 5 and all(r.data.tags["dblocks.scale"] == "smoke" for r in evaluations)
