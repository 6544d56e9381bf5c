# MLflow: the store and experiment are created by one job before the fan-out (parallel jobs never race
# to create them); each experiment then gets a parent run that its block jobs attach to as children.
# An unreachable store does not stop the pipeline (--allow-offline): jobs then run untracked, journal
# what they would have logged, and the tables rule logs those journals first (dblocks track-sync).


rule tracking_store:
    output:
        f"results/{OUT}/runs/store.json",
    log:
        f"logs/{OUT}/tracking-store.log",
    shell:
        "dblocks track-init --params {PARAMS} --out-dir results/{OUT}/runs --store-only --allow-offline > {log} 2>&1"


rule tracking_parent:
    input:
        f"results/{OUT}/runs/store.json",
    output:
        f"results/{OUT}/runs/{{exp}}.json",
    params:
        config_hash=lambda w: PIPE.hash(w.exp),  # a changed experiment gets a new parent run
    log:
        f"logs/{OUT}/{{exp}}/tracking-parent.log",
    shell:
        "dblocks track-init --params {PARAMS} --out-dir results/{OUT}/runs --experiment {wildcards.exp} --allow-offline > {log} 2>&1"
