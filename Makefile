# Two entry points for a fresh machine (see README): `make run` and `make test`.
# Both create ./.venv from this repository's own files; nothing needs to be installed by hand.
#
# The Python environment is locked: uv.lock holds every package's exact version and hashes, and .venv is
# made from it by uv (`uv sync --locked`: fails instead of installing anything the lock does not say).
# uv itself is pinned once, in pyproject.toml's dependency group `dev`; workflow/scripts/envlock.py puts
# that version into .venv with pip (checked against the lock's hashes) before the first sync.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UV     := $(BIN)/uv
STAMP  := $(VENV)/.installed
ENVLOCK := $(PYTHON) workflow/scripts/envlock.py
# uv installs into ./.venv whatever the caller's environment says
UVENV  := UV_PROJECT_ENVIRONMENT=$(VENV)

.PHONY: setup lock conda-env run run-all report smoke test lint format clean-venv

# Redone only when pyproject.toml or uv.lock changed since the last install. --compile-bytecode: uv does not
# write .pyc files by default (pip does), and where PYTHONDONTWRITEBYTECODE is set (as on this project's
# machines) every job would then compile torch and MLflow again: +2.5 s per import, minutes per pipeline run.
$(STAMP): pyproject.toml uv.lock
	$(ENVLOCK) bootstrap-uv $(VENV)
	$(UVENV) $(UV) sync --locked --extra all --extra test --compile-bytecode
	touch $(STAMP)

setup: $(STAMP)

# Refresh the lock: the newest versions pyproject.toml allows (torch/torchvision stay pinned there), then
# the conda environment's pins from it. Commit uv.lock and workflow/envs/dblocks.yaml; `make setup` installs.
lock:
	$(ENVLOCK) bootstrap-uv $(VENV)
	$(UV) lock --upgrade
	$(ENVLOCK) conda-env --uv $(UV)

# workflow/envs/dblocks.yaml (Snakemake's conda environment) from the current uv.lock
conda-env:
	$(ENVLOCK) bootstrap-uv $(VENV)
	$(ENVLOCK) conda-env --uv $(UV)

# The main job: the tiny-scale pipeline on the embedded, offline data.
run: $(STAMP)
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(BIN)/snakemake

# The Snakemake report of the main job, after `make run`: one self-contained HTML file with every table, figure
# and sample grid, grouped by paper table, Snakemake's run statistics, and on its landing page the code version
# that the run's provenance job wrote after the tables. Another params file's, e.g. params/tiny-text.yaml's:
#   snakemake --config params=params/tiny-text.yaml --report results/tiny-text/report.html \
#       --report-metadata results/tiny-text/provenance.yaml
REPORT_DIR := results/tiny
report: $(STAMP)
	$(BIN)/snakemake --report $(REPORT_DIR)/report.html --report-metadata $(REPORT_DIR)/provenance.yaml

# Every table at tiny scale: the main job, then the DiT design ablations (Tables 7, 10, overlap gamma), latent
# diffusion (Tables 2's ImageNet rows, 8) and the language models (Tables 3, 4, 5, 11), each params file in its
# own result folders.
run-all: run
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(BIN)/snakemake --config params=params/tiny-ablations.yaml
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(BIN)/snakemake --config params=params/tiny-latent.yaml
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(BIN)/snakemake --config params=params/tiny-text.yaml

# Smoke run of the paper DAG: params/smoke.yaml over params/paper.yaml, every experiment with the paper's
# architectures, 2 optimizer steps per job and a handful of samples, on generated stand-ins of the datasets
# written in their real on-disk formats (data/smoke/raw; rewritten only where their bytes would change).
# SMOKE_MEM_MB: the memory Snakemake may hand out at once (each training job asks for its share of its network's
# layers, params/smoke.yaml's resources), so two whole DiT-L/2 networks (~12 GB each) never train side by side.
SMOKE_MEM_MB ?= 20000
smoke: $(STAMP)
	$(BIN)/dblocks smoke-data --out data/smoke/raw
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(BIN)/snakemake --config params=params/smoke.yaml \
		--resources mem_mb=$(SMOKE_MEM_MB)

# The SLURM tests need SLURM's Debian packages: installed here when this is root with apt-get (a no-op when
# they are there). Elsewhere they are skipped with the reason, except under CI=true, where that fails.
# The checks tests/test_lint.py runs in the suite (ruff: pyproject.toml's [tool.ruff]; snakefmt: [tool.snakefmt]),
# and the formatters that make them pass
PYCODE := src tests benchmarks workflow/scripts
lint: $(STAMP)
	$(BIN)/ruff check $(PYCODE)
	$(BIN)/ruff format --check $(PYCODE)
	$(BIN)/snakefmt --check Snakefile workflow

format: $(STAMP)
	$(BIN)/ruff check --fix $(PYCODE)
	$(BIN)/ruff format $(PYCODE)
	$(BIN)/snakefmt Snakefile workflow

test: $(STAMP)
	tests/slurm/install.sh --if-possible
	$(BIN)/python -m pytest -n auto --dist loadfile

clean-venv:
	rm -rf $(VENV)
