# Datasets are written once, before any training job, into DVC-tracked files that every job reads.


rule prepare_data:
    output:
        train="data/prepared/{dataset}/train.safetensors",
        test="data/prepared/{dataset}/test.safetensors",
        # the JSON sidecars hold each file's sha256 and are versioned with it
        train_meta="data/prepared/{dataset}/train.json",
        test_meta="data/prepared/{dataset}/test.json",
    wildcard_constraints:
        dataset=dataset_other_than(TRAINED_AUTOENCODER_DATASETS),
    params:
        root=lambda w: f"--data-root {PIPE.datasets[w.dataset]}" if PIPE.datasets.get(w.dataset) else "",
    log:
        "logs/prepare-{dataset}.log",
    shell:
        "dblocks prepare --dataset {wildcards.dataset} {params.root} --out data/prepared/{wildcards.dataset} > {log} 2>&1"


# The same step for a dataset whose prepare trains the autoencoder that encodes it (digits-latent): that
# autoencoder is an output too, so DVC versions it with the latents it made, and the reference statistics
# and evaluations that decode with it depend on it.
AUTOENCODER = f"data/prepared/{{dataset}}/{AUTOENCODER_FILE}"


use rule prepare_data as prepare_autoencoded_data with:
    output:
        train="data/prepared/{dataset}/train.safetensors",
        test="data/prepared/{dataset}/test.safetensors",
        train_meta="data/prepared/{dataset}/train.json",
        test_meta="data/prepared/{dataset}/test.json",
        autoencoder=AUTOENCODER,
        autoencoder_meta=str(sidecar_path(AUTOENCODER)),
    wildcard_constraints:
        dataset="|".join(map(re.escape, TRAINED_AUTOENCODER_DATASETS)) or "^$",
