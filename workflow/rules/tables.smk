# The paper's tables and figures, regenerated from MLflow (not from loose files) once every evaluation
# has been logged. Runs that jobs could only journal (the store was down or locked) are logged first,
# exactly once each.


rule tables:
    input:
        PIPE.metrics_files(),
    output:
        # In the Snakemake report (`snakemake --report results/<out>/report.html`), each table's Markdown and
        # CSV under its own category, with the figures of its experiments (the sample grids are the evaluate
        # rules' outputs; the figures' samples-* are copies of them from MLflow, left out).
        tables=report(
            directory(PIPE.tables_dir()),
            patterns=["table{table}.md", "table{table}.csv"],
            caption="../report/table.rst",
            category=report_category,
            subcategory="Tables",
        ),
        figures=report(
            directory(PIPE.figures_dir()),
            patterns=["table{table,[^-]+}-{figure}.png", "curves-{exp}.png"],
            caption="../report/figure.rst",
            category=report_category,
            subcategory="Figures",
        ),
    log:
        PIPE.log("tables"),
    conda:
        ENV
    params:
        file=PARAMS,
        runs=PIPE.runs_dir(),  # the run records of the tracking jobs (not an input: see track-sync)
        out=lambda w, output: os.path.dirname(output.tables),
        settings=settings_of("tables"),
    shell:
        "(dblocks track-sync --runs-dir {params.runs} && dblocks tables --params {params.file} --out {params.out}) "
        "> {log} 2>&1"


# The code behind the tables: the commit and state of the checkout that holds this workflow, the dblocks
# package, Snakemake and the params file, written after the tables (a job, so that parsing never runs git)
# and again whenever they are; the report shows it, and `make report` puts it on the report's landing page.
rule provenance:
    input:
        rules.tables.output,
    output:
        report(
            PIPE.provenance(),
            caption="../report/provenance.rst",
            category="Provenance",
        ),
    log:
        PIPE.log("provenance"),
    conda:
        ENV
    params:
        file=PARAMS,
    script:
        "../scripts/provenance.py"


# `snakemake verify`: hash every artefact of the params file against its JSON record and set corrupt ones
# aside, so that the next run rebuilds exactly them and what depends on them. Never part of `all`: the
# workflow itself never hashes or moves artefacts (loaders verify what they read).
rule verify:
    log:
        PIPE.log("verify"),
    conda:
        ENV
    params:
        file=PARAMS,
    shell:
        "dblocks verify --params {params.file} --quarantine 2>&1 | tee {log}"
