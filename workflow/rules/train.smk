# One job per (experiment, block): each trains only its own block and never sees another block.
# `params.config_hash` makes Snakemake rerun exactly the jobs whose experiment changed; the MLflow run record
# only says where to log, so rewriting it (a changed `tracking:` section) never retrains a block.
# A job's threads and resources are its experiment's (common.smk: train_resources); `params.launch` starts the
# command in one process, or under torchrun with one data-parallel rank per GPU when the job has N > 1.


rule train_block:
    input:
        data=prepared_split("train"),
        run=training_run_record,
    output:
        checkpoint=weights(f"checkpoints/{OUT}/{{exp}}/block-{{block}}.safetensors"),
        metadata=f"checkpoints/{OUT}/{{exp}}/block-{{block}}.json",
    params:
        file=PARAMS,
        config_hash=config_hash,
        data=prepared_dir,
        launch=launcher,
    log:
        f"logs/{OUT}/{{exp}}/train-block-{{block}}.log",
    benchmark:
        f"results/{OUT}/benchmarks/{{exp}}/train-block-{{block}}.tsv"
    threads: training_threads
    resources:
        **train_resources("blockwise"),
    conda:
        ENV
    shell:
        "{params.launch} train-block --config {params.file} --experiment {wildcards.exp} "
        "--block {wildcards.block} --data {params.data} --track {input.run} --out {output.checkpoint} "
        "--no-progress > {log} 2>&1"


rule train_baseline:
    input:
        data=prepared_split("train"),
        run=training_run_record,
    output:
        checkpoint=weights(f"checkpoints/{OUT}/{{exp}}/e2e.safetensors"),
        metadata=f"checkpoints/{OUT}/{{exp}}/e2e.json",
    params:
        file=PARAMS,
        config_hash=config_hash,
        data=prepared_dir,
        launch=launcher,
    log:
        f"logs/{OUT}/{{exp}}/train-e2e.log",
    benchmark:
        f"results/{OUT}/benchmarks/{{exp}}/train-e2e.tsv"
    threads: training_threads
    resources:
        **train_resources("e2e"),
    conda:
        ENV
    shell:
        "{params.launch} train-baseline --config {params.file} --experiment {wildcards.exp} "
        "--data {params.data} --track {input.run} --out {output.checkpoint} --no-progress > {log} 2>&1"


rule train_shared:
    """The paper's single-process mode (shared stem and head, one block sampled per step); it writes all B
    block checkpoints at once, so its output is their directory."""
    input:
        data=prepared_split("train"),
        run=training_run_record,
    output:
        blocks=weights(directory(f"checkpoints/{OUT}/{{exp}}/paper")),
    params:
        file=PARAMS,
        config_hash=config_hash,
        data=prepared_dir,
        launch=launcher,
    log:
        f"logs/{OUT}/{{exp}}/train-paper.log",
    benchmark:
        f"results/{OUT}/benchmarks/{{exp}}/train-paper.tsv"
    threads: training_threads
    resources:
        **train_resources("paper"),
    conda:
        ENV
    shell:
        "{params.launch} train-shared --config {params.file} --experiment {wildcards.exp} "
        "--data {params.data} --track {input.run} --out-dir {output.blocks} --no-progress > {log} 2>&1"
