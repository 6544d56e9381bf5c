"""The block-local baselines as pipeline jobs: what ``dblocks train-local`` trains and ``dblocks evaluate-local``
assembles and scores, for an experiment whose ``pipeline.methods`` names them (``dblocks.config.LOCAL_METHODS``).

An experiment of a baseline is the baseline's own network and recipe: ``arch`` (``NoProp-paper`` /
``NoProp-tiny`` for NoProp, a ViT of the registry for Forward-Forward), ``train`` (its optimizer, steps and
batch, trained by the project's one loop, :func:`dblocks.train.train`: same schedule, NaN guard, resumable
state and timings as a DiffusionBlocks block) and ``blocks``, the method's unit of independence:

* ``noprop-dt``: ``blocks`` = NoProp's T. T block jobs (``part`` 1..T, each builds, trains and saves its block
  alone) and one head job (``part`` ``"head"``: the linear head on z_T ~ q(z_T | y), T x ``train.steps`` steps,
  see :func:`dblocks.baselines.noprop.train_noprop_head`); nothing passes between them.
* ``noprop-ct``, ``noprop-fm``: one job (``part`` None); ``blocks`` = T, the inference steps.
* ``forward-forward``: one job (``part`` None) training ``blocks`` units of depth / blocks ViT layers, each on its
  own goodness (every unit's input detached).

Every job's initial weights and draws come from the experiment's seed and the job alone
(:func:`dblocks.experiment.derive_seed`), so a job's result does not depend on which other jobs ran. Its
checkpoint (safetensors + JSON, atomic) records the training's time and memory per step (``_train_summary`` of
the CLI: ``train_seconds``, ``steps_run``, ``peak_memory_mb``, ``train_memory_mb``), which the evaluation reports
beside the accuracy."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dblocks.baselines import evaluate_accuracy, load_state, noprop, save_state, seeded, state_of
from dblocks.baselines import forward_forward as ff
from dblocks.checkpoint import load_metadata
from dblocks.config import LOCAL_METHODS, NOPROP_METHODS, SPLIT_METHODS, check_method, config_hash
from dblocks.errors import CheckpointError, ConfigError
from dblocks.experiment import DATASET_SHAPES, Experiment, derive_seed
from dblocks.models import get_arch
from dblocks.pipeline import HEAD
from dblocks.train import Objective

#: the checkpoint kind of a baseline's trained part (DiffusionBlocks' are "block" and "e2e")
KIND = "local"


def parts(method: str, blocks: int) -> list[int | str | None]:
    """The training jobs of a method, by part: NoProp-DT's blocks 1..T and its head; one job (None) else."""
    if method in SPLIT_METHODS:
        return [*range(1, blocks + 1), HEAD]
    return [None]


def part_name(part: int | str | None) -> str:
    """``block-<b>``, ``head`` or ``model``: the file stem of a part's checkpoint."""
    return "model" if part is None else HEAD if part == HEAD else f"block-{part}"


def noprop_spec(config: dict) -> noprop.NoPropSpec:
    """The experiment's NoProp network, its T (``steps``) set by ``blocks``."""
    return dataclasses.replace(noprop.get_noprop(config["arch"]), steps=config["blocks"])


def units(config: dict) -> int:
    """Forward-Forward: the layers per unit (``blocks`` units of the ViT's depth)."""
    return get_arch(config["arch"]).depth // config["blocks"]


def check_part(config: dict, method: str, part: int | str | None) -> None:
    """One line naming the option and what is allowed, if ``part`` is not a job of ``method``."""
    check_method(config, method)
    allowed = parts(method, config["blocks"])
    if part not in allowed:
        names = f"--block 1..{config['blocks']} or --head" if method in SPLIT_METHODS else "neither --block nor --head"
        given = "--head" if part == HEAD else f"--block {part}" if part is not None else "no part"
        raise ConfigError(
            f"{given}: {method} trains {len(allowed)} job{'s' * (len(allowed) > 1)} "
            f"(blocks={config['blocks']}); allowed: {names}"
        )


def _build(config: dict, method: str, part: int | str | None) -> nn.Module:
    """A part's freshly initialised network (the weights a new job starts from)."""
    (shape, classes) = DATASET_SHAPES[config["dataset"]]
    with seeded(derive_seed(config["seed"], "init-local", method, part_name(part))):
        if method == "noprop-dt":
            spec = noprop_spec(config)
            return noprop.dt_head(classes) if part == HEAD else noprop.dt_block(spec, shape, classes)
        if method in NOPROP_METHODS:
            return noprop.CONTINUOUS[method.split("-")[1]](noprop_spec(config), shape, classes)
        try:
            return ff.ForwardForwardViT(config["arch"], shape, classes, layers_per_unit=units(config))
        except ValueError as exc:  # e.g. more classes than the label token's width
            raise ConfigError(f"arch={config['arch']!r}, dataset={config['dataset']!r}: {exc}") from None


def training_job(exp: Experiment, method: str, part: int | str | None) -> tuple[nn.Module, Objective, int]:
    """(module, objective, optimizer steps) of one baseline job, as :func:`dblocks.jobs.training_job` gives
    them for DiffusionBlocks' jobs: NoProp-DT's block ``part`` alone (its term of the ELBO) or its head
    (cross-entropy on z_T, T x ``train.steps``), NoProp-CT / FM's whole objective, Forward-Forward's units."""
    config = exp.config
    check_part(config, method, part)
    module, steps = _build(config, method, part), config["train"]["steps"]
    if method == "noprop-dt":
        spec = noprop_spec(config)
        if part == HEAD:
            return module, noprop.dt_head_objective(module, spec.steps), steps * spec.steps
        return module, noprop.dt_block_objective(module, int(part), spec.steps), steps
    return module, Objective(module.loss, module.draw), steps


def save_part(
    path: Path,
    module: nn.Module,
    exp: Experiment,
    method: str,
    part: int | str | None,
    step: int,
    extra: dict | None = None,
) -> dict:
    """A trained part as a checkpoint (safetensors + JSON record, atomic); returns the record as written."""
    from dblocks.assemble import provenance

    meta = {
        **provenance(exp),
        "kind": KIND,
        "method": method,
        "part": part_name(part),
        "block": part if isinstance(part, int) else None,
        "blocks": exp.config["blocks"],
        "step": step,
        **(extra or {}),
    }
    return save_state(path, state_of(module), meta)


# ------------------------------------------------------------------------------------------ evaluation


def read_parts(paths: Sequence[str | Path]) -> tuple[dict, list[tuple[Path, dict]]]:
    """The checkpoints of one trained baseline, checked from their JSON records alone before any tensor is
    read: one experiment and config, one method, and exactly its parts (NoProp-DT: blocks 1..T and the head).
    Returns (config, [(path, record)] in part order). Problems name the file and the field."""
    records = []
    for path in map(Path, paths):
        meta = load_metadata(path)
        if meta.get("kind") != KIND or meta.get("method") not in LOCAL_METHODS:
            raise CheckpointError(
                path,
                f"is a {meta.get('kind')!r} checkpoint of method {meta.get('method')!r}, "
                f"not a block-local baseline's ({', '.join(LOCAL_METHODS)})",
                field="kind",
            )
        records.append((path, meta))
    if not records:
        raise ConfigError("no checkpoints given; allowed: the checkpoints of one trained baseline")
    ref_path, ref = records[0]
    for path, meta in records[1:]:
        for key in ("method", "config_hash"):
            if meta.get(key) != ref.get(key):
                raise CheckpointError(
                    path,
                    f"{key} is {meta.get(key)!r} but {ref_path} has {ref.get(key)!r}; the "
                    f"parts must come from one experiment, config and method",
                    field=key,
                )
    config, method = ref["config"], ref["method"]
    if config_hash(config) != ref["config_hash"]:
        raise CheckpointError(ref_path, "the recorded config does not hash to config_hash", field="config_hash")
    expected = [part_name(p) for p in parts(method, config["blocks"])]
    given = [meta.get("part") for _, meta in records]
    if sorted(given) != sorted(expected):
        raise ConfigError(
            f"checkpoints of {method} ({ref.get('experiment')}): parts {', '.join(map(str, given))} "
            f"given; allowed: exactly {', '.join(expected)}"
        )
    return config, sorted(records, key=lambda r: expected.index(r[1]["part"]))


def load_model(config: dict, records: list[tuple[Path, dict]]) -> nn.Module:
    """The trained baseline, assembled from its parts (:func:`read_parts`), each file's sha256 verified."""
    method = records[0][1]["method"]
    (shape, classes) = DATASET_SHAPES[config["dataset"]]
    states = [load_state(path)[0] for path, _ in records]
    if method == "noprop-dt":
        return noprop.noprop_dt(noprop_spec(config), shape, classes, states[:-1], states[-1])
    if method in NOPROP_METHODS:
        return noprop.noprop_continuous(method.split("-")[1], noprop_spec(config), shape, classes, states[0])
    return ff.forward_forward(config["arch"], shape, classes, states[0], layers_per_unit=units(config))


def training_cost(records: list[tuple[Path, dict]]) -> dict:
    """Time and memory per training step of a baseline's jobs, from their checkpoints' records: over the
    method's trained units (NoProp-DT's blocks; the model's one job otherwise) the mean milliseconds per
    optimizer step and the largest memory of one job (``train_memory_mb``, ``peak_memory_mb``: see
    :class:`dblocks.train.PeakMemory`), and what all jobs (NoProp-DT's head included) took together."""

    def per_step(meta: dict) -> float | None:
        if meta.get("seconds_per_step") is not None:  # as the job measured and logged it (MLflow: seconds_per_step)
            return 1000 * meta["seconds_per_step"]
        ran = meta.get("steps_run", meta.get("step", 0) - meta.get("resumed_from", 0))
        return 1000 * meta["train_seconds"] / ran if meta.get("train_seconds") is not None and ran else None

    units_ = [meta for _, meta in records if meta.get("part") != HEAD] or [meta for _, meta in records]
    out: dict = {
        "train_jobs": len(records),
        "train_seconds_total": round(sum(m.get("train_seconds") or 0.0 for _, m in records), 3),
    }
    times = [t for t in map(per_step, units_) if t is not None]
    if times:
        out["train_ms_per_step"] = statistics.fmean(times)
    for key in ("train_memory_mb", "peak_memory_mb"):
        values = [m[key] for m in units_ if m.get(key) is not None]
        if values:
            out[key] = max(values)
    if len(units_) > 1:
        out["train_ms_per_step_per_block"] = [per_step(m) for m in units_]
        out["train_memory_mb_per_block"] = [m.get("train_memory_mb") for m in units_]
    heads = [m for _, m in records if m.get("part") == HEAD]
    if heads:
        out["head_ms_per_step"] = per_step(heads[0])
        out["head_train_memory_mb"] = heads[0].get("train_memory_mb")
    return out


def evaluate(model: nn.Module, data, seed: int, device: torch.device) -> dict:
    """Test accuracy (the stochastic samplers' noise from ``seed``) and the time it took."""
    import time

    t0 = time.perf_counter()
    accuracy = evaluate_accuracy(model, data, seed=seed, device=device)
    return {"accuracy": accuracy, "examples": len(data), "eval_seconds": round(time.perf_counter() - t0, 3)}
