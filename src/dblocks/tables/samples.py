"""The samples behind our numbers: an evaluate run's samples artifact (an image grid, or Markdown prompt /
generated / real continuation triples) copied beside the figures, and the note by which a text table links
them, so that a reader sees what a BPC or a MAUVE means."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from dblocks.io import one_line, write_atomic
from dblocks.tables.context import Context
from dblocks.tables.experiments import ExperimentSpec
from dblocks.tables.files import safe_name

#: the samples artifact an evaluate run logs, by task: a PNG grid of images, or Markdown text samples
SAMPLES_ARTIFACT = {
    "generation": "samples.png",
    "masked_text": "samples.md",
    "ar_text": "samples.md",
    "recurrent_text": "samples.md",
}


def samples_file_name(exp: ExperimentSpec, method: str) -> str:
    return f"samples-{safe_name(exp.name)}-{safe_name(method)}{Path(SAMPLES_ARTIFACT[exp.task]).suffix}"


def fetch_samples(ctx: Context, client, exp: ExperimentSpec, method: str, path: Path) -> tuple[Path | None, str]:
    """Copy an evaluate run's samples artifact (:data:`SAMPLES_ARTIFACT`) to ``path``."""
    name = SAMPLES_ARTIFACT[exp.task]
    run, why = ctx.index.latest(exp.name, "evaluate", method)
    if run is None:
        return None, why
    try:
        artifact = find_artifact(client, run.run_id, name)
    except Exception as exc:  # noqa: BLE001 - an unreachable artifact store: not available
        return None, f"run {run.short}: artifacts not readable ({one_line(exc, 200)})"
    if artifact is None:
        return None, f"run {run.short} has no {name} artifact"
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run.run_id, artifact, tmp))
        write_atomic(path, lambda target: shutil.copyfile(local, target))
    return path, ""


def find_artifact(client, run_id: str, name: str, max_depth: int = 3) -> str | None:
    """The artifact path of the first file called ``name`` (the root first, then folders, breadth first)."""
    folders: list[str | None] = [None]
    for _ in range(max_depth):
        deeper: list[str | None] = []
        for folder in folders:
            for info in client.list_artifacts(run_id, folder):
                if not info.is_dir and Path(info.path).name == name:
                    return info.path
                if info.is_dir:
                    deeper.append(info.path)
        folders = deeper
        if not folders:
            break
    return None


def links_note(feeders: list[str], text_samples: dict[str, list[tuple[str, Path]]], tables_dir: Path) -> str | None:
    """The note that links a table to the text samples of the experiments feeding it (None: it has none)."""
    links = [
        f"[{exp} {method}]({os.path.relpath(path, tables_dir)})"
        for exp in feeders
        for method, path in text_samples.get(exp, [])
    ]
    if not links:
        return None
    return "Samples behind these numbers (prompt, generated and real continuation): " + ", ".join(links)
