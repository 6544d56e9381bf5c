"""dblocks.integrity and `dblocks verify`: each artefact against the sha256 in its JSON record; corrupt ones
are set aside (never deleted) only when asked, a paper-mode directory as a whole."""

from __future__ import annotations

from pathlib import Path

import torch

from dblocks.checkpoint import save_checkpoint, sidecar_path
from dblocks.integrity import CORRUPT, MISSING, OK, check, quarantine


def _artefact(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"w": torch.arange(64, dtype=torch.float32)}, {"kind": "test"})
    return path


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def test_check_tells_intact_missing_and_corrupt(tmp_path):
    good = _artefact(tmp_path / "good.safetensors")
    assert check(good).status == OK
    assert check(tmp_path / "never.safetensors").status == MISSING
    deleted = _artefact(tmp_path / "deleted.safetensors")
    deleted.unlink()  # its record remains: still just missing, the workflow rebuilds it
    assert (check(deleted).status, check(deleted).detail) == (MISSING, "its JSON record remains")
    flipped = _artefact(tmp_path / "flipped.safetensors")
    _flip(flipped)
    finding = check(flipped)
    assert finding.status == CORRUPT and "does not match the record" in finding.detail
    unrecorded = _artefact(tmp_path / "unrecorded.safetensors")
    sidecar_path(unrecorded).unlink()
    assert check(unrecorded).status == CORRUPT


def test_quarantine_sets_aside_never_deletes(tmp_path):
    bad = _artefact(tmp_path / "bad.safetensors")
    _flip(bad)
    moved = quarantine(check(bad))
    assert sorted(p.name for p in moved) == ["bad.json.corrupt", "bad.safetensors.corrupt"]
    assert not bad.exists() and all(p.is_file() for p in moved)
    # a block of a directory that one job writes whole: the directory goes, so the job reruns
    paper = tmp_path / "paper"
    block = _artefact(paper / "block-2.safetensors")
    _artefact(paper / "block-1.safetensors")
    _flip(block)
    assert quarantine(check(block), paper) == [tmp_path / "paper.corrupt"]
    assert not paper.exists() and (tmp_path / "paper.corrupt" / "block-1.safetensors").is_file()
