"""Data-parallel scaling of one block job: steps/s with 1, 2, ... ranks at the same GLOBAL batch, peak memory per
rank, and whether the training loop ever waits for data.

1. Scaling: the real training loop (``dblocks.train.train``) of one block job, started by ``torchrun`` with N
   processes (gloo on CPU, NCCL on CUDA; one GPU per rank), at the experiment's global batch, after warm-up
   steps. Reported: steps/s, the speed-up over 1 rank and the scaling efficiency (speed-up / N). On CPU every
   rank gets ``--threads`` threads, so N ranks use N x the cores of 1 rank; the row "1 rank, N x threads" is
   the other way to spend the same cores.
2. Memory per rank: peak resident memory (CPU) or peak allocated device memory (CUDA) of rank 0.
3. Data: the time ``sample_batch`` takes to draw one global batch (indices, gather from the prepared split,
   transfer, augmentation) against the time of a whole step. The loop draws synchronously, so this fraction is
   the share of every step spent waiting for data; with memory-mapped splits the gather reads the page cache.

Default setting: a DiT-S/2 block (B=3) on CIFAR-10 shapes at global batch 64 on CPU (``--global-batch 512`` is
the paper's). Data are random images written as a prepared split (``dblocks.data.save_prepared``) and read back
as training reads them.

Command (from the repository root; about 3 minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/data_parallel.py
    .venv/bin/python benchmarks/data_parallel.py --device cuda --ranks 1 2 4 8 --global-batch 512 --threads 8

Writes results/bench/data_parallel.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402

from dblocks import distributed  # noqa: E402
from dblocks.data import load_prepared, save_prepared  # noqa: E402
from dblocks.jobs import training_job  # noqa: E402
from dblocks.train import sample_batch, train  # noqa: E402


def worker(args) -> None:
    """One rank of an N-rank measurement (run by torchrun); rank 0 writes the numbers to ``args.worker``."""
    torch.set_num_threads(args.threads)
    world, device = distributed.setup(C.pick_device(args.device))
    try:
        exp = C.experiment(C.DIT, 3)
        # train's on_log marks the end of warm-up and every warm-up-length stretch after it, the last at the end
        cfg = {
            **exp.config["train"],
            "batch_size": args.global_batch,
            "steps": args.warmup + args.steps,
            "log_every": args.warmup,
            "checkpoint_every": 10**9,
            "augment": "flip",
        }
        data = load_prepared(args.data, "train")
        module, objective, _ = training_job(exp, "blockwise", 2)
        marks: list[float] = []

        def mark(*_):
            C.synchronize(device)
            marks.append(time.perf_counter())

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train(module, objective, data, cfg, seed=0, device=device, on_log=mark, progress=False)
        seconds = (marks[-1] - marks[0]) / args.steps
        gen = torch.Generator().manual_seed(1)
        draws = []
        for _ in range(10):
            t0 = time.perf_counter()
            sample_batch(data, args.global_batch, gen, device, "flip")
            C.synchronize(device)
            draws.append(time.perf_counter() - t0)
        peak = (
            torch.cuda.max_memory_allocated(device)
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        if world.main:
            Path(args.worker).write_text(
                json.dumps(
                    {
                        "ranks": world.size,
                        "threads_per_rank": args.threads,
                        "seconds_per_step": seconds,
                        "steps_per_second": 1 / seconds,
                        "draw_seconds": C.summarize(draws)["median"],
                        "peak_bytes_rank0": peak,
                        "peak_kind": "cuda allocated" if device.type == "cuda" else "max RSS",
                    }
                )
            )
    finally:
        distributed.teardown()


def measure(args, ranks: int, threads: int, data: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        cmd = [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            f"--nproc_per_node={ranks}",
            __file__,
            "--worker",
            str(out),
            "--data",
            str(data),
            "--device",
            args.device,
            "--threads",
            str(threads),
            "--global-batch",
            str(args.global_batch),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        return json.loads(out.read_text())


def print_table(record: dict) -> None:
    print(
        f"DiT-S/2 block 2 of 3, global batch {record['global_batch']}, {record['device']['device']} "
        f"({record['device'].get('cuda_device') or record['device']['cpu_model']})"
    )
    print(
        C.format_table(
            record["rows"], ["setting", "steps_per_second", "speedup", "efficiency", "peak_mib_rank0", "data_share"]
        )
    )


def plot(record: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    rows = record["rows"]
    ax.barh([r["setting"] for r in rows], [r["steps_per_second"] for r in rows], color="tab:blue")
    ax.set_xlabel("optimizer steps per second")
    ax.set_title(f"DiT-S/2 block, global batch {record['global_batch']}, {record['device']['device']}")
    ax.invert_yaxis()
    return C.save_figure(fig, "data_parallel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="threads per rank (CPU)")
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--examples", type=int, default=20000, help="rows of the prepared split")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.steps % args.warmup:
        parser.error(f"--steps {args.steps}: allowed: a multiple of --warmup ({args.warmup})")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        exp = C.experiment(C.DIT, 3)
        ds = C.random_data(exp, args.examples)
        save_prepared(type(ds)("cifar10", "train", ds.images, ds.labels, ds.num_classes), tmp)
        runs = [
            (
                f"{n} rank{'s' if n > 1 else ''} x {args.threads} thread{'s' if args.threads > 1 else ''}",
                measure(args, n, args.threads, Path(tmp)),
            )
            for n in args.ranks
        ]
        if args.device == "cpu" and max(args.ranks) > 1:
            n = max(args.ranks)
            runs.append((f"1 rank x {n * args.threads} threads", measure(args, 1, n * args.threads, Path(tmp))))
    base = runs[0][1]["steps_per_second"]
    rows = []
    for label, r in runs:
        speedup = r["steps_per_second"] / base
        rows.append(
            {
                "setting": label,
                "steps_per_second": round(r["steps_per_second"], 3),
                "speedup": round(speedup, 2),
                "efficiency": round(speedup / r["ranks"], 2),
                "peak_mib_rank0": round(C.mib(r["peak_bytes_rank0"]), 1),
                "data_share": round(r["draw_seconds"] / r["seconds_per_step"], 4),
                **r,
            }
        )
    record = {
        "global_batch": args.global_batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "examples": args.examples,
        "device": C.device_description(C.pick_device(args.device)),
        "rows": rows,
    }
    C.finish("data_parallel", record, started, print_table, plot)


if __name__ == "__main__":
    main()
