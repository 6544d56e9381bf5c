# Two entry points for a fresh machine (see README): `make run` and `make test`.
# Both create ./.venv from this repository's own files; nothing needs to be installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run test clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# The main job: the tiny-scale pipeline on the embedded, offline data.
run: $(STAMP)
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(BIN)/snakemake

test: $(STAMP)
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
