# Datasets are written once, before any training job, into DVC-tracked files that every job reads.


rule prepare_data:
    output:
        train=f"{DATA}/prepared/{{dataset}}/train.safetensors",
        test=f"{DATA}/prepared/{{dataset}}/test.safetensors",
        # the JSON records hold each file's sha256 and are versioned with it
        train_meta=f"{DATA}/prepared/{{dataset}}/train.json",
        test_meta=f"{DATA}/prepared/{{dataset}}/test.json",
    wildcard_constraints:
        dataset=dataset_other_than(AUTOENCODED),
    params:
        root=data_root_option,
        autoencoder=autoencoder_option,
        out=lambda w, output: os.path.dirname(output.train),
    log:
        "logs/prepare-{dataset}.log",
    conda:
        ENV
    shell:
        "dblocks prepare --dataset {wildcards.dataset} {params.root}{params.autoencoder} --out {params.out} > {log} 2>&1"


# The same step for a dataset whose prepare trains the autoencoder that encodes it (digits-latent): that
# autoencoder is an output too, so DVC versions it with the latents it made, and the reference statistics
# and evaluations that decode with it depend on it.
use rule prepare_data as prepare_autoencoded_data with:
    output:
        train=f"{DATA}/prepared/{{dataset}}/train.safetensors",
        test=f"{DATA}/prepared/{{dataset}}/test.safetensors",
        train_meta=f"{DATA}/prepared/{{dataset}}/train.json",
        test_meta=f"{DATA}/prepared/{{dataset}}/test.json",
        autoencoder=f"{DATA}/prepared/{{dataset}}/{AUTOENCODER_FILE}",
        autoencoder_meta=f"{DATA}/prepared/{{dataset}}/{sidecar_path(AUTOENCODER_FILE)}",
    wildcard_constraints:
        dataset="|".join(map(re.escape, AUTOENCODED)) or "^$",
