"""The code and settings behind a params file's tables: the `provenance` rule's script (workflow/rules/tables.smk).

It writes one flat YAML mapping of strings, so the same file is a result in the Snakemake report and its
landing page's metadata (``snakemake --report ... --report-metadata results/<out>/provenance.yaml``, as
`make report` does). Run as a job after the tables, never while the Snakefile is parsed: it runs git.
"""

# (no `from __future__` import: Snakemake puts its preamble above a script's first line)
import datetime
import hashlib
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path

import yaml

import dblocks
from dblocks.tracking import git_commit


def git(*args: str, cwd: str | Path) -> str | None:
    """git's output in ``cwd``, or None where there is no git or no checkout."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(params_file: str, workflow_dir: str | Path) -> dict[str, str]:
    commit = git("rev-parse", "HEAD", cwd=workflow_dir)
    if commit is None:
        code = "not a git checkout"
    else:
        # tracked files only: a checkout's untracked results and scratch files are not code
        changed = git("status", "--porcelain", "--untracked-files=no", cwd=workflow_dir)
        edits = len(changed.splitlines()) if changed else 0
        code = commit + (f" with uncommitted changes in {edits} tracked files" if edits else "")
    package = git_commit()  # what every MLflow run of the jobs is tagged with (dblocks.git_commit)
    return {
        "workflow commit": code,
        "dblocks": f"{dblocks.__version__}" + (f" (commit {package})" if package and package != commit else ""),
        "snakemake": version("snakemake"),
        "python": platform.python_version(),
        "params file": params_file,
        "params sha256": hashlib.sha256(Path(params_file).read_bytes()).hexdigest(),
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def main(snakemake) -> None:
    record = provenance(snakemake.params.file, snakemake.scriptdir)
    out = Path(snakemake.output[0])
    out.write_text(yaml.safe_dump(record, sort_keys=False, allow_unicode=True))
    Path(snakemake.log[0]).write_text(f"wrote {out}: {record['workflow commit']}\n")


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 - the object Snakemake defines for a script it runs
