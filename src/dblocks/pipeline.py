"""The pipeline's view of a params file: which experiments exist, which methods and blocks each one
trains, where every artefact lives, and the command each job runs.

The Snakefile, the DVC stage list and the tests all read the job graph from here, so the two workflow
engines cannot drift apart: ``dvc.yaml`` is generated from these jobs (``dblocks dvc-yaml``) and a test
checks that Snakemake's DAG has exactly the same jobs and outputs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import jsonschema
import yaml

from dblocks.checkpoint import CheckpointError, load_metadata, sha256_file, sidecar_path
from dblocks.config import (AUTOENCODER_FILE, TRAINED_AUTOENCODER_DATASETS, ConfigError, config_hash, describe_error,
                            load_params, resolve)

#: where the Snakefile finds its schema (relative to the repository root)
PIPELINE_SCHEMA = Path("workflow/schemas/config.schema.json")
BLOCKWISE, E2E, PAPER = "blockwise", "e2e", "paper"
#: settings that shape only the block-wise model; end-to-end training never reads them
BLOCKWISE_ONLY = frozenset({"blocks", "partition", "overlap", "layer_split"})


def _pipeline_schema(root: Path) -> dict:
    path = root / PIPELINE_SCHEMA
    if not path.is_file():
        raise ConfigError(f"pipeline schema {path} not found: run from the repository (or pass its root)")
    return json.loads(path.read_text())


@dataclass
class Pipeline:
    params_path: Path
    raw: dict
    root: Path = Path(".")
    experiments: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, params_path: str | Path, root: str | Path = ".") -> "Pipeline":
        """Read and validate a whole params file; every problem names its key and what is allowed.

        ``root`` is the repository (where workflow/schemas lives); the params path is as given."""
        params_path = Path(params_path)
        if not params_path.is_file():
            raise ConfigError(f"params file {params_path}: not found")
        raw = yaml.safe_load(params_path.read_text()) or {}
        schema_errors = sorted(jsonschema.Draft202012Validator(_pipeline_schema(Path(root))).iter_errors(raw),
                               key=lambda e: len(e.absolute_path))
        if schema_errors:
            raise ConfigError(f"{params_path}: {describe_error(schema_errors[0])}")
        pipe = cls(params_path, raw, Path(root))
        for name in raw["experiments"]:
            try:
                pipe.experiments[name] = resolve(load_params(params_path, name))
            except ConfigError as exc:
                raise ConfigError(f"{params_path}: experiments.{name}.{exc}") from None
        for name in pipe.experiments:
            judge = pipe.judge(name)
            if judge is None:
                continue
            judges = [e for e, c in pipe.experiments.items() if c["task"] == "ar_text" and E2E in pipe.methods(e)]
            if judge not in judges:
                raise ConfigError(f"{params_path}: experiments.{name}.pipeline.judge={judge!r} is not an "
                                  f"autoregressive experiment with an e2e baseline; allowed: {', '.join(judges)}")
        for name in pipe.experiments:
            pipe._check_baseline(name)
        return pipe

    def _check_baseline(self, name: str) -> None:
        """A shared end-to-end baseline must train exactly the network this experiment's own would."""
        source = self.baseline(name)
        if source is None:
            return
        key = f"{self.params_path}: experiments.{name}.pipeline.baseline={source!r}"
        if E2E in self.methods(name):
            raise ConfigError(f"{key}: the experiment trains its own e2e baseline; allowed: drop 'e2e' from its "
                              f"methods, or drop the baseline key")
        own = self._e2e_config(name)
        candidates = [e for e in self.experiments
                      if e != name and E2E in self.methods(e) and self._e2e_config(e) == own]
        if source not in candidates:
            raise ConfigError(f"{key} is not an experiment with an e2e baseline whose settings equal this one's "
                              f"outside {', '.join(sorted(BLOCKWISE_ONLY))}; allowed: "
                              f"{', '.join(candidates) or 'none in this file'}")

    def _e2e_config(self, exp: str) -> dict:
        """What end-to-end training of ``exp`` depends on: its config without the block-wise settings."""
        return {k: v for k, v in self.experiments[exp].items() if k not in BLOCKWISE_ONLY | {"name", "pipeline"}}

    # --- settings --------------------------------------------------------------------------------
    @property
    def scale(self) -> str:
        return self.raw["scale"]

    @property
    def out(self) -> str:
        """The folder name under results/, checkpoints/, models/, metrics/ and logs/: ``outputs`` if the
        params file sets it (two params files of one scale must not share folders), else the scale."""
        return self.raw.get("outputs") or self.scale

    @property
    def resources(self) -> dict:
        return self.raw["resources"]

    @property
    def evaluation(self) -> dict:
        return self.raw["evaluation"]

    def methods(self, exp: str) -> list[str]:
        return list(self.experiments[exp]["pipeline"]["methods"])

    def baseline(self, exp: str) -> str | None:
        """The experiment whose end-to-end run stands for this one's (``pipeline.baseline``), if any."""
        return self.experiments[exp]["pipeline"].get("baseline")

    def judge(self, exp: str) -> str | None:
        """The experiment whose end-to-end AR baseline judges this experiment's generated text."""
        return self.experiments[exp]["pipeline"].get("judge")

    @property
    def text_evaluation(self) -> dict:
        return self.evaluation.get("text", {})

    def blocks(self, exp: str) -> int:
        return self.experiments[exp]["blocks"]

    def hash(self, exp: str) -> str:
        return config_hash(self.experiments[exp])

    @cached_property
    def datasets(self) -> dict[str, str | None]:
        """Each dataset used, with the data_root of the first experiment that names one."""
        out: dict[str, str | None] = {}
        for cfg in self.experiments.values():
            if out.get(cfg["dataset"]) is None:
                out[cfg["dataset"]] = cfg["data_root"]
        return out

    @property
    def needs_feature_net(self) -> bool:
        """Generation on digits is scored with a digits classifier's features (domain FID)."""
        return any(c["task"] == "generation" for c in self.experiments.values())

    # --- paths (relative to the repository root) ---------------------------------------------------
    def prepared(self, dataset: str) -> str:
        return f"data/prepared/{dataset}"

    def autoencoder(self, dataset: str) -> str | None:
        """The autoencoder that a dataset's prepare step trains and its samples are decoded with (written
        beside its prepared splits), or None: pixel data, or a pretrained VAE (imagenet256)."""
        return f"{self.prepared(dataset)}/{AUTOENCODER_FILE}" if dataset in TRAINED_AUTOENCODER_DATASETS else None

    def run_json(self, exp: str) -> str:
        return f"results/{self.out}/runs/{exp}.json"

    def block_checkpoint(self, exp: str, block: int | str, method: str = BLOCKWISE) -> str:
        sub = "" if method == BLOCKWISE else "paper/"
        return f"checkpoints/{self.out}/{exp}/{sub}block-{block}.safetensors"

    def e2e_checkpoint(self, exp: str) -> str:
        return f"checkpoints/{self.out}/{exp}/e2e.safetensors"

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
        return f"data/reference/{dataset}/{self.evaluation['fid_features']}-{size}/{split}.safetensors"

    def tables_dir(self) -> str:
        return f"results/{self.out}/tables"

    # --- the job list ---------------------------------------------------------------------------------
    def targets(self) -> list[str]:
        """Everything 'rule all' asks for: every evaluation and the tables."""
        return [self.metrics(e, m) for e in self.experiments for m in self.methods(e)] + [self.tables_dir()]

    def checkpoint_files(self) -> list[str]:
        """Every safetensors artefact the pipeline writes (prepared data, blocks, baselines, models)."""
        files = [f"{self.prepared(d)}/{split}.safetensors" for d in self.datasets for split in ("train", "test")]
        files += [a for a in map(self.autoencoder, self.datasets) if a is not None]
        generated = {c["dataset"] for c in self.experiments.values() if c["task"] == "generation"}
        files += [self.reference_stats(d, split) for d in sorted(generated) for split in ("train", "test")]
        for exp in self.experiments:
            for method in self.methods(exp):
                if method == BLOCKWISE:
                    files += [self.block_checkpoint(exp, b) for b in range(1, self.blocks(exp) + 1)]
                elif method == PAPER:
                    files += [self.block_checkpoint(exp, b, PAPER) for b in range(1, self.blocks(exp) + 1)]
                files.append(self.model(exp, method))
        return files

    def training_jobs(self) -> list[tuple[str, str, int | None]]:
        """(experiment, method, block) for every training job: B block jobs per block-wise experiment."""
        jobs: list[tuple[str, str, int | None]] = []
        for exp in self.experiments:
            for method in self.methods(exp):
                if method == BLOCKWISE:
                    jobs += [(exp, method, b) for b in range(1, self.blocks(exp) + 1)]
                else:
                    jobs.append((exp, method, None))
        return jobs


def quarantine_corrupt(paths, root: str | Path = ".") -> list[Path]:
    """Move aside artefacts whose bytes no longer match the sha256 in their JSON record (or whose record
    is missing or unreadable), so that the workflow sees them as missing and rebuilds exactly them and
    what depends on them. Nothing is deleted: the bad files keep a ``.corrupt`` suffix for inspection."""
    moved = []
    for rel in paths:
        path = Path(root) / rel
        if not path.exists():
            continue
        try:
            intact = sha256_file(path) == load_metadata(path)["sha256"]
        except (CheckpointError, KeyError):
            intact = False
        if intact:
            continue
        for p in (path, sidecar_path(path)):
            if p.exists():
                p.replace(p.with_name(p.name + ".corrupt"))
        moved.append(path)
    return moved


def _set_aside(path: Path, suffix: str) -> None:
    target = path.with_name(path.name + suffix)
    if target.is_dir():
        import shutil

        shutil.rmtree(target)
    path.replace(target)


def invalidate_downstream_of_missing(pipe: "Pipeline", root: str | Path = ".") -> list[Path]:
    """Snakemake does not rebuild a missing intermediate file while everything after it is up to date.
    A deleted (or quarantined) block checkpoint must still be rebuilt, so walk the chain block ->
    assembled model -> evaluation -> tables and set aside (``.stale``) every product whose inputs are
    missing; Snakemake then plans exactly that block and what depends on it."""
    root = Path(root)
    moved: list[Path] = []

    def stale_if_missing(inputs: list[str], product: str) -> None:
        target = root / product
        if target.exists() and any(not (root / i).exists() for i in inputs):
            for p in (target, sidecar_path(target)) if target.suffix == ".safetensors" else (target,):
                if p.exists():
                    _set_aside(p, ".stale")
            moved.append(target)

    for exp in pipe.experiments:
        for method in pipe.methods(exp):
            if method != E2E:
                blocks = [pipe.block_checkpoint(exp, b, method) for b in range(1, pipe.blocks(exp) + 1)]
                stale_if_missing(blocks, pipe.model(exp, method))
            stale_if_missing([pipe.model(exp, method)], pipe.metrics(exp, method))
    metrics = [pipe.metrics(e, m) for e in pipe.experiments for m in pipe.methods(e)]
    stale_if_missing(metrics, pipe.tables_dir())
    return moved
