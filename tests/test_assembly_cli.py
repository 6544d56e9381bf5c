"""The dblocks CLI end to end on micro models: checkpoints, assembly refusals, sampling, evaluation and
input validation (one line naming the option, exit code 2, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from dblocks.assemble import AssemblyError, assemble, check_blocks, load_model
from dblocks.blocks import AssembledModel
from dblocks.checkpoint import load_metadata, save_checkpoint
from dblocks.cli import main
from tests.conftest import VIT_MICRO_ARGS

MICRO = VIT_MICRO_ARGS
DIT_MICRO = ["--task", "generation", "--arch", "DiT-micro", *MICRO[2:]]


def run(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def vit_blocks(vit_micro_blocks, tmp_path_factory) -> Path:
    """A copy of the shared blocks: tests here rerun jobs on them."""
    d = tmp_path_factory.mktemp("vit") / "blocks"
    shutil.copytree(vit_micro_blocks, d)
    return d


def _copy(src_dir: Path, dst_dir: Path, names) -> list[Path]:
    dst_dir.mkdir(exist_ok=True)
    out = []
    for n in names:
        for suffix in (".safetensors", ".json"):
            shutil.copy(src_dir / f"{n}{suffix}", dst_dir / f"{n}{suffix}")
        out.append(dst_dir / f"{n}.safetensors")
    return out


def test_partition_json_and_table(capsys):
    assert run("partition", "--blocks", 3, "--overlap", 0.05, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert [f"{x:.4g}" for x in out["boundaries"]] == ["0.002", "0.1796", "0.505", "80"]
    assert len(out["train_intervals"]) == 3
    assert out["train_intervals"][0][1] == 80.0 and out["train_intervals"][2][0] == 0.002
    assert out["train_intervals"][1][0] < 0.1796 < 0.505 < out["train_intervals"][1][1]
    assert run("partition", "--blocks", 3, "--kind", "uniform") == 0
    table = capsys.readouterr().out
    assert "uniform" in table and "2.339" in table and "0.0684" in table


def test_block_checkpoint_metadata(vit_blocks):
    meta = load_metadata(vit_blocks / "block-2.safetensors")
    assert meta["kind"] == "block" and meta["method"] == "blockwise"
    assert meta["block"] == 2 and meta["blocks"] == 3 and meta["layers"] == [1]
    assert meta["step"] == 6 and meta["seed"] == 0 and meta["package_version"]
    assert len(meta["config_hash"]) == 16 and meta["config"]["arch"] == "ViT-micro"
    assert meta["partition"]["boundaries"][0] == 0.002
    assert "git_commit" in meta and len(meta["sha256"]) == 64
    assert not (vit_blocks / "block-2.state.safetensors").exists()  # resume state removed once finished


def test_finished_block_is_not_retrained(vit_blocks, capsys):
    before = (vit_blocks / "block-1.safetensors").stat().st_mtime_ns
    assert run("train-block", *MICRO, "--block", 1, "--out", vit_blocks / "block-1.safetensors") == 0
    assert "already trained" in capsys.readouterr().out
    assert (vit_blocks / "block-1.safetensors").stat().st_mtime_ns == before
    # a different config in the same place is refused rather than silently overwritten
    assert run("train-block", *MICRO, "--seed", 1, "--block", 1, "--out", vit_blocks / "block-1.safetensors") == 2
    assert "another config" in capsys.readouterr().err
    # --replace-stale (the workflow's call, its experiment having changed): the other config is retrained, and
    # this config's checkpoint is still kept
    assert run("train-block", *MICRO, "--replace-stale", "--block", 1, "--out", vit_blocks / "block-1.safetensors") == 0
    assert "already trained" in capsys.readouterr().out
    (out,) = _copy(vit_blocks, vit_blocks.parent / "stale", ["block-1"])
    assert run("train-block", *MICRO, "--seed", 1, "--replace-stale", "--block", 1, "--out", out) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_metadata(out)["seed"] == 1


def test_assemble_and_evaluate_classifier(vit_blocks, tmp_path, capsys):
    model_path = tmp_path / "model.safetensors"
    assert run("assemble", *sorted(vit_blocks.glob("block-*.safetensors")), "--out", model_path) == 0
    model, exp, meta = load_model(model_path)
    assert isinstance(model, AssembledModel) and meta["kind"] == "assembled"
    assert [s["block"] for s in meta["sources"]] == [1, 2, 3]
    # the assembled blocks are bit-identical to the block checkpoints
    b2, _ = load_model(vit_blocks / "block-2.safetensors")[0], None
    assert all(torch.equal(v, model.blocks[1].state_dict()[k]) for k, v in b2.state_dict().items())
    metrics = tmp_path / "metrics.json"
    assert run("evaluate", model_path, "--out", metrics) == 0
    record = json.loads(metrics.read_text())
    assert 0.0 <= record["accuracy"] <= 1.0 and record["examples"] == 360 and record["method"] == "blockwise"
    assert 0.0 <= record["accuracy_mean_start"] <= 1.0  # the same blocks' chain from the noise's mean
    assert "from the noise mean" in capsys.readouterr().out


def test_jobs_that_need_no_fid_do_not_import_it(vit_blocks, tmp_path):
    """Every pipeline job is a fresh interpreter: torch-fidelity (with torchvision) costs about two seconds
    of start-up, so assembling and classifier evaluation must not import it just to name an error."""
    import subprocess
    import sys

    model_path = tmp_path / "model.safetensors"
    code = (
        "import sys; from dblocks.cli import main; "
        f"rc = main(['assemble', *{[str(p) for p in sorted(vit_blocks.glob('block-*.safetensors'))]!r}, "
        f"'--out', {str(model_path)!r}]) or main(['evaluate', {str(model_path)!r}, "
        f"'--out', {str(tmp_path / 'metrics.json')!r}]); "
        "print(rc, sorted(m for m in ('torch_fidelity', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"


@pytest.mark.parametrize(
    "case",
    ("missing duplicate wrong_b other_config other_partition other_experiment not_a_block other_target_space").split(),
)
def test_assembly_refuses_mismatches(case, vit_blocks, tmp_path):
    paths = _copy(vit_blocks, tmp_path, ["block-1", "block-2", "block-3"])
    expected = None

    def edit(path, **changes):
        meta = load_metadata(path)
        from dblocks.checkpoint import load_checkpoint

        tensors, _ = load_checkpoint(path)
        for key in ("format_version", "sha256", "tensors"):
            meta.pop(key)
        meta.update(changes)
        save_checkpoint(path, tensors, meta)

    if case == "missing":
        paths, culprit, field = paths[:2], None, "block"
    elif case == "duplicate":
        paths, culprit, field = [paths[0], paths[1], paths[1]], paths[1], "block"
    elif case == "wrong_b":
        expected, culprit, field = 4, paths[0], "blocks"
    elif case == "other_config":
        edit(paths[2], config_hash="0" * 16)
        culprit, field = paths[2], "config_hash"
    elif case == "other_partition":
        edit(paths[1], partition={"kind": "uniform"})
        culprit, field = paths[1], "partition"
    elif case == "other_experiment":
        edit(paths[2], experiment="someone-else")
        culprit, field = paths[2], "experiment"
    elif case == "not_a_block":
        edit(paths[0], kind="e2e")
        culprit, field = paths[0], "kind"
    else:  # same metadata, different target space tensors
        from dblocks.checkpoint import load_checkpoint

        tensors, meta = load_checkpoint(paths[2])
        tensors["task/label_embedding"] = -tensors["task/label_embedding"]
        save_checkpoint(
            paths[2], tensors, {k: v for k, v in meta.items() if k not in ("format_version", "sha256", "tensors")}
        )
        culprit, field = paths[2], "task/label_embedding"
    with pytest.raises(AssemblyError) as err:
        assemble(paths, tmp_path / "out.safetensors", expected)
    message = str(err.value)
    assert f"field '{field}'" in message
    if culprit is not None:
        assert str(culprit) in message
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "out.json").exists()


def test_cli_assembly_error_exits_2(vit_blocks, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert run("assemble", vit_blocks / "block-1.safetensors", vit_blocks / "block-3.safetensors", "--out", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing block(s) [2]" in err
    assert not out.exists()


def test_check_blocks_orders_by_block(vit_blocks):
    records = check_blocks([vit_blocks / f"block-{b}.safetensors" for b in (3, 1, 2)])
    assert [m["block"] for _, m in records] == [1, 2, 3]


def test_baseline_and_evaluate(tmp_path):
    ckpt = tmp_path / "e2e.safetensors"
    assert run("train-baseline", *MICRO, "--out", ckpt) == 0
    assert load_metadata(ckpt)["kind"] == "e2e"
    assert run("evaluate", ckpt, "--out", tmp_path / "m.json") == 0
    assert json.loads((tmp_path / "m.json").read_text())["method"] == "e2e"


def test_paper_mode_writes_assemblable_blocks(tmp_path, capsys):
    out = tmp_path / "paper"
    assert run("train-shared", *MICRO, "--out-dir", out) == 0
    metas = [load_metadata(out / f"block-{b}.safetensors") for b in (1, 2, 3)]
    assert {m["method"] for m in metas} == {"paper"} and metas[0]["step"] == 18  # B x steps
    # like the block jobs, a finished shared-stem run is kept, not retrained
    before = [(out / f"block-{b}.safetensors").read_bytes() for b in (1, 2, 3)]
    capsys.readouterr()
    assert run("train-shared", *MICRO, "--out-dir", out, "--replace-stale") == 0
    assert capsys.readouterr().out.count("already trained with this config") == 3
    assert [(out / f"block-{b}.safetensors").read_bytes() for b in (1, 2, 3)] == before
    assert (
        run("assemble", *[out / f"block-{b}.safetensors" for b in (1, 2, 3)], "--out", tmp_path / "m.safetensors") == 0
    )
    model, _, _ = load_model(tmp_path / "m.safetensors")
    # the stem was shared in training, so every block carries the same stem weights
    assert torch.equal(model.blocks[0].stem.patch_embed.weight, model.blocks[2].stem.patch_embed.weight)


def test_dit_blocks_sample_a_png_grid(tmp_path, capsys):
    for b in (1, 2, 3):
        assert run("train-block", *DIT_MICRO, "--block", b, "--out", tmp_path / f"b{b}.safetensors") == 0
    model = tmp_path / "dit.safetensors"
    assert run("assemble", *[tmp_path / f"b{b}.safetensors" for b in (1, 2, 3)], "--out", model) == 0
    grid = tmp_path / "grid.png"
    assert run("sample", model, "--out", grid, "--num", 20, "--steps", 9, "--no-progress") == 0
    assert "block calls [3, 3, 3]" in capsys.readouterr().out
    image = Image.open(grid)
    # 10 columns x 2 rows of 8x8 digits upscaled 4x with 2-pixel padding
    assert image.size == (10 * 32 + 11 * 2, 2 * 32 + 3 * 2)


BAD_INPUTS = [
    (["train-block", "--block", 1, "--arch", "ViT-huge"], "arch='ViT-huge' is not a registered architecture"),
    (["train-block", "--block", 1, "--blocks", 0], "blocks=0 is out of range; allowed: >= 1"),
    (["train-block", "--block", 1, "--blocks", 13], "blocks=13 exceeds the depth"),
    (["train-block", "--block", 1, "--layer-split", "3,3,3"], "must sum to the depth L=12"),
    (["train-block", "--block", 1, "--layer-split", "1,1,1,3"], "has 4 entries; it must have exactly B=3"),
    (["train-block", "--block", 1, "--overlap", 0.5], "overlap=0.5 is out of range; allowed: < 0.5"),
    (["train-block", "--block", 1, "--overlap", -0.1], "overlap=-0.1 is out of range; allowed: >= 0"),
    (["train-block", "--block", 4], "--block 4: allowed: 1..3"),
    (
        ["train-block", "--block", 1, "--partition", "linear"],
        "partition='linear' is not allowed; allowed: equiprobable, uniform",
    ),
    (["train-block", "--block", 1, "--dataset", "mnist"], "dataset='mnist' is not allowed"),
    (["train-block", "--block", 1, "--task", "generation"], "is a vit model but task='generation'"),
    (["train-block", "--block", 1, "--config", "missing.yaml"], "--config missing.yaml: file not found"),
    (["train-block", "--block", 1, "--set", "train.lr=-1"], "train.lr=-1 is out of range"),
    (["train-block", "--block", 1, "--set", "train.unknown=1"], "train: unknown key"),
    (["train-block", "--block", 1, "--device", "tpu"], "device='tpu' is malformed"),
    (["train-block", "--block", 1, "--out-ext"], None),  # argparse: unknown option
    (["partition", "--blocks", 0], "--blocks 0: allowed: an integer >= 1"),
    (["partition", "--blocks", 3, "--kind", "cosine"], "--kind 'cosine': allowed: equiprobable, uniform"),
    (["partition", "--blocks", 3, "--overlap", 0.7], "--overlap 0.7: allowed: 0 <= gamma < 0.5"),
    (["assemble", "nothing.safetensors"], "BLOCK nothing.safetensors: file not found"),
    (["sample", "nothing.safetensors"], "MODEL nothing.safetensors: file not found"),
    (["evaluate", "nothing.safetensors"], "MODEL nothing.safetensors: file not found"),
    (["prepare", "--dataset", "imagenet"], "--dataset 'imagenet': allowed: digits, digits-latent, cifar10, cifar100"),
    (["prepare", "--dataset", "digits", "--autoencoder-steps", 5], "--autoencoder-steps: digits has no autoencoder"),
    (
        ["prepare", "--dataset", "digits-latent", "--autoencoder-steps", 0],
        "--autoencoder-steps 0: allowed: an integer >= 1",
    ),
    (["train-block", "--block", 1, "--data", "no-such-dir"], "--data no-such-dir: directory not found"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS)
def test_bad_input_fails_fast_with_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = argv[0]
    out_arg = {
        "partition": [],
        "prepare": ["--out", "prepared"],
        "assemble": ["--out", "o.safetensors"],
        "sample": ["--out", "o.png"],
        "evaluate": ["--out", "o.json"],
    }.get(command, ["--out", "o.safetensors"])
    assert run(*argv, *out_arg) == 2
    err = capsys.readouterr().err
    assert (message or "error: ") in err and err.count("\n") == 1, err  # argparse's errors are one line too
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_help_for_every_command(capsys):
    for command in (
        "partition",
        "models",
        "prepare",
        "train-block",
        "train-baseline",
        "train-shared",
        "assemble",
        "sample",
        "evaluate",
    ):
        assert main([command, "--help"]) == 0
        assert "usage: dblocks " + command in capsys.readouterr().out


def test_prepare_then_train_from_prepared_data(tmp_path):
    from dblocks.data import load_image_dataset, load_prepared

    prepared = tmp_path / "digits"
    assert run("prepare", "--dataset", "digits", "--out", prepared) == 0
    for split in ("train", "test"):
        original, stored = load_image_dataset("digits", split), load_prepared(prepared, split)
        assert torch.equal(original.images, stored.images[:]) and torch.equal(original.labels, stored.labels)
    assert run("train-block", *MICRO, "--data", prepared, "--block", 3, "--out", tmp_path / "b.safetensors") == 0
    assert (
        run(
            "train-block",
            *MICRO,
            "--dataset",
            "cifar10",
            "--arch",
            "ViT-micro",
            "--data",
            prepared,
            "--block",
            3,
            "--out",
            tmp_path / "c.safetensors",
        )
        == 2
    )
    assert not (tmp_path / "c.safetensors").exists()
