"""Training step time in float32 and under bf16 autocast (``train.precision``), for the tiny models of the
params files, on this machine's device.

Each job is one training job as the CLI sets it up (the end-to-end baseline, or block 1 alone), on the
experiment's own training data and batch size: one optimizer step (batch draw, forward pass and loss under the
precision, backward, gradient clipping, AdamW), both precisions interleaved (fp32, bf16, fp32, ...) after
warm-up steps. Reported: median and IQR per precision and the speed-up fp32 / bf16.

On a CPU, bf16 pays where matmuls dominate a step: the CPU needs bf16 dot-product instructions (AVX512-BF16 or
AMX) for bf16 matmuls to run at twice the float32 rate, and attention stays in float32 there
(``dblocks.layers.scaled_dot_product_attention``). Narrow models, whose steps are mostly elementwise work,
gain little or lose. Whether bf16 changes what a model learns is a separate question (docs/text-models.md).

Command (from the repository root; about 3 minutes on one CPU core)::

    .venv/bin/python benchmarks/precision.py
    .venv/bin/python benchmarks/precision.py --jobs tiny-text.yaml:mdm-text8:e2e --reps 20

Writes results/bench/precision.json and prints the table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402

from dblocks.experiment import Experiment  # noqa: E402
from dblocks.jobs import training_job  # noqa: E402
from dblocks.params import Params  # noqa: E402

DEFAULT_JOBS = [
    "tiny-text.yaml:mdm-text8:e2e",
    "tiny-text.yaml:mdm-text8:1",
    "tiny-text.yaml:ar-lm1b:e2e",
    "tiny-text.yaml:ar-lm1b:1",
    "tiny-text.yaml:huginn-lm1b:e2e",
    "tiny.yaml:vit-cifar100:e2e",
    "tiny.yaml:dit-cifar10:1",
]


def trainers(spec: str, device: torch.device) -> dict[str, C.Trainer]:
    """One trainer per precision for ``params-file:experiment:e2e|block``, from the same initial weights."""
    file, name, which = spec.split(":")
    config = Params.load(Path("params") / file).experiments[name]
    exp = Experiment(config)
    data = exp.load_data("train")
    method, block = ("e2e", None) if which == "e2e" else ("blockwise", int(which))
    out = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        module, objective, _ = training_job(exp, method, block)
        out[precision] = C.Trainer(module, objective, data, config["train"]["batch_size"], device, 0, precision)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", nargs="+", default=DEFAULT_JOBS, help="params-file:experiment:e2e|block")
    C.timing_arguments(p, reps=10, warmup=3)
    args = p.parse_args(argv)
    device = C.timing_device(args)
    started = time.perf_counter()
    record = C.start_record("precision", device, argv)
    record.update({"reps": args.reps, "warmup": args.warmup, "threads": args.threads})
    rows = []
    for spec in args.jobs:
        jobs = {name: trainer.step for name, trainer in trainers(spec, device).items()}
        stats = {name: C.summarize(ts) for name, ts in C.interleaved(jobs, args.reps, args.warmup, device).items()}
        rows.append(
            {
                "job": spec,
                "fp32_ms": 1000 * stats["fp32"]["median"],
                "fp32_iqr_ms": 1000 * stats["fp32"]["iqr"],
                "bf16_ms": 1000 * stats["bf16"]["median"],
                "bf16_iqr_ms": 1000 * stats["bf16"]["iqr"],
                "speedup": stats["fp32"]["median"] / stats["bf16"]["median"],
            }
        )
    record["rows"] = rows
    record["seconds"] = time.perf_counter() - started
    print(f"\n{C.format_table(rows, list(rows[0]))}\n\nwrote {C.write_json('precision', record)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
