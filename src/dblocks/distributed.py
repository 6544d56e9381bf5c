"""Data-parallel training jobs: the process group a job started by ``torchrun`` joins, and which rank may write.

A training command run as ``torchrun --standalone --nproc_per_node=N -m dblocks train-block ...`` (the SLURM
profile does this for a job that asks for N > 1 GPUs) has N processes with the same arguments; torchrun sets
RANK, LOCAL_RANK and WORLD_SIZE in each. :func:`setup` joins them into one process group (NCCL on CUDA, gloo
on CPU) and gives each its device. The training loop (:mod:`dblocks.train`) then draws the same global batch
on every rank and lets each compute its share, so what a run learns does not depend on N; only rank 0 writes
checkpoints, training state, logs and MLflow runs (:func:`is_main`). A command run without torchrun is a
world of one, and every function here is then a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n``: contiguous, sizes differing by at most one."""
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)


_WORLD = World()


def launched() -> World:
    """The world torchrun (or any launcher setting its variables) started this process in; a world of one
    without it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group of a multi-process job and return (world, this rank's device): with CUDA,
    GPU LOCAL_RANK of the node. A single process returns the world of one and ``device`` unchanged."""
    global _WORLD
    world = launched()
    if world.size == 1 or dist.is_initialized():
        _WORLD = world
        return world, device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    # a generous timeout: rank 0 alone may spend minutes writing a checkpoint while the others wait
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(minutes=30),
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    _WORLD = world
    return world, device


def world() -> World:
    """The world :func:`setup` joined (a world of one before it or without torchrun)."""
    return _WORLD


def is_main() -> bool:
    """Whether this process may write files: rank 0, or the only process."""
    return _WORLD.main


def all_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the ranks (``value`` itself in a world of one)."""
    if _WORLD.size == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / _WORLD.size


def sum_over_ranks(counts: list[int]) -> list[int]:
    """Element-wise sums of a small list of counters over the ranks (``counts`` itself in a world of one)."""
    if _WORLD.size == 1:
        return list(counts)
    gathered: list = [None] * _WORLD.size
    dist.all_gather_object(gathered, list(counts))
    return [sum(column) for column in zip(*gathered)]


def collect_chunks(mine: dict[int, torch.Tensor], sizes: list[int], device: torch.device) -> torch.Tensor | None:
    """The chunks of a work list dealt round-robin over the ranks (chunk i to rank i % N), concatenated in
    order on rank 0 (None on the others). ``mine`` holds this rank's chunks by index, ``sizes`` every
    chunk's row count; chunks travel one at a time (point to point, on ``device`` as NCCL needs), so no rank
    holds more than its own share plus one chunk beyond what rank 0 assembles."""
    if _WORLD.size == 1:
        return torch.cat([mine[i].cpu() for i in range(len(sizes))])
    like = next(iter(mine.values()), None)
    meta = [tuple(like.shape[1:]) if like is not None else None, like.dtype if like is not None else None]
    shapes: list = [None] * _WORLD.size
    dist.all_gather_object(shapes, meta)  # the row shape and dtype, from any rank that has a chunk
    tail, dtype = next(m for m in shapes if m[0] is not None)
    out = []
    for i, rows in enumerate(sizes):
        owner = i % _WORLD.size
        if owner == 0 and _WORLD.main:
            out.append(mine[i].cpu())
        elif _WORLD.main:
            buffer = torch.empty((rows, *tail), dtype=dtype, device=device)
            dist.recv(buffer, src=owner)
            out.append(buffer.cpu())
        elif owner == _WORLD.rank:
            dist.send(mine[i].to(device).contiguous(), dst=0)
    return torch.cat(out) if _WORLD.main else None


def teardown() -> None:
    """Leave the process group (at the end of a command, so the ranks exit together)."""
    global _WORLD
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _WORLD = World()
