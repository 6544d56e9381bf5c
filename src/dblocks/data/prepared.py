"""The prepared on-disk form of a dataset split: what the pipeline's prepare step writes once, DVC
versions, and every training and evaluation job reads. Pixels are stored as the original integers (uint8)
with their maximum value, so the round trip to the [-1, 1] floats is exact; autoencoder latents as float32
with their scale; text as token streams. Every file is a hashed safetensors checkpoint written atomically by
:mod:`dblocks.checkpoint` (no pickle).

Layout of one split, ``<dir>/<split>.safetensors`` with its JSON record ``<dir>/<split>.json``:

* one file (digits, CIFAR, digits-latent, text): the tensors ``images`` and ``labels`` (and a latent
  dataset's ``flipped``), or a text split's token streams;
* shards (imagenet256, written while it is encoded, see :class:`ShardWriter`): ``<split>.safetensors``
  holds the ``labels`` of every example, and its record lists the shards in row order,
  ``shards/<split>-00000.safetensors``, ``shards/<split>-00001.safetensors``, ..., each with its example
  count and sha256. A shard holds consecutive rows of ``images`` (and ``flipped``) and has a JSON record of
  its own. The list is also in the split file's header, so the split file's sha256 (what DVC, the FID
  reference cache and MLflow record) changes with any shard. Shards are written first and the split file
  last: its record commits the whole split. :data:`SHARD_EXAMPLES_ENV` sets the examples per shard.

Loading verifies every file (sha256, each shard against the split's list too) and then reads no rows until
they are asked for: :class:`StoredRows` reads exactly the rows an index selects with positional reads
(``os.preadv``) and converts only those (pixels to floats in [-1, 1]). The data stay in the kernel's page
cache, shared by every job on a node, and a job's resident memory holds its batches and the labels (8 bytes
an example), whatever the size of the dataset. Memory-mapping the files would share the same page cache but
count every touched page in the job's resident set: on ext4 with large folios each random row maps ~2 MB,
so 1,000 random rows of a 300 MB file put all of it in the job's RSS (measured), and an epoch the whole
dataset, which is what SLURM accounts and limits."""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path

import torch

from dblocks.checkpoint import load_checkpoint, remove_checkpoint, save_checkpoint

# LATENT_DATASETS: autoencoder latents, stored as float32 with their scale
from dblocks.config import LATENT_DATASETS, SHARD_DIR
from dblocks.data.dataset import ImageDataset
from dblocks.data.text import TextDataset, token_streams
from dblocks.errors import CheckpointError

#: largest raw pixel value per dataset: digits count ink in 0..16, CIFAR is 8-bit
PIXEL_MAX = {"digits": 16, "cifar10": 255, "cifar100": 255}
#: the folder, beside the split files, that holds a sharded split's shards
#: the environment variable that sets the examples per shard of a sharded prepare (imagenet256)
SHARD_EXAMPLES_ENV = "DBLOCKS_SHARD_EXAMPLES"
#: ImageNet train: 26 shards of 1.6 GB (latents and mirrored latents); its validation split is one shard
DEFAULT_SHARD_EXAMPLES = 50_000
SHARD_KIND = "dataset-shard"
#: rows converted at a time when a whole split is written, so no float copy of the split is ever made
_CHUNK_ROWS = 4096
#: safetensors' names of the dtypes
_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def prepared_path(directory: str | Path, split: str) -> Path:
    return Path(directory) / f"{split}.safetensors"


def shard_path(directory: str | Path, split: str, index: int) -> Path:
    return Path(directory) / SHARD_DIR / f"{split}-{index:05d}.safetensors"


def shard_examples(value: int | str | None = None) -> int:
    """Examples per shard: ``value``, else the environment's :data:`SHARD_EXAMPLES_ENV`, else the default."""
    name = SHARD_EXAMPLES_ENV if value is None else "shard size"
    raw = os.environ.get(SHARD_EXAMPLES_ENV, str(DEFAULT_SHARD_EXAMPLES)) if value is None else value
    try:
        examples = int(str(raw).strip())
    except ValueError:
        examples = 0
    if examples < 1:
        raise ValueError(f"{name}={raw!r}: allowed: an integer >= 1 (examples per shard)")
    return examples


# ----------------------------------------------------------------------------------- reading rows


class FileRows:
    """``count`` rows of shape ``row_shape`` and type ``dtype``, stored back to back from byte ``offset`` of the
    file ``path`` and read with positional reads of exactly the rows asked for: no memory map (whose touched
    pages would count in the process's resident memory) and no file position, so one open file serves every
    caller. The file is opened here, right after the loader verified it, so that a later replacement of the
    path (a new prepare) is not read at this file's offsets; an unpickled copy opens the path again."""

    def __init__(self, path: str | Path, offset: int, dtype: torch.dtype, row_shape: Sequence[int], count: int):
        self.path, self.offset, self.dtype = Path(path), int(offset), dtype
        self.row_shape, self.count = tuple(int(n) for n in row_shape), int(count)
        self.row_bytes = math.prod(self.row_shape) * dtype.itemsize
        self._file = open(self.path, "rb", buffering=0)

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict:  # an open file does not pickle
        return {**self.__dict__, "_file": None}

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows at positions ``rows`` (a 1-D int64 tensor, each in range), in that order, as a new tensor."""
        out = torch.empty((len(rows), *self.row_shape), dtype=self.dtype)
        if len(rows) == 0 or self.row_bytes == 0:
            return out
        raw = out.reshape(len(rows), -1).view(torch.uint8).numpy()  # the same memory, as bytes
        first, last = int(rows[0]), int(rows[-1])
        if last - first == len(rows) - 1 and (len(rows) == 1 or bool((rows.diff() == 1).all())):
            self._read(raw.reshape(-1), first)  # a run of consecutive rows (a slice, a batch loop): one read
        else:
            for i, row in enumerate(rows.tolist()):
                self._read(raw[i], row)
        return out

    def _read(self, into, row: int) -> None:
        """Fill the byte array ``into`` from the start of row ``row``."""
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)
        view, start, done = memoryview(into), self.offset + row * self.row_bytes, 0
        while done < len(view):  # a read may return less than asked (very large reads, signals)
            got = os.preadv(self._file.fileno(), [view[done:]], start + done)
            if got == 0:
                raise CheckpointError(
                    self.path,
                    f"ends inside row {row}: the file changed after it was verified; run 'dblocks prepare' again",
                )
            done += got


def pixels_to_unit(raw: torch.Tensor, pixel_max: int) -> torch.Tensor:
    """Stored pixel integers in 0..pixel_max -> float32 in [-1, 1] (the exact inverse of the stored rounding)."""
    return raw.float() / pixel_max * 2 - 1


def as_float32(raw: torch.Tensor) -> torch.Tensor:
    return raw.float()


def as_int64(raw: torch.Tensor) -> torch.Tensor:
    return raw.long()


class StoredRows:
    """A split's stored rows (``images``, ``flipped``, text windows), read when indexed: ``rows[index]`` reads
    the rows that ``index`` selects (an int, a slice, an integer or boolean tensor or list, or a tuple whose
    first element is one of these and whose rest indexes within the rows) from ``parts``, consecutive runs of
    rows (the shards: :class:`FileRows` or in-memory tensors), and returns them through ``convert`` as a new
    tensor of type ``dtype``. The same index gives the same rows however the split is sharded.

    ``len``, ``shape``, ``ndim`` and ``dtype`` are those of the converted tensor, and ``split(n)`` yields its
    consecutive batches of ``n`` rows as ``Tensor.split`` does, so a loop over batches takes either. ``rows[:]``
    is the whole split in memory: for small data only."""

    def __init__(
        self,
        parts: Sequence[FileRows | torch.Tensor],
        convert: Callable[[torch.Tensor], torch.Tensor],
        dtype: torch.dtype,
    ):
        if not parts:
            raise ValueError("StoredRows needs at least one part")
        layouts = {(_row_shape(p), p.dtype) for p in parts}
        if len(layouts) != 1:
            raise ValueError(
                f"the parts of one split must share a row shape and dtype, got {sorted(map(str, layouts))}"
            )
        ((self.row_shape, self.stored_dtype),) = layouts
        self.parts, self.convert, self.dtype = list(parts), convert, dtype
        self._starts = torch.tensor([0, *itertools.accumulate(len(p) for p in self.parts)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.row_shape))

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    def __repr__(self) -> str:
        return (
            f"StoredRows({len(self)} rows of {tuple(self.row_shape)} {self.stored_dtype} read as {self.dtype}, "
            f"{len(self.parts)} part(s))"
        )

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, tuple):
            first, rest = (index[0], index[1:]) if index else (slice(None), ())
            rows = self[first]
            return rows[rest] if _is_scalar(first) else rows[(slice(None), *rest)]
        if _is_scalar(index):
            return self._gather(self._positions(torch.tensor([int(index)])))[0]
        if isinstance(index, slice):
            return self._gather(torch.arange(*index.indices(len(self))))
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            if index.shape != (len(self),):
                raise IndexError(f"a boolean row mask must have shape ({len(self)},), got {tuple(index.shape)}")
            index = index.nonzero().flatten()
        rows = self._gather(self._positions(index.reshape(-1)))
        return rows.reshape(*index.shape, *rows.shape[1:])

    def split(self, size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(self), size):
            yield self[start : start + size]

    def _positions(self, index: torch.Tensor) -> torch.Tensor:
        """``index`` as in-range int64 row positions (negative ones count from the end)."""
        if index.dtype.is_floating_point or index.dtype.is_complex:
            raise IndexError(f"rows are indexed by integers, got {index.dtype}")
        index = index.long()
        n = len(self)
        bad = (index < -n) | (index >= n)
        if bool(bad.any()):
            raise IndexError(f"row {int(index[bad][0])} is out of range for {n} rows")
        return torch.where(index < 0, index + n, index)

    def _gather(self, positions: torch.Tensor) -> torch.Tensor:
        return self.convert(self._read(positions))

    def _read(self, positions: torch.Tensor) -> torch.Tensor:
        """The stored rows at ``positions``, from whichever parts hold them, in order."""
        if len(self.parts) == 1:
            return _take(self.parts[0], positions)
        part = torch.searchsorted(self._starts, positions, right=True) - 1
        out = torch.empty((len(positions), *self.row_shape), dtype=self.stored_dtype)
        for p in part.unique().tolist():
            mask = part == p
            out[mask] = _take(self.parts[p], positions[mask] - self._starts[p])
        return out


def _is_scalar(index) -> bool:
    return (isinstance(index, int) and not isinstance(index, bool)) or (
        torch.is_tensor(index) and index.ndim == 0 and index.dtype != torch.bool
    )


def _row_shape(part: FileRows | torch.Tensor) -> tuple[int, ...]:
    return tuple(part.shape[1:]) if torch.is_tensor(part) else part.row_shape


def _take(part: FileRows | torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return part[rows] if torch.is_tensor(part) else part.take(rows)


def _tensor_offsets(path: Path) -> dict[str, int]:
    """Byte offset in the file of each tensor's data, from the safetensors header (8-byte length, JSON)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {name: 8 + length + entry["data_offsets"][0] for name, entry in header.items() if name != "__metadata__"}


def _file_rows(path: Path, tensors: Mapping[str, torch.Tensor], names) -> dict[str, FileRows]:
    """Rows of the tensors ``names`` of a verified file (``tensors`` are its loaded tensors: shapes, dtypes)."""
    offsets = _tensor_offsets(path)
    scalar = sorted(name for name in names if tensors[name].ndim == 0)
    if scalar:
        raise CheckpointError(path, f"holds a scalar {scalar[0]}; allowed: rows (N, ...)", field=f"tensors.{scalar[0]}")
    return {
        name: FileRows(path, offsets[name], tensors[name].dtype, tensors[name].shape[1:], tensors[name].shape[0])
        for name in names
    }


# ----------------------------------------------------------------------------------- image splits


def dataset_record(
    name: str,
    split: str,
    num_classes: int,
    examples: int,
    latent_scale: float | None = None,
    provenance: Mapping | None = None,
) -> dict:
    """The metadata of a prepared image split; ``provenance`` is recorded too (e.g. the sha256 of the
    autoencoder that encoded a latent dataset)."""
    meta = {
        **(provenance or {}),
        "kind": "dataset",
        "name": name,
        "split": split,
        "num_classes": num_classes,
        "examples": int(examples),
    }
    if name in LATENT_DATASETS:  # latents are real-valued: stored as they are, with their scale
        if latent_scale is None:
            raise ValueError(f"{name} {split}: a latent dataset needs its latent_scale")
        meta["latent_scale"] = float(latent_scale)
    else:  # pixels go back to their original integers, so the round trip is exact
        meta["pixel_max"] = PIXEL_MAX[name]
    return meta


def _stored_form(images: torch.Tensor | StoredRows, pixel_max: int | None) -> torch.Tensor:
    """A split's floats as they are stored: float32 latents (``pixel_max`` None) or the original pixel integers,
    converted a chunk of rows at a time so that no float temporary of the whole split is made."""
    if pixel_max is None and torch.is_tensor(images) and images.dtype == torch.float32:
        return images.contiguous()
    out = torch.empty(tuple(images.shape), dtype=torch.float32 if pixel_max is None else torch.uint8)
    for start in range(0, len(images), _CHUNK_ROWS):
        chunk = images[start : start + _CHUNK_ROWS]
        out[start : start + len(chunk)] = (
            chunk.float() if pixel_max is None else torch.round((chunk + 1) / 2 * pixel_max).to(torch.uint8)
        )
    return out


def save_prepared(
    ds: ImageDataset, directory: str | Path, provenance: dict | None = None, shard_size: int | None = None
) -> Path:
    """Write one split: one file, or with ``shard_size`` shards of that many examples (the layout above).
    ``provenance`` is recorded in its metadata (e.g. the sha256 of the autoencoder that encoded a latent
    dataset). Returns the split file."""
    meta = dataset_record(ds.name, ds.split, ds.num_classes, len(ds), ds.latent_scale, provenance)
    rows = {"images": _stored_form(ds.images, meta.get("pixel_max"))}
    if ds.flipped is not None:  # a latent dataset's encodings of the mirrored images (train.augment: flip)
        rows["flipped"] = _stored_form(ds.flipped, None)
    if shard_size is None:
        path = prepared_path(directory, ds.split)
        tensors = {"images": rows["images"], "labels": ds.labels}
        save_checkpoint(path, {**tensors, **rows}, meta)  # images, labels, flipped: the order files always had
        return path
    writer = ShardWriter(directory, meta, shard_size)
    for start in range(0, len(ds), writer.shard_size):
        writer.add({name: t[start : start + writer.shard_size] for name, t in rows.items()})
    return writer.finish(ds.labels)


class ShardWriter:
    """Writes a split as shards while its rows are produced (``add``, in order), holding at most one shard in
    memory; ``finish`` then writes the split file, which lists them. ``meta`` is the split's record
    (:func:`dataset_record`), whose ``examples`` is the number of rows that will be added.

    Every file goes through :func:`dblocks.checkpoint.save_checkpoint` (atomic, hashed). Until ``finish``, a
    previous split file still lists its own shards, whose hashes the rewritten ones do not match, so a prepare
    that dies midway is never read as a complete split."""

    def __init__(self, directory: str | Path, meta: Mapping, shard_size: int | str | None = None):
        self.directory, self.meta = Path(directory), dict(meta)
        self.split, self.examples = self.meta["split"], int(self.meta["examples"])
        if self.examples < 1:
            raise ValueError(f"{self.meta.get('name')} {self.split}: no examples to write; allowed: at least one")
        self.shard_size = shard_examples(shard_size)
        self.shards: list[dict] = []  # {"file", "examples", "sha256"} of each written shard
        self._written = 0  # rows in written shards
        self._buffers: dict[str, torch.Tensor] | None = None  # the shard being filled
        self._filled = 0

    def add(self, rows: Mapping[str, torch.Tensor]) -> None:
        """Append rows (the same tensor names every time, equally many rows each)."""
        counts = {len(t) for t in rows.values()}
        if len(counts) != 1:
            raise ValueError(f"{self.split}: the tensors of one add hold different numbers of rows {sorted(counts)}")
        count, done = counts.pop(), 0
        while done < count:
            if self._buffers is None:
                self._start_shard(rows)
            elif set(rows) != set(self._buffers):
                raise ValueError(f"{self.split}: rows of {sorted(rows)} added to a shard of {sorted(self._buffers)}")
            capacity = len(next(iter(self._buffers.values())))
            take = min(count - done, capacity - self._filled)
            for name, t in rows.items():
                self._buffers[name][self._filled : self._filled + take] = t[done : done + take]
            self._filled, done = self._filled + take, done + take
            if self._filled == capacity:
                self._write_shard()

    def _start_shard(self, rows: Mapping[str, torch.Tensor]) -> None:
        capacity = min(self.shard_size, self.examples - self._written)
        if capacity < 1:
            raise ValueError(f"{self.split}: more rows added than the {self.examples} examples announced")
        self._buffers = {name: torch.empty((capacity, *t.shape[1:]), dtype=t.dtype) for name, t in rows.items()}
        self._filled = 0

    def _write_shard(self) -> None:
        index = len(self.shards)
        path = shard_path(self.directory, self.split, index)
        examples = self._filled
        record = save_checkpoint(
            path,
            self._buffers,
            {
                "kind": SHARD_KIND,
                "name": self.meta.get("name"),
                "split": self.split,
                "shard": index,
                "first": self._written,
                "examples": examples,
            },
        )
        self.shards.append(
            {"file": path.relative_to(self.directory).as_posix(), "examples": examples, "sha256": record["sha256"]}
        )
        self._written += examples
        self._buffers, self._filled = None, 0

    def finish(self, labels: torch.Tensor) -> Path:
        """Write the split file (every example's label, the list of shards); returns its path."""
        added = self._written + self._filled
        if added != self.examples:
            raise ValueError(f"{self.split}: {added} rows were added, {self.examples} examples were announced")
        if labels.shape != (self.examples,):
            raise ValueError(f"{self.split}: {tuple(labels.shape)} labels for {self.examples} examples")
        path = prepared_path(self.directory, self.split)
        save_checkpoint(path, {"labels": labels}, {**self.meta, "shards": self.shards})
        self._remove_unlisted()
        return path

    def _remove_unlisted(self) -> None:
        """Shards of this split that an earlier prepare wrote beyond this one's (DVC would version them)."""
        listed = {entry["file"] for entry in self.shards}
        for stale in (self.directory / SHARD_DIR).glob(f"{self.split}-*.safetensors"):
            if stale.relative_to(self.directory).as_posix() not in listed:
                remove_checkpoint(stale)


def _load_split(directory: str | Path, split: str, kind: str, expected_name: str | None):
    """(path, tensors, metadata) of a prepared split, checked to be a ``kind`` file of ``expected_name``."""
    path = prepared_path(directory, split)
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != kind:
        raise CheckpointError(path, f"is a {meta.get('kind')!r} file, not a prepared {kind}", field="kind")
    if expected_name is not None and meta["name"] != expected_name:
        raise CheckpointError(
            path, f"holds dataset {meta['name']!r}, the config asks for {expected_name!r}", field="name"
        )
    return path, tensors, meta


def _listed_shard(directory: Path, split_path: Path, index: int, entry) -> Path:
    """The file of the split's ``index``-th listed shard, checked to be a well-formed entry under shards/."""
    file = entry.get("file") if isinstance(entry, dict) else None
    if (
        not isinstance(file, str)
        or Path(file).parts != (SHARD_DIR, Path(file).name)
        or not isinstance(entry.get("examples"), int)
        or not isinstance(entry.get("sha256"), str)
    ):
        raise CheckpointError(
            split_path,
            f"lists shard {index} as {entry!r}; allowed: {{file: '{SHARD_DIR}/NAME"
            f".safetensors', examples: int, sha256: str}}",
            field="shards",
        )
    return directory / file


def _shard_rows(directory: Path, split_path: Path, meta: Mapping) -> dict[str, list[FileRows]]:
    """The rows of every shard a split file lists, each shard verified (its sha256 against its own record and
    the split's list, its rows against the list's count)."""
    entries = meta["shards"]
    if not isinstance(entries, list) or not entries:
        raise CheckpointError(split_path, "lists no shards; allowed: a non-empty list", field="shards")
    parts: dict[str, list[FileRows]] = {}
    for index, entry in enumerate(entries):
        path = _listed_shard(directory, split_path, index, entry)
        tensors, record = load_checkpoint(path)
        if record["sha256"] != entry["sha256"]:
            raise CheckpointError(
                path,
                f"is not the shard {split_path.name} lists (sha256 {record['sha256'][:12]}..."
                f", listed {entry['sha256'][:12]}...); run 'dblocks prepare' again",
                field="sha256",
            )
        names = sorted(tensors)
        if parts and names != sorted(parts):
            raise CheckpointError(
                path,
                f"holds {names}, shard 0 holds {sorted(parts)}; allowed: the same tensors in every shard",
                field="tensors",
            )
        if names not in (["images"], ["flipped", "images"]):
            raise CheckpointError(
                path, f"holds tensors {names}; allowed: images (and, for latents, flipped)", field="tensors"
            )
        for name, rows in _file_rows(path, tensors, names).items():
            if len(rows) != entry["examples"]:
                raise CheckpointError(
                    path,
                    f"holds {len(rows)} rows of {name}, {split_path.name} lists {entry['examples']}",
                    field=f"tensors.{name}",
                )
            parts.setdefault(name, []).append(rows)
    return parts


def _split_rows(directory: str | Path, path: Path, tensors: Mapping, meta: Mapping) -> dict[str, list[FileRows]]:
    """The stored rows of a split (images, and flipped if any) as parts: its shards, or the split file itself."""
    if "shards" in meta:
        if set(tensors) != {"labels"}:
            raise CheckpointError(
                path,
                f"holds tensors {sorted(tensors)}; allowed in a sharded split's file: labels "
                f"(the rows are in its shards)",
                field="tensors",
            )
        return _shard_rows(Path(directory), path, meta)
    if not {"images", "labels"} <= set(tensors) <= {"images", "labels", "flipped"}:
        raise CheckpointError(
            path,
            f"holds tensors {sorted(tensors)}; allowed: images and labels (and, for latents, flipped)",
            field="tensors",
        )
    return {name: [rows] for name, rows in _file_rows(path, tensors, set(tensors) - {"labels"}).items()}


def _check_split(path: Path, images: StoredRows, labels: torch.Tensor, flipped: StoredRows | None, meta) -> None:
    if flipped is not None and ("latent_scale" not in meta or flipped.shape != images.shape):
        raise CheckpointError(
            path,
            f"has mirrored encodings of shape {tuple(flipped.shape)}; allowed: latents of "
            f"the images' shape {tuple(images.shape)}",
            field="flipped",
        )
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise CheckpointError(
            path,
            f"has {labels.shape[0] if labels.ndim else 0} labels for images of shape "
            f"{tuple(images.shape)}; allowed: images (N, C, H, W) with N labels",
            field="labels",
        )
    if images.shape[0] == 0:
        raise CheckpointError(path, "holds no examples; allowed: a split with at least one example", field="examples")


def load_prepared(directory: str | Path, split: str, expected_name: str | None = None) -> ImageDataset:
    """A prepared split, every file verified; its ``images`` (and ``flipped``) are :class:`StoredRows`, read
    from the files a batch at a time, and its labels are in memory."""
    path, tensors, meta = _load_split(directory, split, "dataset", expected_name)
    parts = _split_rows(directory, path, tensors, meta)
    # a copy, so that no memory map of the file outlives this function
    labels = tensors["labels"].to(torch.int64, copy=True)
    convert = as_float32 if "latent_scale" in meta else partial(pixels_to_unit, pixel_max=meta["pixel_max"])
    images = StoredRows(parts["images"], convert, torch.float32)
    flipped = StoredRows(parts["flipped"], as_float32, torch.float32) if "flipped" in parts else None
    _check_split(path, images, labels, flipped, meta)
    return ImageDataset(
        meta["name"],
        meta["split"],
        images,
        labels,
        meta["num_classes"],
        latent_scale=meta.get("latent_scale"),
        flipped=flipped,
    )


# ------------------------------------------------------------------------------------ text splits


def save_prepared_text(name: str, split: str, directory: str | Path, root=None) -> Path:
    """A text split as its token streams (every tokenizer), windowed at load time for any context length."""
    streams = token_streams(name, split, root)
    path = prepared_path(directory, split)
    save_checkpoint(
        path,
        streams,
        {
            "kind": "text-dataset",
            "name": name,
            "split": split,
            "tokens": {k: int(v.numel()) for k, v in streams.items()},
        },
    )
    return path


def load_prepared_text(
    directory: str | Path, split: str, seq_len: int, tokenizer: str, expected_name: str | None = None
) -> TextDataset:
    """A prepared text split as windows of ``seq_len`` tokens read from the file when indexed (int64 ids; the
    stream stays stored as uint8 / int16)."""
    path, tensors, meta = _load_split(directory, split, "text-dataset", expected_name)
    if tokenizer not in tensors:
        raise CheckpointError(
            path, f"has no {tokenizer!r} tokens; allowed: {', '.join(sorted(tensors))}", field="tensors"
        )
    stream = tensors[tokenizer]
    if stream.ndim != 1:
        raise CheckpointError(
            path,
            f"holds {tokenizer} tokens of shape {tuple(stream.shape)}; allowed: one stream",
            field=f"tensors.{tokenizer}",
        )
    windows = FileRows(path, _tensor_offsets(path)[tokenizer], stream.dtype, (seq_len,), stream.numel() // seq_len)
    return TextDataset(meta["name"], meta["split"], StoredRows([windows], as_int64, torch.int64), tokenizer)
