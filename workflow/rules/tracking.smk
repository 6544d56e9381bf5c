# MLflow: the store and experiment are created by one job before the fan-out (parallel jobs never race
# to create them); each experiment then gets a parent run that its block jobs attach to as children.
# An unreachable store does not stop the pipeline (--allow-offline): jobs then run untracked, journal
# what they would have logged, and the tables rule logs those journals first (dblocks track-sync).


rule tracking_store:
    output:
        record=PIPE.store_record(),
    log:
        PIPE.log("tracking-store"),
    conda:
        ENV
    params:
        file=PARAMS,
        runs=lambda w, output: os.path.dirname(output.record),
        settings=settings_of("tracking_store"),
    shell:
        "dblocks track-init --params {params.file} --out-dir {params.runs} --store-only --allow-offline > {log} 2>&1"


rule tracking_parent:
    input:
        PIPE.store_record(),
    output:
        # named by the experiment's config hash (Pipeline.run_json): a changed experiment, a new record
        record=PIPE.run_json("{exp}", "{chash}"),
    log:
        PIPE.log("{exp}", "tracking-parent.{chash}"),
    conda:
        ENV
    params:
        file=PARAMS,
        runs=lambda w, output: os.path.dirname(output.record),
        settings=settings_of("tracking_parent"),
    shell:
        "dblocks track-init --params {params.file} --out-dir {params.runs} --experiment {wildcards.exp} "
        "--allow-offline > {log} 2>&1"
