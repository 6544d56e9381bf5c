"""DiffusionBlocks pipeline: prepare data -> train one job per (experiment, block) and each baseline ->
assemble -> evaluate (MLflow) -> the paper's tables and figures.

    snakemake --profile profiles/default                          # tiny scale (params/tiny.yaml), offline
    snakemake --profile slurm --config params=params/paper.yaml   # paper scale on a SLURM cluster

Experiments live in the params file alone (DVC reads the same file); rules are thin shells over the
`dblocks` command and hold no method logic.
"""

from snakemake.utils import min_version, validate

min_version("9.0")


include: "workflow/rules/common.smk"


validate(config, "workflow/schemas/config.schema.json")


include: "workflow/rules/data.smk"
include: "workflow/rules/tracking.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"


rule all:
    input:
        PIPE.targets(),
    default_target: True
