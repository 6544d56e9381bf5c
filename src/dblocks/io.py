"""What leaves the process, in one place: files written whole or not at all (:func:`write_atomic` and its
text and JSON forms), nested configs as dotted keys (:func:`flatten`), exceptions as one line of text
(:func:`one_line`). Standard library only: the Snakefile and every job import it."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------ atomic files

# the process's umask, read once (reading it means setting it): a file written whole gets the permissions a
# plain open() would give it, not the owner-only ones of the staging file's mkstemp
_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_file(path: Path) -> None:
    # Opened for writing because some platforms refuse fsync on a read-only descriptor.
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(directory: Path) -> None:
    """Make the renames themselves durable. Best effort: not every platform can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def leftover_staging_files(final: Path) -> list[Path]:
    """Staging files of ``final`` that a killed writer (SIGKILL, power loss) could not remove."""
    return list(final.parent.glob(f".{glob.escape(final.name)}.*.tmp"))


@contextlib.contextmanager
def staging_file(final: Path) -> Iterator[Path]:
    """A temporary file next to ``final`` (same directory, hence same filesystem, so ``os.replace``
    is atomic). It is removed on exit unless it was already moved onto its final name; those of an
    earlier, killed writer of the same file are swept first (one job writes one file at a time)."""
    for stale in leftover_staging_files(final):
        stale.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a staging file next to ``path``, which is then fsynced and renamed onto ``path``:
    readers (Snakemake, DVC, a concurrent tracking sync, a rerun after a kill) never see half a file. The
    staging file's name ends in ``.tmp``: a writer that picks its format by the suffix must be told it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with staging_file(path) as tmp:
        os.chmod(tmp, 0o666 & ~_UMASK)
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes, keep_unchanged: bool = False) -> bool:
    """``data`` written by :func:`write_atomic`; False (nothing written) where ``keep_unchanged`` finds the
    file already holding exactly ``data``, which is left alone, mtime included: Snakemake compares mtimes,
    and a rewrite of identical content would make every job downstream of it look outdated."""
    path = Path(path)
    if keep_unchanged:
        try:
            if path.read_bytes() == data:
                return False
        except OSError:
            pass
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
    return True


def write_text_atomic(path: str | os.PathLike, text: str, keep_unchanged: bool = False) -> bool:
    """``text`` as UTF-8 by :func:`write_bytes_atomic` (``keep_unchanged`` as there)."""
    return write_bytes_atomic(path, text.encode("utf-8"), keep_unchanged)


def write_json_atomic(
    path: str | os.PathLike, record: Mapping[str, Any], keep_unchanged: bool = False, sort_keys: bool = True
) -> bool:
    """``record`` as indented JSON (keys sorted unless ``sort_keys`` is False), by :func:`write_text_atomic`."""
    return write_text_atomic(path, json.dumps(record, indent=2, sort_keys=sort_keys) + "\n", keep_unchanged)


# ------------------------------------------------------------------------------------------ text


def flatten(config: Mapping[str, Any], prefix: str = "", as_strings: bool = False) -> dict[str, Any]:
    """A nested config as dotted keys: ``{"train": {"lr": 0.001}}`` -> ``{"train.lr": 0.001}``; an empty
    mapping is a value of its own. ``as_strings``: every value as the string MLflow logs as a param (strings
    as they are, anything else as JSON: ``"[3, 6, 3]"``, ``"null"``)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + ".", as_strings))
        else:
            out[name] = value if not as_strings or isinstance(value, str) else json.dumps(value)
    return out


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception on one line (whitespace runs collapsed), cut to ``limit`` characters:
    for a warning or a note that must not spill a multi-line error (an SQL statement, a traceback) into a log."""
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
