"""Output file names: experiment, method and table ids made safe for a path. Every output file is written whole
or not at all by dblocks.io (a reader, or a rerun after a killed one, never sees half a table or figure)."""

from __future__ import annotations

import re


def safe_name(name: str) -> str:
    """An experiment, method or table id as part of a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unnamed"
