"""The pipeline's view of a params file: which experiments exist, which methods and blocks each one
trains, where every artefact lives, and which settings each job reads.

The Snakefile, the DVC stage list and the tests all read the job graph from here, so the two workflow
engines cannot drift apart: ``dvc.yaml`` is generated from these jobs (``dblocks dvc-yaml``) and a test
checks that Snakemake's DAG has exactly the same jobs and outputs. Everything here is computed from the
settings alone (it never opens an artefact), so parsing the Snakefile reads nothing but the params file."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from dblocks.checkpoint import sidecar_path
from dblocks.config import (
    AUTOENCODER_FILE,
    LOCAL_METHODS,
    SHARD_DIR,
    SHARDED_DATASETS,
    SPLIT_METHODS,
    TRAINED_AUTOENCODER_DATASETS,
    UNHASHED_KEYS,
)
from dblocks.models import get_arch
from dblocks.noise import layer_split
from dblocks.params import BLOCKWISE, E2E, PAPER, Params

__all__ = ["Pipeline", "BLOCKWISE", "E2E", "PAPER", "LOCAL_METHODS", "HEAD", "READS"]

#: NoProp-DT's head job: the part beside its T block jobs (dblocks.baselines.jobs.HEAD; kept here without torch)
HEAD = "head"

#: The params-file keys that each rule's command reads. "{config}" stands for the settings an experiment's
#: training reads (its entry and ``defaults``, without the keys left out of the config hash: device,
#: data_root, sample, pipeline); "{exp}" for the job's experiment; None for the whole file. DVC declares them
#: as the stage's params dependencies and Snakemake reruns a job when their values change (a rule param
#: holds their digest; training rules use the config hash, which is the same thing resolved), so both engines
#: rerun exactly the jobs that read a changed setting. Rules absent here read no params: their inputs are
#: files, and their options are structural (a changed one changes the job list: regenerate dvc.yaml) or do
#: not change results (reference_stats' batch size).
EVALUATION_READS = ("scale", "evaluation", "defaults", "experiments.{exp}")
READS: dict[str, tuple[str, ...] | None] = {
    "tracking_store": ("scale", "tracking"),
    "tracking_parent": ("scale", "tracking", "{config}"),
    "train_block": ("{config}",),
    "train_baseline": ("{config}",),
    "train_shared": ("{config}",),
    "train_local_block": ("{config}",),
    "train_local_head": ("{config}",),
    "train_local": ("{config}",),
    "evaluate_classifier": EVALUATION_READS,
    "evaluate_local": EVALUATION_READS,
    "evaluate_generator": EVALUATION_READS,
    "evaluate_text": EVALUATION_READS,
    "tables": None,
}


class Pipeline(Params):
    """A validated params file (:class:`dblocks.params.Params`) plus where every artefact lives and which
    jobs make them. Everything here is computed from settings alone: no artefact is opened."""

    @property
    def needs_feature_net(self) -> bool:
        """Generation on digits is scored with a digits classifier's features (domain FID)."""
        return any(c["task"] == "generation" for c in self.experiments.values())

    # --- what each job reads ---------------------------------------------------------------------------
    def reads(self, rule: str, exp: str | None = None) -> list[str] | None:
        """The dotted params keys a rule's command reads (None: the whole file; []: none)."""
        if rule not in READS:
            return []
        if READS[rule] is None:
            return None
        keys: list[str] = []
        for key in READS[rule]:
            if key == "{config}":
                keys += self._hashed_keys("defaults") + self._hashed_keys(f"experiments.{exp}")
            elif self.value(key.format(exp=exp)) is not None:
                keys.append(key.format(exp=exp))
        return keys

    def _hashed_keys(self, section: str) -> list[str]:
        """The keys of a mapping of the file that enter the config hash, dotted (e.g. experiments.x.train)."""
        return [f"{section}.{k}" for k in self.value(section) or {} if k not in UNHASHED_KEYS]

    def settings_digest(self, rule: str, exp: str | None = None) -> str:
        """A digest of the values a rule's command reads: a Snakemake param, so that a changed setting reruns
        the jobs that read it (and only those)."""
        keys = self.reads(rule, exp)
        values = self.raw if keys is None else {k: self.value(k) for k in keys}
        return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def value(self, dotted: str):
        """The raw value of a dotted key of the params file (None where absent, e.g. optional defaults)."""
        node = self.raw
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    # --- what each job asks of the machine -----------------------------------------------------------
    #: every job's floor (MB): what torch, MLflow and a Python process hold before the first tensor
    RUNTIME_MB = 1024

    def training_memory(self, exp: str, method: str, block: int | str | None = None) -> int:
        """MB a training job asks for. ``mem_mb`` (the experiment's training resources,
        :meth:`~dblocks.params.Params.training_resources`) is what one process training the whole network
        needs; a block job holds only its block's share of the layers (states and activations alike: the
        method's memory saving, docs/method.md §7) and asks for that share, never less than :attr:`RUNTIME_MB`.
        So a scheduler with a memory budget (Snakemake's --resources mem_mb, SLURM) runs small blocks beside a
        large job instead of two whole networks at once. A data-parallel job runs one process per GPU, each
        a whole replica of its block, and asks for that many times the share."""
        config = self.experiments[exp]
        if method in LOCAL_METHODS:  # a baseline's job holds its whole network (a NoProp block is one)
            return self.ranks(exp) * self.training_resources(exp)["mem_mb"]
        depth = get_arch(config["arch"]).depth
        layers = (
            depth
            if method != BLOCKWISE
            else layer_split(depth, config["blocks"], config["layer_split"])[int(block) - 1]
        )
        total = self.training_resources(exp)["mem_mb"]
        return self.ranks(exp) * max(min(total, self.RUNTIME_MB), math.ceil(total * layers / depth))

    @property
    def evaluation_memory(self) -> int:
        """MB an evaluation (or reference statistics) job asks for: ``resources.eval_mem_mb``, else mem_mb."""
        return self.resources.get("eval_mem_mb") or self.resources["mem_mb"]

    # --- paths (relative to the repository root) ---------------------------------------------------
    # Every file the pipeline reads or writes is named here, once. The rules call these methods with
    # Snakemake's wildcards as arguments to get their patterns (``block_checkpoint("{exp}", "{block}")`` is
    # ``checkpoints/<out>/{exp}/block-{block}.safetensors``), and with values to name one job's files, so
    # the rules, the targets below, ``dblocks verify`` and the tests cannot disagree on where a file lives.
    @property
    def data_dir(self) -> str:
        """The folder of prepared datasets (``prepared/``) and FID reference statistics (``reference/``):
        ``data_dir`` if the params file sets it (generated stand-in data must never mix with real), else data."""
        return self.raw.get("data_dir") or "data"

    @property
    def keep_weights(self) -> bool:
        """Whether trained weights stay once evaluated (``keep_weights``, default true). A smoke run trains the
        paper's networks for two steps: their ~55 GB are worth nothing once every job that reads them ran."""
        return self.raw.get("keep_weights", True)

    @staticmethod
    def record(path: str) -> str:
        """The JSON record beside a safetensors artefact: its sha256 and provenance (checkpoint.sidecar_path)."""
        return str(sidecar_path(path))

    @classmethod
    def with_records(cls, *paths: str | None) -> list[str]:
        """Safetensors artefacts, each followed by its JSON record; None (no such artefact) is left out."""
        return [f for path in paths if path for f in (path, cls.record(path))]

    def dataset(self, exp: str) -> str:
        """The dataset an experiment trains and is evaluated on."""
        return self.experiments[exp]["dataset"]

    def prepared(self, dataset: str) -> str:
        return f"{self.data_dir}/prepared/{dataset}"

    def split(self, dataset: str, split: str) -> str:
        """A prepared split's tensors (``train`` or ``test``); its record holds their checksum (and a sharded
        split's shard list)."""
        return f"{self.prepared(dataset)}/{split}.safetensors"

    def split_files(self, dataset: str, *splits: str) -> list[str]:
        """Prepared splits with their records: what a job that reads them depends on."""
        return self.with_records(*(self.split(dataset, s) for s in splits))

    def prepared_files(self, dataset: str, autoencoder: bool = False) -> dict[str, str]:
        """What a dataset's prepare step writes, by name (the rules' named outputs): both splits and their
        records, and with ``autoencoder`` the autoencoder it trains (or writes) beside them and its record."""
        files = {s: self.split(dataset, s) for s in ("train", "test")}
        files.update({f"{s}_meta": self.record(self.split(dataset, s)) for s in ("train", "test")})
        if autoencoder:
            files.update(
                autoencoder=self.autoencoder_file(dataset), autoencoder_meta=self.record(self.autoencoder_file(dataset))
            )
        return files

    def shard_dir(self, dataset: str) -> str:
        """The folder of a sharded dataset's shards (dblocks.data.prepared), written by its prepare step."""
        return f"{self.prepared(dataset)}/{SHARD_DIR}"

    def autoencoder_file(self, dataset: str) -> str:
        return f"{self.prepared(dataset)}/{AUTOENCODER_FILE}"

    def autoencoder(self, dataset: str) -> str | None:
        """The autoencoder that a dataset's prepare step writes beside its prepared splits and its samples are
        decoded with (digits-latent's trained one; imagenet256's untrained stand-in where ``autoencoders:``
        names it), or None: pixel data, or a pretrained VAE (imagenet256's sd-vae-ft-ema)."""
        local = dataset in TRAINED_AUTOENCODER_DATASETS or self.encoder(dataset) == "untrained-conv"
        return self.autoencoder_file(dataset) if local else None

    def decoder_files(self, dataset: str) -> list[str]:
        """The trained autoencoder (and its record) that decodes a latent dataset's samples; [] if none."""
        return self.with_records(self.autoencoder(dataset))

    @property
    def autoencoded_datasets(self) -> list[str]:
        """The datasets whose prepare step writes an autoencoder beside its splits (always digits-latent)."""
        return sorted(set(TRAINED_AUTOENCODER_DATASETS) | {d for d in self.datasets if self.autoencoder(d)})

    def runs_dir(self) -> str:
        """The MLflow run records of the tracking jobs (and the journals of runs logged later)."""
        return f"results/{self.out}/runs"

    def store_record(self) -> str:
        """What ``dblocks track-init --store-only`` writes once the store and experiment exist."""
        return f"{self.runs_dir()}/store.json"

    def run_json(self, exp: str, chash: str | None = None) -> str:
        """The MLflow run record of ``exp``'s current config (its parent run; ``dblocks track-init`` writes it):
        keyed by the config hash, so a changed experiment needs a new record, and Snakemake, which skips the
        jobs below a rerun job when their input from it is `ancient` and present, still retrains its blocks.
        ``chash`` (a wildcard, for the rule's pattern) stands for the config hash."""
        return f"{self.runs_dir()}/{exp}.{chash or self.hash(exp)}.json"

    def paper_dir(self, exp: str) -> str:
        """Where the paper's shared-stem mode writes its B blocks (one job, one directory)."""
        return f"checkpoints/{self.out}/{exp}/paper"

    def block_checkpoint(self, exp: str, block: int | str, method: str = BLOCKWISE) -> str:
        folder = f"checkpoints/{self.out}/{exp}" if method == BLOCKWISE else self.paper_dir(exp)
        return f"{folder}/block-{block}.safetensors"

    def block_checkpoints(self, exp: str, method: str = BLOCKWISE) -> list[str]:
        """The B block files of a block-wise (or the paper mode's) model, in block order."""
        return [self.block_checkpoint(exp, b, method) for b in range(1, self.blocks(exp) + 1)]

    def assembly_inputs(self, exp: str, method: str) -> list[str]:
        """What assembling ``method``'s model reads: its block files, or the paper mode's directory of them."""
        return [self.paper_dir(exp)] if method == PAPER else self.block_checkpoints(exp, method)

    def e2e_checkpoint(self, exp: str) -> str:
        return f"checkpoints/{self.out}/{exp}/e2e.safetensors"

    def local_parts(self, exp: str, method: str) -> list[int | str | None]:
        """A block-local baseline's training jobs (dblocks.baselines.jobs.parts): NoProp-DT's blocks 1..T
        (T = ``blocks``) and its head; one job (None) for NoProp-CT / FM and Forward-Forward."""
        if method in SPLIT_METHODS:
            return [*range(1, self.blocks(exp) + 1), HEAD]
        return [None]

    def local_checkpoint(self, exp: str, method: str, part: int | str | None = None) -> str:
        """A block-local baseline's trained part: ``<method>/block-<t>``, ``<method>/head`` or ``<method>/model``."""
        name = "model" if part is None else HEAD if part == HEAD else f"block-{part}"
        return f"checkpoints/{self.out}/{exp}/{method}/{name}.safetensors"

    def local_checkpoints(self, exp: str, method: str) -> list[str]:
        """Every trained part of a block-local baseline, in the order its evaluation reads them."""
        return [self.local_checkpoint(exp, method, part) for part in self.local_parts(exp, method)]

    def model(self, exp: str, method: str) -> str:
        return self.e2e_checkpoint(exp) if method == E2E else f"models/{self.out}/{exp}/{method}.safetensors"

    def judge_checkpoint(self, exp: str) -> list[str]:
        """The end-to-end model of the experiment that judges ``exp``'s generated text; [] if it has none."""
        judge = self.judge(exp)
        return [self.e2e_checkpoint(judge)] if judge else []

    def metrics(self, exp: str, method: str) -> str:
        return f"metrics/{self.out}/{exp}/{method}.json"

    def metrics_files(self) -> list[str]:
        """Every evaluation's metrics: what the tables wait for."""
        return [self.metrics(e, m) for e in self.experiments for m in self.methods(e)]

    def sample_grid(self, exp: str, method: str) -> str:
        """A generator evaluation's PNG grid of samples."""
        return f"metrics/{self.out}/{exp}/{method}-samples.png"

    def text_samples(self, exp: str, method: str) -> str:
        """A text evaluation's samples (prompts, continuations), Markdown."""
        return f"metrics/{self.out}/{exp}/{method}-samples.md"

    def feature_net(self) -> str:
        return f"models/{self.out}/digits-features.safetensors"

    def inception_weights(self) -> str:
        return "models/inception/inception-v3-compat.safetensors"

    def fid_features(self) -> str:
        """The FID feature space's weights file: the digits feature net or the converted Inception."""
        return self.feature_net() if self.evaluation["fid_features"] == "digits" else self.inception_weights()

    def reference_stats_file(self, dataset: str, space: str, size: int | str, split: str) -> str:
        """FID reference statistics of a split in a feature space (digits, inception) over ``size`` images."""
        return f"{self.data_dir}/reference/{dataset}/{space}-{size}/{split}.safetensors"

    def reference_stats(self, dataset: str, split: str) -> str:
        """The cached FID reference statistics this file's evaluations use: named by dataset, feature space
        (``evaluation.fid_features``) and sample count (``evaluation.reference_samples``, else all)."""
        size = self.evaluation.get("reference_samples") or "all"
        return self.reference_stats_file(dataset, self.evaluation["fid_features"], size, split)

    def tables_dir(self) -> str:
        return f"results/{self.out}/tables"

    def figures_dir(self) -> str:
        return f"results/{self.out}/figures"

    def provenance(self) -> str:
        """The code version and settings behind this file's tables (the `provenance` rule writes it; the
        Snakemake report shows it, on its landing page with ``--report-metadata``)."""
        return f"results/{self.out}/provenance.yaml"

    def log(self, *names: str) -> str:
        """A job's log under ``logs/<out>``: ``log("{exp}", "train-e2e")`` is ``logs/<out>/{exp}/train-e2e.log``."""
        return "/".join(["logs", self.out, *names]) + ".log"

    def benchmark(self, *names: str) -> str:
        """A job's time and memory (Snakemake's benchmark TSV), under ``results/<out>/benchmarks``, named as its log."""
        return "/".join(["results", self.out, "benchmarks", *names]) + ".tsv"

    # --- the Snakemake report ---------------------------------------------------------------------------
    def report_category(self, table: str | None = None, exp: str | None = None) -> str:
        """The report's category of a file: its paper table, or the first table its experiment feeds."""
        return f"Table {table if table is not None else self.tables(exp)[0]}"

    # --- the job list ---------------------------------------------------------------------------------
    def experiments_with(self, tasks: tuple[str, ...] = (), methods: tuple[str, ...] = ()) -> list[str]:
        """The experiments of one of these tasks, or that train one of these methods."""
        return [e for e, c in self.experiments.items() if c["task"] in tasks or set(self.methods(e)) & set(methods)]

    def targets(self) -> list[str]:
        """Everything 'rule all' asks for: every evaluation, the tables and their provenance, and (unless
        ``keep_weights`` is false) every trained checkpoint and assembled model. Asking for the checkpoints
        themselves is what makes a deleted block (or one that `dblocks verify` set aside) rebuild with
        Snakemake's own means: the missing target reruns, and its assembly, evaluation and the tables rerun
        after it because their input is rebuilt."""
        return (
            self.metrics_files()
            + [self.tables_dir(), self.provenance()]
            + (self.trained_files() if self.keep_weights else [])
        )

    def trained_files(self) -> list[str]:
        """Block checkpoints, end-to-end baselines and assembled models, each with its JSON record; the
        paper mode's single job writes its B blocks into one directory, which stands for them."""
        files: list[str] = []
        for exp in self.experiments:
            for method in self.methods(exp):
                if method in LOCAL_METHODS:  # its parts are the model; the evaluation assembles them
                    files += self.local_checkpoints(exp, method)
                    continue
                if method != E2E:  # its blocks (the paper mode's: their directory), then the model assembled from them
                    files += self.assembly_inputs(exp, method)
                files.append(self.model(exp, method))
        return [f for path in files for f in (self.with_records(path) if path.endswith(".safetensors") else [path])]

    def artefacts(self) -> list[str]:
        """Every safetensors file the pipeline writes for this params file (prepared data, autoencoders,
        FID feature nets and reference statistics, blocks, baselines, models): what `dblocks verify` checks
        against the sha256 in each file's JSON record."""
        files = [self.split(d, split) for d in self.datasets for split in ("train", "test")]
        files += [
            shard
            for d in self.datasets
            if d in SHARDED_DATASETS
            for split in ("train", "test")
            for shard in self.shards(d, split)
        ]
        files += [a for a in map(self.autoencoder, self.datasets) if a is not None]
        generated = sorted({c["dataset"] for c in self.experiments.values() if c["task"] == "generation"})
        if generated:
            files.append(self.fid_features())
        files += [self.reference_stats(d, split) for d in generated for split in ("train", "test")]
        for exp in self.experiments:
            for method in self.methods(exp):
                if method in LOCAL_METHODS:
                    files += self.local_checkpoints(exp, method)
                    continue
                if method != E2E:
                    files += self.block_checkpoints(exp, method)
                files.append(self.model(exp, method))
        return list(dict.fromkeys(files))

    def shards(self, dataset: str, split: str) -> list[str]:
        """The shard files a sharded split's record lists (none before it is prepared). A sharded split's
        record is small JSON; the shards themselves are not opened here."""
        record = Path(self.record(self.split(dataset, split)))
        try:
            entries = json.loads(record.read_text()).get("shards") or []
        except (OSError, ValueError):
            return []  # not prepared yet, or unreadable: verify reports the split file itself
        return [f"{self.prepared(dataset)}/{e['file']}" for e in entries if isinstance(e, dict) and "file" in e]

    def group_of(self, artefact: str) -> str | None:
        """The directory that one job writes as a whole and that holds this artefact (the paper mode's B
        blocks, a sharded split's shards/), or None: such a file is rebuilt by rebuilding its directory."""
        if Path(artefact).parent.name == SHARD_DIR:
            return str(Path(artefact).parent)
        for exp in self.experiments:
            if PAPER in self.methods(exp) and Path(artefact).parent == Path(self.paper_dir(exp)):
                return self.paper_dir(exp)
        return None

    def training_jobs(self) -> list[tuple[str, str, int | str | None]]:
        """(experiment, method, block) for every training job: B block jobs per block-wise experiment; for a
        block-local baseline its parts (NoProp-DT: T block jobs and its head, ``"head"``)."""
        jobs: list[tuple[str, str, int | str | None]] = []
        for exp in self.experiments:
            for method in self.methods(exp):
                if method == BLOCKWISE:
                    jobs += [(exp, method, b) for b in range(1, self.blocks(exp) + 1)]
                elif method in LOCAL_METHODS:
                    jobs += [(exp, method, part) for part in self.local_parts(exp, method)]
                else:
                    jobs.append((exp, method, None))
        return jobs
