# MLflow: the store and experiment are created by one job before the fan-out (parallel jobs never race
# to create them); each experiment then gets a parent run that its block jobs attach to as children.
# An unreachable store does not stop the pipeline (--allow-offline): jobs then run untracked, journal
# what they would have logged, and the tables rule logs those journals first (dblocks track-sync).


rule tracking_store:
    output:
        record=f"results/{OUT}/runs/store.json",
    params:
        file=PARAMS,
        runs=lambda w, output: os.path.dirname(output.record),
        settings=settings_of("tracking_store"),
    log:
        f"logs/{OUT}/tracking-store.log",
    conda:
        ENV
    shell:
        "dblocks track-init --params {params.file} --out-dir {params.runs} --store-only --allow-offline > {log} 2>&1"


rule tracking_parent:
    input:
        f"results/{OUT}/runs/store.json",
    output:
        record=f"results/{OUT}/runs/{{exp}}.{{chash}}.json",  # Pipeline.run_json: a changed experiment, a new record
    params:
        file=PARAMS,
        runs=lambda w, output: os.path.dirname(output.record),
        settings=settings_of("tracking_parent"),
    log:
        f"logs/{OUT}/{{exp}}/tracking-parent.{{chash}}.log",
    conda:
        ENV
    shell:
        "dblocks track-init --params {params.file} --out-dir {params.runs} --experiment {wildcards.exp} "
        "--allow-offline > {log} 2>&1"
