"""Helpers shared by the benchmark scripts in this directory (not a benchmark itself).

Models are always the project's real ones, built through ``dblocks.experiment.Experiment`` from a
``dblocks.config.resolve``-d config; the dataset named in the config only fixes shapes
(``DATASET_SHAPES``), nothing is downloaded: batches are random tensors of the right shape.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from dblocks.config import resolve
from dblocks.data.dataset import ImageDataset
from dblocks.experiment import DATASET_SHAPES, Experiment
from dblocks.io import write_json_atomic
from dblocks.jobs import training_job
from dblocks.models import ARCHITECTURES, get_arch
from dblocks.optim import adamw
from dblocks.train import clip_and_step, precision_context, sample_batch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "bench"

#: the two paper settings the benchmarks measure: (task, arch, dataset)
VIT = ("classification", "ViT-paper", "cifar100")
DIT = ("generation", "DiT-S/2", "cifar10")


# ------------------------------------------------------------------------------------------ device


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_description(device: torch.device) -> dict:
    """What the numbers were measured on; load average tells whether other work shared the machine."""
    info = {
        "device": str(device),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
    return info


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ output


def write_json(name: str, record: dict, path: Path | None = None) -> Path:
    """results/bench/<name>.json (or ``path``), written atomically."""
    path = Path(path) if path is not None else RESULTS / f"{name}.json"
    write_json_atomic(path, record, sort_keys=False)  # in the order the benchmark filled it
    return path


def timing_arguments(parser, reps: int, warmup: int) -> None:
    """The options every timing benchmark takes: --reps and --warmup (rounds), --threads (torch's, per
    process) and --device."""
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")


def timing_device(args) -> torch.device:
    """The device of :func:`timing_arguments`, with torch's thread count set from them."""
    torch.set_num_threads(args.threads)
    return pick_device(args.device)


def start_record(name: str, device: torch.device, argv: Sequence[str] | None) -> dict:
    """The head of every benchmark's record: its name, the machine, and the command that reproduces it."""
    args = list(argv) if argv is not None else sys.argv[1:]
    return {
        "benchmark": name,
        "device": device_description(device),
        "command": " ".join([".venv/bin/python", f"benchmarks/{name}.py", *args]),
    }


def finish(
    name: str, record: dict, started: float, print_tables: Callable[[dict], None], plot: Callable[[dict], Path]
) -> int:
    """The end of every benchmark: its total time, its tables on stdout, results/bench/<name>.json and
    its figure."""
    record["seconds"] = time.perf_counter() - started
    print()
    print_tables(record)
    print(f"\nwrote {write_json(name, record)} and {plot(record)} ({record['seconds']:.0f} s)")
    return 0


def save_figure(fig, name: str) -> Path:
    path = RESULTS / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain fixed-width table of the given columns (floats to 4 significant digits)."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def mib(n: float) -> float:
    return n / 2**20


# -------------------------------------------------------------------------------------- statistics


def summarize(samples: Iterable[float]) -> dict:
    """Median and inter-quartile range of repeated timings (seconds)."""
    xs = sorted(samples)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "iqr": q3 - q1, "n": len(xs)}


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def interleaved(
    jobs: dict[str, Callable[[], object]], reps: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Time every job ``reps`` times, round-robin (job A, B, C, A, B, C, ...), after ``warmup`` untimed
    rounds, so slow drifts of the machine (other processes, frequency) hit all jobs alike."""
    for _ in range(warmup):
        for fn in jobs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(reps):
        for name, fn in jobs.items():
            times[name].append(time_call(fn, device))
    return times


# -------------------------------------------------------------------------------------- experiments


def register_depth(arch: str, depth: int) -> str:
    """Name of ``arch`` with ``depth`` layers, added to the registry for this process if needed.

    The registry has no depth override (there is no hook for one in dblocks), so the depth sweep
    registers e.g. ``ViT-paper-L24`` in ``dblocks.models.ARCHITECTURES`` at run time, in memory only."""
    spec = get_arch(arch)
    if spec.depth == depth:
        return arch
    name = f"{arch}-L{depth}"
    ARCHITECTURES.setdefault(name, dataclasses.replace(spec, depth=depth))
    return name


def experiment(setting: tuple[str, str, str], blocks: int, depth: int | None = None) -> Experiment:
    task, arch, dataset = setting
    if depth is not None:
        arch = register_depth(arch, depth)
    return Experiment(resolve({"task": task, "arch": arch, "dataset": dataset, "blocks": blocks, "device": "cpu"}))


def random_data(exp: Experiment, n: int, seed: int = 0) -> ImageDataset:
    """n random examples shaped like the experiment's dataset (images in [-1, 1])."""
    g = torch.Generator().manual_seed(seed)
    (c, h, w), classes = DATASET_SHAPES[exp.config["dataset"]]
    images = torch.rand((n, c, h, w), generator=g) * 2 - 1
    labels = torch.randint(classes, (n,), generator=g)
    return ImageDataset(exp.config["dataset"] + "-random", "train", images, labels, classes)


def job(exp: Experiment, which: str | int):
    """(module, objective) of one training job exactly as the CLI sets it up: ``"e2e"`` is the
    end-to-end baseline, an int b is block b trained alone on its own sigma interval."""
    method, block = ("e2e", None) if which == "e2e" else ("blockwise", int(which))
    module, objective, _ = training_job(exp, method, block)
    return module, objective


def largest_block(exp: Experiment) -> int:
    """The block with the most layers (the first of them on a tie): the job that needs the most memory."""
    split = exp.split
    return split.index(max(split)) + 1


class Trainer:
    """Optimizer steps of one job, with the training loop's own pieces (``sample_batch``, the forward pass
    under ``precision_context``, ``clip_and_step`` at the default train.grad_clip, AdamW) but without its LR schedule, logging and
    checkpointing. ``step()`` runs one step and returns the loss."""

    def __init__(
        self,
        module: torch.nn.Module,
        objective,
        data: ImageDataset,
        batch_size: int,
        device: torch.device,
        seed: int = 0,
        precision: str = "fp32",
    ) -> None:
        cfg = resolve()["train"]
        self.precision = precision
        self.module = module.to(device).train()
        self.objective, self.data, self.batch_size, self.device = objective, data, batch_size, device
        self.grad_clip = cfg["grad_clip"]
        self.optimizer = adamw(module.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self) -> dict[str, torch.Tensor]:
        return sample_batch(self.data, self.batch_size, self.gen, self.device)

    def step(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with precision_context(self.device, self.precision):
            loss = self.objective(self.batch(), self.gen)
        loss.backward()
        clip_and_step(self.module, self.optimizer, self.grad_clip)
        return loss.detach()


def setting_label(setting: tuple[str, str, str]) -> str:
    return f"{setting[1]} {setting[2]}"
