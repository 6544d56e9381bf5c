"""One evaluation of a trained model file, as ``dblocks evaluate`` runs it: the request is checked whole
before any work starts (:func:`prepare`), the task's evaluation of :mod:`dblocks.evaluate` runs
(:func:`_evaluate_task`), its JSON record is written and, with a ``track`` record of track-init, the run is
logged to MLflow as a child of the experiment's parent run (:func:`_log_run`). The CLI only turns its options
into an :class:`EvaluationRequest` and prints the summary line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dblocks import distributed
from dblocks.config import chosen_weights, config_hash
from dblocks.data.latents import decoder_for
from dblocks.errors import UsageError
from dblocks.evaluate import (
    evaluate_ar_lm,
    evaluate_classifier,
    evaluate_generator,
    evaluate_masked_lm,
    fid_references,
    samples_markdown,
)
from dblocks.experiment import Experiment
from dblocks.inputs import (
    device_for,
    existing_dir,
    existing_files,
    feature_space,
    load_model_arg,
    output_path,
    recorded,
)
from dblocks.io import write_json_atomic, write_text_atomic
from dblocks.metrics.gen_ppl import HF_JUDGES
from dblocks.params import EVALUATE_DEFAULTS, Params, command_settings, evaluation_hash
from dblocks.tracking import (
    EVAL_HASH_TAG,
    dataset_input,
    git_commit,
    headline_metrics,
    job_run,
    prepared_input,
    record_data,
    record_value,
)

#: evaluate's options that are evaluation settings or labels: given on the command line, else from --params,
#: else these defaults (dblocks.params.EVALUATE_DEFAULTS, shared with the tables' evaluation hash)
EVALUATE_OPTIONS = (
    "scale",
    "samples",
    "sample_steps",
    "evaluations",
    "fid_batch_size",
    "bound_samples",
    "max_windows",
    "prompts",
    "continuations",
    "new_tokens",
    "mauve_features",
    "hf_judges",
)
MAUVE_FEATURES = ("reference-lm", "minilm", "ngram", "gpt2-large")
AR_TASKS = ("ar_text", "recurrent_text")


@dataclass
class EvaluationRequest:
    """What to evaluate and how: one field per option of ``dblocks evaluate`` (errors name the option). The
    settings left None come from ``params`` (the workflow's params file), else the defaults
    (:func:`evaluation_options`)."""

    model: str
    out: str
    split: str = EVALUATE_DEFAULTS["split"]
    weights: str | None = None
    seed: int = EVALUATE_DEFAULTS["seed"]
    params: str | None = None
    scale: str | None = None
    data: str | None = None
    features: str | None = None
    train_stats: str | None = None
    test_stats: str | None = None
    evaluations: int | None = None
    fid_batch_size: int | None = None
    samples: int | None = None
    sample_steps: int | None = None
    grid: str | None = None
    samples_md: str | None = None
    bound_samples: int | None = None
    max_windows: int | None = None
    judge: str | None = None
    prompts: int | None = None
    continuations: int | None = None
    new_tokens: int | None = None
    hf_judges: list[str] | None = None
    mauve_features: list[str] | None = None
    no_progress: bool = False
    track: str | None = None

    @classmethod
    def from_options(cls, options: Any) -> EvaluationRequest:
        """The request of parsed command-line options (an argparse namespace holding every field)."""
        return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(cls)})


@dataclass
class Evaluation:
    record: dict  # as written to the request's ``out``
    summary: str  # the headline numbers, one line


@dataclass
class _Job:
    """A checked request: the model and everything its evaluation reads, loaded or found."""

    out: Path
    track: Path | None
    model: Any
    exp: Experiment
    meta: dict
    judge: Any = None
    judge_hash: str | None = None
    stats: dict[str, str] = dataclasses.field(default_factory=dict)  # FID reference statistics per split
    references: list[dict] = dataclasses.field(default_factory=list)
    fid: dict | None = None  # a generator's FID settings (features, reference splits and samples)
    decode: Any = None

    @property
    def generation(self) -> bool:
        return self.exp.config["task"] == "generation"

    @property
    def text(self) -> bool:
        return self.exp.tokenizer is not None


def evaluation_options(request, exp: Experiment) -> None:
    """Fill evaluate's options that were not given from ``--params`` (the file the workflow runs: its scale,
    evaluation protocol and the experiment's sample settings, so a changed setting takes effect without a new
    command line), else the command's defaults. The scale label is never guessed: without --scale or
    --params it is the --track record's (its params file's), else the model's record's (the params file it
    was trained from), else "unknown". ``request``: an :class:`EvaluationRequest` or the parsed options."""
    from_file: dict = {}
    if request.params is not None:
        params = Params.load(request.params)
        if exp.name not in params.experiments:
            raise UsageError(
                f"--params {request.params}: has no experiment {exp.name!r} (the model's); allowed: "
                f"{', '.join(params.experiments)}"
            )
        from_file = params.evaluate_options(exp.name)
        exp.config["sample"] = from_file.pop("sample")
    scale = record_value(getattr(request, "track", None), "scale") or exp.scale  # the model's own record's
    defaults = {**EVALUATE_DEFAULTS, "scale": scale, "fid_batch_size": 256}
    for key in EVALUATE_OPTIONS:
        if getattr(request, key) is None:
            value = from_file.get(key, defaults.get(key))
            setattr(request, key, list(value) if isinstance(value, (list, tuple)) else value)


def evaluate_model(request: EvaluationRequest) -> Evaluation | None:
    """Evaluate ``request.model``, write its record to ``request.out`` and log the run if ``request.track``;
    None on the other ranks of a data-parallel evaluation (torchrun), whose rank 0 writes and returns."""
    job = prepare(request)
    world, device = distributed.setup(device_for(job.exp))
    if world.size > 1 and not (job.generation or job.exp.config["task"] in AR_TASKS):
        raise UsageError(
            f"{world.size} processes (torchrun): a data-parallel evaluation shares sampling (images for "
            f"FID, text continuations for MAUVE); a {job.exp.config['task']} model is evaluated by one "
            f"process; allowed: 1 process"
        )
    track = job.track if world.main else None  # only rank 0 tracks and writes
    job.model.to(device)
    if job.judge is not None:
        job.judge.to(device)
    block = job.meta.get("block") if job.meta.get("kind") == "block" else None
    # the settings this evaluation's numbers depend on, from the options it received (the tables keep only
    # runs whose evaluation hash equals the one dblocks.params computes from the params file)
    settings = command_settings(dataclasses.asdict(request), job.exp.config, job.judge_hash, job.fid)
    eval_hash = evaluation_hash(settings)
    with job_run(track, "evaluate", job.meta.get("method"), block, job.exp.config) as run:
        if run is not None:
            _log_inputs(run, request, job, settings, eval_hash)
        done = _evaluate_task(request, job)
        if done is None:  # another rank of a data-parallel evaluation: rank 0 scored its samples
            return None
        result, summary = done
        record = {
            "experiment": job.exp.name,
            "method": job.meta.get("method"),
            "split": request.split,
            "scale": request.scale,
            "device": str(device),
            "model": str(request.model),
            "model_sha256": job.meta["sha256"],
            "weights": job.meta["weights"],
            "config_hash": config_hash(job.exp.config),
            "git_commit": git_commit(),
            "eval_hash": eval_hash,
            "evaluation": settings,
            **result,
        }
        write_json_atomic(job.out, record)
        text_samples = None
        if request.samples_md and "samples" in result:
            text_samples = Path(request.samples_md)
            write_text_atomic(text_samples, samples_markdown(job.exp.name, job.meta.get("method"), result))
        if run is not None:
            _log_run(run, request, job, record, result, device, text_samples)
    return Evaluation(record, summary)


def prepare(request: EvaluationRequest) -> _Job:
    """Every check of ``request`` before any work starts (each a one-line UsageError naming the option): the
    model and its record, the settings from --params, the judge, the FID features and reference statistics."""
    out = output_path(request.out, ".json")
    track = existing_files([request.track], "--track")[0] if request.track is not None else None
    # The record first (JSON only, no tensor): --params may replace the sample settings, and sample.weights
    # among them decides which tensors load_model reads.
    wanted = Experiment(*recorded(request.model, "MODEL"))
    evaluation_options(request, wanted)
    request.weights = chosen_weights(request.weights, wanted.config["sample"])
    model, exp, meta = load_model_arg(request.model, "MODEL", request.weights)
    exp.config["sample"] = wanted.config["sample"]
    job = _Job(out, track, model, exp, meta)
    existing_dir(request.data, "--data")
    if request.samples_md is not None:
        if not job.text:
            raise UsageError("--samples-md: text models only (image samples: --grid)")
        output_path(request.samples_md, ".md", "--samples-md")
    if not job.text and request.split == "validation":
        raise UsageError("--split validation: image datasets have only train, test")
    for option, value in (
        ("--bound-samples", request.bound_samples),
        ("--max-windows", request.max_windows),
        ("--prompts", request.prompts),
        ("--continuations", request.continuations),
        ("--new-tokens", request.new_tokens),
    ):
        if value is not None and value < 1:
            raise UsageError(f"{option} {value}: allowed: an integer >= 1")
    bad = sorted(set(request.mauve_features) - set(MAUVE_FEATURES))
    if bad:
        raise UsageError(f"--mauve-features {bad[0]!r}: allowed: {', '.join(MAUVE_FEATURES)}")
    bad = sorted(set(request.hf_judges) - set(HF_JUDGES))
    if bad:
        raise UsageError(f"--hf-judges {bad[0]!r}: allowed: {', '.join(HF_JUDGES)}")
    if request.judge is not None:
        job.judge, job.judge_hash = _load_judge(request.judge, exp)
    if job.generation:
        _prepare_fid(request, job)
    for option in ("evaluations", "fid_batch_size"):
        if getattr(request, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} {getattr(request, option)}: allowed: an integer >= 1")
    return job


def _load_judge(path: str, exp: Experiment):
    """--judge: an end-to-end AR model of the model's dataset and tokenizer, and its config hash."""
    if exp.config["task"] not in AR_TASKS:
        raise UsageError("--judge applies to autoregressive and recurrent-depth text models only")
    judge, judge_exp, judge_meta = load_model_arg(path, "--judge")
    judge_hash = config_hash(judge_exp.config)
    if judge_meta.get("kind") != "e2e" or judge_exp.config["task"] != "ar_text":
        raise UsageError(f"--judge {path}: must be an end-to-end autoregressive text model (train-baseline)")
    if judge_exp.tokenizer != exp.tokenizer or judge_exp.config["dataset"] != exp.config["dataset"]:
        raise UsageError(
            f"--judge {path}: trained on {judge_exp.config['dataset']} "
            f"({judge_exp.tokenizer}); the model reads {exp.config['dataset']} ({exp.tokenizer})"
        )
    return judge, judge_hash


def _prepare_fid(request: EvaluationRequest, job: _Job) -> None:
    """A generator's FID inputs: the feature space, the reference statistics and what they summarize, the
    grid's path and the decoder of latent samples."""
    if request.features is None:
        raise UsageError(
            "--features is required for a generation model: a digits feature net (from "
            "'dblocks train-feature-net') or Inception weights (from 'dblocks inception-weights')"
        )
    space = feature_space(request.features)
    job.stats = {split: path for split, path in (("train", request.train_stats), ("test", request.test_stats)) if path}
    for split, path in job.stats.items():
        existing_files([path], f"--{split}-stats")
    # what the statistics summarize: the prepared splits, found under --data or the pipeline's data
    # directory named by the --track record (read from JSON records only)
    reference_samples, job.references = fid_references(
        {k: Path(v) for k, v in job.stats.items()}, [request.data, record_data(job.track)]
    )
    job.fid = {"fid_features": space.kind, "fid_reference": sorted(job.stats), "reference_samples": reference_samples}
    if request.grid is not None:
        output_path(request.grid, ".png", "--grid")
    # a missing or foreign autoencoder stops us here
    job.decode = decoder_for(job.exp.config["dataset"], request.data)


def _evaluate_task(request: EvaluationRequest, job: _Job) -> tuple[dict, str] | None:
    """The task's evaluation (:mod:`dblocks.evaluate`): its result and summary line; None on a rank of a
    data-parallel evaluation other than rank 0."""
    exp, model = job.exp, job.model
    data = None if job.stats else exp.load_data(request.split, request.data)
    if exp.config["task"] in AR_TASKS:
        try:
            result = evaluate_ar_lm(
                model,
                exp,
                data,
                judge=job.judge,
                seed=request.seed,
                prompts=request.prompts,
                continuations=request.continuations,
                new_tokens=request.new_tokens,
                max_windows=request.max_windows,
                featurizers=tuple(request.mauve_features),
                hf_judges=tuple(request.hf_judges),
                train_data=exp.load_data("train", request.data) if "ngram" in request.mauve_features else None,
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        except OSError as exc:  # a hub model that cannot be downloaded (offline) or found
            raise UsageError(
                f"--hf-judges / --mauve-features gpt2-large: could not load a Hugging Face "
                f"model ({exc.__class__.__name__}); these need the network"
            ) from None
        distributed.teardown()
        if result is None:  # another rank: rank 0 scored its continuations
            return None
        return result, ", ".join(
            f"{k} {result[k]:.4g}"
            for k in ("mauve_reference", "mauve_minilm", "mauve_ngram", "gen_ppl_reference", "next_token_bits")
            if k in result
        )
    if job.text:
        result = evaluate_masked_lm(
            model,
            exp,
            data,
            seed=request.seed,
            samples_per_block=request.bound_samples,
            max_windows=request.max_windows,
            sample_steps=request.sample_steps,
            train_data=exp.load_data("train", request.data),  # the known-word rate's vocabulary (offline, cheap)
        )
        return result, f"BPC {result['bpc']:.4f} on {result['tokens']} {request.split} characters of {data.name}"
    if job.generation:
        samples = request.samples or exp.config["sample"]["num_images"]
        steps = request.sample_steps or exp.config["sample"]["steps"]
        result = evaluate_generator(
            model,
            exp,
            data,
            features=request.features,
            samples=samples,
            steps=steps,
            grid_path=Path(request.grid) if request.grid else None,
            seed=request.seed,
            progress=not request.no_progress,
            reference_stats={k: Path(v) for k, v in job.stats.items()},
            evaluations=request.evaluations,
            batch_size=request.fid_batch_size,
            decode=job.decode,
        )
        distributed.teardown()
        if result is None:  # another rank: rank 0 scored its samples
            return None
        scores = (
            ", ".join(f"{k} {result[k]:.3f}" for k in ("fid_train", "fid_test") if k in result)
            or f"{result['fid']:.3f}"
        )
        return result, (
            f"{result['fid_label']} {scores} vs {result['fid_reference']}, {samples} samples, "
            f"best of {request.evaluations}"
            + (f"; class agreement {result['class_agreement']:.3f}" if "class_agreement" in result else "")
        )
    result = evaluate_classifier(model, exp, data, seed=request.seed)
    mean_start = result.get("accuracy_mean_start")
    return result, (
        f"accuracy {100 * result['accuracy']:.2f}% on {len(data)} {request.split} examples"
        + (f" ({100 * mean_start:.2f}% from the noise mean)" if mean_start is not None else "")
    )


def _log_inputs(run, request: EvaluationRequest, job: _Job, settings: dict, eval_hash: str) -> None:
    """The run's evaluation settings and hash, and the data it reads: the prepared splits behind the FID
    reference statistics (else the statistics files), or the evaluated split."""
    run.set_tags({EVAL_HASH_TAG: eval_hash})
    run.log_params({f"evaluation.{k}": v for k, v in settings.items()})
    if job.stats:
        run.log_inputs(
            [
                prepared_input(r["prepared"], r["split"], "fid-reference")
                if r["prepared"]
                else dataset_input(
                    r["dataset"], r["split"], r["sha256"], r["stats"], "fid-reference", reference_samples=r["samples"]
                )
                if r["sha256"]
                else None
                for r in job.references
            ]
        )
    elif request.data is not None:
        run.log_dataset(request.data, request.split, "evaluation")


def _log_run(
    run, request: EvaluationRequest, job: _Job, record: dict, result: dict, device, text_samples: Path | None
) -> None:
    """The numbers (and the parent run's headline metrics), the model's identity, the record and samples."""
    run.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    run.log_parent_metrics(headline_metrics(job.meta.get("method"), result))
    run.set_tags(
        {
            "model_sha256": record["model_sha256"],
            "split": request.split,
            "model_path": str(request.model),
            "dblocks.weights": job.meta["weights"],
            "dblocks.device": str(device),
            **({"fid_label": result["fid_label"]} if job.generation else {}),
        }
    )
    run.log_artifact(job.out, "evaluation")
    if job.generation and request.grid:
        run.log_artifact(Path(request.grid), name="samples.png")  # the tables look grids up by name
    if text_samples is not None:
        run.log_artifact(text_samples, name="samples.md")  # likewise the text samples
