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

The same format carries the full training state of an interrupted job: :mod:`dblocks.training_state`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

_HASH_CHUNK_BYTES = 1 << 20


# --------------------------------------------------------------------------------------- paths, files


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON metadata file that belongs to a ``.safetensors`` checkpoint."""
    return Path(path).with_suffix(".json")


def checkpoint_path(path: str | os.PathLike) -> Path:
    """``path`` as a checkpoint's tensor file path; CheckpointError unless it ends in ``.safetensors``."""
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
    """Delete a checkpoint: its tensor file, its JSON sidecar and any staging file a killed writer left (a
    training state's previous generation too: :func:`dblocks.training_state.remove_training_state`)."""
    path = Path(path)
    for p in (path, sidecar_path(path), *leftover_staging_files(path), *leftover_staging_files(sidecar_path(path))):
        p.unlink(missing_ok=True)


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


def is_jsonable(value: Any) -> bool:
    """Whether JSON can encode ``value`` (a training state keeps only such scheduler entries)."""
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
    path = checkpoint_path(path)
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
    path = checkpoint_path(path)
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
    path = checkpoint_path(path)
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
