"""Experiment configuration: defaults, loading from a params file, dotted overrides, validation and the
config hash that ties block checkpoints to the exact configuration that produced them.

Validation happens before any work starts and fails with one line naming the key and what is allowed.
The JSON schema (``schema/experiment.schema.json``) checks types, ranges and enumerations; the checks in
``validate`` cover what a schema cannot express (registry names, layer split vs depth and B)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from dblocks.errors import ConfigError
from dblocks.models import ARCHITECTURES, get_arch
from dblocks.noise import layer_split

DEFAULTS: dict[str, Any] = {
    "name": None,  # derived from arch and dataset when not given
    "task": "classification",
    "arch": "ViT-tiny",
    "dataset": "digits",
    "data_root": None,
    "blocks": 3,
    "partition": "equiprobable",
    "overlap": 0.05,
    "layer_split": None,
    "seed": 0,
    "device": "auto",
    "noise": {"p_mean": -1.2, "p_std": 1.2, "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5},
    "train": {
        "steps": 1500,
        "batch_size": 128,
        "batch_per_device": None,
        "lr": 5e-4,
        "weight_decay": 0.0,
        "warmup": 50,
        "schedule": "cosine",
        "min_lr": None,
        "augment": "none",
        "ema_decay": 0.0,
        "ema_rampup": 0.05,
        "precision": "fp32",
        "tf32": True,
        "grad_clip": 1.0,
        "max_loss_weight": None,
        "time_sampling": "iid",
        "checkpoint_every": 250,
        "log_every": 25,
    },
    "sample": {"steps": 50, "guidance": 2.0, "num_images": 64, "batch_size": 256, "seed": 0, "weights": "auto"},
}

#: which trained weights a model is loaded with (sample.weights, --weights): auto = the weight average where
#: training kept one (train.ema_decay > 0), else the raw weights. Kept here so the CLI's parser needs no torch.
WEIGHTS = ("auto", "ema", "raw")


def chosen_weights(asked: str | None, sample: dict) -> str:
    """The weights to load: ``asked`` (--weights), else the sample section's ``weights`` (records written
    before that setting existed: auto)."""
    return asked or sample.get("weights", "auto")


#: the scale label of a model or run whose params file said none (a bare CLI job without --config or --track)
UNKNOWN_SCALE = "unknown"

#: keys that do not change what a block learns; left out of the config hash
UNHASHED_KEYS = ("device", "data_root", "sample", "pipeline")

TASK_FAMILY = {
    "classification": "vit",
    "generation": "dit",
    "masked_text": "mdm",
    "ar_text": "ar",
    "recurrent_text": "huginn",
}
#: tasks whose data is text (the others read images)
TEXT_TASKS = ("masked_text", "ar_text", "recurrent_text")
#: the text data sets a params file may name (loaded by dblocks.data.text); every other dataset is images.
#: Kept here, not in dblocks.data, so that validating params never imports torch.
TEXT_DATASETS = ("shakespeare", "text8", "lm1b", "openwebtext")
#: image datasets whose examples are autoencoder latents (dblocks.data.latents): samples are decoded to
#: images before FID, and prepared splits hold float latents with their scale. Kept here for the same reason.
LATENT_DATASETS = ("imagenet256", "digits-latent")
#: latent datasets whose prepare step trains the autoencoder that encodes them (imagenet256 uses the
#: pretrained sd-vae-ft-ema instead); the autoencoder is written beside the prepared splits as
#: AUTOENCODER_FILE, so the pipeline and DVC version it with the latents it made and evaluation decodes with it.
TRAINED_AUTOENCODER_DATASETS = ("digits-latent",)
#: datasets whose generated samples are 8x8 digits (digits-latent: once decoded), which a held-out digit
#: classifier judges (dblocks.metrics.class_agreement); kept here so the tables know without importing torch
JUDGED_DATASETS = ("digits", "digits-latent")
#: datasets whose prepare step encodes straight into shards (``<data>/prepared/<dataset>/SHARD_DIR/``, listed and
#: hashed in each split's record: dblocks.data.prepared): ImageNet's 1.28M latents and their mirrored twins,
#: ~42 GB, never held in memory at once. Kept here so the workflow declares the shards without importing torch.
SHARDED_DATASETS = ("imagenet256",)
SHARD_DIR = "shards"
AUTOENCODER_FILE = "autoencoder.safetensors"

#: what ``pipeline.methods`` may name: DiffusionBlocks' own methods (block-wise, end-to-end baseline, the paper's
#: shared-stem mode) and the paper's block-local baselines (dblocks.baselines: NoProp-DT / CT / FM of Table 6,
#: Forward-Forward of Table 1). A baseline trains its own network with its own recipe (the experiment's arch and
#: train section), so an experiment holds block-local methods alone, never beside the DiffusionBlocks ones.
DIFFUSION_METHODS = ("blockwise", "e2e", "paper")
NOPROP_METHODS = ("noprop-dt", "noprop-ct", "noprop-fm")
LOCAL_METHODS = (*NOPROP_METHODS, "forward-forward")
METHODS = (*DIFFUSION_METHODS, *LOCAL_METHODS)
#: block-local methods trained as several independent jobs: NoProp-DT's T blocks (``blocks`` = T) and its head
SPLIT_METHODS = ("noprop-dt",)
#: NoProp's networks (dblocks.baselines.noprop.NOPROP_ARCHITECTURES, which a test keeps equal to this): the
#: names are kept here so that validating params never imports torch
NOPROP_ARCHS = ("NoProp-paper", "NoProp-tiny")
#: the pixel datasets a NoProp network reads (its convolutional stages halve 8x8 or 32x32 images three times)
NOPROP_DATASETS = ("digits", "cifar10", "cifar100")


def _schema() -> dict:
    return json.loads(resources.files("dblocks").joinpath("schema/experiment.schema.json").read_text())


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict:
    """``train.lr=1e-3`` -> {"train": {"lr": 0.001}}; the value is parsed as YAML (numbers, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    out: dict = {}
    cursor = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return out


def read_yaml_mapping(path: str | Path, option: str) -> dict:
    """A YAML file whose top level is a mapping; problems are reported against the option that named it."""
    path = Path(path)
    named = f"{option}{'' if option.endswith('=') else ' '}{path}"
    if not path.is_file():
        raise ConfigError(f"{named}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{named}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{named}: expected a mapping at the top level")
    return data


def pick_experiment(data: dict, path: str | Path, experiment: str | None = None) -> dict:
    """One experiment's unresolved settings from a params file's contents.

    A file holds either one experiment mapping, or ``experiments: {name: mapping}`` (with an optional
    ``defaults:`` mapping merged under each), from which ``experiment`` picks one."""
    if "experiments" not in data:
        if experiment is not None and data.get("name", experiment) != experiment:
            raise ConfigError(f"--experiment {experiment!r}: {path} holds only {data.get('name')!r}")
        return data
    experiments = data["experiments"] or {}
    if experiment is None:
        if len(experiments) != 1:
            raise ConfigError(f"--experiment is required: {path} defines {', '.join(experiments)}")
        experiment = next(iter(experiments))
    if experiment not in experiments:
        raise ConfigError(f"--experiment {experiment!r}: not in {path}; allowed: {', '.join(experiments)}")
    return deep_merge(data.get("defaults") or {}, {**(experiments[experiment] or {}), "name": experiment})


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def describe_error(error: jsonschema.ValidationError) -> str:
    key = _key_path(error)
    schema = error.schema
    if error.validator == "enum":
        return f"{key}={error.instance!r} is not allowed; allowed: {', '.join(map(str, error.validator_value))}"
    if error.validator == "additionalProperties":
        allowed = ", ".join(sorted(schema.get("properties", {})))
        return f"{key}: unknown key ({error.message.split('(')[-1].rstrip(')')}); allowed keys: {allowed}"
    bounds = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
    if error.validator in bounds:
        return f"{key}={error.instance!r} is out of range; allowed: {bounds[error.validator]} {error.validator_value}"
    if error.validator == "type":
        return f"{key}={error.instance!r} has the wrong type; allowed: {error.validator_value}"
    if error.validator == "pattern":
        return f"{key}={error.instance!r} is malformed; allowed: {schema.get('description', error.validator_value)}"
    return f"{key}: {error.message}"


def non_finite(value: Any, key: str = "") -> tuple[str, float] | None:
    """The first NaN or infinite number in a nested mapping/list, as (dotted key, value), or None.

    JSON schema bounds cannot catch them (every comparison with NaN is false), and YAML spells them
    ``.nan`` / ``.inf``; a NaN learning rate would otherwise train garbage without a word."""
    if isinstance(value, float) and not math.isfinite(value):
        return key or "(value)", value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = non_finite(v, f"{key}.{k}" if key else str(k))
        if found:
            return found
    return None


def check_finite(data: Any, where: str = "") -> None:
    found = non_finite(data)
    if found:
        key, value = found
        raise ConfigError(f"{where}{key}={value} is not a finite number; allowed: a finite number")


def validate(config: dict) -> dict:
    """Raise ConfigError (first problem, one line) or return the config unchanged."""
    check_finite(config)
    errors = sorted(
        jsonschema.Draft202012Validator(_schema()).iter_errors(config),
        key=lambda e: (len(e.absolute_path), _key_path(e)),
    )
    if errors:
        raise ConfigError(describe_error(errors[0]))
    if config["arch"] in NOPROP_ARCHS:  # NoProp's own network: not a transformer of the registry
        return _validate_noprop(config)
    if config["arch"] not in ARCHITECTURES:
        raise ConfigError(
            f"arch={config['arch']!r} is not a registered architecture; "
            f"allowed: {', '.join([*ARCHITECTURES, *NOPROP_ARCHS])}"
        )
    spec = get_arch(config["arch"])
    family = TASK_FAMILY[config["task"]]
    if spec.family != family:
        allowed = [n for n, s in ARCHITECTURES.items() if s.family == family]
        raise ConfigError(
            f"arch={config['arch']!r} is a {spec.family} model but task={config['task']!r} "
            f"needs one of: {', '.join(allowed)}"
        )
    text_task, text_data = config["task"] in TEXT_TASKS, config["dataset"] in TEXT_DATASETS
    if text_task != text_data:
        datasets = _schema()["properties"]["dataset"]["enum"]
        allowed = TEXT_DATASETS if text_task else [d for d in datasets if d not in TEXT_DATASETS]
        raise ConfigError(
            f"dataset={config['dataset']!r} does not fit task={config['task']!r}; allowed: {', '.join(allowed)}"
        )
    augment = config["train"]["augment"]
    allowed_augment = ("none",) if text_task else ("none", "flip") if config["dataset"] in LATENT_DATASETS else None
    if allowed_augment and augment not in allowed_augment:
        raise ConfigError(
            f"train.augment={augment!r} does not apply to dataset={config['dataset']!r}; "
            f"allowed: {', '.join(allowed_augment)}"
        )
    min_lr = config["train"]["min_lr"]
    if min_lr is not None and min_lr > config["train"]["lr"]:
        raise ConfigError(
            f"train.min_lr={min_lr} is above train.lr={config['train']['lr']}; allowed: 0 <= min_lr <= lr"
        )
    if config["task"] == "recurrent_text" and config["blocks"] != 1:
        raise ConfigError(
            f"blocks={config['blocks']}: a recurrent-depth model is one denoiser (its K iterations "
            f"are K Euler steps of the same block); allowed: 1"
        )
    noise = config["noise"]
    if noise["sigma_min"] >= noise["sigma_max"]:
        raise ConfigError(f"noise.sigma_min={noise['sigma_min']} must be below noise.sigma_max={noise['sigma_max']}")
    if config["blocks"] > spec.depth:
        raise ConfigError(
            f"blocks={config['blocks']} exceeds the depth of {config['arch']} "
            f"({spec.depth} layers); allowed: 1..{spec.depth}"
        )
    try:
        layer_split(spec.depth, config["blocks"], config["layer_split"])
    except ValueError as exc:
        raise ConfigError(f"layer_split: {exc}") from None
    return config


def _validate_noprop(config: dict) -> dict:
    """An experiment on NoProp's network (``arch`` in :data:`NOPROP_ARCHS`): a classifier of pixel images whose
    ``blocks`` is NoProp's T (DT's independent blocks, CT's and FM's inference steps), trained by NoProp methods
    only (see :func:`check_method`)."""
    if config["task"] != "classification":
        raise ConfigError(
            f"arch={config['arch']!r} is NoProp's classifier but task={config['task']!r}; allowed: classification"
        )
    if config["dataset"] not in NOPROP_DATASETS:
        raise ConfigError(
            f"dataset={config['dataset']!r} does not fit arch={config['arch']!r} (NoProp's "
            f"convolutional network of pixel images); allowed: {', '.join(NOPROP_DATASETS)}"
        )
    methods = (config.get("pipeline") or {}).get("methods") or []
    for i, method in enumerate(methods):
        if method not in NOPROP_METHODS:
            raise ConfigError(
                f"pipeline.methods.{i}={method!r} cannot train arch={config['arch']!r} (NoProp's "
                f"network); allowed: {', '.join(NOPROP_METHODS)}"
            )
    return config


def check_method(config: dict, method: str) -> None:
    """Whether ``method`` (a ``pipeline.methods`` value, or ``train-local --method``) can train ``config``'s
    experiment: one line naming the key and what is allowed, else nothing. NoProp's methods train NoProp's
    network; Forward-Forward trains a ViT of the registry, in ``blocks`` units of equally many layers."""
    if method not in METHODS:
        raise ConfigError(f"method {method!r} is not allowed; allowed: {', '.join(METHODS)}")
    arch = config["arch"]
    if method in NOPROP_METHODS and arch not in NOPROP_ARCHS:
        raise ConfigError(
            f"arch={arch!r}: method {method} trains NoProp's own network; allowed: {', '.join(NOPROP_ARCHS)}"
        )
    if method not in NOPROP_METHODS and arch in NOPROP_ARCHS:
        raise ConfigError(
            f"arch={arch!r} is NoProp's network; method {method} cannot train it; allowed: {', '.join(NOPROP_METHODS)}"
        )
    if method == "forward-forward":
        spec = get_arch(arch)
        if config["task"] != "classification" or spec.family != "vit":
            vits = [n for n, s in ARCHITECTURES.items() if s.family == "vit"]
            raise ConfigError(
                f"arch={arch!r}, task={config['task']!r}: Forward-Forward classifies with a ViT; "
                f"allowed: task classification with arch {', '.join(vits)}"
            )
        if spec.depth % config["blocks"] or config["layer_split"] is not None:
            divisors = [d for d in range(1, spec.depth + 1) if spec.depth % d == 0]
            raise ConfigError(
                f"blocks={config['blocks']}, layer_split={config['layer_split']}: Forward-Forward "
                f"trains blocks units of equally many of the {spec.depth} layers of {arch}, each on "
                f"its own goodness; allowed: blocks in {', '.join(map(str, divisors))} and no "
                f"layer_split"
            )


def resolve(params: dict | None = None, overrides: list[dict] | None = None) -> dict:
    """Defaults <- params file <- overrides, validated."""
    config = deep_merge(DEFAULTS, params or {})
    for update in overrides or []:
        config = deep_merge(config, update)
    if config["name"] is None:
        config["name"] = f"{config['arch']}-{config['dataset']}".replace("/", "").lower()
    return validate(config)


#: train settings that change how a step is computed, not what it computes: left out of the config hash too,
#: so a finished block is not retrained because its job now splits the global batch differently
UNHASHED_TRAIN_KEYS = ("batch_per_device",)

#: train settings added after checkpoints were first written, left out of the hash while they hold the value
#: that does what the code did before them: a workspace's finished blocks keep their hashes (and are not
#: retrained) when the code gains an option they do not use
LATER_TRAIN_DEFAULTS = {"time_sampling": "iid"}


def config_hash(config: dict) -> str:
    hashed = {k: v for k, v in config.items() if k not in UNHASHED_KEYS}
    if isinstance(hashed.get("train"), dict):
        hashed["train"] = {
            k: v
            for k, v in hashed["train"].items()
            if k not in UNHASHED_TRAIN_KEYS and LATER_TRAIN_DEFAULTS.get(k, object()) != v
        }
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16]
