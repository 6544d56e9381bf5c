"""Where block-wise training catches up with end-to-end training: test accuracy of the tiny ViT (Table 1's
``vit-cifar100`` of params/tiny.yaml, on the digits) against the number of optimizer steps, for both methods, over
seeds.

Each point is a whole training run at that budget (warm-up and cosine schedule over exactly those steps, as a
pipeline job with ``train.steps`` set to it would run), not an intermediate checkpoint of a longer run: a
checkpoint halfway through a cosine schedule is not what a shorter job makes. Block-wise: the B blocks trained
independently, each for that many steps, assembled and evaluated as the pipeline does (B Euler steps from pure
noise, ``dblocks.evaluate.evaluate_classifier``, and the same blocks' chain started at the noise's mean);
end-to-end: the plain ViT with cross-entropy, the same steps.
Everything else is the params file's experiment (its seed offset by the seed index, as ``pipeline.seeds`` does).
Runs are spread over ``--workers`` processes of one torch thread each.

Command (from the repository root; about 15 minutes on 2 CPU cores with the defaults)::

    .venv/bin/python benchmarks/training_length.py
    .venv/bin/python benchmarks/training_length.py --steps 250 500 1000 2000 4000 --seeds 3

Writes results/bench/training_length.json and results/bench/training_length.png and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def one_run(params: str, experiment: str, method: str, steps: int, seed: int, data: str | None) -> dict:
    """Train ``experiment`` (``method``) for ``steps`` steps with ``seed``; its test accuracy and training time."""
    import torch

    from dblocks.blocks import AssembledModel
    from dblocks.evaluate import evaluate_classifier
    from dblocks.experiment import Experiment, derive_seed
    from dblocks.jobs import training_job
    from dblocks.params import Params
    from dblocks.train import train

    torch.set_num_threads(1)
    config = copy.deepcopy(Params.load(params).experiments[experiment])
    config["seed"] += seed
    config["train"]["steps"] = steps
    config["train"]["warmup"] = min(config["train"]["warmup"], steps // 10)
    exp = Experiment(config)
    train_split, test_split = exp.load_data("train", data), exp.load_data("test", data)
    t0 = time.perf_counter()
    if method == "blockwise":
        blocks = []
        for b in range(1, config["blocks"] + 1):
            module, objective, total = training_job(exp, method, b)
            train(
                module,
                objective,
                train_split,
                config["train"],
                seed=derive_seed(config["seed"], "train-block", b),
                device=torch.device("cpu"),
                steps=total,
                progress=False,
            )
            blocks.append(module.eval())
        model = AssembledModel(blocks, exp.partition)
    else:
        module, objective, total = training_job(exp, method)
        train(
            module,
            objective,
            train_split,
            config["train"],
            seed=derive_seed(config["seed"], "train-e2e"),
            device=torch.device("cpu"),
            steps=total,
            progress=False,
        )
        model = module.eval()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        record = evaluate_classifier(model, exp, test_split)
    run = {"method": method, "steps": steps, "seed": seed, "accuracy": 100 * record["accuracy"]}
    if "accuracy_mean_start" in record:  # block-wise: the same blocks' chain from the noise's mean
        run["accuracy_mean_start"] = 100 * record["accuracy_mean_start"]
    return {**run, "train_seconds": seconds}


#: the curves: (row label, legend, method, accuracy key of the runs)
CURVES = (
    ("e2e", "end-to-end backprop", "e2e", "accuracy"),
    ("blockwise", "DiffusionBlocks (independent blocks)", "blockwise", "accuracy"),
    (
        "blockwise, chain from the noise mean",
        "DiffusionBlocks, chain from the noise mean",
        "blockwise",
        "accuracy_mean_start",
    ),
)


def aggregate(runs: list[dict]) -> list[dict]:
    rows = []
    for label, _, method, key in CURVES:
        for steps in sorted({r["steps"] for r in runs}):
            acc = [r[key] for r in runs if r["method"] == method and r["steps"] == steps and key in r]
            if acc:
                rows.append(
                    {
                        "method": label,
                        "steps": steps,
                        "mean": statistics.mean(acc),
                        "std": statistics.stdev(acc) if len(acc) > 1 else None,
                        "n": len(acc),
                    }
                )
    return rows


def print_tables(record: dict) -> None:
    print(
        f"{record['experiment']} of {record['params']}: test accuracy (%) vs optimizer steps, "
        f"mean and sample std over {record['seeds']} seeds"
    )
    print(C.format_table(record["rows"], ["method", "steps", "mean", "std", "n"]))


def plot(record: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, label, _, _ in CURVES:
        rows = [r for r in record["rows"] if r["method"] == method]
        ax.errorbar(
            [r["steps"] for r in rows],
            [r["mean"] for r in rows],
            yerr=[r["std"] or 0 for r in rows],
            marker="o",
            capsize=3,
            label=label,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("optimizer steps (each block / the baseline)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{record['experiment']} (tiny: digits, CPU), {record['seeds']} seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return C.save_figure(fig, "training_length")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params/tiny.yaml")
    parser.add_argument("--experiment", default="vit-cifar100")
    parser.add_argument("--steps", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--data",
        default="data/prepared/digits",
        help="prepared dataset directory (what `make run` prepares); empty: load the source",
    )
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()
    data = args.data if args.data and Path(args.data).is_dir() else None
    jobs = [
        (args.params, args.experiment, method, steps, seed, data)
        for steps in sorted(args.steps, reverse=True)
        for seed in range(args.seeds)
        for method in ("blockwise", "e2e")
    ]
    with ProcessPoolExecutor(args.workers) as pool:
        runs = list(pool.map(one_run, *zip(*jobs)))
    import torch

    record = {
        "params": args.params,
        "experiment": args.experiment,
        "seeds": args.seeds,
        "data": data,
        "runs": runs,
        "rows": aggregate(runs),
        "machine": C.device_description(torch.device("cpu")),
    }
    return C.finish("training_length", record, started, print_tables, plot)


if __name__ == "__main__":
    sys.exit(main())
