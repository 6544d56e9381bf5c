# The paper's tables and figures, regenerated from MLflow (not from loose files) once every evaluation
# has been logged. Runs that jobs could only journal (the store was down or locked) are logged first,
# exactly once each.


rule tables:
    input:
        [PIPE.metrics(e, m) for e in EXPERIMENTS for m in PIPE.methods(e)],
    output:
        tables=directory(f"results/{OUT}/tables"),
        figures=directory(f"results/{OUT}/figures"),
    log:
        f"logs/{OUT}/tables.log",
    shell:
        "(dblocks track-sync --runs-dir results/{OUT}/runs && "
        "dblocks tables --params {PARAMS} --out results/{OUT}) > {log} 2>&1"
