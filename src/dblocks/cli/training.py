"""The training commands (``train-block``, ``train-baseline``, ``train-shared``, ``train-local``), the
block-local baselines' ``evaluate-local`` and ``training-compute``: one loop, resume state and tracking for all."""

from __future__ import annotations

import json
from pathlib import Path

from dblocks.cli.common import Command, experiment_from_args, experiment_options, track_option, track_path
from dblocks.config import UNKNOWN_SCALE
from dblocks.errors import CheckpointError, UsageError
from dblocks.inputs import device_for, existing_dir, existing_files, output_path
from dblocks.io import write_json_atomic
from dblocks.tracking import job_run

# Every command module is imported to build the parser, so each imports the modules its commands use
# inside the command functions: torch and MLflow load only in the command that runs, never for another command
# or for --help.


def _log_training(run, result, checkpoints: dict[str, tuple[Path, dict]], device, ranks: int = 1) -> None:
    """Metrics, checkpoint hashes and JSON sidecars of a finished training job; ``checkpoints`` maps a
    tag suffix ("" for a single checkpoint, ".block<b>" for several) to (path, metadata as written)."""
    from dblocks.checkpoint import sidecar_path

    if run is None:
        return
    ran = result.steps - result.resumed_from  # a resumed job ran only the remaining steps
    run.log_metrics(
        {
            "train_seconds": result.seconds,
            "seconds_per_step": result.seconds / ran if ran > 0 else None,
            "final_loss": result.losses[-1][1] if result.losses else None,
            "steps_run": ran,
            "resumed_from": result.resumed_from,
            # dblocks.train.PeakMemory: the steps' memory on the job's device
            "peak_memory_mb": result.peak_memory_mb,
            "train_memory_mb": result.train_memory_mb,
        },
        step=result.steps,
    )
    # timings are only comparable on the same device and number of ranks (device: rank 0's)
    tags = {"dblocks.device": str(device), "dblocks.ranks": str(ranks), "dblocks.precision": result.precision}
    for suffix, (path, meta) in checkpoints.items():
        tags[f"checkpoint_sha256{suffix}"] = meta["sha256"]
        tags[f"checkpoint_path{suffix}"] = str(path)
    run.set_tags(tags)
    for path, _ in checkpoints.values():
        run.log_artifact(sidecar_path(path), "checkpoints")


def _finished(args, exp, *outs: Path) -> bool:
    """A finished checkpoint is never retrained by accident: if every one of ``outs`` holds this config's
    checkpoint, skip; a checkpoint of another config is refused, unless ``--replace-stale`` says it is stale
    (the workflow's call: it reruns a job when the experiment's config changed, and leaves the files in place,
    so that a job rerun for any other reason finds its block trained and keeps it)."""
    from dblocks.checkpoint import load_metadata
    from dblocks.config import config_hash

    if args.force:
        return False
    wanted, finished = config_hash(exp.config), []
    for out in outs:
        try:
            meta = load_metadata(out) if out.exists() else None
        except CheckpointError:
            meta = None  # incomplete or corrupt: retrain it
        if meta is None:
            return False
        if meta.get("config_hash") != wanted:
            if args.replace_stale:
                return False
            raise UsageError(
                f"--out {out}: holds a checkpoint of another config (config_hash {meta.get('config_hash')}); "
                f"use --force to overwrite it"
            )
        finished.append((out, meta))
    from dblocks.distributed import launched

    if launched().main:
        for out, meta in finished:
            print(f"{out}: already trained with this config (step {meta.get('step')}); use --force to retrain")
    return True


def _train_summary(result) -> dict:
    return {
        "train_seconds": round(result.seconds, 3),
        "resumed_from": result.resumed_from,
        "steps_run": result.steps - result.resumed_from,
        "seconds_per_step": result.seconds / max(1, result.steps - result.resumed_from),
        "precision": result.precision,
        "peak_memory_mb": result.peak_memory_mb,
        "train_memory_mb": result.train_memory_mb,
        "final_loss": result.losses[-1][1] if result.losses else None,
        "losses": [[s, round(v, 6)] for s, v in result.losses],
    }


def _run_training(args, exp, method: str, block: int | None, seed: int, state_path: Path, save):
    """The body every training command shares: track, load data, train (resuming from ``state_path``),
    save, drop the resume state, log. ``save(module, result)`` returns {tag suffix: (path, metadata)}.

    Started by torchrun with N processes, it trains data-parallel (dblocks.distributed): every rank trains,
    only rank 0 tracks, writes and prints; the others never write a file."""
    from dblocks import distributed
    from dblocks.config import config_hash
    from dblocks.jobs import training_job
    from dblocks.train import train
    from dblocks.training_state import remove_training_state

    world, device = distributed.setup(device_for(exp))
    if world.size > 1 and world.main:
        cfg = exp.config["train"]
        print(
            f"data parallel: {world.size} ranks, global batch {cfg['batch_size']}"
            + (f", at most {cfg['batch_per_device']} rows per device pass" if cfg["batch_per_device"] else ""),
            flush=True,
        )
    track = track_path(args) if world.main else None
    try:
        with job_run(track, "train", method, block, exp.config) as run:
            data = exp.load_data("train", args.data)
            module, objective, steps = training_job(exp, method, block)
            result = train(
                module,
                objective,
                data,
                exp.config["train"],
                seed=seed,
                device=device,
                steps=steps,
                state_path=state_path,
                state_tag=config_hash(exp.config),
                desc=f"{exp.name} {method}" + (f" block {block}" if block else ""),
                on_log=run.log_step if run is not None else None,
                progress=not args.no_progress,
            )
            if world.main:
                written = save(module, result)
                remove_training_state(state_path)  # the resume state, and whatever a killed save of it left
                _log_training(run, result, written, device, world.size)
    finally:
        distributed.teardown()
    return result if world.main else None  # None: a rank that prints nothing


def cmd_train_block(args) -> None:
    from dblocks.assemble import save_block
    from dblocks.experiment import derive_seed

    exp = experiment_from_args(args)
    out = output_path(args.out, ".safetensors")
    b = args.block
    if not 1 <= b <= exp.partition.blocks:
        raise UsageError(f"--block {b}: allowed: 1..{exp.partition.blocks} (B={exp.partition.blocks})")
    device_for(exp)
    track_path(args)
    if _finished(args, exp, out):
        return

    def save(model, result):
        return {
            "": (
                out,
                save_block(out, model, exp, b, "blockwise", result.steps, _train_summary(result), result.averaged),
            )
        }

    result = _run_training(
        args,
        exp,
        "blockwise",
        b,
        derive_seed(exp.config["seed"], "train-block", b),
        out.with_suffix(".state.safetensors"),
        save,
    )
    if result is not None:
        print(f"wrote {out} (block {b}/{exp.partition.blocks}, {result.seconds:.1f} s)")


def cmd_train_baseline(args) -> None:
    from dblocks.assemble import save_e2e
    from dblocks.experiment import derive_seed

    exp = experiment_from_args(args)
    out = output_path(args.out, ".safetensors")
    device_for(exp)
    track_path(args)
    if _finished(args, exp, out):
        return

    def save(model, result):
        return {"": (out, save_e2e(out, model, exp, result.steps, _train_summary(result), result.averaged))}

    result = _run_training(
        args,
        exp,
        "e2e",
        None,
        derive_seed(exp.config["seed"], "train-e2e"),
        out.with_suffix(".state.safetensors"),
        save,
    )
    if result is not None:
        print(f"wrote {out} (end-to-end baseline, {result.seconds:.1f} s)")


def cmd_train_shared(args) -> None:
    from dblocks.assemble import save_block
    from dblocks.experiment import derive_seed

    exp = experiment_from_args(args)
    out_dir = Path(args.out_dir)
    if exp.config["task"] == "classification" and exp.config["train"]["ema_decay"]:
        raise UsageError(
            f"train.ema_decay={exp.config['train']['ema_decay']}: the shared-stem mode learns the "
            f"label table, which the weight average does not cover; allowed: 0"
        )
    device_for(exp)
    track_path(args)
    blocks = [out_dir / f"block-{b}.safetensors" for b in range(1, exp.partition.blocks + 1)]
    if _finished(args, exp, *blocks):
        return

    def save(model, result):
        averaged = result.averaged.blocks if result.averaged is not None else [None] * len(model.blocks)
        return {
            f".block{b}": (out, save_block(out, blk, exp, b, "paper", result.steps, _train_summary(result), avg))
            for b, (out, blk, avg) in enumerate(zip(blocks, model.blocks, averaged), 1)
        }

    result = _run_training(
        args,
        exp,
        "paper",
        None,
        derive_seed(exp.config["seed"], "train-shared"),
        out_dir / "shared.state.safetensors",
        save,
    )
    if result is not None:
        print(f"wrote {exp.partition.blocks} blocks (shared stem and head) to {out_dir} ({result.seconds:.1f} s)")


def _local_method(args, exp) -> str:
    """--method: a block-local baseline that the experiment (its params entry, if any) trains."""
    from dblocks.config import LOCAL_METHODS

    if args.method not in LOCAL_METHODS:
        raise UsageError(f"--method {args.method!r}: allowed: {', '.join(LOCAL_METHODS)}")
    listed = (exp.config.get("pipeline") or {}).get("methods")
    if listed and args.method not in listed:
        raise UsageError(
            f"--method {args.method}: experiment {exp.name} trains {', '.join(listed)}; allowed: "
            f"{', '.join(m for m in listed if m in LOCAL_METHODS) or 'none of the block-local methods'}"
        )
    return args.method


def cmd_train_local(args) -> None:
    """One training job of a block-local baseline (dblocks.baselines.jobs): NoProp-DT's block t or its head,
    NoProp-CT, NoProp-FM or Forward-Forward, through the same loop, resume state, tracking and records as a
    DiffusionBlocks block."""
    from dblocks.baselines.jobs import HEAD, check_part, save_part
    from dblocks.experiment import derive_seed

    exp = experiment_from_args(args)
    method = _local_method(args, exp)
    out = output_path(args.out, ".safetensors")
    if args.head and args.block is not None:
        raise UsageError("--block and --head: a job trains one part; allowed: one of them")
    part = HEAD if args.head else args.block
    check_part(exp.config, method, part)
    device_for(exp)
    track_path(args)
    if _finished(args, exp, out):
        return

    def save(module, result):
        return {"": (out, save_part(out, module, exp, method, part, result.steps, _train_summary(result)))}

    result = _run_training(
        args,
        exp,
        method,
        part,
        derive_seed(exp.config["seed"], "train-local", method, part),
        out.with_suffix(".state.safetensors"),
        save,
    )
    if result is not None:
        blocks = exp.config["blocks"]
        what = method if part is None else f"{method} head" if part == HEAD else f"{method} block {part}/{blocks}"
        ran = max(1, result.steps - result.resumed_from)
        print(f"wrote {out} ({what}, {result.seconds:.1f} s, {1000 * result.seconds / ran:.1f} ms/step)")


def cmd_evaluate_local(args) -> None:
    """Test accuracy of a trained block-local baseline, assembled from its jobs' checkpoints, with the time
    and memory per training step those jobs recorded; a metrics JSON and an MLflow evaluation run."""
    from dblocks.baselines.jobs import evaluate, load_model, read_parts, training_cost
    from dblocks.config import config_hash
    from dblocks.experiment import Experiment
    from dblocks.params import Params, command_settings, evaluation_hash
    from dblocks.tracking import EVAL_HASH_TAG, git_commit, headline_metrics, record_value

    out = output_path(args.out, ".json")
    track = track_path(args)
    config, records = read_parts(existing_files(args.checkpoints, "CHECKPOINT"))
    method = records[0][1]["method"]
    scale = args.scale or record_value(track, "scale") or records[0][1].get("scale") or UNKNOWN_SCALE
    if args.params is not None:
        params = Params.load(args.params)
        if config["name"] not in params.experiments:
            raise UsageError(
                f"--params {args.params}: has no experiment {config['name']!r} (the checkpoints'); "
                f"allowed: {', '.join(params.experiments)}"
            )
        scale = args.scale or params.scale
    exp = Experiment(config, scale)
    existing_dir(args.data, "--data")
    device = device_for(exp)
    settings = command_settings({"split": args.split, "seed": args.seed}, config)
    eval_hash = evaluation_hash(settings)
    model = load_model(config, records)
    with job_run(track, "evaluate", method, None, config) as run:
        if run is not None:
            run.set_tags({EVAL_HASH_TAG: eval_hash})
            run.log_params({f"evaluation.{k}": v for k, v in settings.items()})
            if args.data is not None:
                run.log_dataset(args.data, args.split, "evaluation")
        result = {**evaluate(model, exp.load_data(args.split, args.data), args.seed, device), **training_cost(records)}
        record = {
            "experiment": exp.name,
            "method": method,
            "split": args.split,
            "scale": scale,
            "device": str(device),
            "models": [str(p) for p, _ in records],
            "model_sha256": [m["sha256"] for _, m in records],
            "config_hash": config_hash(config),
            "git_commit": git_commit(),
            "eval_hash": eval_hash,
            "evaluation": settings,
            **result,
        }
        write_json_atomic(out, record)
        if run is not None:
            run.log_metrics(
                {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            )
            run.log_parent_metrics(headline_metrics(method, result))
            run.set_tags(
                {"split": args.split, "dblocks.device": str(device), "model_sha256": ",".join(record["model_sha256"])}
            )
            run.log_artifact(out, "evaluation")
    cost = (f"; training {result['train_ms_per_step']:.1f} ms/step" if "train_ms_per_step" in result else "") + (
        f", {result['train_memory_mb']:.1f} MB" if result.get("train_memory_mb") is not None else ""
    )
    print(
        f"{exp.name} ({method}): accuracy {100 * result['accuracy']:.2f}% on {result['examples']} {args.split} "
        f"examples{cost}"
    )


def cmd_training_compute(args) -> None:
    """Forward layer evaluations per optimizer step, measured by counting layer calls, for each training job."""
    import torch

    from dblocks.jobs import training_job
    from dblocks.layers import counting_layer_calls
    from dblocks.train import sample_batch

    exp = experiment_from_args(args)
    if args.repeats < 1:
        raise UsageError(f"--repeats {args.repeats}: allowed: an integer >= 1")
    data = exp.load_data("train", args.data)
    gen = torch.Generator().manual_seed(0)
    jobs = [("blockwise", b) for b in range(1, exp.partition.blocks + 1)] + [("e2e", None)]
    record = {"experiment": exp.name, "repeats": args.repeats}
    for method, block in jobs:
        module, objective, _ = training_job(exp, method, block)
        with counting_layer_calls(module) as calls:
            for _ in range(args.repeats):
                objective(sample_batch(data, 2, gen, torch.device("cpu")), gen)
        key = f"blockwise_block{block}" if method == "blockwise" else "e2e"
        record[f"{key}_forward_layer_evals_per_step"] = calls[0] / args.repeats
    print(json.dumps(record, indent=2))


def retrain_options(p) -> None:
    p.add_argument(
        "--replace-stale",
        action="store_true",
        help="retrain when the output holds a checkpoint of another config instead of refusing (the workflow's "
        "call); a checkpoint of this config is still kept",
    )


def register(command: Command) -> None:
    """Add the training commands, evaluate-local and training-compute to the ``dblocks`` parser, in the order its help lists them."""
    p = command("train-block", cmd_train_block, "train one block denoiser on its own noise interval")
    p.add_argument("--block", type=int, required=True, help="block index, 1 = highest noise")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors; metadata goes to .json)")
    p.add_argument("--force", action="store_true", help="retrain even if --out already holds this block")
    retrain_options(p)
    experiment_options(p)
    track_option(p)

    p = command("train-baseline", cmd_train_baseline, "train the end-to-end baseline on the same architecture")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    p.add_argument("--force", action="store_true")
    retrain_options(p)
    experiment_options(p)
    track_option(p)

    p = command(
        "train-shared",
        cmd_train_shared,
        "the paper's single-process mode: shared stem and head, one block sampled per step",
    )
    p.add_argument("--out-dir", required=True, help="directory for block-<b>.safetensors")
    p.add_argument("--force", action="store_true", help="retrain even if --out-dir already holds these blocks")
    retrain_options(p)
    experiment_options(p)
    track_option(p)

    p = command(
        "train-local",
        cmd_train_local,
        "train one job of a block-local baseline: NoProp-DT's block t (--block) or head (--head), NoProp-CT, "
        "NoProp-FM or Forward-Forward (one job each), with the training loop, resume state and tracking of "
        "the other training commands",
    )
    p.add_argument("--method", required=True, help="noprop-dt | noprop-ct | noprop-fm | forward-forward")
    p.add_argument("--block", type=int, help="noprop-dt: block t, 1..T (T = the experiment's blocks)")
    p.add_argument("--head", action="store_true", help="noprop-dt: its classification head")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors; its record goes to .json)")
    p.add_argument("--force", action="store_true", help="retrain even if --out already holds this part")
    retrain_options(p)
    experiment_options(p)
    track_option(p)

    p = command(
        "evaluate-local",
        cmd_evaluate_local,
        "evaluate a trained block-local baseline from all its jobs' checkpoints: test accuracy, and the "
        "time and memory per training step its jobs recorded",
    )
    p.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CHECKPOINT",
        help="every part: noprop-dt's block-1..T and head, else the one model checkpoint",
    )
    p.add_argument("--out", required=True, help="metrics JSON path")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--seed", type=int, default=0, help="seed of the samplers' noise (NoProp)")
    p.add_argument("--params", help="a params file (its scale labels the metric; it must hold the experiment)")
    p.add_argument("--scale", help="label recorded with the metric (default: --params', else the --track record's)")
    p.add_argument("--data", help="prepared dataset directory (default: load the source)")
    track_option(p)

    p = command(
        "training-compute",
        cmd_training_compute,
        "measure forward layer evaluations per training step of every job (block-wise and end-to-end)",
    )
    p.add_argument("--repeats", type=int, default=20, help="objective evaluations to average over")
    experiment_options(p)
