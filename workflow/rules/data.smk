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
AUTOENCODED_NOT_SHARDED = one_of(d for d in AUTOENCODED if d not in SHARDED)
SHARDED_NOT_AUTOENCODED = one_of(d for d in SHARDED if d not in AUTOENCODED)
SHARDED_AUTOENCODED = one_of(d for d in SHARDED if d in AUTOENCODED)


rule prepare_data:
    output:
        # both splits, and the JSON records that hold each file's sha256 and are versioned with it
        **PIPE.prepared_files("{dataset}"),
    log:
        # shared by every params file that reads this dataset, like the data: not under logs/<out>
        "logs/prepare-{dataset}.log",
    wildcard_constraints:
        dataset=dataset_other_than(AUTOENCODED + SHARDED),
    conda:
        ENV
    params:
        root=data_root_option,
        autoencoder=autoencoder_option,
        out=lambda w, output: os.path.dirname(output.train),
    shell:
        "dblocks prepare --dataset {wildcards.dataset} {params.root}{params.autoencoder} --out {params.out} > {log} 2>&1"


# The same step for a dataset whose prepare trains the autoencoder that encodes it (digits-latent): that
# autoencoder is an output too, so DVC versions it with the latents it made, and the reference statistics
# and evaluations that decode with it depend on it.
use rule prepare_data as prepare_autoencoded_data with:
    output:
        **PIPE.prepared_files("{dataset}", autoencoder=True),
    wildcard_constraints:
        dataset=AUTOENCODED_NOT_SHARDED,


# A sharded dataset (imagenet256 encoded by sd-vae-ft-ema): its shards are one more output, a folder.
use rule prepare_data as prepare_sharded_data with:
    output:
        **PIPE.prepared_files("{dataset}"),
        shards=directory(PIPE.shard_dir("{dataset}")),
    wildcard_constraints:
        dataset=SHARDED_NOT_AUTOENCODED,


# A sharded dataset whose prepare also writes its autoencoder (imagenet256 with the untrained stand-in).
use rule prepare_autoencoded_data as prepare_sharded_autoencoded_data with:
    output:
        **PIPE.prepared_files("{dataset}", autoencoder=True),
        shards=directory(PIPE.shard_dir("{dataset}")),
    wildcard_constraints:
        dataset=SHARDED_AUTOENCODED,
