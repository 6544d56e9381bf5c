"""One training loop for every method. Block-wise, paper mode and end-to-end differ only in the
objective they pass in (which parameters it touches and which sigmas it draws); the loop itself owns
the optimizer, schedule, gradient clipping, NaN guard, progress bar and resumable state."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from dblocks import distributed
from dblocks.augment import augment
from dblocks.blocks import AssembledModel, BlockDenoiser
from dblocks.data import ImageDataset
from dblocks.data.text import TextDataset
from dblocks.ema import EMA
from dblocks.errors import CheckpointError, TrainingError
from dblocks.noise import Partition
from dblocks.optim import adamw
from dblocks.training_state import load_training_state, remove_training_state, save_training_state

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Objective:
    """What a training job minimises, in two parts so that a step's rows can be computed anywhere (on any
    rank of a data-parallel job, in any micro-batch) with the numbers one process would use: ``draw`` adds
    every random input of a step (noise levels, noise, the paper mode's block) to the whole global batch, from
    the job's generator; ``loss`` is the mean loss over the rows it is given and draws nothing."""

    loss: Callable[[Batch], torch.Tensor]
    draw: Callable[[Batch, torch.Generator], Batch] = lambda batch, gen: batch
    #: False where a step leaves some parameters without a gradient (the paper mode trains one block per
    #: step): DistributedDataParallel must then look for them every step
    every_parameter: bool = True

    def __call__(self, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        """One process's loss of a whole batch."""
        return self.loss(self.draw(batch, gen))


def rows_of(batch: Batch, rows: slice) -> Batch:
    """The same rows of every tensor of a batch (all are per example)."""
    return {k: v[rows] for k, v in batch.items()}


_STOPPED = (
    "stopped without writing a checkpoint (the last resume state, if any, predates the failure); "
    "allowed: a finite loss: lower train.lr, keep train.grad_clip or set train.max_loss_weight"
)


def denoising_objective(
    model: BlockDenoiser,
    sample_sigma: Callable[[int, torch.Generator], torch.Tensor],
    max_loss_weight: float | None = None,
) -> Objective:
    """lambda(sigma)-weighted denoising loss of one denoiser with sigma from ``sample_sigma``."""
    task = model.task

    def draw(batch: Batch, gen: torch.Generator) -> Batch:
        with torch.no_grad():
            y = task.target(batch)  # only its shape: the target may hold learned parameters (shared stem)
        sigma = sample_sigma(y.shape[0], gen).to(y.device)
        noise = task.draw_noise(y.shape, gen).to(y.device)
        return {**task.draw_inputs(batch, gen), "sigma": sigma, "noise": noise}

    def loss(batch: Batch) -> torch.Tensor:
        sigma = batch["sigma"]
        z = task.apply_noise(task.target(batch), sigma, batch["noise"])
        out = model(z, sigma, task.condition(batch))
        weight = task.loss_weight(sigma, max_loss_weight)
        return task.loss(out.raw, out.denoised, {**batch, "noisy": z}, weight)

    return Objective(loss, draw)


def block_objective(
    model: BlockDenoiser,
    partition: Partition,
    block: int,
    max_loss_weight: float | None = None,
    stratified: bool = False,
) -> Objective:
    """Independent block training: sigma from block b's (widened) interval only (``stratified``:
    :func:`dblocks.noise.uniform_draws`)."""
    return denoising_objective(
        model, lambda n, g: partition.sample_sigma(block, n, generator=g, stratified=stratified), max_loss_weight
    )


def paper_mode_objective(
    model: AssembledModel, max_loss_weight: float | None = None, stratified: bool = False
) -> Objective:
    """The paper's single process: each step picks one block uniformly and trains it (and the shared parts)."""
    partition = model.partition
    per_block = [
        block_objective(blk, partition, b, max_loss_weight, stratified) for b, blk in enumerate(model.blocks, 1)
    ]

    def draw(batch: Batch, gen: torch.Generator) -> Batch:
        b = int(torch.randint(partition.blocks, (1,), generator=gen))
        drawn = per_block[b].draw(batch, gen)
        # kept on the CPU, like every per-step choice: reading it back costs no device synchronisation
        return {**drawn, "block": torch.full((len(drawn["sigma"]),), b)}

    def loss(batch: Batch) -> torch.Tensor:
        return per_block[int(batch["block"][0])].loss(batch)

    return Objective(loss, draw, every_parameter=False)


def cross_entropy_objective(model: BlockDenoiser) -> Objective:
    """The ordinary end-to-end classifier: no noise, plain cross-entropy on the logits."""
    return Objective(lambda batch: F.cross_entropy(model.network(None, batch["image"], None), batch["label"]))


def next_token_objective(model: BlockDenoiser) -> Objective:
    """The ordinary end-to-end language model: clean tokens, causal mask, next-token cross-entropy."""

    def loss(batch: Batch) -> torch.Tensor:
        tokens = batch["tokens"]
        logits = model.network(None, tokens, None)
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:])

    return Objective(loss)


def recurrent_objective(model: BlockDenoiser, mean_recurrence: int, backprop_depth: int, width: int) -> Objective:
    """The Huginn baseline: next-token cross-entropy after r ~ log-normal Poisson (mean ``mean_recurrence``)
    iterations of the recurrent block from a random state (``width`` wide), backpropagating through the last
    ``backprop_depth`` only."""
    from dblocks.models.huginn import recurrent_logits, sample_recurrence

    def draw(batch: Batch, gen: torch.Generator) -> Batch:
        tokens = batch["tokens"]
        r = sample_recurrence(mean_recurrence, gen)
        state = torch.randn(tokens.shape[0], tokens.shape[1] - 1, width, generator=gen)
        return {
            **batch,
            "recurrence": torch.full((tokens.shape[0],), r),  # on the CPU, as the paper mode's block
            "state": state.to(tokens.device),
        }

    def loss(batch: Batch) -> torch.Tensor:
        tokens = batch["tokens"]
        logits = recurrent_logits(
            model, tokens[:, :-1], int(batch["recurrence"][0]), backprop_depth, state=batch["state"]
        )
        return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:])

    return Objective(loss, draw)


def sample_batch(
    data: ImageDataset | TextDataset,
    batch_size: int,
    gen: torch.Generator,
    device: torch.device,
    augmentation: str = "none",
) -> Batch:
    """A batch drawn with replacement by ``gen`` (whose state alone fixes the data position on resume), images
    augmented on ``device`` by ``augmentation`` (``train.augment``) with draws from the same generator."""
    idx = torch.randint(len(data), (batch_size,), generator=gen)
    if hasattr(data, "batch"):  # text windows
        return data.batch(idx, device)
    flipped = data.flipped[idx].to(device) if augmentation == "flip" and data.flipped is not None else None
    if augmentation != "none" and data.latent_scale is not None and flipped is None:
        raise TrainingError(
            f"train.augment={augmentation!r}: {data.name} holds autoencoder latents without "
            f"the latents of mirrored images; allowed: none, or prepare it again to get them"
        )
    return {
        "image": augment(data.images[idx].to(device), augmentation, gen, flipped),
        "label": data.labels[idx].to(device),
    }


def clip_and_step(module: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
    """One optimizer step on the gradients of a step's backward passes, clipped to ``grad_clip`` (if set). A
    non-finite gradient norm raises :class:`TrainingError` before the step, so an overflow never reaches the
    weights (a finite loss can still have infinite gradients, and AdamW would turn them into NaN weights)."""
    norm = nn.utils.clip_grad_norm_(module.parameters(), grad_clip or math.inf)
    if not torch.isfinite(norm):
        raise TrainingError(f"gradient norm is {norm.item()}")
    optimizer.step()


class _Loss(nn.Module):
    """An objective's loss as a module's forward, over ``module``'s parameters: what DistributedDataParallel
    wraps, since it synchronises gradients of what runs inside its forward."""

    def __init__(self, module: nn.Module, loss: Callable[[Batch], torch.Tensor]) -> None:
        super().__init__()
        self.module, self.loss = module, loss

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss(batch)


def micro_batches(rows: slice, per_device: int | None) -> list[slice]:
    """``rows`` in consecutive pieces of at most ``per_device`` (train.batch_per_device; None: one piece),
    whose gradients are accumulated before the optimizer step."""
    size = per_device or (rows.stop - rows.start)
    return [slice(a, min(a + size, rows.stop)) for a in range(rows.start, rows.stop, max(1, size))]


def backward_step(
    runner: nn.Module, batch: Batch, device: torch.device, precision: str, per_device: int | None
) -> torch.Tensor:
    """Backward passes of this rank's share of one step's global batch (drawn already), in micro-batches:
    each piece's mean loss is weighted by its share of the global batch times the world size, so that
    DistributedDataParallel's mean over ranks of the accumulated gradients is the gradient of the global
    batch's mean loss, whatever the number of ranks and pieces. Returns the global mean loss (detached)."""
    world = distributed.world()
    total = len(next(iter(batch.values())))
    pieces = micro_batches(world.rows(total), per_device)
    accumulated = torch.zeros((), device=device)
    for i, rows in enumerate(pieces):
        # gradients are synchronised once per step, on the last piece's backward
        sync = (
            runner.no_sync()
            if isinstance(runner, DistributedDataParallel) and i < len(pieces) - 1
            else contextlib.nullcontext()
        )
        with sync:
            with precision_context(device, precision):
                loss = runner(rows_of(batch, rows))
            share = loss * (world.size * (rows.stop - rows.start) / total)
            share.backward()
        accumulated += share.detach().float()
    return distributed.all_mean(accumulated)


def lr_lambda(warmup: int, total: int, schedule: str, floor: float = 0.0) -> Callable[[int], float]:
    """The learning rate as a fraction of ``train.lr`` at each step: linear warm-up over ``warmup`` steps,
    then constant, or a cosine from 1 down to ``floor`` (``train.min_lr / train.lr``) at the last step."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively: a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX
    (where its matmuls run at twice the float32 rate; without them bf16 is emulated and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # torch.cpu names these probes with a leading underscore: absent, say no
        return any(
            getattr(torch.cpu, probe, lambda: False)()
            for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
    return False


def resolve_precision(device: torch.device, precision: str) -> str:
    """``train.precision`` as the steps run it: ``auto`` is bf16 where :func:`native_bf16`, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def precision_context(device: torch.device, precision: str):
    """The forward pass and loss of one step under ``train.precision``: bf16 autocast (weights, gradients and
    optimizer state stay float32, so there is no loss scaling to manage) or plain float32; ``auto``: as
    :func:`resolve_precision` decides on ``device``."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def allow_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 tensor cores for float32 matmuls and convolutions on CUDA (``train.tf32``), as the DiT and authors'
    ViT code set it; CPUs have no TF32, so this changes nothing there."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


@dataclass
class TrainResult:
    steps: int
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since last log)
    resumed_from: int = 0
    averaged: nn.Module | None = None  # a copy of the module holding the EMA weights (train.ema_decay > 0)
    #: the precision the steps ran in (``train.precision`` with ``auto`` resolved on the job's device)
    precision: str = "fp32"
    #: the memory of the training steps (:class:`PeakMemory`), MB; None where the platform cannot say
    peak_memory_mb: float | None = None
    train_memory_mb: float | None = None


def _status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemory:
    """What a job's training steps take, measured around the loop, on the device that runs them.

    ``peak_memory_mb``: on CUDA the most memory torch's tensors held at once (``max_memory_allocated``: weights,
    gradients, optimizer state, activations); on a CPU the process's peak resident memory while training (the
    Python and torch runtime included, some 300 MB). ``train_memory_mb``: what the steps added to what the
    process held when the loop started (the weights and the runtime excluded: gradients, optimizer state and the
    largest step's activations), on both devices, so that a block job and an end-to-end job compare. On a CPU it
    needs Linux's resettable peak (``/proc/self/clear_refs``); elsewhere it is None."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.start = device, None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device) / 2**20
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # the peak resident size restarts from now
            self.start = _status_mb("VmRSS")
        except OSError:
            self.start = None

    def read(self) -> tuple[float | None, float | None]:
        """(peak_memory_mb, train_memory_mb) since construction."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = _status_mb("VmHWM")
            if peak is None:
                import resource

                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
        grown = None if self.start is None or peak is None else max(0.0, peak - self.start)
        return (None if peak is None else round(peak, 2)), (None if grown is None else round(grown, 2))


def _state_of_another_config(state_path: Path, tag: str | None, desc: str) -> bool:
    """Whether the training state at ``state_path`` was saved under a tag other than ``tag`` (states without
    one, and unreadable ones, are left to :func:`load_training_state` and its checks)."""
    from dblocks.checkpoint import load_metadata

    try:
        saved = load_metadata(state_path).get("extra", {}).get("tag")
    except CheckpointError:
        return False
    if tag is None or saved is None or saved == tag:
        return False
    print(
        f"{desc}: the training state {state_path} is an interrupted run of another config ({saved}); "
        f"starting this one afresh",
        file=sys.stderr,
        flush=True,
    )
    return True


def train(
    module: nn.Module,
    objective: Objective,
    data: ImageDataset | TextDataset,
    cfg: dict,
    *,
    seed: int,
    device: torch.device,
    state_path: Path | None = None,
    steps: int | None = None,
    on_log: Callable[[int, float, float], None] | None = None,
    desc: str = "train",
    progress: bool = True,
    state_tag: str | None = None,
) -> TrainResult:
    """Run ``steps`` (default cfg['steps']) optimizer steps on the parameters of ``module``.

    If ``state_path`` holds a training state from an interrupted run it is resumed exactly (model,
    optimizer, schedule, weight average, RNG and data-sampling state); the state is refreshed every
    cfg['checkpoint_every'] steps. With cfg['ema_decay'] > 0 the result carries the averaged weights.
    ``state_tag`` (the CLI: the experiment's config hash) is kept in the state: a state of another tag is an
    interrupted run of another config, and is dropped rather than resumed (its shapes may well match, and its
    optimizer would bring back the former learning rate)."""
    world = distributed.world()
    if cfg["batch_size"] < world.size:  # before any work: every rank needs a row of the global batch
        raise TrainingError(
            f"train.batch_size={cfg['batch_size']} is the global batch, shared by {world.size} "
            f"ranks; allowed: at least {world.size}"
        )
    total = steps or cfg["steps"]
    module.to(device).train()
    allow_tf32(device, cfg["tf32"])
    optimizer = adamw(module.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])  # torch.optim.AdamW
    floor = (cfg["min_lr"] or 0.0) / cfg["lr"]
    # a job that runs k x train.steps (the paper's shared-stem mode: B x, one block per step) stretches the
    # warm-up by k too, as the authors' single process does, so each block sees the schedule the baseline sees
    warmup = round(cfg["warmup"] * total / cfg["steps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total, cfg["schedule"], floor))
    ema = EMA(module, cfg["ema_decay"], cfg["ema_rampup"]) if cfg["ema_decay"] else None
    average = ema.tensors if ema is not None else None
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)  # data order, augmentation, sigma and noise draws
    start = 0
    if state_path is not None and Path(state_path).exists() and _state_of_another_config(state_path, state_tag, desc):
        remove_training_state(state_path)
    if state_path is not None and Path(state_path).exists():
        start = load_training_state(state_path, module, optimizer, scheduler, {"data": gen}, average)["step"]
    precision = resolve_precision(device, cfg["precision"])
    result = TrainResult(steps=total, seconds=0.0, resumed_from=start, precision=precision)
    memory = PeakMemory(device)
    running, count, t0 = 0.0, 0, time.perf_counter()
    runner: nn.Module = _Loss(module, objective.loss)
    if world.size > 1:
        runner = DistributedDataParallel(
            runner,
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=not objective.every_parameter,
        )
    bar = tqdm(
        range(start, total),
        desc=desc,
        initial=start,
        total=total,
        disable=not progress or not world.main,
        mininterval=1.0,
        dynamic_ncols=True,
    )
    for step in bar:
        # every rank draws the whole global batch and its random inputs from the same generator state, then
        # computes its rows: the run is the same whatever the number of ranks (up to reduction order)
        batch = objective.draw(sample_batch(data, cfg["batch_size"], gen, device, cfg["augment"]), gen)
        optimizer.zero_grad(set_to_none=True)
        loss = backward_step(runner, batch, device, precision, cfg.get("batch_per_device"))
        if not torch.isfinite(loss):  # the mean over all ranks: every rank stops here together
            raise TrainingError(f"{desc}: loss is {loss.item()} at step {step + 1}; {_STOPPED}")
        try:
            clip_and_step(module, optimizer, cfg["grad_clip"])
        except TrainingError as exc:
            raise TrainingError(f"{desc}: {exc} at step {step + 1}; {_STOPPED}") from None
        scheduler.step()
        if ema is not None:
            ema.update(module, step)
        running, count = running + loss.item(), count + 1
        done = step + 1
        if done % cfg["log_every"] == 0 or done == total:
            mean = running / count
            result.losses.append((done, mean))
            bar.set_postfix(loss=f"{mean:.4g}")
            if on_log:
                on_log(done, mean, scheduler.get_last_lr()[0])
            running, count = 0.0, 0
        if state_path is not None and done % cfg["checkpoint_every"] == 0 and done < total and world.main:
            save_training_state(
                state_path, module, optimizer, scheduler, done, {"data": gen}, {"tag": state_tag}, average
            )
    bar.close()
    result.peak_memory_mb, result.train_memory_mb = memory.read()  # the steps' memory, not the average's copy
    result.averaged = ema.averaged(module) if ema is not None else None
    for weights in filter(None, (module, result.averaged)):
        bad = next((name for name, p in weights.named_parameters() if not torch.isfinite(p).all()), None)
        if bad is not None:  # last line of defence: never hand back weights that would poison a checkpoint
            raise TrainingError(f"{desc}: parameter {bad} is not finite after step {total}; {_STOPPED}")
    result.seconds = time.perf_counter() - t0
    return result
