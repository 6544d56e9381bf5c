"""ESTIMATED cost of every training job of a params file (default ``params/paper.yaml``), in GPU-hours.

Nothing here runs on a GPU; the GPU-hours are arithmetic on counted FLOPs and an assumed utilisation:

1. Jobs: exactly the pipeline's list (``dblocks.pipeline.Pipeline.training_jobs``): B jobs per block-wise
   experiment, one end-to-end baseline, one job for the paper's shared-stem mode, and the block-local baselines'
   jobs (NoProp-DT's T blocks and its head, NoProp-CT, NoProp-FM, Forward-Forward).
2. FLOPs per optimizer step: ``torch.utils.flop_counter.FlopCounterMode`` around the forward and backward
   pass of the job's own objective (``dblocks.jobs.training_job``) at the experiment's real
   ``train.batch_size``. Module and batch live on PyTorch's ``meta`` device (shapes only, no memory, no
   arithmetic), so DiT-L/2 or the 12 x 768 text models at batch 512 cost seconds and no batch-size
   extrapolation is needed. Data are random tensors of the dataset's shapes (only shapes matter).
   What is counted: matrix multiplications, convolutions and attention (the ops FlopCounterMode knows),
   forward + backward, as "model FLOPs": on ``meta``, attention decomposes into its two batched matmuls and
   their gradients (3 x the forward), as MFU accounting counts it; a GPU flash kernel also recomputes
   the scores in backward, which is not counted. Masked (causal) attention is counted in full: the
   project passes an explicit mask, so kernels do not skip the masked half either.
   Not counted: element-wise ops, norms, softmax, the AdamW update, EMA, gradient clipping, data loading and
   augmentation (none is a matmul; together a few percent for these models), evaluation jobs (sampling
   50k images for FID, text generation for MAUVE) and retries.
   Draws that change the cost of a step: the paper's shared-stem mode trains one block per step, drawn
   uniformly, so its FLOPs per step are the mean over blocks (each block's step counted once, the block
   identified by which layers received gradients); Huginn's end-to-end baseline draws its recurrence
   count r per step (log-normal Poisson, E[r] = the spec's mean exactly) and is counted at r = its mean,
   which is exact in expectation because the cost is affine in r for r >= the backprop depth (8; P(r < 8)
   is about 0.2 %).
3. GPU-hours per job = steps x FLOPs per step / (peak x MFU) / 3600, for each GPU in ``GPUS``, with the peak
   of the job's math mode (``train.precision`` bf16 -> bf16 tensor cores; fp32 with ``train.tf32`` -> TF32;
   fp32 without -> plain FP32) and MFU (model-FLOPs utilisation) an ASSUMPTION, ``--mfu`` (default 0.35,
   typical of well-tuned large-transformer training). Data-parallel training over N GPUs divides the wall
   time by about N, not the GPU-hours.
4. The paper's own measured wall time, where it has one: Table 12 (12-layer ViT, batch 128, B=3; their
   GPU is not named there): 0.0507 s per end-to-end step and 0.0181 s per 4-layer-block step. For the ViT
   jobs with those shapes the output adds steps x that time, and the throughput it implies. The ViT (width
   128) is far too small to keep a GPU busy, so it runs far below the assumed MFU and the FLOP estimate
   is much too low for it; it is meaningful for the large models (DiT-L/2, the 768-wide text models).

Command (from the repository root; about a minute on 2 CPU cores)::

    .venv/bin/python benchmarks/paper_cost.py
    .venv/bin/python benchmarks/paper_cost.py --mfu 0.5 --params params/paper.yaml --out /tmp/cost.json

Writes results/bench/paper_cost.json (like every benchmark's result; ``--out`` elsewhere) and prints the
Markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import dblocks.models.huginn as huginn  # noqa: E402
from dblocks.data.text import VOCAB_SIZE, TextDataset  # noqa: E402
from dblocks.experiment import Experiment  # noqa: E402
from dblocks.jobs import training_job  # noqa: E402
from dblocks.paper import PAPER_TABLES  # noqa: E402
from dblocks.pipeline import BLOCKWISE, E2E, LOCAL_METHODS, PAPER, Pipeline  # noqa: E402
from dblocks.train import sample_batch  # noqa: E402

META = torch.device("meta")

#: dense peak throughput (FLOP/s) per math mode. NVIDIA's datasheets print tensor-core figures "with
#: sparsity" (2:4 structured) as the headline; the dense figures are half of those.
GPUS = {
    "A100": {
        "name": "A100 SXM",
        "bf16": 312e12,
        "tf32": 156e12,
        "fp32": 19.5e12,
        "source": "NVIDIA A100 Tensor Core GPU datasheet, SXM: BF16 312, TF32 156 (dense), FP32 19.5 TFLOPS",
    },
    "H100": {
        "name": "H100 SXM",
        "bf16": 989e12,
        "tf32": 494e12,
        "fp32": 67e12,
        "source": "NVIDIA H100 Tensor Core GPU datasheet, SXM: BF16 989, TF32 494 (dense = half the "
        "with-sparsity figures), FP32 67 TFLOPS",
    },
}
DEFAULT_MFU = 0.35


def math_mode(train: dict) -> str:
    """The peak that applies to a job's matmuls: bf16 autocast runs them on bf16 tensor cores; float32 runs
    them as TF32 when ``train.tf32`` allows it (on CUDA), else as plain FP32."""
    if train["precision"] == "bf16":
        return "bf16"
    return "tf32" if train.get("tf32") else "fp32"


def paper_seconds_per_step(exp: Experiment, method: str) -> float | None:
    """Table 12's measured seconds per step for a job of exactly its shapes (ViT-paper, batch 128: the
    12-layer end-to-end model, or a 4-layer block, which is also what each shared-stem step trains), else
    None. The paper timed the authors' shared-stem code; an independent block has the same FLOPs per step."""
    cfg = exp.config
    if cfg["arch"] != "ViT-paper" or cfg["train"]["batch_size"] != 128 or method in LOCAL_METHODS:
        return None
    seconds = {row["key"]["row"]: row["values"]["seconds"] for row in PAPER_TABLES["12"]["rows"]}
    if method == E2E:
        return seconds["e2e"]
    return seconds["block"] if set(exp.split) == {4} else None


# ------------------------------------------------------------------------------------------ counting


def fake_data(exp: Experiment, n: int = 4):
    """n random examples of the experiment's dataset shapes; sample_batch draws the real batch size
    from them with replacement, so n only needs to be >= 1."""
    if exp.tokenizer is None:
        return C.random_data(exp, n)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(VOCAB_SIZE[exp.tokenizer], (n, exp.arch.spec.context), generator=g)
    return TextDataset(exp.config["dataset"] + "-random", "train", tokens, exp.tokenizer)


@contextlib.contextmanager
def fixed_recurrence(r: int | None = None):
    """Huginn's baseline at recurrence ``r`` on every step, None: its mean (see the module docstring). The
    objective imports ``sample_recurrence`` when ``training_job`` builds it, so patching the module covers it."""

    def draw(mean, generator, sigma=0.5):
        return max(1, mean) if r is None else r

    with mock.patch.object(huginn, "sample_recurrence", draw):
        yield


def count_step(objective, data, batch_size: int, seed: int) -> int:
    """FLOPs of one forward + backward of ``objective`` on a meta batch of ``batch_size``."""
    gen = torch.Generator().manual_seed(seed)
    batch = sample_batch(data, batch_size, gen, META)
    with FlopCounterMode(display=False) as counter:
        objective(batch, gen).backward()
    return counter.get_total_flops()


def trained_block(model) -> int:
    """Which block of a shared-stem model the last step trained: the one whose layers got gradients."""
    hit = [b for b, blk in enumerate(model.blocks, 1) if any(p.grad is not None for p in blk.layers.parameters())]
    if len(hit) != 1:
        raise RuntimeError(f"expected one trained block per shared-stem step, got {hit}")
    return hit[0]


def build_job(exp: Experiment, method: str, block: int | None, recurrence: int | None = None):
    """(module, objective, steps) of one job exactly as training builds it, but on the meta device (and
    Huginn's baseline at a fixed recurrence, None: its mean), in training mode."""
    if method in LOCAL_METHODS:  # small networks whose objectives read numbers off their schedules: built on
        module, objective, steps = training_job(exp, method, block)  # the CPU, then moved to the meta device
        return module.to(META).train(), objective, steps
    with torch.device(META), fixed_recurrence(recurrence):
        module, objective, steps = training_job(exp, method, block)
    return module.train(), objective, steps


def job_cost(
    exp: Experiment,
    method: str,
    block: int | None,
    batch_size: int | None = None,
    recurrence: int | None = None,
    max_draws: int = 200,
) -> dict:
    """Steps, parameters and FLOPs per optimizer step of one training job, counted on the meta device, at
    ``batch_size`` (None: ``train.batch_size``) and, for Huginn's baseline, ``recurrence`` (None: the mean)."""
    batch_size = batch_size or exp.config["train"]["batch_size"]
    module, objective, steps = build_job(exp, method, block, recurrence)
    data = fake_data(exp)
    params = sum(p.numel() for p in module.parameters())
    out = {"steps": steps, "params": params, "batch_size": batch_size}
    if method != PAPER:
        out["flops_per_step"] = count_step(objective, data, batch_size, seed=0)
        if exp.config["task"] == "recurrent_text" and method == E2E:
            out["recurrence"] = recurrence or exp.arch.spec.recurrence
        return out
    # one step trains one uniformly drawn block: average over blocks, each counted once
    per_block: dict[int, int] = {}
    for seed in range(max_draws):
        module.zero_grad(set_to_none=True)
        flops = count_step(objective, data, batch_size, seed)
        per_block.setdefault(trained_block(module), flops)
        if len(per_block) == len(module.blocks):
            break
    else:
        raise RuntimeError(f"{max_draws} shared-stem steps did not visit every block: {sorted(per_block)}")
    out["flops_per_step"] = statistics.fmean(per_block.values())
    out["flops_per_block_step"] = [per_block[b] for b in sorted(per_block)]
    return out


# ------------------------------------------------------------------------------------------ estimate


def gpu_hours(flops: float, mode: str, mfu: float) -> dict[str, float]:
    return {gpu: flops / (spec[mode] * mfu) / 3600 for gpu, spec in GPUS.items()}


def job_label(method: str, block: int | str | None) -> str:
    if method in LOCAL_METHODS:
        return method if block is None else f"{method} {block}" if block == "head" else f"{method} block {block}"
    return f"block {block}" if method == BLOCKWISE else {E2E: "e2e", PAPER: "paper (shared stem)"}[method]


def job_layers(exp: Experiment, method: str, block: int | str | None) -> int | None:
    """The transformer layers a job trains (None: NoProp's convolutional networks)."""
    if method == BLOCKWISE:
        return exp.split[block - 1]
    return None if exp.config["arch"].startswith("NoProp") else exp.arch.spec.depth


def progress(line: str) -> None:
    print(line, file=sys.stderr)  # stdout carries only the Markdown


def estimate(params_path: str | Path, mfu: float = DEFAULT_MFU, log=progress) -> dict:
    pipeline = Pipeline.load(params_path)
    experiments = {
        name: Experiment(cfg, scale=pipeline.raw.get("scale", "unknown")) for name, cfg in pipeline.experiments.items()
    }
    rows = []
    for name, method, block in pipeline.training_jobs():
        exp = experiments[name]
        t0 = time.perf_counter()
        cost = job_cost(exp, method, block)
        mode = math_mode(exp.config["train"])
        total = cost["steps"] * cost["flops_per_step"]
        row = {
            "experiment": name,
            "method": method,
            "block": block,
            "job": job_label(method, block),
            "arch": exp.config["arch"],
            "dataset": exp.config["dataset"],
            "math_mode": mode,
            "layers": job_layers(exp, method, block),
            **cost,
            "total_flops": total,
            "gpu_hours": gpu_hours(total, mode, mfu),
        }
        seconds = paper_seconds_per_step(exp, method)
        if seconds is not None:
            row["paper_seconds_per_step"] = seconds
            row["paper_gpu_hours"] = cost["steps"] * seconds / 3600
            row["paper_implied_tflops"] = cost["flops_per_step"] / seconds / 1e12
        rows.append(row)
        log(
            f"{name:22s} {row['job']:20s} {row['flops_per_step'] / 1e9:12.1f} GFLOPs/step "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    return {
        "benchmark": "paper_cost",
        "estimate": True,
        "params": str(params_path),
        "scale": pipeline.raw.get("scale"),
        "mfu_assumed": mfu,
        "gpus": GPUS,
        "counted_on": "torch meta device (FLOPs from shapes; nothing timed)",
        "host": C.device_description(META),
        "jobs": rows,
        "experiments": totals(rows),
        "total_gpu_hours": sum_hours(rows),
    }


def sum_hours(rows: list[dict]) -> dict[str, float]:
    return {gpu: sum(r["gpu_hours"][gpu] for r in rows) for gpu in GPUS}


def totals(rows: list[dict]) -> dict[str, dict]:
    """Per experiment: its jobs' GPU-hours and, where the paper timed every job, their Table 12 hours."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["experiment"] for r in rows):
        mine = [r for r in rows if r["experiment"] == name]
        out[name] = {
            "jobs": len(mine),
            "gpu_hours": sum_hours(mine),
            "paper_gpu_hours": (
                sum(r["paper_gpu_hours"] for r in mine) if all("paper_gpu_hours" in r for r in mine) else None
            ),
        }
    return out


# ------------------------------------------------------------------------------------------ output


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return ""
    return f"{x:,.0f}" if abs(x) >= 10**digits else f"{x:.{digits}g}"


def markdown(record: dict) -> str:
    gpus = list(record["gpus"])
    mfu = record["mfu_assumed"]
    head = (
        ["experiment", "job", "steps", "params (M)", "GFLOPs/step", "math"]
        + [f"est. GPU-h {g}" for g in gpus]
        + ["paper-time GPU-h"]
    )
    lines = [
        f"ESTIMATE, not a measurement: FLOPs counted per optimizer step (forward + backward, real batch "
        f"size, meta device), GPU-hours = steps x FLOPs / (dense peak x MFU {mfu:g} assumed). "
        f"Peaks: "
        + "; ".join(
            f"{s['name']} " + ", ".join(f"{m} {s[m] / 1e12:g}" for m in ("bf16", "tf32")) + " TFLOPS"
            for s in record["gpus"].values()
        )
        + ".",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in record["jobs"]:
        cells = [
            r["experiment"],
            r["job"],
            f"{r['steps']:,}",
            f"{r['params'] / 1e6:.2f}",
            _num(r["flops_per_step"] / 1e9),
            r["math_mode"],
        ]
        cells += [_num(r["gpu_hours"][g]) for g in gpus] + [_num(r.get("paper_gpu_hours"))]
        lines.append("| " + " | ".join(cells) + " |")
    head = ["experiment", "jobs"] + [f"est. GPU-h {g}" for g in gpus] + ["paper-time GPU-h"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, t in record["experiments"].items():
        cells = [name, str(t["jobs"])] + [_num(t["gpu_hours"][g]) for g in gpus] + [_num(t["paper_gpu_hours"])]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["**all**", f"**{len(record['jobs'])}**"] + [f"**{_num(record['total_gpu_hours'][g])}**" for g in gpus]
    lines.append("| " + " | ".join(cells + [""]) + " |")
    vit = [r for r in record["jobs"] if "paper_implied_tflops" in r]
    if vit:
        implied = sorted({round(r["paper_implied_tflops"], 1) for r in vit})
        lines += [
            "",
            f"paper-time GPU-h: steps x the paper's Table 12 seconds per step (their GPU, ViT batch "
            f"128), which implies only {' / '.join(map(str, implied))} TFLOPS achieved: the width-128 "
            f"ViT runs far below peak, so for the ViT jobs trust that column, not the FLOP estimate.",
        ]
    lines += [
        "",
        "Not included: evaluation jobs (50k-sample FID, MAUVE generation), element-wise ops, norms, the "
        "optimizer and EMA updates, data loading, retries. Data-parallel jobs on N GPUs take about "
        "GPU-h / N of wall time.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params/paper.yaml", help="params file whose jobs to cost")
    ap.add_argument(
        "--mfu",
        type=float,
        default=DEFAULT_MFU,
        help="assumed model-FLOPs utilisation, fraction of the dense peak (default %(default)s)",
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default results/bench/paper_cost.json)")
    args = ap.parse_args(argv)
    if not 0 < args.mfu <= 1:
        ap.error(f"--mfu {args.mfu}: allowed: a fraction in (0, 1]")
    started = time.perf_counter()
    record = estimate(args.params, args.mfu)
    record["seconds"] = time.perf_counter() - started
    print()
    print(markdown(record))
    progress(f"\nwrote {C.write_json('paper_cost', record, args.out)} ({record['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
