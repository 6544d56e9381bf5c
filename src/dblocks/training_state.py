"""The training state of a job, saved so that an interrupted job resumes bit-identically: model and optimizer
tensors, the weight average (if training keeps one) and RNG states in the tensor file, the optimizer's and LR
scheduler's other state in the JSON record, one checkpoint of :mod:`dblocks.checkpoint` (atomic, hashed, loaded
without pickle). :func:`save_training_state` keeps the previous state until the next one is committed, so a kill
at any instant leaves one state to resume from."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dblocks.checkpoint import (
    checkpoint_path,
    is_jsonable,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
    sidecar_path,
)
from dblocks.errors import CheckpointError
from dblocks.io import staging_file

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that handle tensors, as in dblocks.checkpoint: the annotations name it
# only for readers.

TRAINING_STATE_KIND = "training_state"


def previous_generation(path: str | os.PathLike) -> Path:
    """Where :func:`save_training_state` keeps the last complete state while it writes the next one
    (``block-2.state.safetensors`` -> ``block-2.state.prev.safetensors``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src``'s content atomically: a hard link (free) staged and renamed, or a copy where
    the filesystem has no hard links."""
    with staging_file(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


_MODEL = "model/"
_OPTIM = "optim/"
_RNG_TORCH = "rng/torch"
_RNG_CUDA = "rng/cuda/"
_RNG_GEN = "rng/gen/"
# the weight average (dblocks.ema), in a training state and beside the raw weights in a trained checkpoint
AVERAGE_PREFIX = "ema/"


def _with_prefix(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{name}": t for name, t in tensors.items()}


def _under_prefix(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state -> (tensors named ``optim/<param index>/<key>``, JSON-able rest)."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        plain_state[str(index)] = {}
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIM}{index}/{key}"] = value
            else:
                plain_state[str(index)][key] = value
    return tensors, {"state": plain_state, "param_groups": state_dict["param_groups"]}


def _join_optimizer_state(tensors: Mapping[str, torch.Tensor], plain: dict) -> dict:
    """Inverse of :func:`_split_optimizer_state` (JSON turned the integer param indices into strings)."""
    state: dict[int, dict[str, Any]] = {int(index): dict(values) for index, values in plain["state"].items()}
    for name, tensor in _under_prefix(_OPTIM, tensors).items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": plain["param_groups"]}


def _restore_tuples(saved: Any, current: Any) -> Any:
    """JSON has no tuples: give back tuple type where the live object has one (e.g. Adam's betas),
    so a restored optimizer's state_dict equals the original."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return {key: _restore_tuples(value, current.get(key)) for key, value in saved.items()}
    if isinstance(saved, list) and isinstance(current, (list, tuple)):
        items = [_restore_tuples(s, c) for s, c in zip(saved, current)] + saved[len(current) :]
        return tuple(items) if isinstance(current, tuple) else items
    return saved


def _jsonable_scheduler_state(scheduler: Any) -> dict | None:
    """Scheduler state without the entries JSON cannot hold (callables such as custom lr lambdas;
    LambdaLR itself stores None for plain functions, which is kept)."""
    if scheduler is None:
        return None
    return {key: value for key, value in scheduler.state_dict().items() if is_jsonable(value)}


def _rng_tensors(generators: Mapping[str, torch.Generator]) -> dict[str, torch.Tensor]:
    import torch

    tensors = {_RNG_TORCH: torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"{_RNG_CUDA}{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    tensors.update(_with_prefix(_RNG_GEN, {name: g.get_state() for name, g in generators.items()}))
    return tensors


def save_training_state(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    generators: Mapping[str, torch.Generator],
    extra: Mapping[str, Any] | None = None,
    average: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Save everything needed to resume training bit-identically, as one (atomic, hashed) checkpoint:
    model and optimizer tensors, the weight average (``average``, if training keeps one) and RNG states
    in the tensor file, the rest in the JSON."""
    extra = dict(extra or {})
    if "step" in extra:
        raise CheckpointError(path, "'step' is passed separately, not in extra", field="extra.step")
    optim_tensors, optim_plain = _split_optimizer_state(optimizer.state_dict())
    tensors = {
        **_with_prefix(_MODEL, model.state_dict()),
        **optim_tensors,
        **_rng_tensors(generators),
        **_with_prefix(AVERAGE_PREFIX, average or {}),
    }
    metadata = {
        "kind": TRAINING_STATE_KIND,
        "step": int(step),
        "optimizer": optim_plain,
        "scheduler": _jsonable_scheduler_state(scheduler),
        "extra": extra,
    }
    # A kill between save_checkpoint's two renames leaves a new tensor file beside the old JSON, which
    # fails its checksum. So the last complete state is kept as the previous generation (hard links, no
    # copy) until the new one is committed; load_training_state falls back to it.
    path = checkpoint_path(path)
    prev = previous_generation(path)
    if path.is_file() and sidecar_path(path).is_file():
        _link_or_copy(path, prev)
        _link_or_copy(sidecar_path(path), sidecar_path(prev))  # the JSON last: it commits the generation
    save_checkpoint(path, tensors, metadata)
    for p in (sidecar_path(prev), prev):  # JSON first: a tensor file without JSON is never loaded
        p.unlink(missing_ok=True)


def _check_model_matches(path: Path, model: torch.nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            path,
            f"model state does not match the model: the checkpoint lacks {missing}; the model lacks {unexpected}",
            field="model",
        )
    for name, tensor in expected.items():
        if saved[name].shape != tensor.shape:
            raise CheckpointError(
                path,
                f"shape {list(saved[name].shape)} in the checkpoint, {list(tensor.shape)} in the model",
                field=f"{_MODEL}{name}",
            )


def _check_optimizer_matches(path: Path, optimizer: torch.optim.Optimizer, saved_groups: list) -> None:
    saved_sizes = [len(group["params"]) for group in saved_groups]
    live_sizes = [len(group["params"]) for group in optimizer.param_groups]
    if saved_sizes != live_sizes:
        raise CheckpointError(
            path,
            f"optimizer parameter groups hold {saved_sizes} parameters in the checkpoint, {live_sizes} live",
            field="optimizer.param_groups",
        )


def _check_generators_match(path: Path, generators: Mapping[str, torch.Generator], saved: Mapping[str, Any]) -> None:
    if set(generators) != set(saved):
        raise CheckpointError(
            path, f"generators {sorted(saved)} were saved but {sorted(generators)} were given", field="rng/gen"
        )


def _check_average_matches(
    path: Path, average: Mapping[str, torch.Tensor] | None, saved: Mapping[str, torch.Tensor]
) -> None:
    live = {name: (list(t.shape), t.dtype) for name, t in (average or {}).items()}
    kept = {name: (list(t.shape), t.dtype) for name, t in saved.items()}
    if live != kept:
        what = (
            "a weight average was saved but training keeps none"
            if average is None
            else "training keeps a weight average but none was saved"
            if not saved
            else "the saved weight average does not match the model's"
        )
        raise CheckpointError(path, f"{what} (train.ema_decay changed?)", field=AVERAGE_PREFIX.rstrip("/"))


def _restore_rng(tensors: Mapping[str, torch.Tensor], generators: Mapping[str, torch.Generator]) -> None:
    import torch

    torch.set_rng_state(tensors[_RNG_TORCH])
    if torch.cuda.is_available():
        # Devices beyond those present now (resuming on fewer GPUs) have nothing to restore into.
        for index, state in _under_prefix(_RNG_CUDA, tensors).items():
            if int(index) < torch.cuda.device_count():
                torch.cuda.set_rng_state(state, int(index))
    for name, state in _under_prefix(_RNG_GEN, tensors).items():
        generators[name].set_state(state)


def load_training_state(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generators: Mapping[str, torch.Generator],
    average: Mapping[str, torch.Tensor] | None = None,
) -> dict:
    """Restore a state written by :func:`save_training_state` in place (``average``'s tensors included);
    returns ``{"step", **extra}``.

    Everything is checked against the live objects before anything is modified, so a mismatching
    checkpoint raises CheckpointError and leaves model, optimizer and RNGs as they were."""
    path = checkpoint_path(path)
    try:
        tensors, record = load_checkpoint(path)  # on CPU; load_state_dict moves values to each param's device
    except CheckpointError as exc:
        prev = previous_generation(path)
        if not sidecar_path(prev).is_file():
            raise
        # the latest save was cut short (see save_training_state): resume from the one before it, and
        # drop the torn files so that the next save keeps this generation as its fallback
        tensors, record = load_checkpoint(prev)
        print(
            f"dblocks: the latest training state {path} is unusable ({exc}); resuming from the previous "
            f"one, step {record.get('step')}",
            file=sys.stderr,
            flush=True,
        )
        for p in (sidecar_path(path), path):
            p.unlink(missing_ok=True)
        path = prev
    if record.get("kind") != TRAINING_STATE_KIND:
        raise CheckpointError(path, f"not a training state (kind {record.get('kind')!r})", field="kind")
    model_state = _under_prefix(_MODEL, tensors)
    optim_state = _join_optimizer_state(tensors, record["optimizer"])
    _check_model_matches(path, model, model_state)
    _check_optimizer_matches(path, optimizer, optim_state["param_groups"])
    _check_generators_match(path, generators, _under_prefix(_RNG_GEN, tensors))
    saved_average = _under_prefix(AVERAGE_PREFIX, tensors)
    _check_average_matches(path, average, saved_average)
    if (scheduler is None) != (record["scheduler"] is None):
        raise CheckpointError(path, "scheduler given but none saved, or the reverse", field="scheduler")

    model.load_state_dict(model_state, strict=True)
    optim_state["param_groups"] = _restore_tuples(optim_state["param_groups"], optimizer.state_dict()["param_groups"])
    optimizer.load_state_dict(optim_state)
    if scheduler is not None:
        scheduler.load_state_dict(record["scheduler"])
    _restore_rng(tensors, generators)
    for name, tensor in (average or {}).items():
        tensor.copy_(saved_average[name])
    return {"step": record["step"], **record["extra"]}


def remove_training_state(path: str | os.PathLike) -> None:
    """Delete a training state (a finished job drops its resume state): both generations
    (:func:`previous_generation`) and whatever a killed save of either left."""
    for base in (Path(path), previous_generation(path)):
        remove_checkpoint(base)
