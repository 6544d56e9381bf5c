# Two entry points for a fresh machine (see README): `make run` and `make test`.
# Both create ./.venv from this repository's own files; nothing needs to be installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run run-all test clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# The main job: the tiny-scale pipeline on the embedded, offline data.
run: $(STAMP)
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(BIN)/snakemake

# Every table at tiny scale: the main job, then latent diffusion (Tables 2's ImageNet rows, 8) and the
# language models (Tables 3, 4, 5, 11), each params file in its own result folders.
run-all: run
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(BIN)/snakemake --config params=params/tiny-latent.yaml
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(BIN)/snakemake --config params=params/tiny-text.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
