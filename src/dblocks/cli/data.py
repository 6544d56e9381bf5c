"""``dblocks partition``, ``models``, ``prepare`` and ``smoke-data``: the noise partition and the architecture
registry shown, datasets written once for the pipeline."""

from __future__ import annotations

import json

from dblocks.cli.common import Command, finite_float
from dblocks.errors import UsageError
from dblocks.inputs import existing_dir

# Every command module is imported to build the parser, so each imports the modules its commands use
# inside the command functions: the data loaders and models import torch, which 'partition --help' or a tracking job
# must not pay for.


def cmd_partition(args) -> None:
    from dblocks.noise import PARTITION_KINDS, Partition

    if args.kind not in PARTITION_KINDS:
        raise UsageError(f"--kind {args.kind!r}: allowed: {', '.join(PARTITION_KINDS)}")
    if args.blocks < 1:
        raise UsageError(f"--blocks {args.blocks}: allowed: an integer >= 1")
    if not 0 <= args.overlap < 0.5:
        raise UsageError(f"--overlap {args.overlap}: allowed: 0 <= gamma < 0.5")
    part = Partition.make(args.blocks, args.kind, args.overlap)
    if args.json:
        print(json.dumps(part.to_dict(), indent=2))
        return
    print(
        f"{args.kind} partition of [{part.dist.sigma_min}, {part.dist.sigma_max}] into B={part.blocks} "
        f"blocks, overlap gamma={args.overlap}"
    )
    print(f"{'block':>5}  {'sigma low':>10}  {'sigma high':>10}  {'train low':>10}  {'train high':>10}")
    for b in range(1, part.blocks + 1):
        lo, hi = part.interval(b)
        tlo, thi = part.train_interval(b)
        print(f"{b:>5}  {lo:>10.4g}  {hi:>10.4g}  {tlo:>10.4g}  {thi:>10.4g}")


def cmd_prepare(args) -> None:
    from dblocks.config import TRAINED_AUTOENCODER_DATASETS
    from dblocks.data import IMAGE_DATASETS, load_image_dataset, save_prepared, save_prepared_text
    from dblocks.data.text import TEXT_DATASETS

    if args.dataset not in IMAGE_DATASETS + TEXT_DATASETS:
        raise UsageError(f"--dataset {args.dataset!r}: allowed: {', '.join(IMAGE_DATASETS + TEXT_DATASETS)}")
    existing_dir(args.data_root, "--data-root")
    trains_autoencoder = args.dataset in TRAINED_AUTOENCODER_DATASETS
    if args.autoencoder_steps is not None and not trains_autoencoder:
        raise UsageError(
            f"--autoencoder-steps: {args.dataset} has no autoencoder to train; allowed with: "
            f"{', '.join(TRAINED_AUTOENCODER_DATASETS)}"
        )
    if args.autoencoder_steps is not None and args.autoencoder_steps < 1:
        raise UsageError(f"--autoencoder-steps {args.autoencoder_steps}: allowed: an integer >= 1")
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed}: allowed: an integer >= 0")
    if args.autoencoder is not None and args.dataset != "imagenet256":
        raise UsageError(
            f"--autoencoder: {args.dataset} is not encoded by a chosen autoencoder; allowed with: imagenet256"
        )
    if args.dataset == "imagenet256":
        from dblocks.data.latents import IMAGENET_AUTOENCODERS, prepare_imagenet_latents

        autoencoder = args.autoencoder or IMAGENET_AUTOENCODERS[0]
        if autoencoder not in IMAGENET_AUTOENCODERS:
            raise UsageError(f"--autoencoder {autoencoder!r}: allowed: {', '.join(IMAGENET_AUTOENCODERS)}")
        for path in prepare_imagenet_latents(args.data_root, args.out, autoencoder):
            print(f"wrote {path} (encoded by {autoencoder})")
        return
    if trains_autoencoder:
        from dblocks.data.digits_latent import STEPS, prepare_digits_latent

        autoencoder, *splits = prepare_digits_latent(args.out, args.autoencoder_steps or STEPS, args.seed)
        print(f"wrote {autoencoder}: its autoencoder, trained here")
        for path in splits:
            print(f"wrote {path}")
        return
    if args.dataset in TEXT_DATASETS:
        # train and test as the pipeline's prepare step names them (validation stays with the source)
        for split in ("train", "test"):
            print(f"wrote {save_prepared_text(args.dataset, split, args.out, args.data_root)}")
        return
    for split in ("train", "test"):
        ds = load_image_dataset(args.dataset, split, args.data_root)
        print(f"wrote {save_prepared(ds, args.out)}: {len(ds)} images {ds.shape}, {ds.num_classes} classes")


def cmd_smoke_data(args) -> None:
    from dblocks.data.synthetic import DATASETS, write_smoke_data

    bad = [d for d in args.dataset or () if d not in DATASETS]
    if bad:
        raise UsageError(f"--dataset {bad[0]!r}: allowed: {', '.join(DATASETS)}")
    written = write_smoke_data(args.out, args.dataset or DATASETS, args.seed)
    print(f"{args.out}: {len(written)} files written" + ("" if written else " (all were current)"))


def cmd_models(args) -> None:
    from dblocks.models import ARCHITECTURES

    print(f"{'name':<12} {'family':<6} {'depth':>5} {'width':>5} {'heads':>5} {'patch':>5}")
    for name, s in ARCHITECTURES.items():
        print(f"{name:<12} {s.family:<6} {s.depth:>5} {s.width:>5} {s.heads:>5} {s.patch:>5}")


def register(command: Command) -> None:
    """Add partition, models, prepare and smoke-data to the ``dblocks`` parser, in the order its help lists them."""
    p = command("partition", cmd_partition, "print the noise partition into B blocks")
    p.add_argument("--blocks", type=int, required=True)
    p.add_argument("--kind", default="equiprobable", help="equiprobable | uniform")
    p.add_argument("--overlap", type=finite_float, default=0.0, help="training overlap gamma in [0, 0.5)")
    p.add_argument("--json", action="store_true", help="print JSON (boundaries ascending, train_intervals)")

    command("models", cmd_models, "list the architecture registry")

    p = command("prepare", cmd_prepare, "write a dataset's train and test splits to a directory once")
    p.add_argument(
        "--dataset",
        required=True,
        help="digits | digits-latent | cifar10 | cifar100 | imagenet256 | shakespeare | text8 | lm1b | openwebtext",
    )
    p.add_argument("--data-root", help="local copy (Hugging Face parquet layout); default: the source")
    p.add_argument(
        "--out",
        required=True,
        help="directory for train.safetensors and test.safetensors (and digits-latent's autoencoder.safetensors)",
    )
    p.add_argument(
        "--autoencoder-steps",
        type=int,
        help="digits-latent: training steps of its autoencoder (default: dblocks.data.digits_latent.STEPS)",
    )
    p.add_argument("--seed", type=int, default=0, help="digits-latent: seed of its autoencoder's training")
    p.add_argument(
        "--autoencoder",
        help="imagenet256: sd-vae-ft-ema (default; diffusers, online once) or "
        "untrained-conv (a stand-in of its geometry, written beside the splits)",
    )

    p = command(
        "smoke-data",
        cmd_smoke_data,
        "write generated stand-ins of the paper's datasets in their real on-disk formats (for params/smoke.yaml)",
    )
    p.add_argument("--out", required=True, help="folder; each dataset goes to OUT/<dataset>")
    p.add_argument(
        "--dataset",
        action="append",
        help="only this one (repeatable): cifar10 | cifar100 | imagenet | text8 | lm1b | openwebtext; default: all",
    )
    p.add_argument("--seed", type=int, default=0)
