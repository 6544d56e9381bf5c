"""The catalogue of bad inputs, through the ``dblocks`` command as a user meets them: params files, CLI
options, data files, checkpoints and a training run that diverges. Each case must give ONE line that
names the input and what is allowed, a non-zero exit code, and leave the working directory exactly as
it was (no partial output, no temporary file, no resume state).

More cases of the same contract live beside the code they exercise: CLI options
(``test_assembly_cli.BAD_INPUTS``), pipeline params (``test_pipeline``), checkpoint corruption
(``test_checkpoint``) and tracking (``test_tracking_outages``)."""

from __future__ import annotations

import hashlib
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dblocks.checkpoint import load_checkpoint, load_metadata, save_checkpoint
from dblocks.cli import main
from tests.conftest import VIT_MICRO_ARGS

MICRO = (
    "--arch ViT-micro --blocks 3 --steps 4 --batch-size 8 --no-progress --device cpu "
    "--set train.warmup=1 --set train.log_every=2 --set train.checkpoint_every=2"
).split()
TRAIN = ["train-block", *MICRO, "--block", "1", "--out", "out.safetensors"]
#: NoProp-DT by hand: T = 2 blocks and a head (dblocks.baselines.jobs)
NOPROP = (
    "--arch NoProp-tiny --blocks 2 --steps 2 --batch-size 8 --no-progress --device "
    "cpu --set train.warmup=0 --set train.grad_clip=null"
).split()

PARAMS = """\
scale: tiny
tracking: {uri: "sqlite:///mlflow.db", experiment: bad-inputs}
resources: {gpu: 0, mem_mb: 1000, runtime: 10, threads: 1}
evaluation: {samples: 8, sample_steps: 2, fid_features: digits}
experiments:
  good:
    task: classification
    arch: ViT-micro
    blocks: 3
    device: cpu
    train: {steps: 4, batch_size: 8, warmup: 1}
    pipeline: {tables: ["1"], methods: [blockwise]}
"""


def run(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def trained(vit_micro_blocks, tmp_path_factory) -> Path:
    """Three ViT-micro blocks (conftest's), a prepared digits directory and a block of another experiment."""
    d = tmp_path_factory.mktemp("trained") / "files"
    shutil.copytree(vit_micro_blocks, d)
    other = d / "other-3.safetensors"
    assert run("train-block", *VIT_MICRO_ARGS, "--overlap", "0.1", "--block", 3, "--out", other) == 0
    assert run("prepare", "--dataset", "digits", "--out", d / "digits") == 0
    for part in (["--block", 1], ["--block", 2], ["--head"]):
        name = "dt-head" if part == ["--head"] else f"dt-{part[1]}"
        assert run("train-local", *NOPROP, "--method", "noprop-dt", *part, "--out", d / f"{name}.safetensors") == 0
    return d


@dataclass
class Case:
    name: str
    argv: list
    message: str  # must appear in the one error line
    setup: Callable[[Path, Path], None] = lambda cwd, trained: None
    exit_code: int = 2
    also: list[str] = field(default_factory=list)  # more fragments of the same line


def _copy_blocks(cwd: Path, trained: Path, names=("block-1", "block-2", "block-3")) -> None:
    for n in names:
        for suffix in (".safetensors", ".json"):
            shutil.copy(trained / f"{n}{suffix}", cwd / f"{n}{suffix}")


def _write(name: str, text: str | bytes):
    def setup(cwd: Path, trained: Path) -> None:
        path = cwd / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())

    return setup


def _prepared(edit: Callable[[Path], None]):
    def setup(cwd: Path, trained: Path) -> None:
        shutil.copytree(trained / "digits", cwd / "data")
        edit(cwd / "data")

    return setup


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def _resave(path: Path, **changes) -> None:
    tensors, meta = load_checkpoint(path)
    meta = {k: v for k, v in meta.items() if k not in ("format_version", "sha256", "tensors")}
    save_checkpoint(path, tensors, {**meta, **changes})


def _empty_split(data: Path) -> None:
    tensors, meta = load_checkpoint(data / "train.safetensors")
    _resave_tensors(data / "train.safetensors", {k: v[:0] for k, v in tensors.items()}, meta, examples=0)


def _resave_tensors(path: Path, tensors: dict, meta: dict, **changes) -> None:
    meta = {k: v for k, v in meta.items() if k not in ("format_version", "sha256", "tensors")}
    save_checkpoint(path, tensors, {**meta, **changes})


def _mismatched_labels(data: Path) -> None:
    tensors, meta = load_checkpoint(data / "train.safetensors")
    _resave_tensors(data / "train.safetensors", {"images": tensors["images"], "labels": tensors["labels"][:5]}, meta)


def _pickle_file(cwd: Path, trained: Path) -> None:
    class Boom:
        def __reduce__(self):
            return (Path("pwned").touch, ())

    (cwd / "model.safetensors").write_bytes(pickle.dumps({"weights": Boom()}))


def _assembled(edit: Callable[[Path], None] | None = None):
    def setup(cwd: Path, trained: Path) -> None:
        _copy_blocks(cwd, trained)
        assert (
            run(
                "assemble",
                "block-1.safetensors",
                "block-2.safetensors",
                "block-3.safetensors",
                "--out",
                "model.safetensors",
            )
            == 0
        )
        for n in ("block-1", "block-2", "block-3"):
            for suffix in (".safetensors", ".json"):
                (cwd / f"{n}{suffix}").unlink()
        if edit:
            edit(cwd / "model.safetensors")

    return setup


ASSEMBLE = ["assemble", "block-1.safetensors", "block-2.safetensors", "block-3.safetensors", "--out", "m.safetensors"]
DATA = ["--data", "data"]

CASES = [
    # ---- params files
    Case(
        "params: not YAML",
        ["train-block", "--config", "p.yaml", "--block", 1, "--out", "o.safetensors"],
        "--config p.yaml: not valid YAML",
        _write("p.yaml", "experiments: [unclosed\n"),
    ),
    Case(
        "params: not a mapping",
        ["train-block", "--config", "p.yaml", "--block", 1, "--out", "o.safetensors"],
        "--config p.yaml: expected a mapping at the top level",
        _write("p.yaml", "- 1\n- 2\n"),
    ),
    Case(
        "params: unknown experiment",
        ["train-block", "--config", "p.yaml", "--experiment", "gooood", "--block", 1, "--out", "o.safetensors"],
        "--experiment 'gooood': not in p.yaml; allowed: good",
        _write("p.yaml", PARAMS),
    ),
    Case(
        "params: a pipeline file without its settings",
        ["train-block", "--config", "p.yaml", "--block", 1, "--out", "o.safetensors"],
        "p.yaml: (top level): 'scale' is a required property",
        _write(
            "p.yaml",
            PARAMS.split("experiments:")[0].replace("scale: tiny\n", "")
            + "experiments:"
            + PARAMS.split("experiments:")[1],
        ),
    ),
    Case(
        "params: NaN in the file",
        ["train-block", "--config", "p.yaml", "--block", 1, "--out", "o.safetensors"],
        "p.yaml: experiments.good.train.lr=nan is not a finite number; allowed: a finite number",
        _write("p.yaml", PARAMS.replace("warmup: 1}", "warmup: 1, lr: .nan}")),
    ),
    Case(
        "cli: --lr NaN",
        ["train-block", *MICRO, "--block", 1, "--lr", "nan", "--out", "o.safetensors"],
        "argument --lr: nan is not a finite number; allowed: a finite number",
    ),
    Case(
        "cli: --set infinity",
        ["train-block", *MICRO, "--block", 1, "--set", "train.grad_clip=.inf", "--out", "o.safetensors"],
        "train.grad_clip=inf is not a finite number",
    ),
    Case(
        "params: wrong type",
        ["train-block", "--config", "p.yaml", "--block", 1, "--out", "o.safetensors"],
        "blocks='three'",
        _write("p.yaml", PARAMS.replace("blocks: 3", "blocks: three")),
        also=["allowed"],
    ),
    Case(
        "params: misspelt key",
        ["train-block", "--config", "p.yaml", "--block", 1, "--out", "o.safetensors"],
        "unknown key",
        _write("p.yaml", PARAMS.replace("blocks: 3", "blokcs: 3")),
        also=["blokcs", "allowed"],
    ),
    Case(
        "params: B vs layer split",
        ["train-block", "--config", "p.yaml", "--block", 1, "--out", "o.safetensors"],
        "has 2 entries; it must have exactly B=3",
        _write("p.yaml", PARAMS.replace("blocks: 3", "blocks: 3\n    layer_split: [2, 4]")),
    ),
    Case(
        "params: zero steps",
        ["train-block", "--config", "p.yaml", "--block", 1, "--out", "o.safetensors"],
        "train.steps=0 is out of range; allowed: >= 1",
        _write("p.yaml", PARAMS.replace("steps: 4", "steps: 0")),
    ),
    # ---- CLI options
    Case("cli: malformed --set", [*TRAIN, "--set", "train.lr"], "--set 'train.lr'", also=["KEY=VALUE"]),
    Case(
        "cli: output suffix",
        ["train-block", *MICRO, "--block", 1, "--out", "out.pt"],
        "--out out.pt: must end in .safetensors",
    ),
    Case("cli: --track missing", [*TRAIN, "--track", "runs/x.json"], "--track runs/x.json: file not found"),
    Case(
        "cli: ui on a server URI",
        ["ui", "--tracking-uri", "http://10.0.0.1:5000"],
        "is not a SQLite store; allowed: sqlite:///PATH",
    ),
    Case(
        "cli: ui port",
        ["ui", "--tracking-uri", "sqlite:///m.db", "--port", 70000],
        "--port 70000: allowed: 1..65535",
        _write("m.db", b""),
    ),
    # ---- data files
    Case(
        "data: empty file",
        [*TRAIN, *DATA],
        "train.safetensors",
        _prepared(lambda d: (d / "train.safetensors").write_bytes(b"")),
        also=["is empty (0 bytes)"],
    ),
    Case(
        "data: garbage",
        [*TRAIN, *DATA],
        "train.safetensors",
        _prepared(lambda d: (d / "train.safetensors").write_bytes(b"\x00garbage" * 100)),
    ),
    Case(
        "data: no examples",
        [*TRAIN, *DATA],
        "train.safetensors",
        _prepared(_empty_split),
        also=["no examples", "allowed"],
    ),
    Case(
        "data: labels do not match images",
        [*TRAIN, *DATA],
        "train.safetensors",
        _prepared(_mismatched_labels),
        also=["5 labels", "images"],
    ),
    Case(
        "data: another dataset",
        [*TRAIN, *DATA],
        "holds dataset 'cifar10', the config asks for 'digits'",
        _prepared(lambda d: _resave(d / "train.safetensors", name="cifar10")),
    ),
    Case(
        "data: a checkpoint, not data",
        [*TRAIN, *DATA],
        "not a prepared dataset",
        lambda cwd, t: (
            shutil.copytree(t / "digits", cwd / "data"),
            shutil.copy(t / "block-1.safetensors", cwd / "data" / "train.safetensors"),
            shutil.copy(t / "block-1.json", cwd / "data" / "train.json"),
        ),
    ),
    Case(
        "data: --data-root without parquet",
        ["prepare", "--dataset", "cifar10", "--data-root", "root", "--out", "p"],
        "root",
        lambda cwd, t: (cwd / "root").mkdir(),
        also=["parquet"],
    ),
    # ---- checkpoints
    Case(
        "checkpoint: truncated block",
        ASSEMBLE,
        "block-2.safetensors",
        lambda cwd, t: (_copy_blocks(cwd, t), _truncate(cwd / "block-2.safetensors")),
    ),
    Case(
        "checkpoint: flipped byte",
        ASSEMBLE,
        "block-3.safetensors",
        lambda cwd, t: (_copy_blocks(cwd, t), _flip_byte(cwd / "block-3.safetensors")),
        also=["sha256"],
    ),
    Case(
        "checkpoint: missing block",
        ASSEMBLE[:2] + ASSEMBLE[3:] + ["--expect-blocks", 3],
        "block",
        lambda cwd, t: _copy_blocks(cwd, t, ("block-1", "block-3")),
        also=["field 'block'"],
    ),
    Case(
        "checkpoint: extra block",
        [
            "assemble",
            "block-1.safetensors",
            "block-2.safetensors",
            "block-3.safetensors",
            "block-3.safetensors",
            "--out",
            "m.safetensors",
        ],
        "field 'block'",
        _copy_blocks,
    ),
    Case(
        "checkpoint: block of another experiment",
        ["assemble", "block-1.safetensors", "block-2.safetensors", "other-3.safetensors", "--out", "m.safetensors"],
        "other-3.safetensors",
        lambda cwd, t: _copy_blocks(cwd, t, ("block-1", "block-2", "other-3")),
        also=["field"],
    ),
    Case(
        "checkpoint: pickle posing as safetensors",
        ["evaluate", "model.safetensors", "--out", "e.json"],
        "model.safetensors",
        _pickle_file,
    ),
    Case(
        "checkpoint: sidecar of another file",
        ["evaluate", "model.safetensors", "--out", "e.json"],
        "model.safetensors",
        _assembled(lambda p: _flip_byte(p)),
        also=["sha256"],
    ),
    Case(
        "checkpoint: classifier asked to sample",
        ["sample", "model.safetensors", "--out", "s.png"],
        "'sample' needs a generation model",
        _assembled(),
    ),
    Case(
        "checkpoint: --out holds another config",
        ["train-block", *MICRO, "--lr", "0.5", "--block", 1, "--out", "block-1.safetensors"],
        "--out block-1.safetensors: holds a checkpoint of another config",
        lambda cwd, t: _copy_blocks(cwd, t, ("block-1",)),
        also=["--force"],
    ),
    # ---- the block-local baselines (train-local, evaluate-local)
    Case(
        "params: a baseline on a network it cannot train",
        ["train-local", "--config", "p.yaml", "--method", "noprop-dt", "--block", 1, "--out", "o.safetensors"],
        "experiments.good.arch='ViT-micro': method noprop-dt trains NoProp's own network; allowed: NoProp-paper, "
        "NoProp-tiny",
        _write("p.yaml", PARAMS.replace("methods: [blockwise]", "methods: [noprop-dt]")),
    ),
    Case(
        "cli: unknown baseline",
        ["train-local", *MICRO, "--method", "noprop", "--out", "o.safetensors"],
        "--method 'noprop': allowed: noprop-dt, noprop-ct, noprop-fm, forward-forward",
    ),
    Case(
        "cli: a NoProp-DT block beyond T",
        ["train-local", *NOPROP, "--method", "noprop-dt", "--block", 3, "--out", "o.safetensors"],
        "--block 3: noprop-dt trains 3 jobs (blocks=2); allowed: --block 1..2 or --head",
    ),
    Case(
        "cli: a part of a one-job baseline",
        ["train-local", *NOPROP, "--method", "noprop-fm", "--head", "--out", "o.safetensors"],
        "--head: noprop-fm trains 1 job (blocks=2); allowed: neither --block nor --head",
    ),
    Case(
        "cli: Forward-Forward units that do not divide the ViT",
        [
            "train-local",
            *MICRO[:2],
            "--blocks",
            "2",
            *MICRO[4:],
            "--method",
            "forward-forward",
            "--out",
            "o.safetensors",
        ],
        "blocks=2, layer_split=None: Forward-Forward trains blocks units of equally many of the 3 layers of ViT-micro",
        also=["allowed: blocks in 1, 3"],
    ),
    Case(
        "checkpoint: a baseline without its head",
        ["evaluate-local", "dt-1.safetensors", "dt-2.safetensors", "--out", "e.json"],
        "parts block-1, block-2 given; allowed: exactly block-1, block-2, head",
        lambda cwd, t: _copy_blocks(cwd, t, ("dt-1", "dt-2")),
    ),
    Case(
        "checkpoint: a DiffusionBlocks block as a baseline",
        ["evaluate-local", "block-1.safetensors", "--out", "e.json"],
        "block-1.safetensors",
        lambda cwd, t: _copy_blocks(cwd, t, ("block-1",)),
        also=["is a 'block' checkpoint of method 'blockwise', not a block-local baseline's"],
    ),
    Case(
        "checkpoint: a baseline's corrupt part",
        ["evaluate-local", "dt-1.safetensors", "dt-2.safetensors", "dt-head.safetensors", "--out", "e.json"],
        "dt-2.safetensors",
        lambda cwd, t: (_copy_blocks(cwd, t, ("dt-1", "dt-2", "dt-head")), _flip_byte(cwd / "dt-2.safetensors")),
        also=["sha256"],
    ),
    # ---- training
    Case(
        "training: diverging loss",
        [*TRAIN, "--lr", "1e30"],
        "is inf at step",
        exit_code=1,
        also=["stopped without writing a checkpoint", "lower train.lr"],
    ),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def test_the_catalogue_is_large_and_distinct():
    assert len(CASES) >= 20 and len({c.name for c in CASES}) == len(CASES)
    assert {c.name.split(":")[0] for c in CASES} == {"params", "cli", "data", "checkpoint", "training"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    case.setup(tmp_path, trained)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert run(*case.argv) == case.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"dblocks {case.argv[0]}: error: "), err
    for fragment in [case.message, *case.also]:
        assert fragment in err, err
    assert _snapshot(tmp_path) == before  # nothing written, nothing half-written, nothing removed
    assert not (tmp_path / "pwned").exists()
    if case.name.startswith("checkpoint") and (tmp_path / "block-1.safetensors").exists():
        load_metadata(tmp_path / "block-1.safetensors")  # inputs are still intact
