"""What one training job optimises, for every method the pipeline trains: DiffusionBlocks' block-wise,
paper (shared-stem) and end-to-end jobs with the objectives of :mod:`dblocks.train`, the block-local baselines
with those of :mod:`dblocks.baselines.jobs`. A module above both: the baselines train with dblocks.train's
loop, so the dispatch to them cannot live there."""

from __future__ import annotations

from torch import nn

from dblocks.baselines.jobs import training_job as local_job
from dblocks.config import LOCAL_METHODS
from dblocks.train import (
    Objective,
    block_objective,
    cross_entropy_objective,
    denoising_objective,
    next_token_objective,
    paper_mode_objective,
    recurrent_objective,
)


def training_job(exp, method: str, block: int | None = None) -> tuple[nn.Module, Objective, int]:
    """What one training job optimises, as (module, objective, optimizer steps), for an Experiment:
    block ``block`` alone (block-wise), the end-to-end baseline, or the paper's shared-stem mode, which
    samples one block per step and so takes B x the steps to give every block the baseline's updates."""
    cfg = exp.config["train"]
    max_w = cfg["max_loss_weight"]
    stratified = cfg["time_sampling"] == "stratified"
    if method == "blockwise":
        model = exp.block(block)  # this block only: no other block is built, loaded or touched
        return model, block_objective(model, exp.partition, block, max_w, stratified), cfg["steps"]
    if method == "paper":
        model = exp.shared_blocks()
        return model, paper_mode_objective(model, max_w, stratified), cfg["steps"] * exp.partition.blocks
    if method == "e2e":
        model = exp.e2e()
        if exp.config["task"] == "classification":
            return model, cross_entropy_objective(model), cfg["steps"]
        if exp.config["task"] == "ar_text":
            return model, next_token_objective(model), cfg["steps"]
        if exp.config["task"] == "recurrent_text":
            spec = exp.arch.spec
            return model, recurrent_objective(model, spec.recurrence, spec.backprop_depth, spec.width), cfg["steps"]
        full = exp.full_range
        return (
            model,
            denoising_objective(model, lambda n, g: full.sample_sigma(1, n, generator=g, stratified=stratified), max_w),
            cfg["steps"],
        )
    if method in LOCAL_METHODS:  # the paper's block-local baselines: NoProp-DT's block or head, CT, FM, FF
        return local_job(exp, method, block)
    raise ValueError(f"unknown method {method!r}; allowed: blockwise, e2e, paper, {', '.join(LOCAL_METHODS)}")
