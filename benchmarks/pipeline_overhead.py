"""Fixed costs of the pipeline around the training itself.

1. Building the paper-scale DAG: wall time of ``.venv/bin/snakemake -n --config params=params/paper.yaml``
   run from the repository root (a dry run: the DAG is built and printed, nothing is executed).
2. CLI start-up: wall time of ``.venv/bin/python -c "import dblocks.cli"`` and of ``.venv/bin/dblocks models``
   (next to ``python -c pass`` for the interpreter alone and ``import torch``, which the CLI imports only
   for commands that read the model registry or a model), and the other fixed costs every pipeline job pays in its own
   fresh interpreter: MLflow with its SQLite store (tracked jobs), the first optimizer (training jobs: torch
   imports torch._dynamo there; the pipeline's own optimizer, ``dblocks.optim.adamw``, does not) and
   torch-fidelity (image-generation evaluations).
3. MLflow per-step logging: ``dblocks.tracking.JobRun.log_step`` against a fresh SQLite store in a
   temporary directory (set up with ``dblocks.tracking.init_runs`` as ``dblocks track-init`` does), mean
   seconds per call over 200 calls including the batched flushes (every 50 calls by default) and the
   final flush at exit; plus the one-off costs of creating the store and opening the child run.
   A job calls ``log_step`` once every ``train.log_every`` steps (read from params/tiny.yaml and
   params/paper.yaml: 50 and 100 for their first experiments), so the cost per training step is that
   mean divided by log_every.
4. The fixed cost of a training job (the issue's target: at most 2.5 s): the wall time of a 1-step
   ``.venv/bin/dblocks train-block`` job as the pipeline runs it (``--job-params``' experiment
   ``--job-experiment``, block 1, on the prepared digits of ``--data``, with OMP_NUM_THREADS set to the job's
   ``resources.threads`` as the Snakefile's launcher sets it, from the repository root) minus the seconds of
   its training step as the job itself reports them (``train_seconds`` in the checkpoint's JSON record:
   ``TrainResult.seconds``, printed as "wrote ... (block b/B, X s)"): what a job pays to start (interpreter,
   imports, config, data, model, optimizer, tracking) and to finish (checkpoint, tracking, interpreter exit).
   Three kinds of job: untracked, tracked in journal mode and tracked in live mode (each with its run record
   from ``dblocks track-init`` of an overlay of ``--job-params`` that sets ``tracking.mode`` and a SQLite
   store in a temporary directory, made once beforehand). After one untimed round, the three are timed in
   turn ``--reps`` times (median and IQR).

Each command is timed ``--reps`` times (median and IQR); MLFLOW_TRACKING_URI is removed from the
environment of the logging and job measurements so that nothing outside the temporary directory is written.
Whether Python may cache bytecode (PYTHONDONTWRITEBYTECODE unset) is recorded: without the cache every
process compiles the package's modules again (~0.1 s).

Command (from the repository root; about 3 minutes)::

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

import _common as C  # noqa: E402
import torch  # noqa: E402

from dblocks.params import Params  # noqa: E402
from dblocks.tracking import JobRun, init_runs  # noqa: E402

VENV_BIN = C.ROOT / ".venv" / "bin"
#: the issue's budget for a training job's fixed cost (start to first step, plus after the last), seconds
JOB_TARGET_S = 2.5
JOB_KINDS = ("untracked", "journal", "live")


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
    commands = {
        "python -c pass": [py, "-c", "pass"],
        "import torch": [py, "-c", "import torch"],
        "import dblocks.cli": [py, "-c", "import dblocks.cli"],
        "dblocks models": [str(VENV_BIN / "dblocks"), "models"],
        # what else a pipeline job pays before its first step, each in a fresh interpreter:
        # a tracked job opens MLflow's SQLite store, a training job builds an optimizer (torch
        # imports torch._dynamo on the first one), an image-generation evaluation imports torch-fidelity
        "import torch + mlflow + its SQLite store": [
            py,
            "-c",
            "import torch, mlflow; import mlflow.store.tracking.sqlalchemy_store",
        ],
        "import torch + first optimizer": [
            py,
            "-c",
            "import torch; torch.optim.AdamW([torch.zeros(1, requires_grad=True)])",
        ],
        "import torch + first dblocks.optim.adamw": [
            py,
            "-c",
            "import torch, dblocks.optim as o; o.adamw([torch.zeros(1, requires_grad=True)])",
        ],
        "import torch + torch_fidelity": [py, "-c", "import torch, torch_fidelity"],
    }
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
    return {
        "params": params,
        "experiment": name,
        "steps": steps,
        "flush_every": flush_every,
        "store_seconds": t_store,
        "parent_seconds": t_parent,
        "open_run_seconds": t_open,
        "close_run_seconds": t_close,
        "seconds_per_log_step_mean": total / steps,
        "log_step_call": C.summarize(per_call),
        "log_step_call_max": max(per_call),
        "metrics_logged": logged,
    }


def _job_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = str(threads)  # as the Snakefile's launcher starts a job of one rank
    return env


def _run_job(argv: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=C.ROOT, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return wall, proc.stdout + proc.stderr


def job_overhead(params: str, experiment: str, data: str, reps: int) -> dict:
    """Wall time of a 1-step train-block job minus its own training time, untracked and tracked both ways."""
    params_path, data_path = (C.ROOT / params).resolve(), (C.ROOT / data).resolve()
    if not (data_path / "train.safetensors").is_file():
        raise SystemExit(f"--data {data}: no prepared train split; write it with 'dblocks prepare' (or snakemake)")
    threads = Params.load(params_path).training_resources(experiment)["threads"]
    env, dblocks = _job_env(threads), str(VENV_BIN / "dblocks")
    out: dict = {
        "params": params,
        "experiment": experiment,
        "data": data,
        "block": 1,
        "steps": 1,
        "omp_num_threads": threads,
        "target_seconds": JOB_TARGET_S,
        "bytecode_cache": not os.environ.get("PYTHONDONTWRITEBYTECODE"),
        "kinds": {},
    }
    with tempfile.TemporaryDirectory(prefix="dblocks-bench-") as tmp:
        tmp = Path(tmp)
        track = {}
        for mode in ("journal", "live"):  # the pipeline's tracking_store and tracking_parent jobs, once
            overlay = tmp / f"{mode}.yaml"
            overlay.write_text(
                json.dumps(
                    {
                        "base": str(params_path),
                        "tracking": {"uri": f"sqlite:///{tmp}/{mode}.db", "experiment": f"bench-{mode}", "mode": mode},
                    }
                )
            )
            for extra in (["--store-only"], ["--experiment", experiment]):
                _run_job([dblocks, "track-init", "--params", str(overlay), "--out-dir", str(tmp / mode), *extra], env)
            track[mode] = ["--track", str(tmp / mode / f"{experiment}.json")]
        track["untracked"] = []
        samples: dict[str, dict[str, list[float]]] = {k: {"wall": [], "train": [], "fixed": []} for k in JOB_KINDS}
        for rep in range(reps + 1):  # round 0 is not timed: it warms the page cache
            for kind in JOB_KINDS:
                ckpt = tmp / f"{kind}-{rep}.safetensors"
                wall, text = _run_job(
                    [
                        dblocks,
                        "train-block",
                        "--config",
                        str(params_path),
                        "--experiment",
                        experiment,
                        "--block",
                        "1",
                        "--steps",
                        "1",
                        "--data",
                        str(data_path),
                        "--out",
                        str(ckpt),
                        "--no-progress",
                        *track[kind],
                    ],
                    env,
                )
                printed = re.search(r"^wrote .*\(block \d+/\d+, ([0-9.]+) s\)\s*$", text, re.M)
                if printed is None:
                    raise RuntimeError(f"train-block printed no 'wrote ...' line:\n{text[-2000:]}")
                train = json.loads(ckpt.with_suffix(".json").read_text()).get("train_seconds")
                train = float(printed.group(1)) if train is None else float(train)
                if "warning" in text.lower():
                    raise RuntimeError(f"{kind} job warned (tracking failed?):\n{text[-2000:]}")
                if rep:
                    for key, value in (("wall", wall), ("train", train), ("fixed", wall - train)):
                        samples[kind][key].append(value)
    for kind, s in samples.items():
        out["kinds"][kind] = {
            "wall": C.summarize(s["wall"]),
            "train_seconds": C.summarize(s["train"]),
            "fixed": C.summarize(s["fixed"]),
            "fixed_times": s["fixed"],
            "meets_target": C.summarize(s["fixed"])["median"] <= JOB_TARGET_S,
        }
    return out


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
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(19, 4))
    ax1.barh(
        [n for n, _ in items],
        [r["median"] for _, r in items],
        xerr=[[r["median"] - r["q1"] for _, r in items], [r["q3"] - r["median"] for _, r in items]],
        capsize=3,
    )
    ax1.set_xlabel("wall seconds (median, IQR)")
    ax1.set_title("DAG build and CLI start-up", fontsize=10)
    names = ["create store", "parent run", "open child run", f"log_step (mean of {log['steps']})", "close run"]
    vals = [
        log["store_seconds"],
        log["parent_seconds"],
        log["open_run_seconds"],
        log["seconds_per_log_step_mean"],
        log["close_run_seconds"],
    ]
    ax2.barh(names, vals)
    ax2.set_xscale("log")
    ax2.set_xlabel("seconds")
    ax2.set_title(
        f"MLflow (SQLite) tracking: {log['seconds_per_log_step_mean'] * 1e3:.2f} ms per log_step", fontsize=10
    )
    job = record["job"]
    kinds = list(job["kinds"].values())
    ax3.barh(
        list(job["kinds"]),
        [k["fixed"]["median"] for k in kinds],
        xerr=[
            [k["fixed"]["median"] - k["fixed"]["q1"] for k in kinds],
            [k["fixed"]["q3"] - k["fixed"]["median"] for k in kinds],
        ],
        capsize=3,
    )
    ax3.axvline(job["target_seconds"], color="k", linestyle="--", label=f"target {job['target_seconds']} s")
    ax3.legend(loc="lower right", fontsize=8)
    ax3.set_xlabel("wall s minus the job's training time (median, IQR)")
    ax3.set_title(f"Fixed cost of a 1-step train-block job ({job['experiment']})", fontsize=10)
    dev = record["device"]
    fig.suptitle(f"Pipeline overhead: {dev['device']} ({dev['cpu_model']}, {dev['logical_cpus']} cores)", fontsize=10)
    return C.save_figure(fig, "pipeline_overhead")


def print_tables(record: dict) -> None:
    rows = [
        {
            "what": f"snakemake -n --config params={record['dag']['params']} ({record['dag']['jobs']} jobs)",
            "median_s": record["dag"]["median"],
            "iqr_s": record["dag"]["iqr"],
            "n": record["dag"]["n"],
        }
    ]
    rows += [
        {"what": name, "median_s": r["median"], "iqr_s": r["iqr"], "n": r["n"]} for name, r in record["cli"].items()
    ]
    log = record["mlflow"]
    rows += [
        {"what": "MLflow: create SQLite store + experiment", "median_s": log["store_seconds"], "n": 1},
        {"what": "MLflow: parent run", "median_s": log["parent_seconds"], "n": 1},
        {"what": "MLflow: open child run (JobRun enter)", "median_s": log["open_run_seconds"], "n": 1},
        {
            "what": "MLflow: log_step, mean incl. flushes",
            "median_s": log["seconds_per_log_step_mean"],
            "n": log["steps"],
        },
        {
            "what": "MLflow: log_step, median call (buffered)",
            "median_s": log["log_step_call"]["median"],
            "n": log["steps"],
        },
        {
            "what": f"MLflow: log_step, slowest call (a flush of {2 * log['flush_every']} metrics)",
            "median_s": log["log_step_call_max"],
            "n": 1,
        },
        {"what": "MLflow: close run (final flush)", "median_s": log["close_run_seconds"], "n": 1},
    ]
    job = record["job"]
    rows += [
        {
            "what": f"training job, {kind}: wall (1 step)",
            "median_s": k["wall"]["median"],
            "iqr_s": k["wall"]["iqr"],
            "n": k["wall"]["n"],
        }
        for kind, k in job["kinds"].items()
    ]
    rows += [
        {
            "what": f"training job, {kind}: its training time (train_seconds)",
            "median_s": k["train_seconds"]["median"],
            "iqr_s": k["train_seconds"]["iqr"],
            "n": k["train_seconds"]["n"],
        }
        for kind, k in job["kinds"].items()
    ]
    rows += [
        {
            "what": f"training job, {kind}: FIXED COST (wall - training)",
            "median_s": k["fixed"]["median"],
            "iqr_s": k["fixed"]["iqr"],
            "n": k["fixed"]["n"],
        }
        for kind, k in job["kinds"].items()
    ]
    print(C.format_table(rows, ["what", "median_s", "iqr_s", "n"]))
    print("per training step: " + ", ".join(f"{k} {v:.3g}" for k, v in log["per_training_step"].items()))
    print(
        f"fixed cost of a training job ({job['experiment']}, block 1, 1 step, OMP_NUM_THREADS="
        f"{job['omp_num_threads']}, bytecode cache {'on' if job['bytecode_cache'] else 'off'}), median of "
        f"{next(iter(job['kinds'].values()))['fixed']['n']}, against the target of <= {job['target_seconds']} s: "
        + "; ".join(
            f"{kind} {k['fixed']['median']:.2f} s ({'met' if k['meets_target'] else 'MISSED'})"
            for kind, k in job["kinds"].items()
        )
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params/paper.yaml", help="params file for the DAG")
    p.add_argument("--dag-reps", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--log-steps", type=int, default=200)
    p.add_argument("--flush-every", type=int, default=50, help="JobRun's default")
    p.add_argument("--log-params", default="params/tiny.yaml", help="params file whose first experiment is logged")
    p.add_argument("--job-params", default="params/tiny.yaml", help="params file of the training job")
    p.add_argument("--job-experiment", default="dit-t7-equiprob-444", help="its experiment (block 1 is trained)")
    p.add_argument("--data", default="data/prepared/digits", help="the prepared data the job reads")
    args = p.parse_args(argv)
    record = C.start_record("pipeline_overhead", torch.device("cpu"), argv)
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
    print("training job fixed cost", flush=True)
    record["job"] = job_overhead(args.job_params, args.job_experiment, args.data, args.reps)
    return C.finish("pipeline_overhead", record, t0, print_tables, plot)


if __name__ == "__main__":
    sys.exit(main())
