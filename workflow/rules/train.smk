# One job per (experiment, block): each trains only its own block and never sees another block.
# `params.config_hash` makes Snakemake rerun exactly the jobs whose experiment changed; the MLflow run record
# only says where to log, so rewriting it (a changed `tracking:` section) never retrains a block. The outputs
# stay in place when a job reruns (common.smk: trained): the job keeps a block already trained with this config,
# and `--replace-stale` lets it retrain one of another config, the experiment having changed.
# A job's threads and resources are its experiment's (common.smk: train_resources); `params.launch` starts the
# command in one process, or under torchrun with one data-parallel rank per GPU when the job has N > 1.
#
# Every training job is this one rule: the end-to-end baseline, the paper's shared-stem mode (below) and the
# block-local baselines (local.smk) are `use rule train_block` with their own outputs, command and options,
# so they read the same inputs, log and resume the same way, and their commands differ only where the jobs do.


rule train_block:
    input:
        data=prepared_split("train"),
        run=training_run_record,
    output:
        checkpoint=weights(PIPE.block_checkpoint("{exp}", "{block}")),
        metadata=trained(PIPE.record(PIPE.block_checkpoint("{exp}", "{block}"))),
    log:
        PIPE.log("{exp}", "train-block-{block}"),
    benchmark:
        PIPE.benchmark("{exp}", "train-block-{block}")
    conda:
        ENV
    threads: training_threads
    resources:
        **train_resources("blockwise"),
    params:
        file=PARAMS,
        config_hash=config_hash,
        data=prepared_dir,
        launch=launcher,
        command="train-block",
        # the job's part of the network (the options between --experiment and --data)
        part=" --block {block}",
        # taking the output makes it a derived param: the file itself is what Snakemake tracks
        out=lambda w, output: f"--out {output.checkpoint}",
    shell:
        "{params.launch} {params.command} --config {params.file} --experiment {wildcards.exp}{params.part} "
        "--data {params.data} --track {input.run} {params.out} --replace-stale --no-progress > {log} 2>&1"


# The end-to-end baseline: the whole network, by backpropagation, on the same data and budget.
use rule train_block as train_baseline with:
    output:
        checkpoint=weights(PIPE.e2e_checkpoint("{exp}")),
        metadata=trained(PIPE.record(PIPE.e2e_checkpoint("{exp}"))),
    log:
        PIPE.log("{exp}", "train-e2e"),
    benchmark:
        PIPE.benchmark("{exp}", "train-e2e")
    resources:
        **train_resources("e2e"),
    params:
        command="train-baseline",
        part="",


# The paper's single-process mode (shared stem and head, one block sampled per step); it writes all B block
# checkpoints at once, so its output is their directory.
use rule train_block as train_shared with:
    output:
        blocks=weights(directory(PIPE.paper_dir("{exp}"))),
    log:
        PIPE.log("{exp}", "train-paper"),
    benchmark:
        PIPE.benchmark("{exp}", "train-paper")
    resources:
        **train_resources("paper"),
    params:
        command="train-shared",
        part="",
        out=lambda w, output: f"--out-dir {output.blocks}",
