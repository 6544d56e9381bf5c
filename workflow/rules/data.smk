# Datasets are written once, before any training job, into DVC-tracked files that every job reads.
#
# A split is `<split>.safetensors` with its JSON record `<split>.json`. The datasets in SHARDED (ImageNet:
# 1.28M latents and their mirrored twins, 42 GB) are encoded straight into shards, whose number is known only
# once the images are counted: they go to one folder, `shards/`, declared as a directory output; the split
# file holds the labels and its record lists and hashes every shard (dblocks.data.prepared), so the split
# files stay the inputs that downstream jobs name, and they change whenever a shard does.

SHARDED = list(SHARDED_DATASETS)
# The dataset-wildcard patterns of the three rules below (each matches no name when its set is empty), so that
# exactly one prepare rule claims each dataset's files: with or without an autoencoder, sharded or not.
AUTOENCODED_NOT_SHARDED = "|".join(re.escape(d) for d in AUTOENCODED if d not in SHARDED) or "^$"
SHARDED_NOT_AUTOENCODED = "|".join(re.escape(d) for d in SHARDED if d not in AUTOENCODED) or "^$"
SHARDED_AUTOENCODED = "|".join(re.escape(d) for d in SHARDED if d in AUTOENCODED) or "^$"


rule prepare_data:
    output:
        train=f"{DATA}/prepared/{{dataset}}/train.safetensors",
        test=f"{DATA}/prepared/{{dataset}}/test.safetensors",
        # the JSON records hold each file's sha256 and are versioned with it
        train_meta=f"{DATA}/prepared/{{dataset}}/train.json",
        test_meta=f"{DATA}/prepared/{{dataset}}/test.json",
    wildcard_constraints:
        dataset=dataset_other_than(AUTOENCODED + SHARDED),
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
        dataset=AUTOENCODED_NOT_SHARDED,


# A sharded dataset (imagenet256 encoded by sd-vae-ft-ema): its shards are one more output, a folder.
use rule prepare_data as prepare_sharded_data with:
    output:
        train=f"{DATA}/prepared/{{dataset}}/train.safetensors",
        test=f"{DATA}/prepared/{{dataset}}/test.safetensors",
        train_meta=f"{DATA}/prepared/{{dataset}}/train.json",
        test_meta=f"{DATA}/prepared/{{dataset}}/test.json",
        shards=directory(f"{DATA}/prepared/{{dataset}}/{SHARD_DIR}"),
    wildcard_constraints:
        dataset=SHARDED_NOT_AUTOENCODED,


# A sharded dataset whose prepare also writes its autoencoder (imagenet256 with the untrained stand-in).
use rule prepare_autoencoded_data as prepare_sharded_autoencoded_data with:
    output:
        train=f"{DATA}/prepared/{{dataset}}/train.safetensors",
        test=f"{DATA}/prepared/{{dataset}}/test.safetensors",
        train_meta=f"{DATA}/prepared/{{dataset}}/train.json",
        test_meta=f"{DATA}/prepared/{{dataset}}/test.json",
        autoencoder=f"{DATA}/prepared/{{dataset}}/{AUTOENCODER_FILE}",
        autoencoder_meta=f"{DATA}/prepared/{{dataset}}/{sidecar_path(AUTOENCODER_FILE)}",
        shards=directory(f"{DATA}/prepared/{{dataset}}/{SHARD_DIR}"),
    wildcard_constraints:
        dataset=SHARDED_AUTOENCODED,
