# Datasets are written once, before any training job, into DVC-tracked files that every job reads.


rule prepare_data:
    output:
        train="data/prepared/{dataset}/train.safetensors",
        test="data/prepared/{dataset}/test.safetensors",
        # the JSON records hold each file's sha256 and are versioned with it
        train_meta="data/prepared/{dataset}/train.json",
        test_meta="data/prepared/{dataset}/test.json",
    wildcard_constraints:
        dataset=dataset_other_than(TRAINED_AUTOENCODER_DATASETS),
    params:
        root=data_root_option,
        out=lambda w, output: os.path.dirname(output.train),
    log:
        "logs/prepare-{dataset}.log",
    conda:
        ENV
    shell:
        "dblocks prepare --dataset {wildcards.dataset} {params.root} --out {params.out} > {log} 2>&1"


# The same step for a dataset whose prepare trains the autoencoder that encodes it (digits-latent): that
# autoencoder is an output too, so DVC versions it with the latents it made, and the reference statistics
# and evaluations that decode with it depend on it.
use rule prepare_data as prepare_autoencoded_data with:
    output:
        train="data/prepared/{dataset}/train.safetensors",
        test="data/prepared/{dataset}/test.safetensors",
        train_meta="data/prepared/{dataset}/train.json",
        test_meta="data/prepared/{dataset}/test.json",
        autoencoder=f"data/prepared/{{dataset}}/{AUTOENCODER_FILE}",
        autoencoder_meta=f"data/prepared/{{dataset}}/{sidecar_path(AUTOENCODER_FILE)}",
    wildcard_constraints:
        dataset="|".join(map(re.escape, TRAINED_AUTOENCODER_DATASETS)) or "^$",
