"""Evaluation of an assembled (or end-to-end) model: accuracy for classifiers; samples, a sample grid,
FID and sampling cost for generators. Each returns a flat record of numbers and labels that the CLI
writes as JSON and logs to MLflow."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from dblocks import distributed
from dblocks.blocks import AssembledModel, BlockDenoiser
from dblocks.config import JUDGED_DATASETS
from dblocks.data import ImageDataset
from dblocks.data.text import unigram_bits
from dblocks.experiment import Experiment, derive_seed
from dblocks.metrics.class_agreement import class_agreement
from dblocks.noise import Partition
from dblocks.sample import classify, classify_direct, generate, save_grid

#: prompt / continuation pairs an AR text evaluation keeps for readers (the paper's tables come with none)
SHOWN_SAMPLES = 5


def as_assembled(
    model: AssembledModel | BlockDenoiser, exp: Experiment, partition: Partition | None = None
) -> AssembledModel:
    """An end-to-end denoiser is one block that owns the whole sigma range, or with ``partition`` the one
    network in each of its blocks (so that an estimate over the partition's stretches covers both methods)."""
    if isinstance(model, AssembledModel):
        return model
    over = partition or exp.full_range
    return AssembledModel([model] * over.blocks, over)


def layer_evaluations(model: AssembledModel, grid: list[float], guided: bool) -> int:
    """Transformer layers run per sample along ``grid``: each step runs only its block's layers."""
    depth = [len(b.layers) for b in model.blocks]
    per_pass = sum(depth[model.block_for(s) - 1] for s in grid[:-1])
    return per_pass * (2 if guided else 1)


def evaluate_classifier(model, exp: Experiment, data: ImageDataset, seed: int = 0) -> dict:
    """Accuracy on ``data``; its images are classified a batch at a time (``images.split``), so a prepared
    split is read from its files batch by batch, never held whole. Block-wise: ``accuracy`` from the paper's
    chain started at a noise draw, and ``accuracy_mean_start`` from the chain started at the noise's mean
    (:func:`dblocks.sample.classify`)."""
    t0 = time.perf_counter()
    record = {}
    if isinstance(model, AssembledModel):
        preds = classify(model, data.images, torch.Generator().manual_seed(seed))
        evals = layer_evaluations(model, list(reversed(model.partition.boundaries)), guided=False)
        mean_start = classify(model, data.images, start="mean")
        record["accuracy_mean_start"] = (mean_start == data.labels).float().mean().item()
    else:  # the end-to-end baseline: a plain forward pass
        preds = classify_direct(model, data.images)
        evals = len(model.layers)
    return {
        "accuracy": (preds == data.labels).float().mean().item(),
        **record,
        "examples": len(data),
        "eval_seconds": round(time.perf_counter() - t0, 3),
        "layer_evals_per_sample": evals,
    }


def class_balanced_samples(
    model,
    exp: Experiment,
    samples: int,
    steps: int,
    seed: int = 0,
    guidance: float | None = None,
    progress: bool = False,
):
    """``samples`` images whose labels cycle through the classes, from ``steps`` Euler steps on the
    equal-mass grid; returns (images, the routing model, the grid, seconds)."""
    model = as_assembled(model, exp)
    device = next(model.parameters()).device
    guidance = exp.config["sample"]["guidance"] if guidance is None else guidance
    grid = exp.noise.quantile_grid(steps)
    labels = torch.arange(samples) % exp.arch.num_classes
    t0 = time.perf_counter()
    images = generate(
        model.to(device),
        labels,
        grid,
        torch.Generator().manual_seed(seed),
        guidance=guidance,
        null_label=exp.arch.num_classes,
        batch_size=exp.config["sample"]["batch_size"],
        progress=progress,
    )
    return images, model, grid, time.perf_counter() - t0


def save_class_grid(images: torch.Tensor, exp: Experiment, path: Path) -> None:
    """Labels cycle 0..C-1, so each grid row holds one sample of every class (at most 10 rows and 10
    columns: ImageNet's 1000 classes show their first 10). Small images are upscaled 4x."""
    per_row = min(exp.arch.num_classes, 10)
    rows = max(1, min(10, len(images) // exp.arch.num_classes))
    picked = torch.cat([images[r * exp.arch.num_classes :][:per_row] for r in range(rows)])
    save_grid(picked, path, nrow=per_row, scale=4 if images.shape[-1] <= 32 else 1)


def evaluate_generator(
    model,
    exp: Experiment,
    reference: ImageDataset | None,
    *,
    features: str | Path,
    samples: int,
    steps: int,
    grid_path: Path | None,
    seed: int = 0,
    progress: bool = False,
    reference_stats: dict[str, Path] | None = None,
    evaluations: int = 1,
    batch_size: int = 256,
    decode=None,
) -> dict | None:
    """Class-balanced samples from ``steps`` Euler steps, FID and the sampling cost.

    In a data-parallel job (dblocks.distributed) every rank samples its share of the chunks and rank 0 scores
    them all and returns the record; the other ranks return None. The samples are those of one process.

    Digit samples are also read by a held-out digit classifier (:mod:`dblocks.metrics.class_agreement`):
    ``class_agreement`` is the mean over the sample sets of the fraction read as the class asked for.

    ``features`` is a digits feature net (domain FID, the tiny scale) or converted Inception weights (the
    paper's FID), both safetensors checkpoints told apart by their record. With ``reference_stats`` ({split: cached statistics
    file}, e.g. train and test) the paper's protocol runs: ``evaluations`` independent sample sets (seeds
    ``seed``, ``seed + 1``, ...), each scored against every split, and ``fid_<split>`` is the best (lowest)
    of them; every evaluation's value is kept in ``fid_<split>_all``. Without it, the sample sets are
    scored against the images of ``reference`` (one split). ``fid`` is the test FID when there is one. ``decode`` turns
    samples into images first (a latent dataset's VAE decoder, :func:`dblocks.data.latents.decoder_for`)."""
    from dblocks.metrics.reference import FeatureSpace, fid_from_statistics, image_statistics, load_reference_statistics

    if evaluations < 1:
        raise ValueError(f"evaluations must be >= 1, got {evaluations}")
    space = FeatureSpace.from_weights(features)
    if not distributed.is_main():
        refs = {}  # only rank 0 scores
    elif reference_stats:
        refs = {split: load_reference_statistics(path)[0] for split, path in reference_stats.items()}
    else:  # the split's images (or latents, decoded) are read and embedded a batch at a time
        refs = {reference.split: image_statistics(reference.images, space, batch_size, progress, decode=decode)}
    scores: dict[str, list[float]] = {split: [] for split in refs}
    seconds = []
    judged, agreement = exp.config["dataset"] in JUDGED_DATASETS, []  # digits: class agreement beside FID
    for i in range(evaluations):
        images, routed, grid, sample_seconds = class_balanced_samples(
            model, exp, samples, steps, seed + i, progress=progress
        )
        seconds.append(sample_seconds)
        if i == 0:  # one evaluation's block calls (the counters keep running), over all ranks of the job
            calls = distributed.sum_over_ranks(routed.calls)
        if images is None:  # a data-parallel job's other ranks: their samples went to rank 0, which scores them
            continue
        if decode is not None:
            images = decode(images)
        if i == 0 and grid_path is not None:
            save_class_grid(images, exp, grid_path)
        if judged:
            agreement.append(class_agreement(images, torch.arange(len(images)) % exp.arch.num_classes))
        generated = image_statistics(images, space, batch_size, progress)
        for split, ref in refs.items():
            scores[split].append(fid_from_statistics(generated, ref))
    if not distributed.is_main():
        return None
    best = {f"fid_{split}": min(values) for split, values in scores.items()}
    headline = best.get("fid_test", next(iter(best.values())))
    guidance = exp.config["sample"]["guidance"]
    reference_name = reference.name if reference is not None else exp.config["dataset"]
    return {
        "fid": headline,
        **best,
        **{f"fid_{split}_all": v for split, v in scores.items()},
        "fid_label": space.label,
        "fid_reference": f"{reference_name} {', '.join(refs)}",
        "evaluations": evaluations,
        "samples": samples,
        "sample_steps": steps,
        "guidance": guidance,
        "sample_seconds": round(sum(seconds) / len(seconds), 3),
        "sample_seconds_per_sample": sum(seconds) / len(seconds) / samples,
        "block_calls": calls,
        **({"class_agreement": sum(agreement) / len(agreement), "class_agreement_all": agreement} if judged else {}),
        "layer_evals_per_sample": layer_evaluations(routed, grid, guided=guidance != 1.0),
    }


def evaluate_masked_lm(
    model,
    exp: Experiment,
    data,
    *,
    seed: int = 0,
    samples_per_block: int = 1,
    max_windows: int | None = None,
    sample_num: int = 5,
    sample_steps: int | None = None,
    train_data=None,
) -> dict:
    """Bits per character (the negative ELBO, dblocks.masked_diffusion.bits_by_block) on ``data`` and a few
    unconditional samples (decoded text) with the cost of drawing them. With ``train_data`` (the training
    split) also the samples' known-word rate, beside that of as many held-out windows spread over ``data``."""
    from dblocks.masked_diffusion import bits_by_block, sample_text

    # an end-to-end model is estimated through the experiment's partition too (the same network in every
    # stretch): the same draws of t as a block-wise model's, and terms that compare stretch by stretch
    bounded = as_assembled(model, exp, exp.partition)
    model = as_assembled(model, exp)  # samples: an end-to-end model is one block that owns every t
    tokens = data.tokens[:max_windows]  # read (a prepared split's from its file) as one int64 tensor
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    terms = bits_by_block(bounded, tokens, gen, samples_per_block)
    eval_seconds = time.perf_counter() - t0
    steps = sample_steps or exp.config["sample"]["steps"]
    model.calls = [0] * len(model.blocks)
    samples = sample_text(model, sample_num, steps, gen)
    depth = [len(b.layers) for b in model.blocks]
    record = {}
    if train_data is not None:  # a number that says whether the samples are words, beside the bound
        from dblocks.metrics.text_features import NgramProfile

        # only the vocabulary is read: unigram counts, not the 8 orders that MAUVE's profiles need
        ngrams = NgramProfile.from_dataset(train_data, max_order=1)
        real = data.tokens[torch.linspace(0, len(data) - 1, sample_num).long()]
        record["train_word_rate"] = ngrams.word_rate([data.decode(s) for s in samples])
        record["train_word_rate_reference"] = ngrams.word_rate([data.decode(w) for w in real])
    return record | {
        "bpc": sum(terms) / len(terms),
        # where along the masking times the bits go: block b owns t in [(B-b)/B, (B-b+1)/B]
        **{f"bpc_block{b}": term for b, term in enumerate(terms, 1)},
        "unigram_bits": unigram_bits(tokens, data.vocab_size),  # the context-free floor
        "tokens": tokens.numel(),
        "eval_seconds": round(eval_seconds, 3),
        "samples_per_block": samples_per_block,
        "sample_steps": steps,
        "block_calls": list(model.calls),
        # each unmasking step runs only the layers of the block that owns its t
        "layer_evals_per_sample": sum(depth[model.block_for((steps - i) / steps) - 1] for i in range(steps)),
        "sample_text": [data.decode(s) for s in samples],
        "samples": [{"continuation": data.decode(s)} for s in samples],
    }  # unconditional: no prompt


def samples_markdown(experiment: str, method: str, record: dict) -> str:
    """The text samples of an evaluation record as Markdown: prompt / continuation (/ the real continuation)
    pairs, or unconditional samples (masked LM), each in a code span so that whitespace shows."""

    def shown(text: str) -> str:
        return "`" + text.replace("`", "'").replace("\n", "⏎") + "`"

    lines = [f"# Samples: {experiment}, {method}", ""]
    for k, sample in enumerate(record.get("samples", []), 1):
        if "prompt" in sample:
            lines += [
                f"{k}. prompt {shown(sample['prompt'])}",
                f"   - generated: {shown(sample['continuation'])}",
                f"   - real: {shown(sample['reference'])}",
            ]
        else:
            lines.append(f"{k}. {shown(sample['continuation'])}")
    return "\n".join(lines) + "\n"


def in_chunks(fn, rows: torch.Tensor, size: int, seed: int, purpose: str, device) -> torch.Tensor | None:
    """``fn(chunk, generator)`` over ``rows`` in chunks of ``size``, chunk i with its own generator seeded from
    (seed, purpose, i): so the result depends neither on how many rows a device holds at once beyond ``size``
    (paper scale: 5,000 continuations of 512-token prompts never share one batch) nor on the number of ranks,
    which the chunks are dealt over (round-robin; rank 0 gathers them and returns all, the others None)."""
    world = distributed.world()
    chunks = rows.split(size)
    mine = {
        i: fn(chunk, torch.Generator().manual_seed(derive_seed(seed, purpose, i)))
        for i, chunk in enumerate(chunks)
        if i % world.size == world.rank
    }
    return distributed.collect_chunks(mine, [len(c) for c in chunks], device)


def evaluate_ar_lm(
    model,
    exp: Experiment,
    data,
    *,
    judge=None,
    seed: int = 0,
    prompts: int = 100,
    continuations: int = 5,
    new_tokens: int = 50,
    max_windows: int | None = None,
    featurizers: tuple[str, ...] = ("reference-lm", "minilm"),
    hf_judges: tuple[str, ...] = (),
    steps_per_token: int | None = None,
    start_noise: float = 1.0,
    top_p: float = 0.95,
    train_data=None,
) -> dict | None:
    """The paper's protocol at any scale: prompts from held-out windows, ``continuations`` continuations of
    ``new_tokens`` tokens each (block-wise: B denoising steps per token, greedy; end-to-end: top-p 0.95),
    MAUVE against the windows' true continuations, generative perplexity under ``judge`` and plain
    next-token quality. ``judge`` is a causal next-token model (this experiment's own end-to-end reference
    LM offline, labelled so); without it only next-token quality and the samples are reported.
    ``steps_per_token`` and ``start_noise`` change the block-wise sampler (:func:`dblocks.text_generation.
    generate_blockwise`; None and 1: the paper's B steps from sigma_max noise), ``top_p`` the baseline's.
    ``train_data``: the training split that the ``ngram`` featurizer counts (None: loaded from the source).

    Continuations are generated ``sample.batch_size`` prompts at a time (:func:`in_chunks`); in a data-parallel
    job the ranks share the chunks and rank 0 scores (the others return None)."""
    from dblocks.metrics.mauve import (
        MINILM_LABEL,
        REFERENCE_LM_LABEL,
        mauve_from_features,
        minilm_features,
        reference_lm_features,
    )
    from dblocks.text_generation import (
        continuation_nll,
        generate_baseline,
        generate_blockwise,
        generate_recurrent,
        next_token_quality,
        recurrent_next_token_quality,
        sigma_grid,
    )

    recurrent = exp.config["task"] == "recurrent_text"
    iterations = exp.arch.spec.recurrence  # Huginn: K iterations (block-wise: K Euler steps) per token
    context = exp.arch.spec.context
    prompt_len = context - new_tokens
    if prompt_len < 1:
        raise ValueError(f"new_tokens={new_tokens} leaves no room for a prompt in a context of {context} tokens")
    if len(data) < prompts:
        raise ValueError(f"{prompts} prompts asked for but the split has only {len(data)} windows")
    blockwise = isinstance(model, AssembledModel)
    # prompts spread evenly over the split: the first windows are one passage (one play's opening), against which
    # even real text from elsewhere in the split scores low
    windows = data.tokens[torch.linspace(0, len(data) - 1, prompts).long()]
    prompt = windows[:, :prompt_len].repeat_interleave(continuations, dim=0)
    t0 = time.perf_counter()
    if blockwise:
        model.calls = [0] * len(model.blocks)
    if recurrent:

        def continue_(chunk, gen):
            return generate_recurrent(model, chunk, new_tokens, iterations, gen)
    elif blockwise:

        def continue_(chunk, gen):
            return generate_blockwise(model, chunk, new_tokens, gen, steps_per_token, start_noise)
    else:

        def continue_(chunk, gen):
            return generate_baseline(model, chunk, new_tokens, gen, top_p=top_p)

    generated = in_chunks(
        continue_, prompt, exp.config["sample"]["batch_size"], seed, "continuations", next(model.parameters()).device
    )
    if blockwise:
        model.calls = distributed.sum_over_ranks(model.calls)
    if generated is None:  # a data-parallel job's other ranks: rank 0 scores the continuations
        return None
    steps = (
        f"{iterations} Euler steps"
        if recurrent
        else "B Euler steps"
        if steps_per_token is None
        else f"{steps_per_token} Euler steps"
    )
    start = "" if start_noise == 1.0 or recurrent else f", start noise x {start_noise:g}"
    record = {
        "prompts": prompts,
        "continuations": continuations,
        "new_tokens": new_tokens,
        "prompt_tokens": prompt_len,
        "sampler": f"greedy, {steps} per token{start}" if blockwise else f"top-p {top_p:g}",
        "generate_seconds": round(time.perf_counter() - t0, 3),
    }
    if blockwise:
        record["block_calls"] = list(model.calls)
    if recurrent:  # block-wise: K whole-net passes; baseline: prelude and coda once, the block K times
        net = model.blocks[0] if blockwise else model
        outer = len(net.stem.prelude) + len(net.head.coda)
        record["layer_evals_per_token"] = (
            iterations * (outer + len(net.layers)) if blockwise else outer + iterations * len(net.layers)
        )
    elif blockwise:  # each block once per token (steps_per_token = k B: k times)
        record["layer_evals_per_token"] = layer_evaluations(model, sigma_grid(model, steps_per_token), guided=False)
    else:
        record["layer_evals_per_token"] = len(model.layers)
    scored = data.tokens[:max_windows]
    quality_gen = torch.Generator().manual_seed(seed)
    record.update(
        recurrent_next_token_quality(model, scored, iterations, quality_gen)
        if recurrent
        else next_token_quality(model, scored, quality_gen)
    )
    # the context-free floor next-token bits are read against (the tokens the next-token quality scores)
    record["unigram_bits"] = unigram_bits(scored[:, 1:], data.vocab_size)
    p_text = [data.decode(torch.cat([a, b])) for a, b in zip(prompt, generated)]
    q_text = [data.decode(w[:context]) for w in windows]
    record["sample_text"] = p_text[::continuations][:8]
    # what a reader sees beside the numbers: the first continuation of the first prompts, and the text that
    # really followed each prompt
    record["samples"] = [
        {
            "prompt": data.decode(w[:prompt_len]),
            "continuation": data.decode(g),
            "reference": data.decode(w[prompt_len:context]),
        }
        for w, g in zip(windows[:SHOWN_SAMPLES], generated[::continuations])
    ]
    for name in hf_judges:  # the paper's judges (online): Llama-2, GPT2-XL
        from dblocks.metrics.gen_ppl import HF_JUDGES, hf_generative_perplexity

        prompt_text = [data.decode(p) for p in prompt]
        continuation_text = [data.decode(g) for g in generated]
        record[HF_JUDGES[name][1]] = hf_generative_perplexity(prompt_text, continuation_text, name)
    if "gpt2-large" in featurizers:  # the paper's featurizer (online: mauve-text downloads GPT-2 large)
        from dblocks.metrics.mauve import GPT2_LARGE_LABEL, mauve_gpt2_large

        record["mauve_gpt2_large"] = mauve_gpt2_large(p_text, q_text, seed=seed)
        record["mauve_gpt2_large_label"] = GPT2_LARGE_LABEL
    if "minilm" in featurizers:
        record["mauve_minilm"] = mauve_from_features(minilm_features(p_text), minilm_features(q_text), seed)
        record["mauve_minilm_label"] = MINILM_LABEL
    if "ngram" in featurizers:  # offline and order-sensitive: n-gram surprisal profiles (training split counts)
        from dblocks.metrics.text_features import NGRAM_LABEL, NgramProfile

        ngrams = NgramProfile.from_dataset(train_data if train_data is not None else exp.load_data("train"))
        record["mauve_ngram"] = mauve_from_features(ngrams.features(p_text), ngrams.features(q_text), seed)
        record["mauve_ngram_label"] = NGRAM_LABEL
        # beside it: the share of the continuations' whole words that are training-split words
        record["train_word_rate"] = ngrams.word_rate([data.decode(g) for g in generated])
        record["train_word_rate_reference"] = ngrams.word_rate([data.decode(w[prompt_len:context]) for w in windows])
    if judge is not None:
        nll = continuation_nll(judge, prompt, generated)
        record.update(
            {
                "gen_ppl_reference": math.exp(nll),
                "gen_nll_reference": nll,
                "gen_ppl_label": "generative perplexity per token under this experiment's own end-to-end "
                "reference LM (not Llama-2 / GPT2-XL)",
            }
        )
        if "reference-lm" in featurizers:
            p_feat = reference_lm_features(judge, torch.cat([prompt, generated], dim=1))
            q_feat = reference_lm_features(judge, windows[:, :context])
            record["mauve_reference"] = mauve_from_features(p_feat, q_feat, seed)
            record["mauve_reference_label"] = REFERENCE_LM_LABEL
    return record


def fid_references(
    stats: dict[str, Path], data_dirs: list[str | Path | None]
) -> tuple[int | list[int] | None, list[dict]]:
    """What cached FID reference statistics (``{split: file}``) summarize, read from their JSON records (and
    the prepared splits' records, looked up in ``data_dirs``): the ``reference_samples`` setting they were
    made with (None: each whole split, as a params file without ``evaluation.reference_samples`` makes
    them) and per file {dataset, split, sha256, samples, examples, prepared, stats}, where ``prepared`` is
    the directory holding the very split they were computed from (same sha256), or None if not found."""
    import json

    from dblocks.checkpoint import load_metadata, sidecar_path

    found = []
    for split, path in sorted(stats.items()):
        key = load_metadata(path).get("key") or {}
        info = {
            "dataset": key.get("dataset"),
            "split": key.get("split", split),
            "sha256": key.get("data_sha256"),
            "samples": key.get("samples"),
            "examples": None,
            "prepared": None,
            "stats": Path(path),
        }
        for directory in data_dirs:
            if not directory:
                continue
            try:
                record = json.loads(sidecar_path(Path(directory) / f"{info['split']}.safetensors").read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and info["sha256"] and record.get("sha256") == info["sha256"]:
                info.update(examples=record.get("examples"), prepared=Path(directory))
                break
        found.append(info)
    whole = all(
        isinstance(i["samples"], int) and isinstance(i["examples"], int) and i["samples"] >= i["examples"]
        for i in found
    )
    counts = sorted({i["samples"] for i in found if isinstance(i["samples"], int)})
    return (None if whole or not counts else counts[0] if len(counts) == 1 else counts), found
