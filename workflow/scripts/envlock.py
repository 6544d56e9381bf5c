#!/usr/bin/env python3
"""The Python environment's pins, read from pyproject.toml and uv.lock (standard library only, no dblocks).

    envlock.py uv-version                print the uv version pinned in pyproject.toml (dependency group `dev`)
    envlock.py bootstrap-uv VENV         make VENV (python -m venv) if missing and put that uv into it with pip,
                                         checked against uv.lock's hashes; nothing happens when it is there
    envlock.py conda-env [--uv UV] [--check]
                                         write workflow/envs/dblocks.yaml from uv.lock (`uv export`);
                                         --check: exit 1 when the file differs from what would be written

`make setup` runs bootstrap-uv and then `uv sync --locked`; `make lock` refreshes uv.lock and then runs
conda-env, so the conda environment always carries the lock's versions.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = REPO / "pyproject.toml"
LOCK = REPO / "uv.lock"
CONDA_ENV = REPO / "workflow/envs/dblocks.yaml"


def normalize(name: str) -> str:
    """PEP 503 name normalization (what uv.lock stores)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_uv(pyproject: Path = PYPROJECT) -> str:
    """The uv version of the `dev` dependency group: its one pin in the repository."""
    groups = tomllib.loads(pyproject.read_text())["dependency-groups"]
    for requirement in groups["dev"]:
        m = re.fullmatch(r"\s*uv\s*==\s*([^\s;,]+)\s*", requirement)
        if m:
            return m.group(1)
    raise SystemExit(f"{pyproject}: no `uv==VERSION` in [dependency-groups] dev")


def lock_packages(lock: Path = LOCK) -> dict[str, list[dict]]:
    """uv.lock's packages by normalized name (a package the resolution forks on has several versions)."""
    packages: dict[str, list[dict]] = {}
    for package in tomllib.loads(lock.read_text())["package"]:
        packages.setdefault(normalize(package["name"]), []).append(package)
    return packages


def lock_versions(lock: Path = LOCK) -> dict[str, set[str]]:
    return {name: {p["version"] for p in entries if "version" in p} for name, entries in lock_packages(lock).items()}


def uv_requirement(version: str, lock: Path = LOCK) -> str:
    """A pip requirement line for uv==version with every hash uv.lock holds for it ('' hashes: not locked)."""
    hashes = []
    if lock.exists():
        for package in lock_packages(lock).get("uv", []):
            if package["version"] == version:
                files = package.get("wheels", []) + ([package["sdist"]] if "sdist" in package else [])
                hashes = [f["hash"] for f in files if "hash" in f]
    return " ".join([f"uv=={version}", *(f"--hash={h}" for h in hashes)])


def bootstrap_uv(venv: Path) -> None:
    version = pinned_uv()
    python, uv = venv / "bin/python", venv / "bin/uv"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    try:
        have = subprocess.run([str(uv), "--version"], capture_output=True, text=True).stdout.split()
    except OSError:
        have = []
    if have[1:2] == [version]:
        return
    requirement = uv_requirement(version)
    if "--hash=" not in requirement:
        # pyproject's pin moved and the lock is not refreshed yet (make lock does it with this uv)
        print(f"envlock: uv {version} is not in uv.lock yet: installing it without hash checks", file=sys.stderr)
    print(f"envlock: installing uv {version} into {venv} (pip)", file=sys.stderr)
    if subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True).returncode != 0:
        subprocess.run([str(python), "-m", "ensurepip", "--default-pip"], check=True, stdout=subprocess.DEVNULL)
    req_file = venv / "uv-requirement.txt"
    req_file.write_text(requirement + "\n")
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            *(["--require-hashes"] if "--hash=" in requirement else []),
            "-r",
            str(req_file),
        ],
        check=True,
    )


def conda_python(pyproject: Path = PYPROJECT) -> str:
    """The conda env's Python: requires-python's lower bound (the version the lock is made and tested for)."""
    spec = tomllib.loads(pyproject.read_text())["project"]["requires-python"]
    m = re.search(r">=\s*(\d+\.\d+)", spec)
    if not m:
        raise SystemExit(f"requires-python {spec!r} has no '>=X.Y' lower bound")
    return m.group(1)


HEADER = """\
# The conda environment of the pipeline's jobs, for `snakemake --software-deployment-method conda` (a rule
# refers to it as `conda: "../envs/dblocks.yaml"` from workflow/rules/). GENERATED from uv.lock by
# `make conda-env` (also run by `make lock`): do not edit the pins by hand; tests/test_environment.py checks
# that every pin equals the lock's version.
#
# Conda provides only Python and pip (conda-forge); every Python package comes from PyPI with the exact
# versions of uv.lock (the full resolved set, with the lock's own environment markers), so a job runs with
# the same torch/torchvision, MLflow, DVC... as `make setup`'s .venv.
#
# The project itself: `-e ../..` below. Snakemake copies this file to .snakemake/conda/<hash>.yaml and runs
# `conda env create --file .snakemake/conda/<hash>.yaml`; conda runs pip in that file's folder, so `../..`
# is Snakemake's working directory, which must be the repository root: run snakemake there, as `make run`
# does, and keep the default --conda-prefix (from another prefix or working directory, `../..` is some other
# folder and pip stops: "does not appear to be a Python project"). The install is editable, like .venv's:
# Snakemake keys the environment by this file's content alone, so jobs must import the repository's current
# src/dblocks, not a copy frozen when the environment was built.
"""


def export_pins(uv: str) -> list[str]:
    """`uv export` of the lock: the pipeline's runtime packages (the library and its `all` extra; no test extra, no
    dev group), pinned, with markers."""
    out = subprocess.run(
        [
            uv,
            "export",
            "--frozen",
            "--offline",
            "--format",
            "requirements-txt",
            "--no-hashes",
            "--no-dev",
            "--extra",
            "all",
            "--no-emit-project",
            "--no-header",
            "--no-annotate",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip() and not line.startswith("#")]


def conda_env_text(uv: str) -> str:
    lines = [
        HEADER.rstrip("\n"),
        "name: dblocks",
        "channels:",
        "  - conda-forge",
        "  - nodefaults",
        "dependencies:",
        f"  - python={conda_python()}",
        "  - pip",
        "  - pip:",
        "      - -e ../..",
    ]
    lines += [f'      - "{pin}"' if ";" in pin else f"      - {pin}" for pin in export_pins(uv)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("uv-version")
    boot = sub.add_parser("bootstrap-uv")
    boot.add_argument("venv", type=Path)
    conda = sub.add_parser("conda-env")
    conda.add_argument("--uv", default=str(REPO / ".venv/bin/uv"))
    conda.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "uv-version":
        print(pinned_uv())
    elif args.command == "bootstrap-uv":
        bootstrap_uv(args.venv)
    else:
        text = conda_env_text(args.uv)
        if args.check:
            if not CONDA_ENV.exists() or CONDA_ENV.read_text() != text:
                print(
                    f"{CONDA_ENV.relative_to(REPO)} is out of date with uv.lock: run `make conda-env`", file=sys.stderr
                )
                return 1
            return 0
        CONDA_ENV.parent.mkdir(parents=True, exist_ok=True)
        tmp = CONDA_ENV.with_suffix(".yaml.tmp")
        tmp.write_text(text)
        os.replace(tmp, CONDA_ENV)
        print(f"wrote {CONDA_ENV.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
