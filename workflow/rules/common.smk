# Loads the params file into Snakemake's config, validates every experiment before any job starts, and
# defines the names every rule shares.
import os
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from dblocks.checkpoint import sidecar_path
from dblocks.config import AUTOENCODER_FILE, TRAINED_AUTOENCODER_DATASETS, ConfigError
from dblocks.pipeline import Pipeline

# One params file is the single source of truth (DVC reads it too); choose it with
# `--config params=params/paper.yaml`. Other `--config` keys would not reach the jobs, so they are refused.
PARAMS = config.pop("params", "params/tiny.yaml")
if config:
    raise WorkflowError(
        f"--config {', '.join(sorted(config))}: experiments are set in the params file only; "
        f"allowed: --config params=<params/*.yaml>"
    )
try:
    PIPE = Pipeline.load(PARAMS, "--config params=")
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

# Parsing reads the params file and nothing else: no artefact is hashed, moved or deleted here, because
# every dry run and every SLURM job parses this file again. A deleted block is rebuilt because `rule all`
# asks for every checkpoint (see PIPE.targets); a corrupt one is found by `dblocks verify` (or the
# `verify` rule), which sets it aside so that the next run rebuilds exactly it and what depends on it.

SCALE = PIPE.scale  # the label of the numbers (tiny | paper)
OUT = PIPE.out  # the folder of this params file's products (default: the scale)
RES = PIPE.resources
EXPERIMENTS = list(PIPE.experiments)

# Jobs call `dblocks`; make the one installed beside this Snakemake visible to them (and to SLURM jobs,
# which inherit the submitting environment).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


# Wildcards can only take these shapes, so no value can smuggle shell syntax into a command.
wildcard_constraints:
    exp="|".join(EXPERIMENTS) or "[a-z0-9][a-z0-9_-]*",
    block=r"[1-9][0-9]*",
    method="blockwise|e2e|paper",
    assembled="blockwise|paper",
    dataset=r"[a-z0-9][a-z0-9-]*",


def dataset_other_than(names):
    """A dataset-wildcard pattern matching any dataset name except ``names`` (so that two rules never
    both claim one dataset's files)."""
    return rf"(?!(?:{'|'.join(map(re.escape, names))})(?![a-z0-9-]))[a-z0-9][a-z0-9-]*"


def dataset_of(wildcards):
    return PIPE.experiments[wildcards.exp]["dataset"]


def prepared_split(split):
    """A prepared split: the tensors and the JSON record that holds their checksum."""
    return lambda wildcards: [f"{PIPE.prepared(dataset_of(wildcards))}/{split}.{ext}" for ext in ("safetensors", "json")]


def training_runtime(wildcards, attempt):
    """Minutes per training job; a retry after a timeout gets proportionally more."""
    return RES["runtime"] * attempt


TRAIN_RESOURCES = dict(
    gpu=RES["gpu"],
    mem_mb=RES["mem_mb"],
    runtime=training_runtime,
    **({"gpu_model": RES["gpu_model"]} if RES.get("gpu_model") else {}),
)
