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
