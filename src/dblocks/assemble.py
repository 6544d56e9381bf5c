"""Saving trained parts and composing them: block checkpoints -> one assembled model.

Every checkpoint's JSON records the experiment, its resolved config and config hash, the partition, the
block index and layer range, the step and seed, the package version and the git commit. Assembly reads
only those JSON records first and refuses any mismatch, naming the file and the field, before it loads a
single tensor."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import dblocks
from dblocks.blocks import AssembledModel, BlockDenoiser
from dblocks.checkpoint import load_checkpoint, load_metadata, save_checkpoint
from dblocks.config import UNKNOWN_SCALE, WEIGHTS, chosen_weights, config_hash
from dblocks.errors import CheckpointError
from dblocks.experiment import Experiment
from dblocks.tracking import git_commit
from dblocks.training_state import AVERAGE_PREFIX

TASK_PREFIX = "task/"
#: ``sample.weights``: which weights a trained model is used with


class AssemblyError(ValueError):
    """Block checkpoints that do not form one model; the message names the file and the field."""


def provenance(exp: Experiment) -> dict:
    return {
        "experiment": exp.name,
        "scale": exp.scale,
        "config": exp.config,
        "config_hash": config_hash(exp.config),
        "seed": exp.config["seed"],
        "package_version": dblocks.__version__,
        "git_commit": git_commit(),
    }


def _tensors(model: nn.Module, exp: Experiment, averaged: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """A trained module's tensors: its weights, the weight average beside them (``ema/...``) when training
    kept one, and the task's shared target space."""
    out = dict(model.state_dict())
    if averaged is not None:
        out.update({AVERAGE_PREFIX + k: v for k, v in averaged.state_dict().items()})
    out.update(exp.task.buffers())
    return out


def save_block(
    path: Path,
    model: BlockDenoiser,
    exp: Experiment,
    block: int,
    method: str,
    step: int,
    extra: dict | None = None,
    averaged: BlockDenoiser | None = None,
) -> dict:
    meta = {
        **provenance(exp),
        "kind": "block",
        "method": method,
        "block": block,
        "blocks": exp.partition.blocks,
        "partition": exp.partition.to_dict(),
        "layer_split": exp.split,
        "layers": exp.layer_indices(block),
        "step": step,
        **(extra or {}),
    }
    return save_checkpoint(path, _tensors(model, exp, averaged), meta)


def save_e2e(
    path: Path,
    model: BlockDenoiser,
    exp: Experiment,
    step: int,
    extra: dict | None = None,
    averaged: BlockDenoiser | None = None,
) -> dict:
    meta = {**provenance(exp), "kind": "e2e", "method": "e2e", "step": step, **(extra or {})}
    return save_checkpoint(path, _tensors(model, exp, averaged), meta)


def _require_same(field: str, meta: dict, ref: dict, path: Path, ref_path: Path) -> None:
    if meta.get(field) != ref.get(field):
        raise AssemblyError(
            f"{path}: field '{field}' is {meta.get(field)!r} but {ref_path} has "
            f"{ref.get(field)!r}; blocks must come from one experiment and config"
        )


def check_blocks(paths: Sequence[str | Path], expected_blocks: int | None = None) -> list[tuple[Path, dict]]:
    """Validate that ``paths`` are exactly blocks 1..B of one experiment; return them ordered by block."""
    if not paths:
        raise AssemblyError("no block checkpoints given")
    records = []
    for p in map(Path, paths):
        try:
            meta = load_metadata(p)
        except CheckpointError as exc:
            raise AssemblyError(str(exc)) from None
        if meta.get("kind") != "block":
            raise AssemblyError(f"{p}: field 'kind' is {meta.get('kind')!r}; expected a block checkpoint")
        records.append((p, meta))
    ref_path, ref = records[0]
    for p, meta in records[1:]:
        for field in ("experiment", "config_hash", "method", "blocks", "partition", "layer_split"):
            _require_same(field, meta, ref, p, ref_path)
    blocks = ref["blocks"]
    if expected_blocks is not None and blocks != expected_blocks:
        raise AssemblyError(f"{ref_path}: field 'blocks' is {blocks} but --blocks {expected_blocks} was asked for")
    seen: dict[int, Path] = {}
    for p, meta in records:
        b = meta.get("block")
        if not isinstance(b, int) or not 1 <= b <= blocks:
            raise AssemblyError(f"{p}: field 'block' is {b!r}; allowed: 1..{blocks}")
        if b in seen:
            raise AssemblyError(f"{p}: field 'block' duplicates block {b} already given by {seen[b]}")
        seen[b] = p
    missing = sorted(set(range(1, blocks + 1)) - set(seen))
    if missing:
        raise AssemblyError(
            f"missing block(s) {missing} of B={blocks}: field 'block' of the given files covers only {sorted(seen)}"
        )
    return sorted(records, key=lambda r: r[1]["block"])


def assemble(paths: Sequence[str | Path], out: str | Path, expected_blocks: int | None = None) -> dict:
    """Compose B block checkpoints into one model file; the shared target space must agree bit for bit."""
    records = check_blocks(paths, expected_blocks)
    tensors: dict[str, torch.Tensor] = {}
    ref_task: dict[str, torch.Tensor] | None = None
    sources = []
    for p, meta in records:
        try:
            block_tensors, _ = load_checkpoint(p)
        except CheckpointError as exc:
            raise AssemblyError(str(exc)) from None
        task = {k: v for k, v in block_tensors.items() if k.startswith(TASK_PREFIX)}
        if ref_task is None:
            ref_task = task
        elif task.keys() != ref_task.keys() or not all(torch.equal(task[k], ref_task[k]) for k in task):
            raise AssemblyError(
                f"{p}: field '{next(iter(task), 'task')}' (the shared target space) differs from {records[0][0]}"
            )
        tensors.update(
            {f"block{meta['block']}/{k}": v for k, v in block_tensors.items() if not k.startswith(TASK_PREFIX)}
        )
        sources.append({"block": meta["block"], "path": str(p), "sha256": meta["sha256"], "step": meta["step"]})
    tensors.update(ref_task or {})
    first = records[0][1]
    meta = {
        k: first[k]
        for k in ("experiment", "config", "config_hash", "seed", "method", "blocks", "partition", "layer_split")
    }
    meta["scale"] = first.get("scale", UNKNOWN_SCALE)
    meta.update(
        {"kind": "assembled", "sources": sources, "package_version": dblocks.__version__, "git_commit": git_commit()}
    )
    return save_checkpoint(out, tensors, meta)


def _load_into(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(path, f"weights do not fit the architecture in its config: {exc}") from None


def choose_weights(tensors: dict[str, torch.Tensor], weights: str, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """One trained module's raw weights or their average (``sample.weights``), and which of the two it is."""
    if weights not in WEIGHTS:
        raise CheckpointError(path, f"weights {weights!r} asked for; allowed: {', '.join(WEIGHTS)}")
    average = {k[len(AVERAGE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(AVERAGE_PREFIX)}
    if weights == "ema" and not average:
        raise CheckpointError(
            path,
            "sample.weights=ema but training kept no weight average (train.ema_decay is 0); allowed: raw, auto",
            field="tensors",
        )
    if average and weights != "raw":
        return average, "ema"
    return {k: v for k, v in tensors.items() if not k.startswith(AVERAGE_PREFIX)}, "raw"


def load_model(
    path: str | Path, device: torch.device | str = "cpu", weights: str | None = None
) -> tuple[nn.Module, Experiment, dict]:
    """Rebuild a model from an assembled, block or end-to-end checkpoint (safetensors + JSON, no pickle),
    with its raw weights or their average (``weights``, one of :data:`WEIGHTS`; None: the model's own
    sample.weights, auto for records older than it); the returned metadata's ``weights`` field says which
    were loaded.

    Returns an AssembledModel for assembled and block files (a lone block routes every sigma to itself,
    for inspection) and a BlockDenoiser for end-to-end files."""
    path = Path(path)
    tensors, meta = load_checkpoint(path)
    exp = Experiment(meta["config"], meta.get("scale", UNKNOWN_SCALE))
    weights = chosen_weights(weights, exp.config["sample"])
    exp.task.load_buffers({k: v for k, v in tensors.items() if k.startswith(TASK_PREFIX)})
    trained = {k: v for k, v in tensors.items() if not k.startswith(TASK_PREFIX)}
    kind = meta.get("kind")
    if kind in ("e2e", "block"):
        model: nn.Module = exp.e2e() if kind == "e2e" else exp.block(meta["block"])
        state, used = choose_weights(trained, weights, path)
        _load_into(model, state, path)
    elif kind == "assembled":
        blocks = exp.empty_blocks()
        for b, blk in enumerate(blocks, 1):
            prefix = f"block{b}/"
            state, used = choose_weights(
                {k[len(prefix) :]: v for k, v in trained.items() if k.startswith(prefix)}, weights, path
            )
            _load_into(blk, state, path)
        model = AssembledModel(blocks, exp.partition)
    else:
        raise CheckpointError(path, f"unknown checkpoint kind {kind!r}", field="kind")
    return model.to(device).eval(), exp, {**meta, "weights": used}
