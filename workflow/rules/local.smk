# The paper's block-local baselines (dblocks.baselines), each an experiment of its own whose pipeline.methods
# names it: NoProp-DT as T independent block jobs plus a head job (Table 6), NoProp-CT, NoProp-FM and
# Forward-Forward on the ViT as one job each (Tables 6 and 1). Like train.smk's jobs, each trains its part
# alone through the project's training loop (resumable state, atomic safetensors checkpoints, MLflow child
# runs, time and memory per step); one evaluation per method assembles the parts and scores them.


rule train_local_block:
    """NoProp-DT's block t: its term of NoProp's ELBO, on z_{t-1} drawn from the noising chain; it builds,
    loads and updates no other block."""
    input:
        data=prepared_split("train"),
        run=training_run_record,
    output:
        checkpoint=weights(f"checkpoints/{OUT}/{{exp}}/{{local}}/block-{{block}}.safetensors"),
        metadata=f"checkpoints/{OUT}/{{exp}}/{{local}}/block-{{block}}.json",
    wildcard_constraints:
        exp=of_methods(*SPLIT_METHODS),
        local="|".join(SPLIT_METHODS),
    params:
        file=PARAMS,
        config_hash=config_hash,
        data=prepared_dir,
        launch=launcher,
    log:
        f"logs/{OUT}/{{exp}}/train-{{local}}-block-{{block}}.log",
    benchmark:
        f"results/{OUT}/benchmarks/{{exp}}/train-{{local}}-block-{{block}}.tsv"
    threads: training_threads
    resources:
        **train_resources("noprop-dt"),
    conda:
        ENV
    shell:
        "{params.launch} train-local --config {params.file} --experiment {wildcards.exp} --method {wildcards.local} "
        "--block {wildcards.block} --data {params.data} --track {input.run} --out {output.checkpoint} "
        "--no-progress > {log} 2>&1"


rule train_local_head:
    """NoProp-DT's head: the linear classifier of z_T ~ q(z_T | y), which needs no block."""
    input:
        data=prepared_split("train"),
        run=training_run_record,
    output:
        checkpoint=weights(f"checkpoints/{OUT}/{{exp}}/{{local}}/head.safetensors"),
        metadata=f"checkpoints/{OUT}/{{exp}}/{{local}}/head.json",
    wildcard_constraints:
        exp=of_methods(*SPLIT_METHODS),
        local="|".join(SPLIT_METHODS),
    params:
        file=PARAMS,
        config_hash=config_hash,
        data=prepared_dir,
        launch=launcher,
    log:
        f"logs/{OUT}/{{exp}}/train-{{local}}-head.log",
    benchmark:
        f"results/{OUT}/benchmarks/{{exp}}/train-{{local}}-head.tsv"
    threads: training_threads
    resources:
        **train_resources("noprop-dt"),
    conda:
        ENV
    shell:
        "{params.launch} train-local --config {params.file} --experiment {wildcards.exp} --method {wildcards.local} "
        "--head --data {params.data} --track {input.run} --out {output.checkpoint} --no-progress > {log} 2>&1"


rule train_local:
    """A baseline trained in one job: NoProp-CT (network, learned noise schedule and head together), NoProp-FM,
    or Forward-Forward (every unit on its own goodness, each unit's input detached)."""
    input:
        data=prepared_split("train"),
        run=training_run_record,
    output:
        checkpoint=weights(f"checkpoints/{OUT}/{{exp}}/{{local}}/model.safetensors"),
        metadata=f"checkpoints/{OUT}/{{exp}}/{{local}}/model.json",
    wildcard_constraints:
        exp=of_methods(*WHOLE_METHODS),
        local="|".join(WHOLE_METHODS),
    params:
        file=PARAMS,
        config_hash=config_hash,
        data=prepared_dir,
        launch=launcher,
    log:
        f"logs/{OUT}/{{exp}}/train-{{local}}.log",
    benchmark:
        f"results/{OUT}/benchmarks/{{exp}}/train-{{local}}.tsv"
    threads: training_threads
    resources:
        **train_resources("forward-forward"),
    conda:
        ENV
    shell:
        "{params.launch} train-local --config {params.file} --experiment {wildcards.exp} --method {wildcards.local} "
        "--data {params.data} --track {input.run} --out {output.checkpoint} --no-progress > {log} 2>&1"


rule evaluate_local:
    """Test accuracy of a baseline assembled from all its parts (NoProp-DT: the T blocks in sequence from
    pure noise, then the head), with the time and memory per training step its jobs recorded."""
    input:
        checkpoints=lambda w: with_records(PIPE.local_checkpoints(w.exp, w.local)),
        run=run_record,
        data=prepared_split("test"),
    output:
        metrics=f"metrics/{OUT}/{{exp}}/{{local}}.json",
    wildcard_constraints:
        exp=of_methods(*LOCAL_METHODS),
    params:
        file=PARAMS,
        data=prepared_dir,
        parts=lambda w: " ".join(PIPE.local_checkpoints(w.exp, w.local)),
        settings=settings_of("evaluate_local"),
    log:
        f"logs/{OUT}/{{exp}}/evaluate-{{local}}.log",
    benchmark:
        f"results/{OUT}/benchmarks/{{exp}}/evaluate-{{local}}.tsv"
    threads: RES["threads"]
    resources:
        **EVAL_RESOURCES,
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} dblocks evaluate-local {params.parts} --params {params.file} "
        "--data {params.data} --track {input.run} --out {output.metrics} > {log} 2>&1"
