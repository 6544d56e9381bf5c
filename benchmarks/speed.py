"""Wall time of block-wise vs end-to-end training and inference, as ratios (docs/method.md §7, Table 12).

1. Training iteration, ViT-paper (12 layers, width 128) on CIFAR-100 shapes, B=3, batch 128 (the paper's
   Table 12 setting): one optimizer step (batch draw, forward, loss, backward, gradient clipping, AdamW;
   the body of ``dblocks.train.train``'s loop) of the end-to-end job and of each block's job, on the same
   device and batch size, interleaved (e2e, block 1, 2, 3, e2e, ...) after warm-up rounds. Reported:
   median and IQR per job, and sum over blocks / e2e (paper: 0.0543 / 0.0507 = 1.07; target <= 1.03), as
   the ratio of medians and as the median of the per-round ratios.
2. Sampling, DiT-S/2 on CIFAR-10 shapes, B=3: images/s of ``dblocks.sample.generate`` for the end-to-end
   denoiser (one block over the whole sigma range) vs the assembled blocks, at the same number of Euler
   steps on the same equi-quantile grid, no guidance; block-wise runs only the block owning each sigma.
   Speed-up = e2e time / block-wise time (target >= 0.9 B).
3. ViT inference latency: ``classify_direct`` (one pass of the end-to-end classifier) vs ``classify``
   (B Euler steps, one per block), at batch 1 and batch 128.

Models are untrained (timing does not depend on the weights); inputs are random tensors.

Command (from the repository root; about 3 minutes on 2 CPU cores, single-threaded)::

    .venv/bin/python benchmarks/speed.py
    .venv/bin/python benchmarks/speed.py --sample-steps 50 --sample-images 64   # paper's 50 steps; slow on CPU

Writes results/bench/speed.json and results/bench/speed.png and prints the tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402

from dblocks.blocks import AssembledModel  # noqa: E402
from dblocks.sample import classify, classify_direct, generate  # noqa: E402


def training_iterations(blocks: int, batch: int, reps: int, warmup: int, device: torch.device) -> dict:
    exp = C.experiment(C.VIT, blocks)
    data = C.random_data(exp, batch)
    jobs = {"e2e": "e2e", **{f"block{b}": b for b in range(1, blocks + 1)}}
    trainers = {name: C.Trainer(*C.job(exp, which), data, batch, device) for name, which in jobs.items()}
    times = C.interleaved({name: t.step for name, t in trainers.items()}, reps, warmup, device)
    stats = {name: C.summarize(ts) for name, ts in times.items()}
    block_names = [n for n in jobs if n != "e2e"]
    sum_blocks = sum(stats[n]["median"] for n in block_names)
    per_round = [sum(times[n][r] for n in block_names) / times["e2e"][r] for r in range(reps)]
    return {
        "arch": "ViT-paper",
        "dataset": "cifar100",
        "blocks": blocks,
        "batch": batch,
        "reps": reps,
        "warmup": warmup,
        "layers": {name: len(t.module.layers) for name, t in trainers.items()},
        "seconds": stats,
        "times": times,
        "sum_blocks_median": sum_blocks,
        "ratio_sum_blocks_over_e2e": sum_blocks / stats["e2e"]["median"],
        "ratio_per_round": C.summarize(per_round),
        "paper_ratio": 0.0543 / 0.0507,
        "target": 1.03,
    }


def sampling(blocks: int, images: int, steps: int, reps: int, warmup: int, device: torch.device) -> dict:
    exp = C.experiment(C.DIT, blocks)
    grid = exp.noise.quantile_grid(steps)
    labels = torch.arange(images) % exp.arch.num_classes
    models = {
        "e2e": AssembledModel([exp.e2e()], exp.full_range),
        "blockwise": AssembledModel(exp.empty_blocks(), exp.partition),
    }
    for m in models.values():
        m.to(device)

    def run(model):
        return lambda: generate(model, labels, grid, torch.Generator().manual_seed(0), batch_size=images)

    times = C.interleaved({name: run(m) for name, m in models.items()}, reps, warmup, device)
    stats = {name: C.summarize(ts) for name, ts in times.items()}
    calls = {name: [c // (reps + warmup) for c in m.calls] for name, m in models.items()}
    return {
        "arch": "DiT-S/2",
        "dataset": "cifar10",
        "blocks": blocks,
        "images": images,
        "steps": steps,
        "reps": reps,
        "warmup": warmup,
        "guidance": 1.0,
        "seconds": stats,
        "times": times,
        "block_calls_per_sample_run": calls,
        "images_per_second": {n: images / s["median"] for n, s in stats.items()},
        "speedup": stats["e2e"]["median"] / stats["blockwise"]["median"],
        "target": 0.9 * blocks,
    }


def vit_latency(blocks: int, batches, reps: int, warmup: int, device: torch.device) -> list[dict]:
    exp = C.experiment(C.VIT, blocks)
    e2e = exp.e2e().to(device)
    assembled = AssembledModel(exp.empty_blocks(), exp.partition).to(device)
    rows = []
    for batch in batches:
        images = C.random_data(exp, batch).images
        jobs = {
            "e2e_single_pass": lambda images=images, batch=batch: classify_direct(e2e, images, batch_size=batch),
            "blockwise_euler": lambda images=images, batch=batch: classify(
                assembled, images, torch.Generator().manual_seed(0), batch_size=batch
            ),
        }
        times = C.interleaved(jobs, reps, warmup, device)
        stats = {name: C.summarize(ts) for name, ts in times.items()}
        ratio = stats["blockwise_euler"]["median"] / stats["e2e_single_pass"]["median"]
        rows.append(
            {
                "arch": "ViT-paper",
                "blocks": blocks,
                "batch": batch,
                "reps": reps,
                "seconds": stats,
                "ratio_blockwise_over_e2e": ratio,
            }
        )
    return rows


def plot(record: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))

    def bars(ax, names, stats, colors=None):
        med = [stats[n]["median"] for n in names]
        err = [
            [stats[n]["median"] - stats[n]["q1"] for n in names],
            [stats[n]["q3"] - stats[n]["median"] for n in names],
        ]
        ax.bar(names, med, yerr=err, capsize=3, color=colors)

    tr = record["training"]
    names = list(tr["seconds"])
    bars(axes[0], names, tr["seconds"])
    axes[0].bar(["sum of blocks"], [tr["sum_blocks_median"]], color="grey")
    axes[0].set_ylabel("seconds per iteration (median, IQR)")
    axes[0].set_title(
        f"ViT-paper train step, batch {tr['batch']}, B={tr['blocks']}: sum/e2e = {tr['ratio_sum_blocks_over_e2e']:.3f}",
        fontsize=9,
    )
    sm = record["sampling"]
    ips = sm["images_per_second"]
    axes[1].bar(list(ips), list(ips.values()), color=["C0", "C1"])
    axes[1].set_ylabel("images / s")
    axes[1].set_title(
        f"DiT-S/2 sampling, {sm['steps']} Euler steps, {sm['images']} images: "
        f"speed-up {sm['speedup']:.2f} (target {sm['target']:.2f})",
        fontsize=9,
    )
    lat = record["vit_latency"]
    x = range(len(lat))
    for i, name in enumerate(("e2e_single_pass", "blockwise_euler")):
        axes[2].bar(
            [j + (i - 0.5) * 0.4 for j in x], [r["seconds"][name]["median"] * 1e3 for r in lat], 0.4, label=name
        )
    axes[2].set_xticks(list(x), [f"batch {r['batch']}" for r in lat])
    axes[2].set_yscale("log")
    axes[2].set_ylabel("ms per classify call (median)")
    axes[2].set_title(
        f"ViT-paper inference, B={lat[0]['blocks']}: block-wise / e2e = "
        + ", ".join(f"{r['ratio_blockwise_over_e2e']:.2f}" for r in lat),
        fontsize=9,
    )
    axes[2].legend(fontsize=8)
    dev = record["device"]
    fig.suptitle(
        f"Speed: {dev['device']} ({dev['cpu_model']}, {dev['logical_cpus']} cores, "
        f"{dev['torch_threads']} torch thread(s))",
        fontsize=10,
    )
    return C.save_figure(fig, "speed")


def print_tables(record: dict) -> None:
    tr = record["training"]
    rows = [
        {"job": n, "layers": tr["layers"][n], "median_s": s["median"], "iqr_s": s["iqr"]}
        for n, s in tr["seconds"].items()
    ]
    rows.append({"job": "sum of blocks", "median_s": tr["sum_blocks_median"]})
    print(C.format_table(rows, ["job", "layers", "median_s", "iqr_s"]))
    pr = tr["ratio_per_round"]
    print(
        f"sum of blocks / e2e: {tr['ratio_sum_blocks_over_e2e']:.3f} (ratio of medians); per round: median "
        f"{pr['median']:.3f}, IQR [{pr['q1']:.3f}, {pr['q3']:.3f}]; paper {tr['paper_ratio']:.3f}, target <= 1.03\n"
    )
    sm = record["sampling"]
    rows = [
        {
            "sampler": n,
            "median_s": s["median"],
            "iqr_s": s["iqr"],
            "images_per_s": sm["images_per_second"][n],
            "block_calls": sm["block_calls_per_sample_run"][n],
        }
        for n, s in sm["seconds"].items()
    ]
    print(C.format_table(rows, ["sampler", "median_s", "iqr_s", "images_per_s", "block_calls"]))
    print(
        f"DiT-S/2 sampling speed-up (e2e time / block-wise time): {sm['speedup']:.3f}, target >= {sm['target']:.2f}\n"
    )
    rows = [
        {
            "batch": r["batch"],
            "e2e_ms": r["seconds"]["e2e_single_pass"]["median"] * 1e3,
            "e2e_iqr_ms": r["seconds"]["e2e_single_pass"]["iqr"] * 1e3,
            "blockwise_ms": r["seconds"]["blockwise_euler"]["median"] * 1e3,
            "blockwise_iqr_ms": r["seconds"]["blockwise_euler"]["iqr"] * 1e3,
            "blockwise/e2e": r["ratio_blockwise_over_e2e"],
        }
        for r in record["vit_latency"]
    ]
    print(C.format_table(rows, ["batch", "e2e_ms", "e2e_iqr_ms", "blockwise_ms", "blockwise_iqr_ms", "blockwise/e2e"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--batch", type=int, default=128, help="ViT training batch (paper: 128)")
    C.timing_arguments(p, reps=20, warmup=3)
    p.add_argument("--sample-images", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=6, help="Euler steps (paper: 50; 6 = 2 per block at B=3)")
    p.add_argument("--sample-reps", type=int, default=3)
    p.add_argument("--latency-batches", type=int, nargs="+", default=[1, 128])
    args = p.parse_args(argv)
    device = C.timing_device(args)
    record = C.start_record("speed", device, argv)
    t0 = time.perf_counter()
    print(f"ViT-paper training iterations, B={args.blocks}, batch {args.batch}, {args.reps} reps", flush=True)
    record["training"] = training_iterations(args.blocks, args.batch, args.reps, args.warmup, device)
    print(f"DiT-S/2 sampling, {args.sample_images} images, {args.sample_steps} steps", flush=True)
    record["sampling"] = sampling(args.blocks, args.sample_images, args.sample_steps, args.sample_reps, 1, device)
    print("ViT-paper inference latency", flush=True)
    record["vit_latency"] = vit_latency(args.blocks, args.latency_batches, args.reps, args.warmup, device)
    return C.finish("speed", record, t0, print_tables, plot)


if __name__ == "__main__":
    sys.exit(main())
