# The paper's block-local baselines (dblocks.baselines), each an experiment of its own whose pipeline.methods
# names it: NoProp-DT as T independent block jobs plus a head job (Table 6), NoProp-CT, NoProp-FM and
# Forward-Forward on the ViT as one job each (Tables 6 and 1). Like train.smk's jobs, each trains its part
# alone through the project's training loop (resumable state, atomic safetensors checkpoints, MLflow child
# runs, time and memory per step); one evaluation per method assembles the parts and scores them.


# Their training jobs are the pipeline's one training rule (train.smk's train_block) running `dblocks
# train-local` with the method, and NoProp-DT's part, as options.


# NoProp-DT's block t: its term of NoProp's ELBO, on z_{t-1} drawn from the noising chain; it builds, loads and
# updates no other block.
use rule train_block as train_local_block with:
    output:
        checkpoint=weights(PIPE.local_checkpoint("{exp}", "{local}", "{block}")),
        metadata=trained(PIPE.record(PIPE.local_checkpoint("{exp}", "{local}", "{block}"))),
    log:
        PIPE.log("{exp}", "train-{local}-block-{block}"),
    benchmark:
        PIPE.benchmark("{exp}", "train-{local}-block-{block}")
    wildcard_constraints:
        exp=of_methods(*SPLIT_METHODS),
        local=one_of(SPLIT_METHODS),
    resources:
        **train_resources("noprop-dt"),
    params:
        command="train-local",
        part=" --method {local} --block {block}",


# NoProp-DT's head: the linear classifier of z_T ~ q(z_T | y), which needs no block.
use rule train_local_block as train_local_head with:
    output:
        checkpoint=weights(PIPE.local_checkpoint("{exp}", "{local}", HEAD)),
        metadata=trained(PIPE.record(PIPE.local_checkpoint("{exp}", "{local}", HEAD))),
    log:
        PIPE.log("{exp}", "train-{local}-head"),
    benchmark:
        PIPE.benchmark("{exp}", "train-{local}-head")
    params:
        part=" --method {local} --head",


# A baseline trained in one job: NoProp-CT (network, learned noise schedule and head together), NoProp-FM, or
# Forward-Forward (every unit on its own goodness, each unit's input detached).
use rule train_local_block as train_local with:
    output:
        checkpoint=weights(PIPE.local_checkpoint("{exp}", "{local}")),
        metadata=trained(PIPE.record(PIPE.local_checkpoint("{exp}", "{local}"))),
    log:
        PIPE.log("{exp}", "train-{local}"),
    benchmark:
        PIPE.benchmark("{exp}", "train-{local}")
    wildcard_constraints:
        exp=of_methods(*WHOLE_METHODS),
        local=one_of(WHOLE_METHODS),
    resources:
        **train_resources("forward-forward"),
    params:
        part=" --method {local}",


rule evaluate_local:
    """Test accuracy of a baseline assembled from all its parts (NoProp-DT: the T blocks in sequence from
    pure noise, then the head), with the time and memory per training step its jobs recorded."""
    input:
        checkpoints=lambda w: PIPE.with_records(*PIPE.local_checkpoints(w.exp, w.local)),
        run=run_record,
        data=prepared_split("test"),
    output:
        metrics=PIPE.metrics("{exp}", "{local}"),
    log:
        PIPE.log("{exp}", "evaluate-{local}"),
    benchmark:
        PIPE.benchmark("{exp}", "evaluate-{local}")
    wildcard_constraints:
        exp=of_methods(*LOCAL_METHODS),
    conda:
        ENV
    threads: RES["threads"]
    resources:
        **EVAL_RESOURCES,
    params:
        file=PARAMS,
        data=prepared_dir,
        parts=lambda w: " ".join(PIPE.local_checkpoints(w.exp, w.local)),
        settings=settings_of("evaluate_local"),
    shell:
        "OMP_NUM_THREADS={threads} dblocks evaluate-local {params.parts} --params {params.file} "
        "--data {params.data} --track {input.run} --out {output.metrics} > {log} 2>&1"
