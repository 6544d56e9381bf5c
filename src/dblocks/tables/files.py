"""Output files: names made safe for a path, and every file written whole or not at all (a reader, or a rerun
after a killed one, never sees half a table or figure)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path


def safe_name(name: str) -> str:
    """An experiment, method or table id as part of a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unnamed"


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """``write`` a temporary file beside ``path`` (same filesystem), then rename it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_text(path: Path, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
