"""Integrity of the pipeline's artefacts: each safetensors file against the sha256 in its JSON record.

Every loader already verifies the file it reads, so a corrupt checkpoint is never used silently. This is the
explicit check of everything a params file produces at once (``dblocks verify``, or ``snakemake verify``),
kept out of the Snakefile on purpose: hashing tens of GB of checkpoints and datasets at every parse (and
every SLURM job parses again) would cost minutes per job, and moving files while other jobs write them is a
race. With ``quarantine`` a corrupt file is set aside (``<name>.corrupt``, with its record), so the next
workflow run sees it missing and rebuilds exactly it and what depends on it; nothing is deleted."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from dblocks.checkpoint import load_metadata, sha256_file, sidecar_path
from dblocks.errors import CheckpointError

OK, MISSING, CORRUPT = "ok", "missing", "corrupt"


@dataclass(frozen=True)
class Finding:
    path: Path
    status: str  # ok | missing | corrupt
    detail: str = ""


def check(path: str | Path) -> Finding:
    """Whether a safetensors artefact exists and its bytes match the sha256 its JSON record holds."""
    path = Path(path)
    if not path.is_file():  # not built yet, or deleted: the workflow rebuilds it (it is a target)
        return Finding(path, MISSING, "its JSON record remains" if sidecar_path(path).exists() else "")
    try:
        expected = load_metadata(path)["sha256"]
    except CheckpointError as exc:
        return Finding(path, CORRUPT, str(exc))
    actual = sha256_file(path)
    if actual != expected:
        return Finding(path, CORRUPT, f"sha256 {actual[:12]}... does not match the record's {expected[:12]}...")
    return Finding(path, OK)


def verify(paths: list[str], root: str | Path = ".") -> list[Finding]:
    return [check(Path(root) / p) for p in paths]


def _aside(path: Path) -> Path:
    target = path.with_name(path.name + ".corrupt")
    if target.is_dir():
        shutil.rmtree(target)
    path.replace(target)
    return target


def quarantine(finding: Finding, group: Path | None = None) -> list[Path]:
    """Set a corrupt artefact aside as ``<name>.corrupt`` (with its JSON record); when it belongs to a
    ``group`` directory that one job writes as a whole (the paper mode's blocks), the directory goes."""
    if group is not None:
        return [_aside(group)] if group.exists() else []
    return [_aside(p) for p in (finding.path, sidecar_path(finding.path)) if p.exists()]
