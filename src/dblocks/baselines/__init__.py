"""The paper's block-local baselines as trained methods: Forward-Forward (Table 1) in
:mod:`dblocks.baselines.forward_forward` and NoProp-DT / CT / FM (Table 6) in :mod:`dblocks.baselines.noprop`.

What the methods share lives here: their training settings over the project's one training loop
(:func:`dblocks.train.train`, so a baseline job gets the same optimizer, schedule, NaN guard and resumable
state as a block job), seeded construction, test accuracy and checkpoints. Each method's model has a
``classify(images, generator, **options) -> labels`` method, which is all :func:`evaluate_accuracy` needs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from dblocks.config import DEFAULTS


def train_config(method_defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """A full ``train`` section for :func:`dblocks.train.train`: the project's defaults, then the method's own
    (its paper's optimizer settings), then the caller's overrides (``steps=...``, ``lr=...``)."""
    cfg = {**DEFAULTS["train"], **method_defaults, **overrides}
    unknown = sorted(set(cfg) - set(DEFAULTS["train"]))
    if unknown:
        raise ValueError(f"unknown train setting(s) {', '.join(unknown)}; allowed: {', '.join(DEFAULTS['train'])}")
    return cfg


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build parameters from ``seed`` without disturbing the caller's global random state, so a job's
    initial weights depend on its seed alone, not on what ran before it in the process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """A trained module's tensors, detached and on the CPU (what a job hands back and saves)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, data, *, seed: int = 0, batch_size: int = 512, device: str | torch.device = "cpu", **classify: Any
) -> float:
    """The share of ``data`` (an :class:`dblocks.data.ImageDataset` split) that ``model.classify`` labels
    right. The sampling noise of the stochastic methods comes from one generator seeded with ``seed``, so an
    evaluation is repeatable; ``classify`` options (``steps=...``) are passed through."""
    device = torch.device(device)
    model.to(device).eval()
    gen = torch.Generator().manual_seed(seed)
    correct = 0
    for images, labels in zip(data.images.split(batch_size), data.labels.split(batch_size)):
        correct += int((model.classify(images.to(device), gen, **classify).cpu() == labels).sum())
    return correct / len(data)


def save_state(path: str | os.PathLike, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> dict:
    """A baseline's trained part as a project checkpoint (safetensors + JSON sidecar, written atomically,
    :func:`dblocks.checkpoint.save_checkpoint`); ``metadata`` should name the method, its sizes and the part."""
    from dblocks.checkpoint import save_checkpoint

    return save_checkpoint(path, {k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata)


def load_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state, metadata)`` of a checkpoint written by :func:`save_state` (checksum verified, no pickle)."""
    from dblocks.checkpoint import load_checkpoint

    return load_checkpoint(path)
