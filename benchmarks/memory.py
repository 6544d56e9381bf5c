"""Training memory of one block job vs the end-to-end job, as ratios (docs/method.md §1 and §7).

For each setting (ViT-paper on CIFAR-100 shapes, batch 128; DiT-S/2 on CIFAR-10 shapes, batch 16 by
default on CPU) and B in {2, 3, 4, 6}, one job = the end-to-end baseline or the LARGEST block of B
(the block with the most layers; all splits of 12 layers here are even). Per job it measures

* parameters, gradients and AdamW state (exp_avg + exp_avg_sq) that the job holds, in bytes, read off
  the live tensors after one optimizer step (``states`` = params + grads + optimizer);
* activations: the bytes of the distinct storages autograd saves for backward during one training
  forward (``torch.autograd.graph.saved_tensors_hooks``, de-duplicated by storage ``data_ptr``;
  parameters excluded, they are counted above), split into stem / layers / head / other
  (preconditioning, noise draw, loss);
* the measured peak: ``ru_maxrss`` of a FRESH Python process that builds the model and runs 2 training
  steps, and the same minus that process's RSS before it builds the job (after its imports and one
  warm-up step of the family's micro model, which loads the lazily imported optimizer code and kernels):
  ``peak - baseline``, what the job itself allocated; on CUDA also ``torch.cuda.max_memory_allocated``.

and reports the ratios end-to-end / block for states, activations, their total and the peak. The peak
is measured twice, in two fresh processes: with glibc's default allocator, and with
``MALLOC_MMAP_THRESHOLD_=65536`` (every tensor its own mapping, unmapped when freed, so RSS follows the
live tensors instead of what the heap kept). Also measured: the same with activation checkpointing
inside the job (``torch.utils.checkpoint``, non-reentrant, around each layer, applied here by wrapping
the model's layers; src/ is unchanged; the accounting then adds one layer's activations, held again
while that layer is recomputed in backward), and memory vs depth L (ViT width 128 at L in {3, 6, 12,
24}, end-to-end vs the largest block of B=3; ``ViT-paper-L<n>`` is registered in memory for this). For
DiT, the total ratio is also estimated at batch 64 and 512 (the paper's) by scaling the measured
activations linearly in the batch (checked: batch 8 saves exactly half of batch 16). The analytic
expectation (docs/method.md §7) is a ratio of B when layers dominate; the own stem and head of every
block job (the project's independent mode) keep it below B, and the script reports their share.

Every job runs in its own subprocess, one at a time (``--worker`` is that subprocess's entry point),
single-threaded by default (``--threads``).

Command (from the repository root; about 7 minutes on 2 CPU cores, DiT at batch 16)::

    .venv/bin/python benchmarks/memory.py
    .venv/bin/python benchmarks/memory.py --dit-batch 64 --dit-checkpoint-blocks 2 3 4 6   # fuller, slower

Writes results/bench/memory.json and results/bench/memory.png and prints the tables.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

SETTINGS = {"vit": C.VIT, "dit": C.DIT}
BLOCKS = (2, 3, 4, 6)
DEPTHS = (3, 6, 12, 24)


# ------------------------------------------------------------------------------ in the worker process


class CheckpointedLayer(nn.Module):
    """``layer(h, c)`` recomputed in backward instead of keeping its activations (non-reentrant)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.layer, h, c, use_reentrant=False)


def checkpoint_layers(model: nn.Module) -> None:
    model.layers = nn.ModuleList(CheckpointedLayer(layer) for layer in model.layers)


class SavedTensorMeter:
    """Bytes of the distinct storages saved for backward, attributed to the part of the model that was
    running when each was first saved (stem, layer i, head; anything else is ``other``)."""

    def __init__(self, model: nn.Module) -> None:
        self.param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = defaultdict(int)
        self.region = "other"
        parts = [("stem", model.stem), ("head", model.head)]
        parts += [(f"layer{i}", layer) for i, layer in enumerate(model.layers)]
        for name, module in parts:
            module.register_forward_pre_hook(lambda *_, n=name: self._enter(n))
            module.register_forward_hook(lambda *_: self._enter("other"))

    def _enter(self, region: str) -> None:
        self.region = region

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self.seen and ptr not in self.param_storages:
            self.seen.add(ptr)
            self.bytes[self.region] += storage.nbytes()
        return t

    def wrap(self, objective):
        def measured(batch, gen):
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                return objective(batch, gen)

        return measured

    def summary(self) -> dict:
        layers = [v for k, v in sorted(self.bytes.items()) if k.startswith("layer")]
        return {
            "stem": self.bytes["stem"],
            "layers": sum(layers),
            "head": self.bytes["head"],
            "other": self.bytes["other"],
            "total": sum(self.bytes.values()),
        }


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


MICRO = {"vit": "ViT-micro", "dit": "DiT-micro"}


def warm_up(setting: str, device: torch.device) -> None:
    """Load what the first training step loads lazily (optimizer code, kernels: ~150 MB of RSS on CPU)
    on the same family's micro model, so that the baseline RSS holds the library and not the job."""
    task, _, dataset = SETTINGS[setting]
    exp = C.experiment((task, MICRO[setting], dataset), 1)
    for which in ("e2e", 1):
        C.Trainer(*C.job(exp, which), C.random_data(exp, 2), 2, device).step()
    gc.collect()


def worker(spec: dict) -> dict:
    """One job in this (fresh) process: warm up, build, 2 training steps, measure."""
    torch.set_num_threads(spec["threads"])
    device = C.pick_device(spec["device"])
    warm_up(spec["setting"], device)
    baseline_rss = psutil.Process().memory_info().rss
    exp = C.experiment(SETTINGS[spec["setting"]], spec["blocks"], spec.get("depth"))
    which = spec["job"]
    model, objective = C.job(exp, which)
    if spec["checkpoint"]:
        checkpoint_layers(model)
    meter = SavedTensorMeter(model)
    trainer = C.Trainer(model, meter.wrap(objective), C.random_data(exp, spec["batch"]), spec["batch"], device)
    built_rss = psutil.Process().memory_info().rss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    trainer.step()  # step 1: activations measured, optimizer state allocated
    grads = tensor_bytes(p.grad for p in model.parameters())
    optim = tensor_bytes(t for state in trainer.optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    trainer.objective = objective
    trainer.step()  # step 2: the steady state (optimizer state already held)
    C.synchronize(device)
    seconds = time.perf_counter() - t0
    params = {part: tensor_bytes(getattr(model, part).parameters()) for part in ("stem", "layers", "head")}
    result = {
        **spec,
        "layers_in_job": len(model.layers),
        "param_count": sum(p.numel() for p in model.parameters()),
        "params_bytes": sum(params.values()),
        "params_by_part": params,
        "buffers_bytes": tensor_bytes(model.buffers()),
        "grads_bytes": grads,
        "optimizer_bytes": optim,
        "activations": meter.summary(),
        "rss_baseline": baseline_rss,
        "rss_built": built_rss,
        "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # kB on Linux
        "two_steps_seconds": seconds,
    }
    result["states_bytes"] = result["params_bytes"] + grads + optim
    result["total_bytes"] = result["states_bytes"] + result["activations"]["total"]
    result["rss_peak_delta"] = result["rss_peak"] - baseline_rss
    if device.type == "cuda":
        result["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
    return result


# ------------------------------------------------------------------------------ in the parent process

#: how the worker's C allocator is set up: glibc's default (a dynamic mmap threshold, so freed tensors
#: often stay in the heap and count in RSS) or a fixed 64 KiB mmap threshold (every tensor is its own
#: mapping, returned on free, so RSS follows the live tensors)
ALLOCATORS = {"glibc": {}, "mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def run_job(spec: dict, allocator: str) -> dict:
    env = {**os.environ, **ALLOCATORS[allocator]}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    result = {**json.loads(proc.stdout.strip().splitlines()[-1]), "allocator": allocator}
    print(
        f"  {spec['setting']} L={result['layers_in_job']:>2} job={spec['job']!s:>3} B={spec['blocks']} "
        f"ckpt={int(spec['checkpoint'])} {allocator:>5}: states {C.mib(result['states_bytes']):7.1f} MiB, "
        f"activations {C.mib(result['activations']['total']):7.1f} MiB, peak-baseline "
        f"{C.mib(result['rss_peak_delta']):7.1f} MiB ({result['two_steps_seconds']:.1f} s)",
        flush=True,
    )
    return result


def run_jobs(spec: dict, allocators, raw: list) -> dict[str, dict]:
    """The same job once per allocator setting, each in a fresh process."""
    results = {a: run_job(spec, a) for a in allocators}
    raw += results.values()
    return results


def per_layer_activations(result: dict) -> float:
    """Activation bytes one layer saves in this job (without checkpointing): what a checkpointed layer
    holds again while it is recomputed in backward."""
    return result["activations"]["layers"] / result["layers_in_job"]


def compare(
    e2e: dict[str, dict], block: dict[str, dict], blocks: int, extrapolate=(), recompute: float | None = None
) -> dict:
    """End-to-end / block ratios and the stem+head overhead of the block job. The byte counts do not
    depend on the allocator; the measured peaks get one ratio per allocator.

    ``extrapolate``: batch sizes at which to estimate the total ratio (with the recomputed layer, if
    any), with activations scaled linearly in the batch (they are: every saved tensor is per-example).
    ``recompute``: for checkpointed jobs, the bytes of one layer's activations, held again during its
    recomputation in backward, added to both sides (the analytic 4PL + A of docs/method.md §7)."""
    e, k = next(iter(e2e.values())), next(iter(block.values()))
    row = {
        "B": blocks,
        "block_layers": k["layers_in_job"],
        "e2e_layers": e["layers_in_job"],
        "ratio_states": e["states_bytes"] / k["states_bytes"],
        "ratio_activations": e["activations"]["total"] / k["activations"]["total"],
        "ratio_total": e["total_bytes"] / k["total_bytes"],
    }
    held = recompute or 0.0
    for n in extrapolate:
        scale = n / e["batch"]
        row[f"ratio_total_at_batch_{n}"] = (e["states_bytes"] + scale * (e["activations"]["total"] + held)) / (
            k["states_bytes"] + scale * (k["activations"]["total"] + held)
        )
    if recompute is not None:
        row["recompute_mib"] = C.mib(recompute)
        row["ratio_total_with_recompute"] = (e["total_bytes"] + recompute) / (k["total_bytes"] + recompute)
    for alloc in block:
        row[f"ratio_peak_delta_{alloc}"] = e2e[alloc]["rss_peak_delta"] / block[alloc]["rss_peak_delta"]
        row[f"ratio_peak_rss_{alloc}"] = e2e[alloc]["rss_peak"] / block[alloc]["rss_peak"]
        row[f"e2e_peak_delta_mib_{alloc}"] = C.mib(e2e[alloc]["rss_peak_delta"])
        row[f"block_peak_delta_mib_{alloc}"] = C.mib(block[alloc]["rss_peak_delta"])
        if "cuda_max_allocated" in block[alloc]:
            row["ratio_cuda_max_allocated"] = e2e[alloc]["cuda_max_allocated"] / block[alloc]["cuda_max_allocated"]
    row["target"] = 0.95 * blocks
    p, a = k["params_by_part"], k["activations"]
    row["block_stem_head_param_share"] = (p["stem"] + p["head"]) / k["params_bytes"]
    row["block_stem_head_other_act_share"] = (a["stem"] + a["head"] + a["other"]) / a["total"]
    row["e2e_stem_head_param_share"] = (e["params_by_part"]["stem"] + e["params_by_part"]["head"]) / e["params_bytes"]
    row["ratio_layers_only_params"] = e["params_by_part"]["layers"] / p["layers"]
    row["ratio_layers_only_activations"] = e["activations"]["layers"] / a["layers"]
    row["e2e_total_mib"] = C.mib(e["total_bytes"])
    row["block_total_mib"] = C.mib(k["total_bytes"])
    row["e2e_states_mib"] = C.mib(e["states_bytes"])
    row["block_states_mib"] = C.mib(k["states_bytes"])
    row["e2e_activations_mib"] = C.mib(e["activations"]["total"])
    row["block_activations_mib"] = C.mib(a["total"])
    return row


def sweep_blocks(
    setting: str,
    batch: int,
    blocks,
    ckpt: bool,
    allocators,
    common: dict,
    raw: list,
    extrapolate=(),
    recompute: float | None = None,
) -> list[dict]:
    base = {"setting": setting, "batch": batch, "checkpoint": ckpt, **common}
    e2e = run_jobs({**base, "blocks": blocks[0], "job": "e2e"}, allocators, raw)  # the same for every B
    rows = []
    for b in blocks:
        block = run_jobs(
            {**base, "blocks": b, "job": C.largest_block(C.experiment(SETTINGS[setting], b))}, allocators, raw
        )
        rows.append(
            {"setting": setting, "batch": batch, "checkpoint": ckpt, **compare(e2e, block, b, extrapolate, recompute)}
        )
    return rows


def plain_e2e(raw: list, setting: str) -> dict:
    """The end-to-end job of ``setting`` measured without checkpointing (at the registry depth)."""
    return next(
        r
        for r in raw
        if r["setting"] == setting and r["job"] == "e2e" and not r["checkpoint"] and r.get("depth") is None
    )


def sweep_depth(batch: int, depths, blocks: int, allocators, common: dict, raw: list) -> list[dict]:
    rows = []
    for depth in depths:
        base = {"setting": "vit", "batch": batch, "checkpoint": False, "blocks": blocks, "depth": depth, **common}
        largest = C.largest_block(C.experiment(SETTINGS["vit"], blocks, depth))
        e2e, block = (
            run_jobs({**base, "job": "e2e"}, allocators, raw),
            run_jobs({**base, "job": largest}, allocators, raw),
        )
        rows.append({"setting": "vit", "batch": batch, "depth": depth, **compare(e2e, block, blocks)})
    return rows


def plot(record: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    keys = ["states", "activations", "total", *(f"peak_delta_{a}" for a in record["allocators"])]
    for ax, setting in zip(axes[0], ("vit", "dit")):
        rows = [r for r in record["blocks"] if r["setting"] == setting and not r["checkpoint"]]
        if not rows:
            continue
        bs = [r["B"] for r in rows]
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            ax.bar(
                [j + (i - len(keys) / 2 + 0.5) * width for j in range(len(bs))],
                [r.get(f"ratio_{key}", 0) for r in rows],
                width,
                label=key,
            )
        for j, b in enumerate(bs):
            ax.hlines([b, 0.95 * b], j - 0.45, j + 0.45, colors="k", linestyles=["-", ":"])
        ax.set_xticks(range(len(bs)), [f"B={b}" for b in bs])
        ax.set_ylabel("end-to-end / largest block")
        ax.set_title(
            f"{C.setting_label(SETTINGS[setting])}, batch {rows[0]['batch']} (line: B, dotted: 0.95 B)", fontsize=10
        )
        ax.legend(fontsize=7)
    ax = axes[1][0]
    alloc = record["allocators"][-1]
    for setting, marker, color in (("vit", "o", "C0"), ("dit", "s", "C1")):
        for ckpt, style in ((False, "-"), (True, "--")):
            rows = [r for r in record["blocks"] if r["setting"] == setting and r["checkpoint"] == ckpt]
            if rows:
                tag = " + checkpointing" if ckpt else ""
                key = "ratio_total_with_recompute" if ckpt else "ratio_total"
                ax.plot(
                    [r["B"] for r in rows],
                    [r[key] for r in rows],
                    style,
                    marker=marker,
                    color=color,
                    label=f"{setting} total{tag} (+ one layer recomputed)" if ckpt else f"{setting} total",
                )
                ax.plot(
                    [r["B"] for r in rows],
                    [r[f"ratio_peak_delta_{alloc}"] for r in rows],
                    style,
                    marker=marker,
                    color=color,
                    alpha=0.35,
                    label=f"{setting} peak delta ({alloc}){tag}",
                )
    ax.plot(BLOCKS, BLOCKS, "k-", lw=0.8, label="B")
    ax.plot(BLOCKS, [0.95 * b for b in BLOCKS], "k:", lw=0.8, label="0.95 B")
    ax.set_xlabel("B")
    ax.set_ylabel("end-to-end / largest block")
    ax.set_title("with and without activation checkpointing (per layer)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax = axes[1][1]
    rows = record["depth"]
    if rows:
        for key in ("states", "activations", "total", *(f"peak_delta_{a}" for a in record["depth_allocators"])):
            ax.plot([r["depth"] for r in rows], [r[f"ratio_{key}"] for r in rows], marker="o", label=key)
        ax.axhline(rows[0]["B"], color="k", lw=0.8)
        ax.axhline(0.95 * rows[0]["B"], color="k", ls=":", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["depth"] for r in rows], [str(r["depth"]) for r in rows])
        ax.set_xlabel(f"depth L (ViT width 128, batch {rows[0]['batch']})")
        ax.set_ylabel(f"end-to-end / largest block of B={rows[0]['B']}")
        ax.set_title("memory ratio vs depth", fontsize=10)
        ax.legend(fontsize=7)
    dev = record["device"]
    fig.suptitle(
        f"Training memory, end-to-end / block job: {dev['device']} ({dev['cpu_model']}, "
        f"{dev['logical_cpus']} cores, {record['threads']} torch thread(s))",
        fontsize=10,
    )
    return C.save_figure(fig, "memory")


def print_tables(record: dict) -> None:
    peaks = [f"ratio_peak_delta_{a}" for a in record["allocators"]]
    cols = [
        "setting",
        "batch",
        "checkpoint",
        "B",
        "block_layers",
        "ratio_states",
        "ratio_activations",
        "ratio_total",
        *peaks,
        "target",
        "block_stem_head_param_share",
        "block_stem_head_other_act_share",
    ]
    if any("ratio_cuda_max_allocated" in r for r in record["blocks"]):
        cols.insert(-3, "ratio_cuda_max_allocated")
    print(C.format_table(record["blocks"], cols))
    print()
    extra = sorted(
        {k for r in record["blocks"] for k in r if k.startswith("ratio_total_at_batch_")},
        key=lambda k: int(k.rsplit("_", 1)[1]),
    )
    rows = [r for r in record["blocks"] if r["checkpoint"] or any(k in r for k in extra)]
    print(
        C.format_table(
            rows,
            [
                "setting",
                "batch",
                "checkpoint",
                "B",
                "ratio_total",
                *extra,
                "recompute_mib",
                "ratio_total_with_recompute",
                *peaks,
            ],
        )
    )
    print()
    depth_peaks = [f"ratio_peak_delta_{a}" for a in record["depth_allocators"]]
    print(
        C.format_table(
            record["depth"],
            [
                "depth",
                "B",
                "block_layers",
                "ratio_states",
                "ratio_activations",
                "ratio_total",
                *depth_peaks,
                "e2e_total_mib",
                "block_total_mib",
                "block_stem_head_param_share",
            ],
        )
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--vit-batch", type=int, default=128)
    p.add_argument("--dit-batch", type=int, default=16, help="DiT-S/2 batch (paper: 512; 16 keeps CPU time short)")
    p.add_argument("--blocks", type=int, nargs="+", default=list(BLOCKS))
    p.add_argument(
        "--dit-checkpoint-blocks",
        type=int,
        nargs="*",
        default=[3],
        help="B values for the DiT run with activation checkpointing (each costs a DiT job)",
    )
    p.add_argument(
        "--dit-extrapolate",
        type=int,
        nargs="*",
        default=[64, 512],
        help="DiT batch sizes at which to estimate the total ratio (activations scale linearly)",
    )
    p.add_argument("--depths", type=int, nargs="*", default=list(DEPTHS))
    p.add_argument("--depth-blocks", type=int, default=3)
    p.add_argument("--allocators", nargs="+", choices=list(ALLOCATORS), default=list(ALLOCATORS))
    p.add_argument("--depth-allocators", nargs="+", choices=list(ALLOCATORS), default=["mmap"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-dit", action="store_true")
    p.add_argument("--replot", action="store_true", help="only print and plot results/bench/memory.json again")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.replot:
        record = json.loads((C.RESULTS / "memory.json").read_text())
        print_tables(record)
        print(f"\nwrote {plot(record)}")
        return 0
    torch.set_num_threads(args.threads)
    device = C.pick_device(args.device)
    common = {"threads": args.threads, "device": str(device)}
    record = {
        **C.start_record("memory", device, argv),
        "threads": args.threads,
        "allocators": args.allocators,
        "depth_allocators": args.depth_allocators,
        "notes": "ratios are end-to-end / largest block job; states = params + grads + AdamW state; "
        "activations = bytes saved for backward in one training forward (parameters excluded); "
        "peak_delta = ru_maxrss - RSS before the build (after imports and a micro-model warm-up "
        "step) of a fresh process that ran 2 training steps; glibc = default allocator, "
        "mmap = MALLOC_MMAP_THRESHOLD_=65536",
        "blocks": [],
        "depth": [],
        "raw": [],
    }
    t0 = time.perf_counter()
    raw = record["raw"]
    runs = [("vit", args.vit_batch, args.blocks, args.blocks, ())]
    if not args.skip_dit:
        runs.append(("dit", args.dit_batch, args.blocks, args.dit_checkpoint_blocks, args.dit_extrapolate))
    for setting, batch, blocks, ckpt_blocks, extrapolate in runs:
        print(f"{SETTINGS[setting][1]}, batch {batch}", flush=True)
        record["blocks"] += sweep_blocks(setting, batch, blocks, False, args.allocators, common, raw, extrapolate)
        if ckpt_blocks:
            print(f"{SETTINGS[setting][1]}, batch {batch}, activation checkpointing", flush=True)
            recompute = per_layer_activations(plain_e2e(raw, setting))
            record["blocks"] += sweep_blocks(
                setting, batch, ckpt_blocks, True, args.allocators, common, raw, extrapolate, recompute
            )
    if args.depths:
        print(f"ViT width 128, depth sweep, B={args.depth_blocks}", flush=True)
        record["depth"] = sweep_depth(
            args.vit_batch, args.depths, args.depth_blocks, args.depth_allocators, common, raw
        )
    return C.finish("memory", record, t0, print_tables, plot)


if __name__ == "__main__":
    sys.exit(main())
