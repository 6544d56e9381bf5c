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
from dblocks.config import (AUTOENCODER_FILE, LOCAL_METHODS, SHARD_DIR, SHARDED_DATASETS, SPLIT_METHODS,
                            TRAINED_AUTOENCODER_DATASETS, UNHASHED_KEYS)
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
        method's memory saving, SPEC section 7) and asks for that share, never less than :attr:`RUNTIME_MB`.
        So a scheduler with a memory budget (Snakemake's --resources mem_mb, SLURM) runs small blocks beside a
        large job instead of two whole networks at once. A data-parallel job runs one process per GPU, each
        a whole replica of its block, and asks for that many times the share."""
        config = self.experiments[exp]
        if method in LOCAL_METHODS:  # a baseline's job holds its whole network (a NoProp block is one)
            return self.ranks(exp) * self.training_resources(exp)["mem_mb"]
        depth = get_arch(config["arch"]).depth
        layers = depth if method != BLOCKWISE else \
            layer_split(depth, config["blocks"], config["layer_split"])[int(block) - 1]
        total = self.training_resources(exp)["mem_mb"]
        return self.ranks(exp) * max(min(total, self.RUNTIME_MB), math.ceil(total * layers / depth))

    @property
    def evaluation_memory(self) -> int:
        """MB an evaluation (or reference statistics) job asks for: ``resources.eval_mem_mb``, else mem_mb."""
        return self.resources.get("eval_mem_mb") or self.resources["mem_mb"]

    # --- paths (relative to the repository root) ---------------------------------------------------
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

    def prepared(self, dataset: str) -> str:
        return f"{self.data_dir}/prepared/{dataset}"

    def autoencoder(self, dataset: str) -> str | None:
        """The autoencoder that a dataset's prepare step writes beside its prepared splits and its samples are
        decoded with (digits-latent's trained one; imagenet256's untrained stand-in where ``autoencoders:``
        names it), or None: pixel data, or a pretrained VAE (imagenet256's sd-vae-ft-ema)."""
        local = dataset in TRAINED_AUTOENCODER_DATASETS or self.encoder(dataset) == "untrained-conv"
        return f"{self.prepared(dataset)}/{AUTOENCODER_FILE}" if local else None

    @property
    def autoencoded_datasets(self) -> list[str]:
        """The datasets whose prepare step writes an autoencoder beside its splits (always digits-latent)."""
        return sorted(set(TRAINED_AUTOENCODER_DATASETS) | {d for d in self.datasets if self.autoencoder(d)})

    def run_json(self, exp: str) -> str:
        """The MLflow run record of ``exp``'s current config (its parent run; ``dblocks track-init`` writes it):
        keyed by the config hash, so a changed experiment needs a new record, and Snakemake, which skips the
        jobs below a rerun job when their input from it is `ancient` and present, still retrains its blocks."""
        return f"results/{self.out}/runs/{exp}.{self.hash(exp)}.json"

    def paper_dir(self, exp: str) -> str:
        """Where the paper's shared-stem mode writes its B blocks (one job, one directory)."""
        return f"checkpoints/{self.out}/{exp}/paper"

    def block_checkpoint(self, exp: str, block: int | str, method: str = BLOCKWISE) -> str:
        folder = f"checkpoints/{self.out}/{exp}" if method == BLOCKWISE else self.paper_dir(exp)
        return f"{folder}/block-{block}.safetensors"

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

    def metrics(self, exp: str, method: str) -> str:
        return f"metrics/{self.out}/{exp}/{method}.json"

    def feature_net(self) -> str:
        return f"models/{self.out}/digits-features.safetensors"

    def inception_weights(self) -> str:
        return "models/inception/inception-v3-compat.safetensors"

    def fid_features(self) -> str:
        """The FID feature space's weights file: the digits feature net or the converted Inception."""
        return self.feature_net() if self.evaluation["fid_features"] == "digits" else self.inception_weights()

    def reference_stats(self, dataset: str, split: str) -> str:
        """Cached FID reference statistics, named by dataset, feature space and sample count."""
        size = self.evaluation.get("reference_samples") or "all"
        return f"{self.data_dir}/reference/{dataset}/{self.evaluation['fid_features']}-{size}/{split}.safetensors"

    def tables_dir(self) -> str:
        return f"results/{self.out}/tables"

    # --- the job list ---------------------------------------------------------------------------------
    def targets(self) -> list[str]:
        """Everything 'rule all' asks for: every evaluation, the tables, and (unless ``keep_weights`` is false)
        every trained checkpoint and assembled model. Asking for the checkpoints themselves is what makes a deleted block (or one that
        `dblocks verify` set aside) rebuild with Snakemake's own means: the missing target reruns, and its
        assembly, evaluation and the tables rerun after it because their input is rebuilt."""
        metrics = [self.metrics(e, m) for e in self.experiments for m in self.methods(e)]
        return metrics + [self.tables_dir()] + (self.trained_files() if self.keep_weights else [])

    def trained_files(self) -> list[str]:
        """Block checkpoints, end-to-end baselines and assembled models, each with its JSON record; the
        paper mode's single job writes its B blocks into one directory, which stands for them."""
        files: list[str] = []
        for exp in self.experiments:
            for method in self.methods(exp):
                if method in LOCAL_METHODS:  # its parts are the model; the evaluation assembles them
                    files += self.local_checkpoints(exp, method)
                    continue
                if method == BLOCKWISE:
                    files += [self.block_checkpoint(exp, b) for b in range(1, self.blocks(exp) + 1)]
                elif method == PAPER:
                    files.append(self.paper_dir(exp))
                files.append(self.model(exp, method))
        return [f for path in files for f in ((path, str(sidecar_path(path))) if path.endswith(".safetensors")
                                               else (path,))]

    def artefacts(self) -> list[str]:
        """Every safetensors file the pipeline writes for this params file (prepared data, autoencoders,
        FID feature nets and reference statistics, blocks, baselines, models): what `dblocks verify` checks
        against the sha256 in each file's JSON record."""
        files = [f"{self.prepared(d)}/{split}.safetensors" for d in self.datasets for split in ("train", "test")]
        files += [shard for d in self.datasets if d in SHARDED_DATASETS for split in ("train", "test")
                  for shard in self.shards(d, split)]
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
                if method == BLOCKWISE:
                    files += [self.block_checkpoint(exp, b) for b in range(1, self.blocks(exp) + 1)]
                elif method == PAPER:
                    files += [self.block_checkpoint(exp, b, PAPER) for b in range(1, self.blocks(exp) + 1)]
                files.append(self.model(exp, method))
        return list(dict.fromkeys(files))

    def shards(self, dataset: str, split: str) -> list[str]:
        """The shard files a sharded split's record lists (none before it is prepared). A sharded split's
        record is small JSON; the shards themselves are not opened here."""
        record = Path(self.prepared(dataset)) / f"{split}.json"
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
