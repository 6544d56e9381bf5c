# Assembly composes the B block checkpoints; evaluation measures the assembled model (or the baseline)
# and logs to MLflow under the experiment's parent run.


def assemble_inputs(wildcards):
    blocks = range(1, PIPE.blocks(wildcards.exp) + 1)
    if wildcards.assembled == "paper":
        return [f"checkpoints/{SCALE}/{wildcards.exp}/paper"]
    return [PIPE.block_checkpoint(wildcards.exp, b) for b in blocks]


def assemble_args(wildcards, input):
    if wildcards.assembled == "paper":
        return " ".join(f"{input[0]}/block-{b}.safetensors" for b in range(1, PIPE.blocks(wildcards.exp) + 1))
    return " ".join(input)


rule assemble:
    input:
        assemble_inputs,
    output:
        f"models/{SCALE}/{{exp}}/{{assembled}}.safetensors",
        f"models/{SCALE}/{{exp}}/{{assembled}}.json",
    params:
        blocks=lambda w: PIPE.blocks(w.exp),
        files=assemble_args,
    log:
        f"logs/{SCALE}/{{exp}}/assemble-{{assembled}}.log",
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
        f"models/{SCALE}/digits-features.safetensors",
        f"models/{SCALE}/digits-features.json",
    log:
        f"logs/{SCALE}/feature-net.log",
    shell:
        "dblocks train-feature-net --data data/prepared/digits --out {output[0]} > {log} 2>&1"


def _of_task(task):
    return "|".join(e for e, c in PIPE.experiments.items() if c["task"] == task) or "^$"


EVAL_RESOURCES = dict(gpu=RES["gpu"], mem_mb=RES["mem_mb"])


rule evaluate_classifier:
    """Accuracy on the held-out split: one Euler step per block from pure noise (each block runs once)."""
    input:
        model=lambda w: PIPE.model(w.exp, w.method),
        run=f"results/{SCALE}/runs/{{exp}}.json",
        data=prepared_split("test"),
    output:
        metrics=f"metrics/{SCALE}/{{exp}}/{{method}}.json",
    wildcard_constraints:
        exp=_of_task("classification"),
    params:
        data=lambda w: PIPE.prepared(dataset_of(w)),
    log:
        f"logs/{SCALE}/{{exp}}/evaluate-{{method}}.log",
    benchmark:
        f"results/{SCALE}/benchmarks/{{exp}}/evaluate-{{method}}.tsv"
    threads: RES["threads"]
    resources:
        **EVAL_RESOURCES,
    shell:
        "OMP_NUM_THREADS={threads} dblocks evaluate {input.model} --data {params.data} --track {input.run} "
        "--scale {SCALE} --out {output.metrics} > {log} 2>&1"


rule evaluate_generator:
    """Samples (each Euler step runs only the block owning its sigma), a sample grid and domain FID."""
    input:
        model=lambda w: PIPE.model(w.exp, w.method),
        run=f"results/{SCALE}/runs/{{exp}}.json",
        data=prepared_split("test"),
        features=[PIPE.feature_net()] if PIPE.evaluation["fid_features"] == "digits" else [],
    output:
        metrics=f"metrics/{SCALE}/{{exp}}/{{method}}.json",
        grid=f"metrics/{SCALE}/{{exp}}/{{method}}-samples.png",
    wildcard_constraints:
        exp=_of_task("generation"),
    params:
        data=lambda w: PIPE.prepared(dataset_of(w)),
        samples=PIPE.evaluation["samples"],
        steps=PIPE.evaluation["sample_steps"],
        features=f"--features {PIPE.feature_net()}" if PIPE.evaluation["fid_features"] == "digits" else "--features inception",
    log:
        f"logs/{SCALE}/{{exp}}/evaluate-{{method}}.log",
    benchmark:
        f"results/{SCALE}/benchmarks/{{exp}}/evaluate-{{method}}.tsv"
    threads: RES["threads"]
    resources:
        **EVAL_RESOURCES,
    shell:
        "OMP_NUM_THREADS={threads} dblocks evaluate {input.model} --data {params.data} --track {input.run} "
        "--scale {SCALE} {params.features} --samples {params.samples} --sample-steps {params.steps} "
        "--grid {output.grid} --out {output.metrics} > {log} 2>&1"


def _of_tasks(*tasks):
    return "|".join(e for e, c in PIPE.experiments.items() if c["task"] in tasks) or "^$"


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
        run=f"results/{SCALE}/runs/{{exp}}.json",
        data=prepared_split("test"),
        judge=judge_checkpoint,
    output:
        metrics=f"metrics/{SCALE}/{{exp}}/{{method}}.json",
    wildcard_constraints:
        exp=_of_tasks("masked_text", "ar_text", "recurrent_text"),
    params:
        data=lambda w: PIPE.prepared(dataset_of(w)),
        extra=text_evaluation_args,
    log:
        f"logs/{SCALE}/{{exp}}/evaluate-{{method}}.log",
    benchmark:
        f"results/{SCALE}/benchmarks/{{exp}}/evaluate-{{method}}.tsv"
    threads: RES["threads"]
    resources:
        **EVAL_RESOURCES,
    shell:
        "OMP_NUM_THREADS={threads} dblocks evaluate {input.model} --data {params.data} --track {input.run} "
        "--scale {SCALE} {params.extra} --out {output.metrics} > {log} 2>&1"
