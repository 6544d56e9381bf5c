"""Fixed costs of the pipeline around the training itself.

1. Building the paper-scale DAG: wall time of ``.venv/bin/snakemake -n --config params=params/paper.yaml``
   run from the repository root (a dry run: the DAG is built and printed, nothing is executed).
2. CLI start-up: wall time of ``.venv/bin/python -c "import dblocks.cli"`` and of ``.venv/bin/dblocks models``
   (next to ``python -c pass`` for the interpreter alone and ``import torch``, which the CLI imports only
   for commands that read the model registry or a model), and the other fixed costs every pipeline job pays in its own
   fresh interpreter: MLflow with its SQLite store (tracked jobs), the first optimizer (training jobs: torch
   imports torch._dynamo there) and torch-fidelity (image-generation evaluations).
3. MLflow per-step logging: ``dblocks.tracking.JobRun.log_step`` against a fresh SQLite store in a
   temporary directory (set up with ``dblocks.tracking.init_runs`` as ``dblocks track-init`` does), mean
   seconds per call over 200 calls including the batched flushes (every 50 calls by default) and the
   final flush at exit; plus the one-off costs of creating the store and opening the child run.
   A job calls ``log_step`` once every ``train.log_every`` steps (read from params/tiny.yaml and
   params/paper.yaml: 50 and 100 for their first experiments), so the cost per training step is that
   mean divided by log_every.

Each command is timed ``--reps`` times (median and IQR); MLFLOW_TRACKING_URI is removed from the
environment of the logging measurement so that nothing outside the temporary directory is written.

Command (from the repository root; about 1 minute)::

    .venv/bin/python benchmarks/pipeline_overhead.py

Writes results/bench/pipeline_overhead.json and results/bench/pipeline_overhead.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402
from dblocks.params import Params  # noqa: E402
from dblocks.tracking import JobRun, init_runs  # noqa: E402

VENV_BIN = C.ROOT / ".venv" / "bin"


def time_command(argv: list[str], reps: int) -> dict:
    """Wall time of a command run from the repository root, ``reps`` times; fails loudly if it fails."""
    times, out = [], ""
    for _ in range(reps):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=C.ROOT, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
        out = proc.stdout + proc.stderr
    return {"command": " ".join(argv), **C.summarize(times), "times": times, "output": out}


def snakemake_dag(params: str, reps: int) -> dict:
    result = time_command([str(VENV_BIN / "snakemake"), "-n", "--config", f"params={params}"], reps)
    jobs = re.search(r"^total\s+(\d+)\s*$", result.pop("output"), re.M)
    return {**result, "params": params, "jobs": int(jobs.group(1)) if jobs else None}


def cli_startup(reps: int) -> dict:
    py = str(VENV_BIN / "python")
    commands = {"python -c pass": [py, "-c", "pass"],
                "import torch": [py, "-c", "import torch"],
                "import dblocks.cli": [py, "-c", "import dblocks.cli"],
                "dblocks models": [str(VENV_BIN / "dblocks"), "models"],
                # what else a pipeline job pays before its first step, each in a fresh interpreter:
                # a tracked job opens MLflow's SQLite store, a training job builds an optimizer (torch
                # imports torch._dynamo on the first one), an image-generation evaluation imports torch-fidelity
                "import torch + mlflow + its SQLite store": [
                    py, "-c", "import torch, mlflow; import mlflow.store.tracking.sqlalchemy_store"],
                "import torch + first optimizer": [
                    py, "-c", "import torch; torch.optim.AdamW([torch.zeros(1, requires_grad=True)])"],
                "import torch + torch_fidelity": [py, "-c", "import torch, torch_fidelity"]}
    out = {}
    for name, argv in commands.items():
        r = time_command(argv, reps)
        r.pop("output")
        out[name] = r
    return out


def mlflow_logging(params: str, steps: int, flush_every: int) -> dict:
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # this process only: keep everything in the temp store
    with tempfile.TemporaryDirectory(prefix="dblocks-bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        loaded = Params.load(params)
        name = next(iter(loaded.experiments))
        t0 = time.perf_counter()
        init_runs(params, tmp, uri, store_only=True)  # the pipeline's tracking_store step
        t_store = time.perf_counter() - t0
        t0 = time.perf_counter()
        (run_json,) = init_runs(params, tmp, uri, names=[name])  # its tracking_parent step
        t_parent = time.perf_counter() - t0
        config = loaded.experiments[name]
        per_call = []
        t0 = time.perf_counter()
        run = JobRun(run_json, "train", "blockwise", 1, config, flush_every=flush_every)
        run.__enter__()
        t_open = time.perf_counter() - t0
        if not run.enabled:
            raise RuntimeError(f"tracking was disabled: {run.warning}")
        t_all = time.perf_counter()
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            run.log_step(step, 1.0 / step, 1e-4)
            per_call.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run.__exit__(None, None, None)
        t_close = time.perf_counter() - t0
        total = time.perf_counter() - t_all  # the 200 calls and the final flush at exit
        import mlflow

        logged = len(mlflow.MlflowClient(tracking_uri=uri).get_metric_history(run.run_id, "train_loss"))
    return {"params": params, "experiment": name, "steps": steps, "flush_every": flush_every,
            "store_seconds": t_store, "parent_seconds": t_parent, "open_run_seconds": t_open,
            "close_run_seconds": t_close, "seconds_per_log_step_mean": total / steps,
            "log_step_call": C.summarize(per_call), "log_step_call_max": max(per_call),
            "metrics_logged": logged}


def per_training_step(log: dict, log_every: dict) -> dict:
    """Logging cost per training step at each scale's log_every, and as a share of one ViT block step
    if benchmarks/speed.py has been run."""
    out = {f"{scale}_log_every_{n}": log["seconds_per_log_step_mean"] / n for scale, n in log_every.items()}
    speed = C.RESULTS / "speed.json"
    if speed.exists():
        step = json.loads(speed.read_text())["training"]["seconds"]["block1"]["median"]
        out["vit_block_step_seconds"] = step
        for scale, n in log_every.items():
            out[f"{scale}_share_of_vit_block_step"] = log["seconds_per_log_step_mean"] / n / step
    return out


def plot(record: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(f"snakemake -n (paper, {record['dag']['jobs']} jobs)", record["dag"])]
    items += [(name, r) for name, r in record["cli"].items()]
    log = record["mlflow"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4))
    ax1.barh([n for n, _ in items], [r["median"] for _, r in items],
             xerr=[[r["median"] - r["q1"] for _, r in items], [r["q3"] - r["median"] for _, r in items]], capsize=3)
    ax1.set_xlabel("wall seconds (median, IQR)")
    ax1.set_title("DAG build and CLI start-up", fontsize=10)
    names = ["create store", "parent run", "open child run", f"log_step (mean of {log['steps']})", "close run"]
    vals = [log["store_seconds"], log["parent_seconds"], log["open_run_seconds"], log["seconds_per_log_step_mean"],
            log["close_run_seconds"]]
    ax2.barh(names, vals)
    ax2.set_xscale("log")
    ax2.set_xlabel("seconds")
    ax2.set_title(f"MLflow (SQLite) tracking: {log['seconds_per_log_step_mean'] * 1e3:.2f} ms per log_step",
                  fontsize=10)
    dev = record["device"]
    fig.suptitle(f"Pipeline overhead: {dev['device']} ({dev['cpu_model']}, {dev['logical_cpus']} cores)", fontsize=10)
    return C.save_figure(fig, "pipeline_overhead")


def print_tables(record: dict) -> None:
    rows = [{"what": f"snakemake -n --config params={record['dag']['params']} ({record['dag']['jobs']} jobs)",
             "median_s": record["dag"]["median"], "iqr_s": record["dag"]["iqr"], "n": record["dag"]["n"]}]
    rows += [{"what": name, "median_s": r["median"], "iqr_s": r["iqr"], "n": r["n"]}
             for name, r in record["cli"].items()]
    log = record["mlflow"]
    rows += [{"what": "MLflow: create SQLite store + experiment", "median_s": log["store_seconds"], "n": 1},
             {"what": "MLflow: parent run", "median_s": log["parent_seconds"], "n": 1},
             {"what": "MLflow: open child run (JobRun enter)", "median_s": log["open_run_seconds"], "n": 1},
             {"what": "MLflow: log_step, mean incl. flushes", "median_s": log["seconds_per_log_step_mean"],
              "n": log["steps"]},
             {"what": "MLflow: log_step, median call (buffered)", "median_s": log["log_step_call"]["median"],
              "n": log["steps"]},
             {"what": f"MLflow: log_step, slowest call (a flush of {2 * log['flush_every']} metrics)",
              "median_s": log["log_step_call_max"], "n": 1},
             {"what": "MLflow: close run (final flush)", "median_s": log["close_run_seconds"], "n": 1}]
    print(C.format_table(rows, ["what", "median_s", "iqr_s", "n"]))
    print("per training step: " + ", ".join(f"{k} {v:.3g}" for k, v in log["per_training_step"].items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params/paper.yaml", help="params file for the DAG")
    p.add_argument("--dag-reps", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--log-steps", type=int, default=200)
    p.add_argument("--flush-every", type=int, default=50, help="JobRun's default")
    p.add_argument("--log-params", default="params/tiny.yaml", help="params file whose first experiment is logged")
    args = p.parse_args(argv)
    record = {"benchmark": "pipeline_overhead", "device": C.device_description(torch.device("cpu")),
              "command": " ".join([".venv/bin/python", "benchmarks/pipeline_overhead.py",
                                   *(argv if argv is not None else sys.argv[1:])])}
    t0 = time.perf_counter()
    print("snakemake dry run", flush=True)
    record["dag"] = snakemake_dag(args.params, args.dag_reps)
    print("CLI start-up", flush=True)
    record["cli"] = cli_startup(args.reps)
    print("MLflow logging", flush=True)
    record["mlflow"] = mlflow_logging(str(C.ROOT / args.log_params), args.log_steps, args.flush_every)
    log_every = {}
    for scale in ("tiny", "paper"):
        path = C.ROOT / "params" / f"{scale}.yaml"
        first = next(iter(Params.load(path).experiments.values()))
        log_every[scale] = first["train"]["log_every"]
    record["mlflow"]["per_training_step"] = per_training_step(record["mlflow"], log_every)
    return C.finish("pipeline_overhead", record, t0, print_tables, plot)


if __name__ == "__main__":
    sys.exit(main())
