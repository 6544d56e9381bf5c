"""Evaluation of an assembled (or end-to-end) model: accuracy for classifiers; samples, a sample grid,
FID and sampling cost for generators. Each returns a flat record of numbers and labels that the CLI
writes as JSON and logs to MLflow."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dblocks.blocks import AssembledModel, BlockDenoiser
from dblocks.data import ImageDataset
from dblocks.experiment import Experiment
from dblocks.sample import classify, classify_direct, generate, save_grid


def as_assembled(model: AssembledModel | BlockDenoiser, exp: Experiment) -> AssembledModel:
    """An end-to-end denoiser is one block that owns the whole sigma range."""
    return model if isinstance(model, AssembledModel) else AssembledModel([model], exp.full_range)


def layer_evaluations(model: AssembledModel, grid: list[float], guided: bool) -> int:
    """Transformer layers run per sample along ``grid``: each step runs only its block's layers."""
    depth = [len(b.layers) for b in model.blocks]
    per_pass = sum(depth[model.block_for(s) - 1] for s in grid[:-1])
    return per_pass * (2 if guided else 1)


def evaluate_classifier(model, exp: Experiment, data: ImageDataset, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    if isinstance(model, AssembledModel):
        preds = classify(model, data.images, torch.Generator().manual_seed(seed))
        evals = layer_evaluations(model, list(reversed(model.partition.boundaries)), guided=False)
    else:  # the end-to-end baseline: a plain forward pass
        preds = classify_direct(model, data.images)
        evals = len(model.layers)
    return {"accuracy": (preds == data.labels).float().mean().item(), "examples": len(data),
            "eval_seconds": round(time.perf_counter() - t0, 3), "layer_evals_per_sample": evals}


def class_balanced_samples(model, exp: Experiment, samples: int, steps: int, seed: int = 0,
                           guidance: float | None = None, progress: bool = False):
    """``samples`` images whose labels cycle through the classes, from ``steps`` Euler steps on the
    equal-mass grid; returns (images, the routing model, the grid, seconds)."""
    model = as_assembled(model, exp)
    device = next(model.parameters()).device
    guidance = exp.config["sample"]["guidance"] if guidance is None else guidance
    grid = exp.noise.quantile_grid(steps)
    labels = torch.arange(samples) % exp.arch.num_classes
    t0 = time.perf_counter()
    images = generate(model.to(device), labels, grid, torch.Generator().manual_seed(seed), guidance=guidance,
                      null_label=exp.arch.num_classes, batch_size=exp.config["sample"]["batch_size"],
                      progress=progress)
    return images, model, grid, time.perf_counter() - t0


def save_class_grid(images: torch.Tensor, exp: Experiment, path: Path) -> None:
    """Labels cycle 0..C-1, so each grid row holds one sample of every class (at most 10 rows and 10
    columns: ImageNet's 1000 classes show their first 10). Small images are upscaled 4x."""
    per_row = min(exp.arch.num_classes, 10)
    rows = max(1, min(10, len(images) // exp.arch.num_classes))
    picked = torch.cat([images[r * exp.arch.num_classes:][:per_row] for r in range(rows)])
    save_grid(picked, path, nrow=per_row, scale=4 if images.shape[-1] <= 32 else 1)


def evaluate_generator(model, exp: Experiment, reference: ImageDataset | None, *, features: str | Path,
                       samples: int, steps: int, grid_path: Path | None, seed: int = 0, progress: bool = False,
                       reference_stats: dict[str, Path] | None = None, evaluations: int = 1,
                       batch_size: int = 256, decode=None) -> dict:
    """Class-balanced samples from ``steps`` Euler steps, FID and the sampling cost.

    ``features`` is a digits feature net (``.safetensors``: domain FID, the tiny scale) or converted
    Inception weights (``.pth``: the paper's FID). With ``reference_stats`` ({split: cached statistics
    file}, e.g. train and test) the paper's protocol runs: ``evaluations`` independent sample sets (seeds
    ``seed``, ``seed + 1``, ...), each scored against every split, and ``fid_<split>`` is the best (lowest)
    of them; every evaluation's value is kept in ``fid_<split>_all``. Without it, the sample sets are
    scored against the images of ``reference`` (one split). ``fid`` is the test FID when there is one. ``decode`` turns
    samples into images first (a latent dataset's VAE decoder, :func:`dblocks.data.latents.decoder_for`)."""
    from dblocks.metrics.reference import (FeatureSpace, fid_from_statistics, image_statistics,
                                           load_reference_statistics)

    if evaluations < 1:
        raise ValueError(f"evaluations must be >= 1, got {evaluations}")
    space = FeatureSpace.from_weights(features)
    if reference_stats:
        refs = {split: load_reference_statistics(path)[0] for split, path in reference_stats.items()}
    else:
        ref_images = decode(reference.images) if decode is not None else reference.images
        refs = {reference.split: image_statistics(ref_images, space, batch_size, progress)}
    scores: dict[str, list[float]] = {split: [] for split in refs}
    seconds = []
    for i in range(evaluations):
        images, routed, grid, sample_seconds = class_balanced_samples(model, exp, samples, steps, seed + i,
                                                                      progress=progress)
        seconds.append(sample_seconds)
        if decode is not None:
            images = decode(images)
        if i == 0:
            calls = list(routed.calls)  # one evaluation's block calls (the counters keep running)
            if grid_path is not None:
                save_class_grid(images, exp, grid_path)
        generated = image_statistics(images, space, batch_size, progress)
        for split, ref in refs.items():
            scores[split].append(fid_from_statistics(generated, ref))
    best = {f"fid_{split}": min(values) for split, values in scores.items()}
    headline = best.get("fid_test", next(iter(best.values())))
    guidance = exp.config["sample"]["guidance"]
    reference_name = reference.name if reference is not None else exp.config["dataset"]
    return {"fid": headline, **best, **{f"fid_{split}_all": v for split, v in scores.items()},
            "fid_label": space.label, "fid_reference": f"{reference_name} {', '.join(refs)}",
            "evaluations": evaluations, "samples": samples, "sample_steps": steps, "guidance": guidance,
            "sample_seconds": round(sum(seconds) / len(seconds), 3),
            "sample_seconds_per_sample": sum(seconds) / len(seconds) / samples,
            "block_calls": calls,
            "layer_evals_per_sample": layer_evaluations(routed, grid, guided=guidance != 1.0)}
