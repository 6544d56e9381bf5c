"""The params model: the one reader of a params file (``params/*.yaml``).

A params file is the single source of truth of a pipeline run: its scale, MLflow tracking, resources,
evaluation protocol and experiments. :func:`Params.load` reads it once, checks it against the schema shipped
in this package (``schema/params.schema.json``), resolves every experiment over ``defaults`` and the package
defaults, validates each one (``dblocks.config.validate``) and the links between them (judges, shared
baselines). The Snakefile, DVC generation, ``track-init``, ``tables``, ``ui`` and every command's
``--config`` read params through this module and nothing else, so there is one set of defaults and one
set of error messages.

Loading is cheap and pure: it reads the YAML file only (never an artefact) and imports no torch, so every
Snakemake parse, including the one each SLURM job does, can afford it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

import jsonschema

from dblocks.config import (TEXT_TASKS, ConfigError, check_finite, config_hash, describe_error, pick_experiment,
                            read_yaml_mapping, resolve)

SCHEMA_FILE = "schema/params.schema.json"
BLOCKWISE, E2E, PAPER = "blockwise", "e2e", "paper"
#: settings that shape only the block-wise model; end-to-end training never reads them
BLOCKWISE_ONLY = frozenset({"blocks", "partition", "overlap", "layer_split"})


#: ``dblocks evaluate``'s defaults for the evaluation settings it may be given (its option defaults are these)
EVALUATE_DEFAULTS: dict = {"split": "test", "seed": 0, "evaluations": 1, "bound_samples": 1, "max_windows": None,
                           "prompts": 100, "continuations": 5, "new_tokens": 50,
                           "mauve_features": ["reference-lm", "minilm"], "hf_judges": []}
#: the settings that shape each task's evaluation numbers (beyond split and seed); execution-only options
#: (batch sizes, device, output paths, progress) are not settings
EVALUATION_KEYS: dict[str, tuple[str, ...]] = {
    "classification": (),
    "generation": ("samples", "sample_steps", "guidance", "evaluations", "fid_features", "fid_reference",
                   "reference_samples"),
    "masked_text": ("bound_samples", "max_windows", "sample_steps"),
    "ar_text": ("max_windows", "prompts", "continuations", "new_tokens", "mauve_features", "hf_judges", "judge"),
}
EVALUATION_KEYS["recurrent_text"] = EVALUATION_KEYS["ar_text"]


def evaluation_settings(task: str, values: dict) -> dict:
    """What an evaluation of a ``task`` model depends on beyond the model itself: its task's keys of
    :data:`EVALUATION_KEYS` (and split, seed) taken from ``values``, else :data:`EVALUATE_DEFAULTS`; lists are
    sorted (they are sets), numbers of a float setting are floats. The one definition behind
    :func:`evaluation_hash`: ``dblocks evaluate`` builds ``values`` from the options it received,
    :meth:`Params.evaluation_settings` from a params file."""
    out: dict = {"task": task}
    for key in ("split", "seed", *EVALUATION_KEYS[task]):
        value = values.get(key, EVALUATE_DEFAULTS.get(key))
        if isinstance(value, (list, tuple)):
            value = sorted(value)
        elif key == "guidance" and value is not None:
            value = float(value)
        out[key] = value
    return out


def command_settings(options: dict, config: dict, judge_hash: str | None = None, fid: dict | None = None) -> dict:
    """The evaluation settings (:func:`evaluation_settings`) of a ``dblocks evaluate`` run, from the options it
    runs with (its argparse namespace as a dict, or :meth:`Params.evaluate_options`), the model's config
    (whose ``sample`` settings fill in samples and steps not given, and give the guidance), the config hash
    of its judge and, for a generator, ``fid`` = {fid_features, fid_reference, reference_samples} of its FID
    reference. The command and the tables both call this, so their hashes agree by construction."""
    sample = config["sample"]
    return evaluation_settings(config["task"], {
        **options, "judge": judge_hash, "samples": options.get("samples") or sample["num_images"],
        "sample_steps": options.get("sample_steps") or sample["steps"], "guidance": sample["guidance"],
        **(fid or {})})


def evaluation_hash(settings: dict) -> str:
    """The evaluation-settings hash of :func:`evaluation_settings` (16 hex digits, like the config hash)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def schema() -> dict:
    return json.loads(resources.files("dblocks").joinpath(SCHEMA_FILE).read_text())


@dataclass
class Params:
    """A validated params file: the raw settings and every experiment resolved."""

    path: Path
    raw: dict
    experiments: dict[str, dict]

    @classmethod
    def load(cls, path: str | Path, option: str = "--params"):
        """Read and validate a whole params file; every problem is one ConfigError naming its key and what
        is allowed (prefixed by the file)."""
        path = Path(path)
        raw = read_yaml_mapping(path, option)
        check_finite(raw, f"{path}: ")
        errors = sorted(jsonschema.Draft202012Validator(schema()).iter_errors(raw),
                        key=lambda e: len(e.absolute_path))
        if errors:
            raise ConfigError(f"{path}: {describe_error(errors[0])}")
        experiments = {}
        for name in raw["experiments"]:
            try:
                experiments[name] = resolve(pick_experiment(raw, path, name))
            except ConfigError as exc:
                raise ConfigError(f"{path}: experiments.{name}.{exc}") from None
        params = cls(path, raw, experiments)
        for name in experiments:
            params._check_judge(name)
            params._check_baseline(name)
        return params

    def _check_judge(self, name: str) -> None:
        judge = self.judge(name)
        if judge is None:
            return
        judges = [e for e, c in self.experiments.items() if c["task"] == "ar_text" and E2E in self.methods(e)]
        if judge not in judges:
            raise ConfigError(f"{self.path}: experiments.{name}.pipeline.judge={judge!r} is not an "
                              f"autoregressive experiment with an e2e baseline; allowed: {', '.join(judges)}")

    def _check_baseline(self, name: str) -> None:
        """A shared end-to-end baseline must train exactly the network this experiment's own would."""
        source = self.baseline(name)
        if source is None:
            return
        key = f"{self.path}: experiments.{name}.pipeline.baseline={source!r}"
        if E2E in self.methods(name):
            raise ConfigError(f"{key}: the experiment trains its own e2e baseline; allowed: drop 'e2e' from its "
                              f"methods, or drop the baseline key")
        own = self.e2e_config(name)
        candidates = [e for e in self.experiments
                      if e != name and E2E in self.methods(e) and self.e2e_config(e) == own]
        if source not in candidates:
            raise ConfigError(f"{key} is not an experiment with an e2e baseline whose settings equal this one's "
                              f"outside {', '.join(sorted(BLOCKWISE_ONLY))}; allowed: "
                              f"{', '.join(candidates) or 'none in this file'}")

    def e2e_config(self, exp: str) -> dict:
        """What end-to-end training of ``exp`` depends on: its config without the block-wise settings."""
        return {k: v for k, v in self.experiments[exp].items() if k not in BLOCKWISE_ONLY | {"name", "pipeline"}}

    # --- top-level settings ---------------------------------------------------------------------------
    @property
    def scale(self) -> str:
        return self.raw["scale"]

    @property
    def out(self) -> str:
        """The folder name under results/, checkpoints/, models/, metrics/ and logs/: ``outputs`` if the
        params file sets it (two params files of one scale must not share folders), else the scale."""
        return self.raw.get("outputs") or self.scale

    @property
    def tracking_uri(self) -> str:
        """The configured MLflow store (MLFLOW_TRACKING_URI overrides it where runs are opened)."""
        return self.raw["tracking"]["uri"]

    @property
    def mlflow_experiment(self) -> str:
        return self.raw["tracking"]["experiment"]

    @property
    def resources(self) -> dict:
        return self.raw["resources"]

    @property
    def evaluation(self) -> dict:
        return self.raw["evaluation"]

    @property
    def text_evaluation(self) -> dict:
        return self.evaluation.get("text", {})

    # --- per experiment -------------------------------------------------------------------------------
    def methods(self, exp: str) -> list[str]:
        return list(self.experiments[exp]["pipeline"]["methods"])

    def tables(self, exp: str) -> list[str]:
        return [str(t) for t in self.experiments[exp]["pipeline"]["tables"]]

    def baseline(self, exp: str) -> str | None:
        """The experiment whose end-to-end run stands for this one's (``pipeline.baseline``), if any."""
        return self.experiments[exp]["pipeline"].get("baseline")

    def judge(self, exp: str) -> str | None:
        """The experiment whose end-to-end AR baseline judges this experiment's generated text."""
        return self.experiments[exp]["pipeline"].get("judge")

    def blocks(self, exp: str) -> int:
        return self.experiments[exp]["blocks"]

    def hash(self, exp: str) -> str:
        """The experiment's config hash: what its checkpoints, runs and records are keyed by."""
        return config_hash(self.experiments[exp])

    def evaluation_settings(self, exp: str) -> dict:
        """The settings the pipeline's evaluate job of ``exp`` runs with: :func:`command_settings` of the
        options ``dblocks evaluate --params`` takes from this file (:meth:`evaluate_options`), the
        experiment's current sample settings, its judge's config hash and, for a generator, the train and
        test reference statistics of ``evaluation.fid_features`` over ``reference_samples`` images."""
        options = self.evaluate_options(exp)
        config = {**self.experiments[exp], "sample": options.pop("sample")}
        judge = self.judge(exp)
        fid = None
        if config["task"] == "generation":
            fid = {"fid_features": self.evaluation["fid_features"], "fid_reference": ["test", "train"],
                   "reference_samples": self.evaluation.get("reference_samples")}
        return command_settings(options, config, self.hash(judge) if judge else None, fid)

    def evaluate_options(self, exp: str) -> dict:
        """What ``dblocks evaluate --params FILE`` takes from this file for a model of ``exp``: the scale label,
        the options of its task's evaluation protocol (generation: ``evaluation.samples``, ``sample_steps``,
        ``evaluations``, ``fid_batch_size``; text: ``evaluation.text``) and the experiment's current ``sample``
        settings (guidance, sampling batch), which win over those recorded in the model at training time."""
        config, evaluation = self.experiments[exp], self.evaluation
        options: dict = {"scale": self.scale, "sample": dict(config["sample"])}
        if config["task"] == "generation":
            options.update({k: evaluation[k] for k in ("samples", "sample_steps", "evaluations", "fid_batch_size")
                            if k in evaluation})
        elif config["task"] in TEXT_TASKS:
            options.update(self.text_evaluation)
        return options

    def eval_hash(self, exp: str) -> str:
        """The evaluation-settings hash that ``exp``'s evaluate runs must carry to be this file's."""
        return evaluation_hash(self.evaluation_settings(exp))

    @cached_property
    def datasets(self) -> dict[str, str | None]:
        """Each dataset used, with the data_root of the first experiment that names one."""
        out: dict[str, str | None] = {}
        for cfg in self.experiments.values():
            if out.get(cfg["dataset"]) is None:
                out[cfg["dataset"]] = cfg["data_root"]
        return out


def experiment_config(path: str | Path, experiment: str | None = None, overrides: list[dict] | None = None) -> dict:
    """One resolved experiment for a command's ``--config FILE [--experiment NAME]`` and its overrides.

    A pipeline params file (``experiments:``) is loaded and validated whole through :meth:`Params.load`, so a
    job sees exactly the configuration the workflow validated. A file holding a single experiment mapping
    (the hand-run form) is resolved on its own."""
    data = read_yaml_mapping(path, "--config")
    if "experiments" not in data:
        check_finite(data, f"{path}: ")
        return resolve(pick_experiment(data, path, experiment), overrides)
    params = Params.load(path, "--config")
    if experiment is None:
        if len(params.experiments) != 1:
            raise ConfigError(f"--experiment is required: {path} defines {', '.join(params.experiments)}")
        experiment = next(iter(params.experiments))
    if experiment not in params.experiments:
        raise ConfigError(f"--experiment {experiment!r}: not in {path}; allowed: {', '.join(params.experiments)}")
    return resolve(params.experiments[experiment], overrides)
