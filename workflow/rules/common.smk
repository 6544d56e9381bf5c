# Loads the params file through the one params model, validates every experiment before any job starts,
# and defines the names and helper functions every rule shares (rules files hold rules only). Where a file
# lives is the params model's (dblocks.pipeline.Pipeline): rules call it, with wildcards for their patterns.
import os
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from dblocks.config import LOCAL_METHODS, SHARDED_DATASETS, SPLIT_METHODS
from dblocks.errors import ConfigError
from dblocks.pipeline import HEAD, Pipeline

# One params file is the single source of truth (DVC reads it too); choose it with
# `--config params=params/paper.yaml`. Other `--config` keys would not reach the jobs, so they are refused.
# The path is normalised (relative to the working directory) because it is a param of the jobs: another
# spelling of the same file (./params/tiny.yaml, an absolute path) must not look like a changed setting.
PARAMS = os.path.relpath(os.path.abspath(config.pop("params", "params/tiny.yaml")))
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
# asks for every checkpoint (see Pipeline.targets); a corrupt one is found by `dblocks verify` (or
# `snakemake verify`), which sets it aside so that the next run rebuilds exactly it and what depends on it.

RES = PIPE.resources
EXPERIMENTS = list(PIPE.experiments)
AUTOENCODED = PIPE.autoencoded_datasets  # their prepare step also writes the autoencoder that encodes them
# the block-local baselines (local.smk): NoProp-DT's T block jobs and head job, the others one job each
WHOLE_METHODS = [m for m in LOCAL_METHODS if m not in SPLIT_METHODS]


# Jobs call `dblocks`. Make the one installed beside this Snakemake visible to them (a user need not
# activate the virtual environment); SLURM jobs inherit PATH from the submitting environment, and with
# --software-deployment-method conda the job's environment puts its own first.
envvars:
    "PATH",


os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


def trained(path):
    """A file a training job writes. Snakemake deletes a job's outputs before it reruns the job; these it
    leaves in place (`update`), so that a job rerun because something other than its experiment changed (the
    rule's command, a regenerated run record) finds its block trained with this config and keeps it instead
    of training it again. A rerun that fails gets the former file back."""
    return update(path)


def weights(path):
    """A file of trained weights (:func:`trained`), or with `keep_weights: false` (a smoke run) deleted by
    Snakemake once every job that reads it has run (its JSON record stays)."""
    return trained(path) if PIPE.keep_weights else temp(path)


# The software environment of every job (Snakemake resolves it relative to the rules files): used with
# `--software-deployment-method conda`; ignored otherwise, when jobs run in the current environment.
ENV = "../envs/dblocks.yaml"


# Wildcards can only take these shapes, so no value can smuggle shell syntax into a command.
wildcard_constraints:
    exp="|".join(EXPERIMENTS) or "[a-z0-9][a-z0-9_-]*",
    block=r"[1-9][0-9]*",
    method="blockwise|e2e|paper",
    assembled="blockwise|paper",
    local="|".join(LOCAL_METHODS),
    dataset=r"[a-z0-9][a-z0-9-]*",
    chash=r"[0-9a-f]{16}",


# --- wildcard patterns ----------------------------------------------------------------------------------


def one_of(names):
    """A wildcard pattern matching exactly these names (never empty-matching: '^$' where there are none)."""
    return "|".join(re.escape(n) for n in names) or "^$"


def dataset_other_than(names):
    """A dataset-wildcard pattern matching any dataset name except ``names`` (so that two rules never
    both claim one dataset's files)."""
    return rf"(?!(?:{'|'.join(map(re.escape, names))})(?![a-z0-9-]))[a-z0-9][a-z0-9-]*"


def of_tasks(*tasks):
    """A wildcard pattern matching exactly the experiments of these tasks."""
    return one_of(PIPE.experiments_with(tasks=tasks))


def of_methods(*methods):
    """A wildcard pattern matching exactly the experiments that train one of these methods."""
    return one_of(PIPE.experiments_with(methods=methods))


# --- the files and options of a job, from its wildcards (the paths themselves are Pipeline's) ------------


def dataset_of(wildcards):
    return PIPE.dataset(wildcards.exp)


def prepared_split(*splits):
    """Prepared splits of the job's experiment: the tensors and the JSON record that holds their checksum."""
    return lambda wildcards: PIPE.split_files(dataset_of(wildcards), *splits)


def prepared_dir(wildcards):
    return PIPE.prepared(dataset_of(wildcards))


def data_root_option(wildcards):
    root = PIPE.datasets.get(wildcards.dataset)
    return f"--data-root {root}" if root else ""


def autoencoder_option(wildcards):
    """The autoencoder a latent dataset is encoded with, where the params file names one (autoencoders:)."""
    name = PIPE.encoder(wildcards.dataset)
    return f" --autoencoder {name}" if name else ""


def decoder_option(wildcards):
    """A trained autoencoder is read from the prepared directory it was written to."""
    dataset = dataset_of(wildcards)
    return f" --data {PIPE.prepared(dataset)}" if PIPE.decoder_files(dataset) else ""


def fid_features_files(wildcards=None):
    return PIPE.with_records(PIPE.fid_features())


def reference_stats_files(split):
    return lambda wildcards: PIPE.with_records(PIPE.reference_stats(dataset_of(wildcards), split))


def reference_samples_option(wildcards):
    return "" if wildcards.size == "all" else f"--samples {wildcards.size}"


def model_of(wildcards):
    """The model an evaluation reads: the assembled one, or the end-to-end checkpoint."""
    return PIPE.model(wildcards.exp, wildcards.method)


def report_category(wildcards):
    """The report groups files by paper table: a table's own, or the first one its experiment feeds."""
    return PIPE.report_category(wildcards.get("table"), wildcards.get("exp"))


# --- training -------------------------------------------------------------------------------------------


# A training job's resources are its experiment's (Pipeline.training_resources: the file's `resources`, with
# `resources.experiments.<exp>` over them). They are resources and threads, never params, so changing them
# reruns nothing: how many GPUs train a block does not change what it learns.


def training_threads(wildcards):
    return PIPE.training_resources(wildcards.exp)["threads"]


def training_gpus(wildcards):
    return PIPE.training_resources(wildcards.exp)["gpu"]


def training_gpu_model(wildcards):
    """The GPU type of a job that asks for GPUs; '' (no type) otherwise: the SLURM executor would turn a type
    with 0 GPUs into --gpus=<model>:0."""
    res = PIPE.training_resources(wildcards.exp)
    return res.get("gpu_model", "") if res["gpu"] else ""


def training_runtime(wildcards, attempt):
    """Minutes per training job; a retry after a timeout gets proportionally more."""
    return PIPE.training_resources(wildcards.exp)["runtime"] * attempt


def training_memory(method):
    """MB a training job asks for: its share of the network's layers, times its ranks (Pipeline.training_memory)."""
    return lambda wildcards: PIPE.training_memory(wildcards.exp, method, wildcards.get("block"))


# Only where some experiment names a GPU type: every job then carries the resource ('' where it has none).
GPU_MODELS = any(PIPE.training_resources(e).get("gpu_model") for e in EXPERIMENTS)


def train_resources(method):
    return dict(
        gpu=training_gpus,
        mem_mb=training_memory(method),
        runtime=training_runtime,
        **({"gpu_model": training_gpu_model} if GPU_MODELS else {}),
    )


def launcher(wildcards, threads, resources):
    """How a training command (or a generator's evaluation) starts: `dblocks` in one process, or, for a job
    granted N > 1 GPUs, N data-parallel ranks on this node under `torchrun --standalone` (rank i on GPU i of
    the job's; the SLURM executor runs the job as ONE task holding the N GPUs, see profiles/slurm/config.yaml).
    The ranks share the job's threads. Taking threads and resources makes this a derived param, which
    Snakemake leaves out of its params rerun trigger: the same job on another number of GPUs is not a changed
    job."""
    ranks = max(1, int(resources.gpu))
    if ranks == 1:
        return f"OMP_NUM_THREADS={threads} dblocks"
    return f"OMP_NUM_THREADS={max(1, threads // ranks)} torchrun --standalone --nproc_per_node={ranks} -m dblocks"


# A generator's evaluation (sampling for FID) runs on its experiment's GPUs, as its training does; each rank
# holds a whole model, so the memory is the evaluation's times the ranks.
generator_evaluation_resources = dict(
    gpu=training_gpus,
    mem_mb=lambda wildcards: PIPE.ranks(wildcards.exp) * PIPE.evaluation_memory,
    **({"gpu_model": training_gpu_model} if GPU_MODELS else {}),
)


# The other evaluations run one process: one GPU at most, whatever a training job asks for.
EVAL_RESOURCES = dict(
    gpu=min(RES["gpu"], 1),
    mem_mb=PIPE.evaluation_memory,
    **({"gpu_model": RES["gpu_model"]} if RES["gpu"] and RES.get("gpu_model") else {}),
)


def settings_of(rule):
    """Not read by the command (it reads the params file itself): the digest of the settings that the rule's
    command reads, so that a changed setting reruns exactly the jobs that read it (Pipeline.reads)."""
    return lambda wildcards: PIPE.settings_digest(rule, wildcards.get("exp"))


def run_record(wildcards):
    """The experiment's MLflow run record (Pipeline.run_json: keyed by its config hash), for the jobs that log
    into its parent run."""
    return PIPE.run_json(wildcards.exp)


def training_run_record(wildcards):
    """The run record as a training input whose age does not count (`ancient`): it says where a job logs,
    not what it computes, so a record rewritten for a changed `tracking:` section retrains no block. A changed
    experiment is retrained all the same, in the same call: its record has a new name (its config hash), which
    is missing until tracking_parent writes it, and Snakemake skips a job below a rerun job only when all
    its inputs from that job are ancient AND present."""
    return ancient(run_record(wildcards))


def config_hash(wildcards):
    """Not read by the command: a changed experiment changes this value, and Snakemake's params trigger then
    reruns exactly that experiment's jobs."""
    return PIPE.hash(wildcards.exp)
