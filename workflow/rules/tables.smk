# The paper's tables and figures, regenerated from MLflow (not from loose files) once every evaluation
# has been logged. Runs that jobs could only journal (the store was down or locked) are logged first,
# exactly once each.


rule tables:
    input:
        all_metrics,
    output:
        tables=directory(f"results/{OUT}/tables"),
        figures=directory(f"results/{OUT}/figures"),
    params:
        file=PARAMS,
        runs=f"results/{OUT}/runs",  # the run records of the tracking jobs (not an input: see track-sync)
        out=lambda w, output: os.path.dirname(output.tables),
        settings=settings_of("tables"),
    log:
        f"logs/{OUT}/tables.log",
    conda:
        ENV
    shell:
        "(dblocks track-sync --runs-dir {params.runs} && dblocks tables --params {params.file} --out {params.out}) "
        "> {log} 2>&1"


# `snakemake verify`: hash every artefact of the params file against its JSON record and set corrupt ones
# aside, so that the next run rebuilds exactly them and what depends on them. Never part of `all`: the
# workflow itself never hashes or moves artefacts (loaders verify what they read).
rule verify:
    params:
        file=PARAMS,
    log:
        f"logs/{OUT}/verify.log",
    conda:
        ENV
    shell:
        "dblocks verify --params {params.file} --quarantine 2>&1 | tee {log}"
