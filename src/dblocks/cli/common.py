"""What the command modules share: the experiment, tracking and weights options, and the experiment they
describe (the checks of paths, devices and model files are :mod:`dblocks.inputs`, shared with the library)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from dblocks.config import UNKNOWN_SCALE, WEIGHTS, parse_override, resolve
from dblocks.errors import UsageError
from dblocks.inputs import existing_dir, existing_files

#: how a command module adds a subcommand: command(name, function, help) -> its parser
Command = Callable[[str, Callable, str], argparse.ArgumentParser]

# The experiment needs torch: it is imported inside the functions below, so that building the parser (every
# command, --help) does not import it.


def experiment_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experiment (a params file, then these options, then --set, win in that order)")
    g.add_argument("--config", help="YAML params file (one experiment, or 'experiments:' with --experiment)")
    g.add_argument("--experiment", help="which experiment of the params file")
    g.add_argument("--task", help="classification | generation")
    g.add_argument("--arch", help="architecture name (see 'dblocks models')")
    g.add_argument(
        "--dataset",
        help="digits (embedded, offline) | digits-latent (prepared only: --data) | cifar10 | "
        "cifar100 | imagenet256 | shakespeare | text8 | lm1b | openwebtext",
    )
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
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, dotted, e.g. --set train.warmup=100 (repeatable)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def track_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--track",
        metavar="RUN_JSON",
        help="log this job as a child MLflow run of the parent run named in RUN_JSON "
        "(written by 'dblocks track-init'); tracking failures only warn",
    )


def weights_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        choices=WEIGHTS,
        help="the trained weights or their average (default: the experiment's sample.weights; auto = "
        "the average where training kept one)",
    )


def finite_float(text: str) -> float:
    """A float option that is a real number: NaN and infinity are refused with the one-line error (argparse's
    float() accepts 'nan' and 'inf', and a NaN learning rate would fail deep inside the optimizer)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number; allowed: a finite number")
    return value


def _layer_split(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"--layer-split {text!r}: expected comma-separated layer counts, e.g. 3,6,3") from None


def experiment_from_args(args: argparse.Namespace):
    from dblocks.experiment import Experiment

    direct = {
        "task": args.task,
        "arch": args.arch,
        "dataset": args.dataset,
        "data_root": args.data_root,
        "blocks": args.blocks,
        "partition": args.partition,
        "overlap": args.overlap,
        "seed": args.seed,
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

        exp = Experiment(experiment_config(args.config, args.experiment, overrides), scale_of(args.config) or scale)
    else:
        exp = Experiment(resolve({}, overrides), scale)
    existing_dir(args.data, "--data")
    existing_dir(args.data_root, "--data-root")
    if args.data is not None:
        for split in ("train", "test"):
            from dblocks.data import prepared_path

            if not prepared_path(args.data, split).is_file():
                raise UsageError(f"--data {args.data}: no {split}.safetensors; write it with 'dblocks prepare'")
    return exp


def track_path(args) -> Path | None:
    """The --track run JSON (written by 'dblocks track-init'), checked before any work starts."""
    track = getattr(args, "track", None)
    if track is None:
        return None
    (path,) = existing_files([track], "--track")
    return path
