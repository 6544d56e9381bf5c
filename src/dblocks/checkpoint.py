"""Checkpoints that can be loaded without running pickle: tensors in a ``.safetensors`` file, metadata
in a JSON sidecar next to it (``block.safetensors`` + ``block.json``).

Writing is atomic per file: each file is written to a temporary file in the same directory, flushed
and fsynced, then ``os.replace``d onto its final name, so a crash never leaves a half-written file
under a final name. The tensor file is replaced first and the JSON last: the JSON is the commit
record, holding the sha256 of the tensor file. A tensor file without its JSON is an incomplete
checkpoint, and a tensor file that does not match its JSON (for instance after a crash between the
two renames) fails the checksum on load; neither is ever loaded silently.

Loading uses only ``safetensors.torch.load_file`` and ``json``; ``torch.load`` and pickle are never
called, so a foreign or malicious file cannot execute code.

The same format carries the full training state (model, optimizer, LR scheduler, RNG states) so an
interrupted job can resume bit-identically: see :func:`save_training_state`, which keeps the previous
state until the next one is committed, so a kill at any instant leaves one state to resume from.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from safetensors import SafetensorError

from dblocks.errors import CheckpointError
from dblocks.io import fsync_dir, fsync_file, leftover_staging_files, staging_file

if TYPE_CHECKING:
    import torch

# torch (and safetensors.torch, which imports it) are imported inside the functions that handle tensors:
# the Snakefile checks checkpoints' JSON records (load_metadata, sha256_file) before any job, and every
# SLURM job parses the Snakefile again, so this module must import in milliseconds.

FORMAT_VERSION = 1

TENSOR_SUFFIX = ".safetensors"
# Keys that save_checkpoint writes itself; user metadata may not set them.
RESERVED_KEYS = ("format_version", "sha256", "tensors")
# Key of the metadata copy embedded in the safetensors header.
HEADER_KEY = "dblocks"
TRAINING_STATE_KIND = "training_state"

_HASH_CHUNK_BYTES = 1 << 20


# --------------------------------------------------------------------------------------- paths, files


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON metadata file that belongs to a ``.safetensors`` checkpoint."""
    return Path(path).with_suffix(".json")


def _checkpoint_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix != TENSOR_SUFFIX:
        raise CheckpointError(path, f"checkpoint path must end in {TENSOR_SUFFIX!r}")
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks so large checkpoints need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint: its tensor file, its JSON sidecar, any staging file a killed writer left and,
    for a training state, its previous generation."""
    path = Path(path)
    for base in (path, previous_generation(path)):
        for p in (base, sidecar_path(base), *leftover_staging_files(base), *leftover_staging_files(sidecar_path(base))):
            p.unlink(missing_ok=True)


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
            import shutil

            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


# ------------------------------------------------------------------------------------------ metadata


def _unserialisable_field(value: Any, where: str, ancestors: frozenset[int] = frozenset()) -> str | None:
    """Dotted path of the first value inside ``value`` that JSON cannot encode, or None."""
    if isinstance(value, (dict, list, tuple)):
        if id(value) in ancestors:
            return where or "<root>"  # a reference cycle
        ancestors = ancestors | {id(value)}
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{where}.{key}" if where else str(key)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                return child
            found = _unserialisable_field(item, child, ancestors)
            if found is not None:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _unserialisable_field(item, f"{where}[{index}]", ancestors)
            if found is not None:
                return found
        return None
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return where or "<root>"
    return None


def _to_json(path: Path, metadata: Mapping[str, Any], **dump_options: Any) -> str:
    """Encode metadata, turning a failure into a CheckpointError that names the offending key."""
    try:
        return json.dumps(metadata, sort_keys=True, **dump_options)
    except (TypeError, ValueError) as exc:
        field = _unserialisable_field(metadata, "")
        raise CheckpointError(path, f"metadata is not JSON-serialisable: {exc}", field=field) from exc


def _is_jsonable(value: Any) -> bool:
    return _unserialisable_field(value, "") is None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    return {name: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for name, t in tensors.items()}


# ---------------------------------------------------------------------------------------------- save


def _prepare_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors with no two sharing storage (safetensors refuses shared
    storage, which tied weights and views of one buffer would otherwise produce)."""
    import torch

    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise CheckpointError(path, "tensor names must be strings", field=repr(name))
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(path, f"expected a torch.Tensor, got {type(tensor).__name__}", field=name)
        t = tensor.detach().cpu().contiguous()
        if t.numel() > 0:  # empty tensors have no storage to share
            storage = t.untyped_storage().data_ptr()
            if storage in seen_storages:
                t = t.clone()
                storage = t.untyped_storage().data_ptr()
            seen_storages.add(storage)
        prepared[name] = t
    return prepared


def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> dict:
    """Write ``tensors`` to ``path`` (a ``.safetensors`` file) and ``metadata`` to its JSON sidecar,
    atomically; returns the metadata as written (with ``format_version``, ``sha256``, ``tensors``).

    If anything fails before the renames, a previous checkpoint at ``path`` is left untouched and no
    temporary file is left behind."""
    path = _checkpoint_path(path)
    reserved = sorted(set(metadata) & set(RESERVED_KEYS))
    if reserved:
        raise CheckpointError(path, "metadata key is reserved for the checkpoint format", field=reserved[0])
    prepared = _prepare_tensors(path, tensors)
    core = {**metadata, "format_version": FORMAT_VERSION}
    # Validates the user's metadata before any file is touched; the tensor table is already safe.
    header = {HEADER_KEY: _to_json(path, core)}

    path.parent.mkdir(parents=True, exist_ok=True)
    json_path = sidecar_path(path)
    # Both files are fully written and fsynced before either rename, so the only window in which the
    # pair is inconsistent is between the two renames, which the checksum on load detects.
    with staging_file(path) as tensor_tmp, staging_file(json_path) as json_tmp:
        from safetensors.torch import save_file

        save_file(prepared, tensor_tmp, metadata=header)
        fsync_file(tensor_tmp)
        record = {**core, "sha256": sha256_file(tensor_tmp), "tensors": _describe_tensors(prepared)}
        json_tmp.write_text(_to_json(json_path, record, indent=2) + "\n", encoding="utf-8")
        fsync_file(json_tmp)
        os.replace(tensor_tmp, path)
        os.replace(json_tmp, json_path)  # the commit point
    fsync_dir(path.parent)
    return record


# ---------------------------------------------------------------------------------------------- load


def _require_field(json_path: Path, record: dict, field: str, kind: type | tuple[type, ...]) -> Any:
    if field not in record:
        raise CheckpointError(json_path, "metadata lacks a required field", field=field)
    value = record[field]
    # bool is an int subclass, but True is not a format version.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CheckpointError(json_path, f"has type {type(value).__name__}, expected {kind}", field=field)
    return value


def load_metadata(path: str | os.PathLike) -> dict:
    """Read and validate only the JSON sidecar of the checkpoint at ``path``; the tensor file is not
    read or verified, so this is cheap enough to check many blocks before loading any."""
    path = _checkpoint_path(path)
    json_path = sidecar_path(path)
    if not json_path.is_file():
        if path.is_file():
            raise CheckpointError(json_path, f"incomplete checkpoint: metadata sidecar missing for {path}")
        raise CheckpointError(path, "no checkpoint here (neither the tensor file nor its metadata exists)")
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(json_path, f"metadata is not valid JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise CheckpointError(json_path, "metadata must be a JSON object")
    version = _require_field(json_path, record, "format_version", int)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            json_path,
            f"format_version {version} is newer than this code supports ({FORMAT_VERSION}); upgrade dblocks",
            field="format_version",
        )
    if version < 1:
        raise CheckpointError(json_path, f"invalid format_version {version}", field="format_version")
    _require_field(json_path, record, "sha256", str)
    _require_field(json_path, record, "tensors", dict)
    return record


def _check_tensors_match_record(path: Path, tensors: Mapping[str, torch.Tensor], record: dict) -> None:
    expected = record["tensors"]
    only_in_record = sorted(set(expected) - set(tensors))
    only_in_file = sorted(set(tensors) - set(expected))
    if only_in_record or only_in_file:
        raise CheckpointError(
            path,
            f"tensor names do not match: in the metadata but not the file: {only_in_record}; "
            f"in the file but not the metadata: {only_in_file}",
            field="tensors",
        )
    actual = _describe_tensors(tensors)
    for name in sorted(expected):
        if actual[name] != expected[name]:
            raise CheckpointError(
                path,
                f"tensor is {actual[name]} in the file but {expected[name]} in the metadata",
                field=f"tensors.{name}",
            )


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device | int = "cpu", verify: bool = True
) -> tuple[dict[str, torch.Tensor], dict]:
    """Load ``(tensors, metadata)`` from a checkpoint written by :func:`save_checkpoint`.

    With ``verify`` (the default) the tensor file's sha256 must match the one in the metadata. The
    tensor names, shapes and dtypes are always checked against the metadata."""
    path = _checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(path, "tensor file missing")
    record = load_metadata(path)
    if path.stat().st_size == 0:
        raise CheckpointError(path, "is empty (0 bytes): truncated or never written")
    if verify and sha256_file(path) != record["sha256"]:
        raise CheckpointError(path, "checksum mismatch: file is corrupted or was modified", field="sha256")
    try:
        import torch
        from safetensors.torch import load_file

        tensors = load_file(path, device=str(torch.device(device)))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(path, f"not a readable safetensors file (truncated or foreign?): {exc}") from exc
    _check_tensors_match_record(path, tensors, record)
    return tensors, record


# ------------------------------------------------------------------------------------ training state

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
    return {key: value for key, value in scheduler.state_dict().items() if _is_jsonable(value)}


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
    tensors = {**_with_prefix(_MODEL, model.state_dict()), **optim_tensors, **_rng_tensors(generators),
               **_with_prefix(AVERAGE_PREFIX, average or {})}
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
    path = _checkpoint_path(path)
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


def _check_average_matches(path: Path, average: Mapping[str, torch.Tensor] | None,
                           saved: Mapping[str, torch.Tensor]) -> None:
    live = {name: (list(t.shape), t.dtype) for name, t in (average or {}).items()}
    kept = {name: (list(t.shape), t.dtype) for name, t in saved.items()}
    if live != kept:
        what = ("a weight average was saved but training keeps none" if average is None else
                "training keeps a weight average but none was saved" if not saved else
                "the saved weight average does not match the model's")
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
    path = _checkpoint_path(path)
    try:
        tensors, record = load_checkpoint(path)  # on CPU; load_state_dict moves values to each param's device
    except CheckpointError as exc:
        prev = previous_generation(path)
        if not sidecar_path(prev).is_file():
            raise
        # the latest save was cut short (see save_training_state): resume from the one before it, and
        # drop the torn files so that the next save keeps this generation as its fallback
        tensors, record = load_checkpoint(prev)
        print(f"dblocks: the latest training state {path} is unusable ({exc}); resuming from the previous "
              f"one, step {record.get('step')}", file=sys.stderr, flush=True)
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
