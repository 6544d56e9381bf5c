"""DiffusionBlocks pipeline: prepare data -> train one job per (experiment, block) and each baseline (the
end-to-end one; the block-local NoProp and Forward-Forward ones of local.smk) -> assemble -> evaluate (MLflow)
-> the paper's tables and figures.

    snakemake --profile profiles/default                          # tiny scale (params/tiny.yaml), offline
    snakemake --profile slurm --config params=params/paper.yaml   # paper scale on a SLURM cluster

Experiments live in the params file alone (DVC reads the same file); rules are thin shells over the
`dblocks` command and hold no method logic.
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


rule all:
    input:
        PIPE.targets(),
    default_target: True
