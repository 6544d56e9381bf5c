"""Shared fixtures: the smallest real experiments, on the embedded digits data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never reach a hub: fail fast instead of retrying the network.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core (pytest-xdist): each, and the jobs it starts, computes on one
    # thread, since torch's threads spin-wait and several per core slow every test down severalfold
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

from dblocks.config import resolve  # noqa: E402
from dblocks.experiment import Experiment  # noqa: E402


@pytest.fixture(autouse=True)
def fixed_seeds():
    """Every test starts from the same global random state, whatever ran before it on its worker: a test that
    draws without its own generator draws the same numbers on every run."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: small models gain nothing from a second, and torch's threads spin-wait
    on a loaded machine (measured: NoProp-DT's learning test took 241 s on 2 threads under load, 14 s on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def optimizer_params(monkeypatch) -> list:
    """The parameters every optimizer the training loop builds during the test holds, one list per optimizer."""
    import dblocks.train

    seen, real = [], dblocks.train.adamw

    def spy(params, *args, **kwargs):
        params = list(params)
        seen.append(params)
        return real(params, *args, **kwargs)

    monkeypatch.setattr(dblocks.train, "adamw", spy)
    return seen


MICRO_TRAIN = {"steps": 8, "batch_size": 16, "warmup": 2, "log_every": 4, "checkpoint_every": 4}


def micro_config(**overrides) -> dict:
    task = overrides.pop("task", "classification")
    arch = "ViT-micro" if task == "classification" else "DiT-micro"
    params = {"task": task, "arch": arch, "blocks": 3, "device": "cpu", "train": dict(MICRO_TRAIN)}
    return resolve(params, [overrides])


@pytest.fixture
def vit_exp() -> Experiment:
    return Experiment(micro_config())


@pytest.fixture
def dit_exp() -> Experiment:
    return Experiment(micro_config(task="generation"))


def run_record(runs_dir, params, exp):
    """Where ``dblocks track-init --out-dir runs_dir`` writes ``exp``'s run record: the file name of
    Pipeline.run_json (the experiment's name and config hash)."""
    from dblocks.pipeline import Pipeline

    return Path(runs_dir) / Path(Pipeline.load(params).run_json(exp)).name


#: steps of the shared digits feature net: ~97 % held-out accuracy in 1-2 s (the pipeline's default is 600)
FEATURE_NET_STEPS = 150


@pytest.fixture(scope="session")
def digits_feature_net(tmp_path_factory):
    """The digits feature net (FID features at tiny scale), trained once per test process and saved with its
    record; tests that need a working feature net share it instead of training their own."""
    from dblocks.data import load_image_dataset
    from dblocks.metrics.fid import save_feature_net, train_feature_net

    train = load_image_dataset("digits", "train")
    path = tmp_path_factory.mktemp("featnet") / "digits_net.safetensors"
    net = train_feature_net(train.images, train.labels, steps=FEATURE_NET_STEPS, seed=0)
    save_feature_net(net, path, {"steps": FEATURE_NET_STEPS})
    return path


#: the command-line options of the shared ViT-micro blocks (and of the tests that train more of the same kind)
VIT_MICRO_ARGS = (
    "--arch ViT-micro --blocks 3 --steps 6 --batch-size 16 --no-progress --device cpu "
    "--set train.log_every=3 --set train.warmup=1"
).split()


@pytest.fixture(scope="session")
def vit_micro_blocks(tmp_path_factory):
    """Three ViT-micro blocks trained by `dblocks train-block` once per test process (block-<b>.safetensors and
    their records in one folder), for the tests that assemble, evaluate or refuse them. Tests copy what they
    change; they never modify this folder."""
    from dblocks.cli import main

    folder = tmp_path_factory.mktemp("vit-micro-blocks")
    for block in (1, 2, 3):
        out = folder / f"block-{block}.safetensors"
        assert main(["train-block", *VIT_MICRO_ARGS, "--block", str(block), "--out", str(out)]) == 0
    return folder


def train_and_assemble_by_cli(config, folder, blocks: int) -> None:
    """What the pipeline does for one experiment, by the `dblocks` command: its ``blocks`` block jobs, its
    end-to-end baseline and the assembly, from the config file ``config``, into ``folder`` (block-<b>,
    e2e and model .safetensors)."""
    from dblocks.cli import main

    folder = Path(folder)
    common = ["--config", str(config), "--no-progress"]
    for b in range(1, blocks + 1):
        out = folder / f"block-{b}.safetensors"
        assert main(["train-block", *common, "--block", str(b), "--out", str(out)]) == 0
    assert main(["train-baseline", *common, "--out", str(folder / "e2e.safetensors")]) == 0
    parts = [str(folder / f"block-{b}.safetensors") for b in range(1, blocks + 1)]
    assert main(["assemble", *parts, "--out", str(folder / "model.safetensors")]) == 0


def train_killed_at_loss(
    module, objective, data, cfg: dict, state_path, at: int = 6, seed: int = 5, tag: str | None = None
) -> None:
    """Train ``module`` with resume state at ``state_path`` (saved under ``tag``) until the ``at``-th loss it
    computes, where a KeyboardInterrupt stands in for a kill (with checkpoint_every=4 and at=6: between two
    checkpoints)."""
    from dblocks.train import Objective, train

    calls = 0

    def dies(batch):
        nonlocal calls
        calls += 1
        if calls == at:
            raise KeyboardInterrupt
        return objective.loss(batch)

    with pytest.raises(KeyboardInterrupt):
        train(
            module,
            Objective(dies, objective.draw),
            data,
            cfg,
            seed=seed,
            device=torch.device("cpu"),
            state_path=state_path,
            progress=False,
            state_tag=tag,
        )


def train_job_in_process(exp: Experiment, method: str, block: int | None = None, seed: int = 0):
    """(module, training result) of one of ``exp``'s training jobs run in this process on the CPU, for its
    configured number of steps: what `dblocks train-block` / `train-baseline` do, without the files."""
    from dblocks.jobs import training_job
    from dblocks.train import train

    args = (exp, method) if block is None else (exp, method, block)
    module, objective, steps = training_job(*args)
    result = train(
        module,
        objective,
        exp.load_data("train"),
        exp.config["train"],
        seed=seed,
        device=torch.device("cpu"),
        steps=steps,
        progress=False,
    )
    return module, result
