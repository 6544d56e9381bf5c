"""Checks of what a user hands a command or a library entry point (paths, devices, model files, FID features),
each failing with a one-line :class:`~dblocks.errors.UsageError` that names the option at fault, before any
work starts."""

from __future__ import annotations

from pathlib import Path

from dblocks.config import UNKNOWN_SCALE
from dblocks.errors import CheckpointError, UsageError

# torch, the models and the FID networks are imported inside the functions that need them: the CLI imports
# this module to check the inputs of commands that need none of them.


def device_for(exp):
    """The torch device of ``exp``'s ``device`` setting (auto: CUDA where there is one)."""
    import torch

    name = exp.config["device"]
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; allowed: auto, cpu")
    return torch.device(name)


def output_path(path: str, suffix: str, option: str = "--out") -> Path:
    p = Path(path)
    if p.suffix != suffix:
        raise UsageError(f"{option} {path}: must end in {suffix}")
    return p


def existing_files(paths: list[str], option: str) -> list[Path]:
    for p in paths:
        if not Path(p).is_file():
            raise UsageError(f"{option} {p}: file not found")
    return [Path(p) for p in paths]


def existing_dir(path: str | None, option: str) -> None:
    if path is not None and not Path(path).is_dir():
        raise UsageError(f"{option} {path}: directory not found")


def load_model_arg(model: str, option: str, weights: str | None = None):
    """(model, experiment, metadata) of a model file given as ``option``."""
    from dblocks.assemble import load_model

    (path,) = existing_files([model], option)
    try:
        return load_model(path, weights=weights)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None


def recorded(model: str, option: str) -> tuple[dict, str]:
    """A model's config and scale label from its JSON record alone (no tensor is read)."""
    from dblocks.checkpoint import load_metadata

    (path,) = existing_files([model], option)
    try:
        meta = load_metadata(path)
        return meta["config"], meta.get("scale", UNKNOWN_SCALE)
    except (CheckpointError, KeyError) as exc:
        raise UsageError(f"{option} {model}: {exc}") from None


def feature_space(path: str):
    """--features: a digits feature net or converted Inception weights, told apart by their record."""
    from dblocks.metrics.reference import FeatureSpace

    existing_files([path], "--features")
    try:
        return FeatureSpace.from_weights(path)
    except CheckpointError:
        raise
    except ValueError as exc:
        raise UsageError(f"--features {exc}") from None
