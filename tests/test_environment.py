"""The installed environment is the locked one: pyproject.toml, uv.lock, .venv, Snakemake's conda environment
file and the Makefile's install stamp agree; and the SLURM tests skip (or, under CI=true, fail) with their
reason where no SLURM cluster can run. Nothing here needs the network (uv runs with --offline)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
UV = Path(sys.executable).parent / "uv"
KEY_PACKAGES = ("torch", "torchvision", "snakemake", "dvc", "mlflow")

_spec = importlib.util.spec_from_file_location("envlock", REPO / "workflow/scripts/envlock.py")
envlock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(envlock)


def uv(*args: str) -> subprocess.CompletedProcess:
    if not UV.exists():
        pytest.fail(f"{UV} is missing: `make setup` installs uv into .venv (pinned in pyproject.toml)")
    return subprocess.run([str(UV), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def only_version(name: str) -> str:
    versions = envlock.lock_versions()[envlock.normalize(name)]
    assert len(versions) == 1, f"{name}: the lock forks on it: {versions}"
    return next(iter(versions))


# ------------------------------------------------------------------------------------------- the lock


# The library is what `pip install diffusion-blocks` gives: these modules, on the base dependencies alone.
LIBRARY = (
    "dblocks.noise",
    "dblocks.edm",
    "dblocks.layers",
    "dblocks.blocks",
    "dblocks.models",
    "dblocks.ema",
    "dblocks.optim",
    "dblocks.train",
    "dblocks.sample",
    "dblocks.checkpoint",
    "dblocks.assemble",
    "dblocks.masked_diffusion",
    "dblocks.text_generation",
)


def test_the_library_needs_only_the_base_dependencies():
    """pyproject.toml's base dependencies are the library's (torch, safetensors, numpy and small parsers), the
    pipeline, FID and text evaluation are extras, and importing the library's modules imports no distribution
    that only an extra installs."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {envlock.normalize(re.split(r"[<>=!~\[;]", d)[0]) for d in project["dependencies"]}
    assert {"torch", "safetensors", "numpy"} <= base
    extras = project["optional-dependencies"]
    only_extra = {
        envlock.normalize(re.split(r"[<>=!~\[;]", d)[0]) for name in ("pipeline", "fid", "text") for d in extras[name]
    } - base
    assert {"snakemake", "dvc", "mlflow", "torch-fidelity", "mauve-text"} <= only_extra
    assert extras["all"] == ["diffusion-blocks[pipeline,fid,text]"]
    # the top-level modules each extra-only distribution provides
    provided = {
        module
        for module, dists in metadata.packages_distributions().items()
        if any(envlock.normalize(d) in only_extra for d in dists)
    }
    assert {"snakemake", "mlflow", "torch_fidelity", "mauve"} <= provided
    code = (
        f"import importlib, sys; [importlib.import_module(m) for m in {LIBRARY!r}]; "
        "print('\\n'.join(sorted({n.split('.')[0] for n in sys.modules})))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
        ).stdout.split()
    )
    assert not loaded & provided, f"the library imports modules of extras: {sorted(loaded & provided)}"


def test_lock_agrees_with_pyproject():
    proc = uv("lock", "--check", "--offline", "--python", sys.executable)
    assert proc.returncode == 0, f"uv.lock is out of date with pyproject.toml (run `make lock`):\n{proc.stderr}"


def test_uv_is_pinned_once_and_the_lock_and_venv_agree():
    pinned = envlock.pinned_uv()
    assert only_version("uv") == pinned
    assert uv("--version").stdout.split()[:2] == ["uv", pinned]
    # the bootstrap checks the lock's hashes of that version
    assert envlock.uv_requirement(pinned).count("--hash=sha256:") >= 2


def test_torch_pair_is_locked_as_pyproject_pins_it():
    pins = dict(
        re.match(r"([\w.-]+)==(\S+)$", d).groups()
        for d in envlock.tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
        if re.match(r"torch(vision)?==", d)
    )
    assert set(pins) == {"torch", "torchvision"}
    for name, version in pins.items():
        assert only_version(name) == version


def test_every_locked_package_comes_from_pypi():
    """No machine-local index or wheel folder leaks into the lock (e.g. a CPU-only torch from a find-links
    folder): everything but the project itself is a PyPI file with its hash."""
    for name, entries in envlock.lock_packages().items():
        for package in entries:
            if name == "diffusion-blocks":
                assert package["source"] == {"editable": "."}
                continue
            assert package["source"] == {"registry": "https://pypi.org/simple"}, (name, package["source"])
            files = package.get("wheels", []) + ([package["sdist"]] if "sdist" in package else [])
            assert files and all(f["hash"].startswith("sha256:") for f in files), name


def test_installed_versions_equal_the_lock():
    locked = envlock.lock_versions()
    for name in KEY_PACKAGES:
        assert metadata.version(name) == only_version(name), name
    # and every other installed distribution the lock knows (pip, seeded by `python -m venv`, it does not)
    wrong = {}
    for dist in metadata.distributions():
        name = envlock.normalize(dist.metadata["Name"])
        if name in locked and dist.version not in locked[name]:
            wrong[name] = (dist.version, sorted(locked[name]))
    assert not wrong, f"installed != uv.lock (run `make setup`): {wrong}"


def test_setup_stamp_depends_on_pyproject_and_lock(tmp_path):
    """`make setup` does nothing while its stamp is newer than pyproject.toml and uv.lock; either changing
    makes it sync again (checked with make -q / -n on copies: nothing is installed)."""
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    for name in ("Makefile", "pyproject.toml", "uv.lock"):
        shutil.copy2(REPO / name, tmp_path / name)
    stamp = tmp_path / ".venv/.installed"
    stamp.parent.mkdir()
    stamp.touch()
    past = time.time() - 3600
    for name in ("pyproject.toml", "uv.lock"):
        os.utime(tmp_path / name, (past, past))
    make = ["make", "--no-print-directory", "-C", str(tmp_path)]
    assert subprocess.run([*make, "-q", "setup"]).returncode == 0
    for name in ("pyproject.toml", "uv.lock"):
        os.utime(tmp_path / name, None)  # now: newer than the stamp
        dry = subprocess.run([*make, "-n", "setup"], capture_output=True, text=True)
        assert "uv sync --locked" in dry.stdout, (name, dry.stdout)
        os.utime(tmp_path / name, (past, past))


# ------------------------------------------------------------------------- the conda environment


def conda_env() -> dict:
    return yaml.safe_load(envlock.CONDA_ENV.read_text())


def test_conda_env_is_a_conda_environment_for_python_and_pip():
    env = conda_env()
    assert isinstance(env, dict) and set(env) >= {"name", "channels", "dependencies"}
    assert env["name"] == "dblocks" and "conda-forge" in env["channels"]
    conda_deps = [d for d in env["dependencies"] if isinstance(d, str)]
    assert conda_deps == [f"python={envlock.conda_python()}", "pip"]
    assert envlock.conda_python() == f"{sys.version_info.major}.{sys.version_info.minor}"  # the tested one
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert len(pip) == 1 and "-e ../.." in pip[0]  # the repository, from .snakemake/conda/


def test_conda_env_pins_equal_the_lock():
    locked = envlock.lock_versions()
    pins = {}
    for line in next(d["pip"] for d in conda_env()["dependencies"] if isinstance(d, dict)):
        if line.startswith("-e "):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][\w.-]*)==([^\s;]+)(\s*;.+)?", line)
        assert m, f"not an exact pin: {line!r}"
        name, version = envlock.normalize(m.group(1)), m.group(2)
        assert version in locked.get(name, ()), f"{line!r}: uv.lock has {sorted(locked.get(name, ()))}"
        pins.setdefault(name, set()).add(version)
    project = envlock.lock_packages()["diffusion-blocks"][0]
    direct = {envlock.normalize(d["name"]) for d in project["dependencies"]}
    assert direct <= set(pins), f"direct dependencies without a pin: {direct - set(pins)}"
    for name in KEY_PACKAGES:
        assert pins[name] == {only_version(name)}
    assert "uv" not in pins and "pytest" not in pins  # runtime only: no dev group, no test extra


def test_conda_env_is_regenerated_from_the_current_lock():
    if not UV.exists():
        pytest.fail(f"{UV} is missing: run `make setup`")
    proc = subprocess.run(
        [sys.executable, str(REPO / "workflow/scripts/envlock.py"), "conda-env", "--check", "--uv", str(UV)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------- SLURM tests: skip, or fail under CI

PROBE = """
import tests.slurm.cluster as cluster

cluster.SBIN = ()  # only PATH counts in this probe


def test_needs_the_slurm_cluster():
    cluster.require_cluster()
"""


def fake_programs(folder: Path, names, body: str = "exit 0") -> None:
    folder.mkdir(exist_ok=True)
    for name in names:
        path = folder / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def run_probe(tmp_path: Path, path: Path, ci: str | None) -> subprocess.CompletedProcess:
    """pytest on a one-test file that calls the SLURM tests' skip helper, with PATH=path only."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PATH=str(path), PYTHONPATH=str(REPO))
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-ra", "-p", "no:cacheprovider", "test_probe.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_slurm_tests_skip_with_the_reason_where_slurm_is_missing(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = run_probe(tmp_path, empty, ci=None)
    assert proc.returncode == 0, proc.stdout
    assert re.search(r"SKIPPED \[1\] .*SLURM tests cannot run here: .*munged.*: not installed", proc.stdout), (
        proc.stdout
    )
    assert "1 skipped" in proc.stdout


def test_under_ci_a_missing_slurm_fails_instead_of_skipping(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = run_probe(tmp_path, empty, ci="true")
    assert proc.returncode == 1, proc.stdout
    assert "CI=true does not allow skipping them" in proc.stdout and "munged" in proc.stdout
    assert "1 failed" in proc.stdout and "skipped" not in proc.stdout


def test_slurm_tests_run_where_the_programs_are_found(tmp_path):
    from tests.slurm.cluster import CLIENTS, DAEMONS

    fake_programs(tmp_path / "bin", (*DAEMONS, *CLIENTS, "unshare"))
    proc = run_probe(tmp_path, tmp_path / "bin", ci="true")
    if os.geteuid() == 0:
        assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout
    else:  # the cluster's daemons run as root: that is the reason given
        assert proc.returncode == 1 and "run the tests as root" in proc.stdout, proc.stdout


def test_install_script_does_nothing_when_slurm_is_installed(tmp_path):
    """make test runs tests/slurm/install.sh every time: with the programs there it must not call apt."""
    bin_ = tmp_path / "bin"
    fake_programs(bin_, ("slurmctld", "slurmd", "sbatch", "munged"))
    fake_programs(bin_, ("apt-get",), body=f"touch {tmp_path}/apt-called; exit 1")
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(REPO / "tests/slurm/install.sh"), "--if-possible"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PATH=f"{bin_}{os.pathsep}/usr/bin{os.pathsep}/bin"),
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert not (tmp_path / "apt-called").exists()
    assert time.monotonic() - start < 5


def test_make_test_installs_slurm_and_ci_only_calls_make_test():
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "tests/slurm/install.sh --if-possible" in recipe and "pytest" in recipe
    ci = [
        line
        for line in (REPO / ".ci/run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ci[-1] == "make test" and not any("install" in line for line in ci)
