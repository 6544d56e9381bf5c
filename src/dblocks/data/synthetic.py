"""Generated stand-ins for the paper's datasets, written in each one's real on-disk format, so that a smoke run
(``params/smoke.yaml``, ``make smoke``) sends them through the very loaders a real run uses:

* ``cifar10`` / ``cifar100``: Hugging Face parquet files as ``uoft-cs/cifar10`` (``plain_text/``) and
  ``uoft-cs/cifar100`` (``cifar100/``) ship them (``img`` PNG bytes, ``label`` / ``fine_label`` +
  ``coarse_label``), through :func:`dblocks.data.images.write_cifar_parquet`;
* ``imagenet``: ``train/`` and ``val/`` class folders of JPEGs of assorted sizes (never 256 x 256, so the
  center crop does real work), as the ImageNet folder loader reads them;
* ``text8``: ``text8.zip`` holding one member ``text8``, a single line of a-z and spaces;
* ``lm1b`` / ``openwebtext``: parquet files with a ``text`` column as the Hugging Face ``lm1b`` (``train-*``,
  ``test-*``, one sentence per row) and ``Skylion007/openwebtext`` (``plain_text/train-*``, whole documents) repos.

Images are coloured patterns whose hue and stripe frequency follow the class, plus noise; text is sentences of
common English words drawn with Zipf-like frequencies. Nothing here is meant to be learnt: the data only has to
look like the real thing to the code that reads it. Everything comes from ``seed`` through NumPy's and
Python's seeded generators, so the same seed writes the same content; a file whose bytes would not change is
not rewritten (its modification time stays), so a repeated ``dblocks smoke-data`` leaves the tree as it was."""

from __future__ import annotations

import functools
import io
import itertools
import os
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from dblocks.io import write_bytes_atomic

#: what is written per dataset (the folder names a smoke params file's data_roots point at)
DATASETS = ("cifar10", "cifar100", "imagenet", "text8", "lm1b", "openwebtext")
#: images per split; CIFAR-100 keeps two training images per class
CIFAR_SIZES = {"cifar10": {"train": 100, "test": 50}, "cifar100": {"train": 200, "test": 100}}
IMAGENET_CLASSES = ("n01440764", "n01443537", "n01484850", "n01491361")
IMAGENET_PER_CLASS = {"train": 4, "val": 2}
#: characters of text8 (test = the last 5 %: 58 windows of MDM's 256 characters)
TEXT8_CHARS = 300_000
#: LM1B sentences per split and OpenWebText documents (about 250 KB / 25 KB and 300 KB of text)
LM1B_SENTENCES = {"train": 2000, "test": 200}
OWT_DOCUMENTS = 100

_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no will can more about said up out "
    "them some could time what into other than then its only new two may first any like these over such our "
    "also most after years people back state city market year government president week company world school "
    "house water report night work music team power game family river police country history science light "
    "small large early public local great second young long old right high little open strong final best"
).split()


def write_smoke_data(out: str | os.PathLike, datasets=DATASETS, seed: int = 0) -> list[Path]:
    """Write each of ``datasets`` under ``out/<dataset>``; returns the files that were (re)written."""
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise ValueError(f"dataset {unknown[0]!r}: allowed: {', '.join(DATASETS)}")
    from datasets import disable_progress_bars

    disable_progress_bars()  # one parquet file per split: a bar each is noise
    writers = {
        "cifar10": _cifar,
        "cifar100": _cifar,
        "imagenet": _imagenet,
        "text8": _text8,
        "lm1b": _lm1b,
        "openwebtext": _openwebtext,
    }
    written: list[Path] = []
    for offset, name in enumerate(DATASETS):  # each dataset's own seed, whichever subset is asked for
        if name in datasets:
            for path, data in writers[name](name, seed + 1000 * offset):
                if write_bytes_atomic(Path(out) / name / path, data, keep_unchanged=True):
                    written.append(Path(out) / name / path)
    return written


# ------------------------------------------------------------------------------------------- images


def _pattern(rng: np.random.Generator, label: int, classes: int, height: int, width: int) -> np.ndarray:
    """A uint8 (H, W, 3) image: stripes whose hue and frequency follow the class, plus pixel noise."""
    hue = 2 * np.pi * label / classes
    colour = 127.5 + 100 * np.cos(hue + np.array([0.0, 2.1, 4.2]))
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    angle = rng.uniform(0, np.pi)
    stripes = np.sin(2 * np.pi * (1 + label % 7) * (x * np.cos(angle) + y * np.sin(angle)))
    image = colour * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 20, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _parquet(write) -> bytes:
    """The bytes of a parquet file that ``write(path)`` writes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "part.parquet"
        write(path)
        return path.read_bytes()


def _cifar(name: str, seed: int):
    from dblocks.data.images import write_cifar_parquet

    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    folder = "plain_text" if name == "cifar10" else "cifar100"  # as the Hugging Face repos lay them out
    for split, n in CIFAR_SIZES[name].items():
        labels = np.arange(n) % classes
        images = np.stack([_pattern(rng, int(y), classes, 32, 32) for y in labels])
        coarse = labels // 5 if name == "cifar100" else None
        write = functools.partial(
            write_cifar_parquet, images_uint8_nhwc=images, labels=labels, name=name, coarse_labels=coarse
        )
        yield f"{folder}/{split}-00000-of-00001.parquet", _parquet(write)


def _imagenet(name: str, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, per_class in IMAGENET_PER_CLASS.items():
        for label, synset in enumerate(IMAGENET_CLASSES):
            for i in range(per_class):
                width, height = (int(v) for v in rng.integers(260, 520, 2))  # the crop to 256 does real work
                buffer = io.BytesIO()
                Image.fromarray(_pattern(rng, label, len(IMAGENET_CLASSES), height, width)).save(
                    buffer, format="JPEG", quality=90
                )
                stem = f"{synset}_{i}" if split == "train" else f"ILSVRC2012_val_{label * per_class + i + 1:08d}"
                yield f"{split}/{synset}/{stem}.JPEG", buffer.getvalue()


# --------------------------------------------------------------------------------------------- text


#: Zipf-like word frequencies: the i-th word is drawn with weight 1 / (i + 1)
_CUMULATIVE = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(_WORDS))))


def _sentence(rng: random.Random) -> str:
    words = rng.choices(_WORDS, cum_weights=_CUMULATIVE, k=rng.randint(6, 24))
    return " ".join(words).capitalize() + "."


def _text8(name: str, seed: int):
    rng = random.Random(seed)
    parts, size = [], 0
    while size < TEXT8_CHARS:
        part = " " + _sentence(rng).lower().rstrip(".")
        parts.append(part)
        size += len(part)
    buffer = io.BytesIO()
    info = zipfile.ZipInfo("text8", date_time=(2006, 9, 1, 0, 0, 0))  # fixed, so the bytes do not vary
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(info, "".join(parts)[:TEXT8_CHARS], compress_type=zipfile.ZIP_DEFLATED)
    yield "text8.zip", buffer.getvalue()


def _text_parquet(texts: list[str]) -> bytes:
    import datasets

    return _parquet(lambda path: datasets.Dataset.from_dict({"text": texts}).to_parquet(os.fspath(path)))


def _lm1b(name: str, seed: int):
    rng = random.Random(seed)
    for split, n in LM1B_SENTENCES.items():
        yield f"lm1b/{split}-00000-of-00001.parquet", _text_parquet([_sentence(rng) for _ in range(n)])


def _openwebtext(name: str, seed: int):
    rng = random.Random(seed)
    documents = [
        "\n\n".join(" ".join(_sentence(rng) for _ in range(rng.randint(3, 8))) for _ in range(rng.randint(2, 6)))
        for _ in range(OWT_DOCUMENTS)
    ]
    yield "plain_text/train-00000-of-00001.parquet", _text_parquet(documents)
