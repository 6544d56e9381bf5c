"""DiffusionBlocks pipeline: prepare data -> train one job per (experiment, block) and each baseline (the
end-to-end one; the block-local NoProp and Forward-Forward ones of local.smk) -> assemble -> evaluate (MLflow)
-> the paper's tables and figures.

    snakemake --profile profiles/default                          # tiny scale (params/tiny.yaml), offline
    snakemake --profile slurm --config params=params/paper.yaml   # paper scale on a SLURM cluster

    snakemake --report results/tiny/report.html                   # after a run: tables, figures, samples

Experiments live in the params file alone (DVC reads the same file); rules are thin shells over the
`dblocks` command and hold no method logic, and the params model (dblocks.pipeline.Pipeline) names every file.
"""

from snakemake.utils import min_version

min_version("9.0")


# common.smk loads the params file through dblocks.params (validated against the schema shipped in the
# package, every experiment resolved and checked) before any rule is defined or any job starts.
include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/tracking.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/local.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"


# The landing page of `snakemake --report`; the results in it (tables, figures, sample grids, provenance)
# are the outputs marked `report(...)` in the rules files, with captions from workflow/report/.
report: "workflow/report/workflow.rst"


# Jobs of seconds and little memory (writing a run record, composing block files, reading MLflow into tables,
# writing the provenance) run in the Snakemake process itself: on SLURM, queueing each as a cluster job
# would cost more than running it.
localrules:
    tracking_store,
    tracking_parent,
    assemble,
    tables,
    provenance,


rule all:
    default_target: True
    input:
        PIPE.targets(),
