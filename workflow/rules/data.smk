# Datasets are written once, before any training job, into DVC-tracked files that every job reads.


rule prepare_data:
    output:
        train="data/prepared/{dataset}/train.safetensors",
        test="data/prepared/{dataset}/test.safetensors",
        # the JSON sidecars hold each file's sha256 and are versioned with it
        train_meta="data/prepared/{dataset}/train.json",
        test_meta="data/prepared/{dataset}/test.json",
    params:
        root=lambda w: f"--data-root {PIPE.datasets[w.dataset]}" if PIPE.datasets.get(w.dataset) else "",
    log:
        "logs/prepare-{dataset}.log",
    shell:
        "dblocks prepare --dataset {wildcards.dataset} {params.root} --out data/prepared/{wildcards.dataset} > {log} 2>&1"
