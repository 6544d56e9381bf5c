"""The params model: the one reader of a params file (``params/*.yaml``).

A params file is the single source of truth of a pipeline run: its scale, MLflow tracking, resources,
evaluation protocol and experiments. :func:`Params.load` reads it once, checks it against the schema shipped
in this package (``schema/params.schema.json``), resolves every experiment over ``defaults`` and the package
defaults, validates each one (``dblocks.config.validate``) and the links between them (judges, shared
baselines). The Snakefile, DVC generation, ``track-init``, ``tables``, ``ui`` and every command's
``--config`` read params through this module and nothing else, so there is one set of defaults and one
set of error messages.

A params file may build on another (an overlay): ``base: paper.yaml`` (relative to the overlay) names the file
it starts from; its own top-level sections are deep-merged over the base's (mappings merge, scalars and lists
replace), and three keys reshape the base's experiments: ``only`` (keep just these), ``override`` (a mapping
deep-merged over every experiment after its own settings) and ``data_roots`` (``{dataset: path}``: the
data_root of every experiment reading that dataset). What the rest of the project sees is the merged result
(:attr:`Params.raw`), so a changed value in either file changes the same hashes and digests; :attr:`Params.files`
lists the files it came from and :meth:`Params.param_sources` says which keys of which file hold a value.

Loading is cheap and pure: it reads the YAML files only (never an artefact) and imports no torch, so every
Snakemake parse, including the one each SLURM job does, can afford it."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path

import jsonschema

from dblocks.config import (
    DEFAULTS,
    DIFFUSION_METHODS,
    LOCAL_METHODS,
    TEXT_TASKS,
    check_finite,
    check_method,
    chosen_weights,
    config_hash,
    deep_merge,
    describe_error,
    pick_experiment,
    read_yaml_mapping,
    resolve,
)
from dblocks.errors import ConfigError

SCHEMA_FILE = "schema/params.schema.json"
BLOCKWISE, E2E, PAPER = "blockwise", "e2e", "paper"  # DiffusionBlocks' methods; the others: config.LOCAL_METHODS
#: settings that shape only the block-wise model; end-to-end training never reads them
BLOCKWISE_ONLY = frozenset({"blocks", "partition", "overlap", "layer_split"})
#: the keys with which a file builds on another; they reshape the merged settings and are never part of them
OVERLAY_KEYS = ("base", "only", "override", "data_roots")


#: ``dblocks evaluate``'s defaults for the evaluation settings it may be given (its option defaults are these)
EVALUATE_DEFAULTS: dict = {
    "split": "test",
    "seed": 0,
    "evaluations": 1,
    "bound_samples": 1,
    "max_windows": None,
    "prompts": 100,
    "continuations": 5,
    "new_tokens": 50,
    "mauve_features": ["reference-lm", "minilm"],
    "hf_judges": [],
}
#: the settings that shape each task's evaluation numbers (beyond split and seed); execution-only options
#: (batch sizes, device, output paths, progress) are not settings
EVALUATION_KEYS: dict[str, tuple[str, ...]] = {
    "classification": (),
    "generation": (
        "samples",
        "sample_steps",
        "guidance",
        "evaluations",
        "fid_features",
        "fid_reference",
        "reference_samples",
    ),
    "masked_text": ("bound_samples", "max_windows", "sample_steps"),
    "ar_text": ("max_windows", "prompts", "continuations", "new_tokens", "mauve_features", "hf_judges", "judge"),
}
EVALUATION_KEYS["recurrent_text"] = EVALUATION_KEYS["ar_text"]
#: a task's evaluation protocol, where it changed what a number means with the same settings (part of the
#: evaluation hash, so runs of the former protocol read "other evaluation settings" in the tables instead of
#: filling a cell): 2 = block-wise next-token bits from the model's next-token distribution (the highest-noise
#: block at sigma_max), no longer the chain's last logits (docs/ar-text.md); 3 = prompts spread evenly over the
#: split instead of its first windows (one passage). classification 2 = block-wise models also classified by the
#: chain started at the noise's mean (``accuracy_mean_start``), so Tables 1 and 6 fill that column. masked_text
#: 2 = the bound of an end-to-end model estimated through the experiment's partition as a block-wise model's
#: (the same draws of t per stretch), with each stretch's term logged (``bpc_block1`` ...)
PROTOCOLS: dict[str, int] = {"ar_text": 3, "recurrent_text": 3, "classification": 2, "masked_text": 2}


def evaluation_settings(task: str, values: dict) -> dict:
    """What an evaluation of a ``task`` model depends on beyond the model itself: its task's keys of
    :data:`EVALUATION_KEYS` (and split, seed, the weights asked for) taken from ``values``, else :data:`EVALUATE_DEFAULTS`; lists are
    sorted (they are sets), numbers of a float setting are floats. The one definition behind
    :func:`evaluation_hash`: ``dblocks evaluate`` builds ``values`` from the options it received,
    :meth:`Params.evaluation_settings` from a params file."""
    out: dict = {"task": task}
    if task in PROTOCOLS:
        out["protocol"] = PROTOCOLS[task]
    for key in ("split", "seed", "weights", *EVALUATION_KEYS[task]):
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
    return evaluation_settings(
        config["task"],
        {
            **options,
            "judge": judge_hash,
            "weights": chosen_weights(options.get("weights"), sample),
            "samples": options.get("samples") or sample["num_images"],
            "sample_steps": options.get("sample_steps") or sample["steps"],
            "guidance": sample["guidance"],
            **(fid or {}),
        },
    )


def evaluation_hash(settings: dict) -> str:
    """The evaluation-settings hash of :func:`evaluation_settings` (16 hex digits, like the config hash)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def schema() -> dict:
    return json.loads(resources.files("dblocks").joinpath(SCHEMA_FILE).read_text())


def read_layers(path: str | Path, option: str = "--params") -> list[tuple[Path, dict]]:
    """The files a params file is built from, as (path, contents), the root base first and ``path`` last.
    A ``base`` is relative to the file naming it; a chain that comes back to a file is refused."""
    path, chain = Path(path), []
    while True:
        raw = read_yaml_mapping(path, option)
        check_finite(raw, f"{path}: ")
        chain.append((path, raw))
        if "base" not in raw:
            return chain[::-1]
        base = raw["base"]
        if not isinstance(base, str) or not base:
            raise ConfigError(
                f"{path}: base={base!r} has the wrong type; allowed: the path of a params file, "
                f"relative to {path.parent}"
            )
        following = Path(os.path.normpath(path.parent / base))
        if any(following.resolve() == p.resolve() for p, _ in chain):
            raise ConfigError(
                f"{path}: base={base!r} leads back to {following}; allowed: a params file that does "
                f"not build on this one"
            )
        option, path = f"{path}: base=", following


def dataset_of(entry: dict, defaults: dict | None) -> str:
    """The dataset an unresolved experiment entry reads (its own, else ``defaults``', else the package's)."""
    return entry.get("dataset") or (defaults or {}).get("dataset") or DEFAULTS["dataset"]


def merge_layers(chain: list[tuple[Path, dict]]) -> dict:
    """The settings of a chain of files (:func:`read_layers`): each file's sections deep-merged over the
    previous result, the result checked against the schema after every file (errors name that file), then
    that file's ``only``, ``override`` and ``data_roots`` applied to the experiments."""
    validator = jsonschema.Draft202012Validator(schema())
    merged: dict = {}
    for path, raw in chain:
        merged = deep_merge(merged, {k: v for k, v in raw.items() if k not in OVERLAY_KEYS})
        overlay = {k: raw[k] for k in OVERLAY_KEYS if k in raw}
        errors = sorted(validator.iter_errors({**merged, **overlay}), key=lambda e: len(e.absolute_path))
        if errors:
            raise ConfigError(f"{path}: {describe_error(errors[0])}")
        experiments = merged["experiments"]
        for name in raw.get("resources", {}).get("experiments", {}):
            if name not in experiments:
                raise ConfigError(
                    f"{path}: resources.experiments.{name}: not an experiment here; allowed: {', '.join(experiments)}"
                )
        if "only" in overlay:
            unknown = [name for name in overlay["only"] if name not in experiments]
            if unknown:
                raise ConfigError(
                    f"{path}: only: {unknown[0]!r} is not an experiment here; allowed: {', '.join(experiments)}"
                )
            experiments = {name: e for name, e in experiments.items() if name in overlay["only"]}
        if "override" in overlay:
            experiments = {name: deep_merge(e or {}, overlay["override"]) for name, e in experiments.items()}
        read = {name: dataset_of(e or {}, merged.get("defaults")) for name, e in experiments.items()}
        for dataset, root in overlay.get("data_roots", {}).items():
            if dataset not in read.values():
                raise ConfigError(
                    f"{path}: data_roots.{dataset}: no experiment reads this dataset; allowed: "
                    f"{', '.join(sorted(set(read.values())))}"
                )
            experiments = {
                name: {**(e or {}), "data_root": root} if read[name] == dataset else e
                for name, e in experiments.items()
            }
        merged["experiments"] = experiments
    return merged


def seed_name(name: str, seed: int, own_seed: int) -> str:
    """The experiment that trains ``name``'s configuration with ``seed``: itself for its own seed, else
    ``<name>-seed<seed>``."""
    return name if seed == own_seed else f"{name}-seed{seed}"


def expand_seeds(experiments: dict[str, dict], path: Path) -> dict[str, dict]:
    """Each experiment with ``pipeline.seeds: N > 1`` followed by its N - 1 replicates: the same config with
    the next seeds, named by :func:`seed_name`, marked ``pipeline.replicate_of``, and linked to the replicate
    of their baseline with the same seed (a seed's block-wise model is compared with that seed's baseline)."""
    out: dict[str, dict] = {}
    for name, config in experiments.items():
        out[name] = config
        own, count = config["seed"], config["pipeline"].get("seeds", 1)
        for seed in range(own + 1, own + count):
            twin = seed_name(name, seed, own)
            if twin in experiments:
                raise ConfigError(
                    f"{path}: experiments.{twin}: the name of {name}'s run with seed {seed} "
                    f"(pipeline.seeds={count}); allowed: another name for it"
                )
            pipeline = {**config["pipeline"], "replicate_of": name}
            baseline = pipeline.get("baseline")
            if baseline in experiments:
                pipeline["baseline"] = seed_name(baseline, seed, experiments[baseline]["seed"])
            out[twin] = {**config, "name": twin, "seed": seed, "pipeline": pipeline}
    return out


@dataclass
class Params:
    """A validated params file: the raw settings (an overlay's merged over its base) and every experiment
    resolved."""

    path: Path
    raw: dict
    experiments: dict[str, dict]
    layers: list[tuple[Path, dict]] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path, option: str = "--params"):
        """Read and validate a whole params file (and the files it builds on); every problem is one
        ConfigError naming its key and what is allowed (prefixed by the file)."""
        path = Path(path)
        layers = read_layers(path, option)
        raw = merge_layers(layers)
        experiments = {}
        for name in raw["experiments"]:
            try:
                experiments[name] = resolve(pick_experiment(raw, path, name))
            except ConfigError as exc:
                raise ConfigError(f"{path}: experiments.{name}.{exc}") from None
        experiments = expand_seeds(experiments, path)
        params = cls(path, raw, experiments, layers)
        for name in experiments:
            params._check_methods(name)
            params._check_judge(name)
            params._check_baseline(name)
            params._check_shared_stem(name)
            params._check_ranks(name)
        return params

    @property
    def files(self) -> list[Path]:
        """Every file these settings were read from, the root base first and this file last."""
        return [p for p, _ in self.layers] or [self.path]

    def param_sources(self, keys: list[str] | None) -> dict[Path, list[str] | None]:
        """Where the values of these dotted keys of the merged settings are written (None: every value), as
        {file: its keys}, for DVC's params dependencies (DVC reads files, not merged settings). A key is
        written under its own name, and in an overlay also as ``override.<rest>`` (for ``experiments.<name>.
        <rest>``) and ``data_roots.<dataset>`` (for an experiment's data_root). Files holding none of the keys
        are left out; a file that builds on nothing gives back ``keys`` unchanged."""
        if len(self.files) == 1 or keys is None:
            return {path: keys for path in self.files}
        out: dict[Path, list[str] | None] = {}
        for path, raw in self.layers:
            written = list(dict.fromkeys(w for key in keys for w in self._written(raw, key)))
            if written:
                out[path] = written
        return out

    def _written(self, raw: dict, key: str) -> list[str]:
        """The keys of one file's contents ``raw`` that set the merged key ``key`` (see :meth:`param_sources`)."""
        parts = key.split(".")
        found = [key] if _has(raw, parts) else []
        if parts[0] == "experiments" and len(parts) >= 2 and parts[1] in self.experiments:
            rest = parts[2:]
            if "override" in raw and _has(raw["override"], rest):
                found.append(".".join(["override", *rest]))
            dataset = self.experiments[parts[1]]["dataset"]
            if rest in ([], ["data_root"]) and dataset in raw.get("data_roots", {}):
                found.append(f"data_roots.{dataset}")
        return found

    def _check_methods(self, name: str) -> None:
        """An experiment's methods are DiffusionBlocks' (blockwise, e2e, paper) or block-local baselines
        (dblocks.baselines), never both: a baseline trains its own network with its own recipe, which are the
        experiment's arch and train section. Each baseline must fit the experiment (:func:`check_method`)."""
        methods = self.methods(name)
        key = f"{self.path}: experiments.{name}"
        local = [m for m in methods if m in LOCAL_METHODS]
        if local and len(local) != len(methods):
            others = ", ".join(m for m in methods if m not in local)
            raise ConfigError(
                f"{key}.pipeline.methods={methods}: {', '.join(local)} train their own network with "
                f"their own train recipe, not the one of {others}; "
                f"allowed: {', '.join(DIFFUSION_METHODS)} in one experiment, the block-local methods "
                f"({', '.join(LOCAL_METHODS)}) in experiments of their own"
            )
        if local and self.judge(name):
            raise ConfigError(f"{key}.pipeline.judge: block-local baselines classify images; allowed: no judge")
        for method in local:
            try:
                check_method(self.experiments[name], method)
            except ConfigError as exc:
                raise ConfigError(f"{key}.{exc} (pipeline.methods)") from None

    def _check_judge(self, name: str) -> None:
        judge = self.judge(name)
        if judge is None:
            return
        judges = [e for e, c in self.experiments.items() if c["task"] == "ar_text" and E2E in self.methods(e)]
        if judge not in judges:
            raise ConfigError(
                f"{self.path}: experiments.{name}.pipeline.judge={judge!r} is not an "
                f"autoregressive experiment with an e2e baseline; allowed: {', '.join(judges)}"
            )

    def _check_baseline(self, name: str) -> None:
        """A shared end-to-end baseline must train exactly the network this experiment's own would."""
        source = self.baseline(name)
        if source is None:
            return
        key = f"{self.path}: experiments.{name}.pipeline.baseline={source!r}"
        if E2E in self.methods(name):
            raise ConfigError(
                f"{key}: the experiment trains its own e2e baseline; allowed: drop 'e2e' from its "
                f"methods, or drop the baseline key"
            )
        own = self.e2e_config(name)
        candidates = [e for e in self.experiments if e != name and E2E in self.methods(e) and self.e2e_config(e) == own]
        if source not in candidates:
            raise ConfigError(
                f"{key} is not an experiment with an e2e baseline whose settings equal this one's "
                f"outside {', '.join(sorted(BLOCKWISE_ONLY))}; allowed: "
                f"{', '.join(candidates) or 'none in this file'}"
            )

    def _check_shared_stem(self, name: str) -> None:
        config = self.experiments[name]
        if PAPER in self.methods(name) and config["task"] == "classification" and config["train"]["ema_decay"]:
            raise ConfigError(
                f"{self.path}: experiments.{name}.train.ema_decay={config['train']['ema_decay']}: the "
                f"shared-stem mode ('paper' in pipeline.methods) learns the label table, which the "
                f"weight average does not cover; allowed: 0 (the authors' ViT keeps no average), or "
                f"drop 'paper' from the methods"
            )

    def _check_ranks(self, name: str) -> None:
        """Every rank of a data-parallel job computes at least one row of the global batch."""
        ranks, batch = self.ranks(name), self.experiments[name]["train"]["batch_size"]
        if ranks > batch:
            own = "gpu" in self.resources.get("experiments", {}).get(name, {})
            key = f"resources.experiments.{name}.gpu" if own else "resources.gpu"
            raise ConfigError(
                f"{self.path}: {key}={ranks}: a training job of {name} runs {ranks} ranks, each "
                f"computing a share of train.batch_size={batch} (the global batch); allowed: at most "
                f"{batch} GPUs, or a larger batch"
            )

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
    def tracking_mode(self) -> str:
        """live: jobs log to the store as they run; journal: jobs write only their journal, and the tables
        job logs them all (``dblocks track-sync``)."""
        return self.raw["tracking"].get("mode", "live")

    @property
    def resources(self) -> dict:
        """The file's ``resources`` section: every job's defaults (``experiments`` holds the training jobs' own
        settings of single experiments, see :meth:`training_resources`)."""
        return self.raw["resources"]

    def training_resources(self, exp: str) -> dict:
        """What each training job of ``exp`` asks of the machine: ``resources`` with the experiment's own
        ``resources.experiments.<exp>`` merged over it (gpu, gpu_model, mem_mb, runtime, threads). They live in
        the ``resources`` section, outside the experiment, so they enter no config hash and no job's settings
        digest: the number of GPUs that train a block does not change what it learns (dblocks.train draws
        the same global batch on every rank). A CPU run, whose file-level ``resources.gpu`` is 0 (tiny,
        smoke), trains every job in one process without a GPU: an experiment's own gpu and gpu_model are
        ignored there, so an overlay such as params/smoke.yaml keeps its base's GPU experiments on the CPU."""
        base = {k: v for k, v in self.resources.items() if k != "experiments"}
        merged = {**base, **self.resources.get("experiments", {}).get(exp, {})}
        if not base["gpu"]:
            merged["gpu"] = 0
            merged.pop("gpu_model", None)
        return merged

    def ranks(self, exp: str) -> int:
        """Processes of each training job of ``exp``: one per GPU (torchrun, data parallel), else one."""
        return max(1, self.training_resources(exp)["gpu"])

    def encoder(self, dataset: str) -> str | None:
        """The autoencoder named for a latent dataset (``autoencoders:``), or None: its default."""
        return self.raw.get("autoencoders", {}).get(dataset)

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

    def replicate_of(self, exp: str) -> str:
        """The experiment whose seed ``exp`` repeats (``pipeline.seeds``); itself if it is not a repeat."""
        return self.experiments[exp]["pipeline"].get("replicate_of", exp)

    def replicates(self, exp: str) -> list[str]:
        """``exp`` and the experiments that repeat it with the other seeds of ``pipeline.seeds``, in seed order."""
        return [name for name in self.experiments if self.replicate_of(name) == exp]

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
            fid = {
                "fid_features": self.evaluation["fid_features"],
                "fid_reference": ["test", "train"],
                "reference_samples": self.evaluation.get("reference_samples"),
            }
        return command_settings(options, config, self.hash(judge) if judge else None, fid)

    def evaluate_options(self, exp: str) -> dict:
        """What ``dblocks evaluate --params FILE`` takes from this file for a model of ``exp``: the scale label,
        the options of its task's evaluation protocol (generation: ``evaluation.samples``, ``sample_steps``,
        ``evaluations``, ``fid_batch_size``; text: ``evaluation.text``, and for the masked LM ``sample_steps``)
        and the experiment's current ``sample`` settings (guidance, sampling batch), which win over those
        recorded in the model at training time."""
        config, evaluation = self.experiments[exp], self.evaluation
        options: dict = {"scale": self.scale, "sample": dict(config["sample"])}
        if config["task"] == "generation":
            options.update(
                {
                    k: evaluation[k]
                    for k in ("samples", "sample_steps", "evaluations", "fid_batch_size")
                    if k in evaluation
                }
            )
        elif config["task"] in TEXT_TASKS:
            options.update(self.text_evaluation)
            if config["task"] == "masked_text" and "sample_steps" in evaluation:  # its unmasking steps
                options["sample_steps"] = evaluation["sample_steps"]
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


def _has(mapping: dict, parts: list[str]) -> bool:
    """Whether the nested mapping holds a value at this key path (the empty path: the mapping itself)."""
    for part in parts:
        if not isinstance(mapping, dict) or part not in mapping:
            return False
        mapping = mapping[part]
    return True


def is_pipeline_file(data: dict) -> bool:
    """A params file's contents: a pipeline file (``experiments:``, or an overlay's ``base:``), or a single
    hand-run experiment mapping."""
    return "experiments" in data or "base" in data


def scale_of(path: str | Path) -> str | None:
    """The scale label of a pipeline params file (its own or its base's); None for a single-experiment file."""
    return Params.load(path, "--config").scale if is_pipeline_file(read_yaml_mapping(path, "--config")) else None


def experiment_config(path: str | Path, experiment: str | None = None, overrides: list[dict] | None = None) -> dict:
    """One resolved experiment for a command's ``--config FILE [--experiment NAME]`` and its overrides.

    A pipeline params file (``experiments:``, or an overlay's ``base:``) is loaded and validated whole through :meth:`Params.load`, so a
    job sees exactly the configuration the workflow validated. A file holding a single experiment mapping
    (the hand-run form) is resolved on its own."""
    data = read_yaml_mapping(path, "--config")
    if not is_pipeline_file(data):
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
