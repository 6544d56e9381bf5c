"""``dblocks assemble`` and ``sample``: block checkpoints composed into one model, and a grid of its
samples."""

from __future__ import annotations

from dblocks.cli.common import Command, finite_float, weights_option
from dblocks.errors import UsageError
from dblocks.inputs import device_for, existing_dir, existing_files, load_model_arg, output_path

# Every command module is imported to build the parser, so each imports the modules its commands use
# inside the command functions: the models import torch, which no other command's start-up should pay for.


def cmd_assemble(args) -> None:
    from dblocks.assemble import AssemblyError, assemble

    paths = existing_files(args.blocks, "BLOCK")
    out = output_path(args.out, ".safetensors")
    try:
        meta = assemble(paths, out, args.expect_blocks)
    except AssemblyError as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {out}: {meta['experiment']}, {meta['blocks']} blocks, method {meta['method']}")


def cmd_sample(args) -> None:
    from dblocks.evaluate import class_balanced_samples, save_class_grid

    out = output_path(args.out, ".png")
    model, exp, meta = load_model_arg(args.model, "MODEL", args.weights)  # None: the model's sample.weights
    if exp.config["task"] != "generation":
        raise UsageError(f"MODEL {args.model}: is a {exp.config['task']} model; 'sample' needs a generation model")
    existing_dir(args.data, "--data")
    from dblocks.data.latents import decoder_for

    decode = decoder_for(exp.config["dataset"], args.data)  # latents are shown as the images they decode to
    model.to(device_for(exp))
    steps = args.steps or exp.config["sample"]["steps"]
    n = args.num or exp.config["sample"]["num_images"]
    images, model, _, seconds = class_balanced_samples(
        model, exp, n, steps, args.seed, args.guidance, progress=not args.no_progress
    )
    save_class_grid(decode(images) if decode is not None else images, exp, out)
    print(
        f"wrote {out}: {n} samples, {steps} steps, {meta['weights']} weights, block calls {model.calls}, "
        f"{seconds:.1f} s"
    )


def register(command: Command) -> None:
    """Add assemble and sample to the ``dblocks`` parser, in the order its help lists them."""
    p = command("assemble", cmd_assemble, "compose B block checkpoints into one model")
    p.add_argument("blocks", nargs="+", metavar="BLOCK", help="block checkpoints (.safetensors)")
    p.add_argument("--out", required=True, help="model path (.safetensors)")
    p.add_argument("--expect-blocks", type=int, help="refuse unless the checkpoints say B equals this")

    p = command("sample", cmd_sample, "generate a PNG grid of class-conditional samples")
    p.add_argument("model", metavar="MODEL", help="assembled or end-to-end generation model (.safetensors)")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument(
        "--num",
        type=int,
        help="number of samples (default: sample.num_images); the grid shows up to 10 rows of one sample per class",
    )
    p.add_argument("--steps", type=int, help="Euler steps (default: sample.steps)")
    p.add_argument("--guidance", type=finite_float, help="classifier-free guidance scale (default: sample.guidance)")
    weights_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="digits-latent: its prepared directory, whose autoencoder decodes the samples")
    p.add_argument("--no-progress", action="store_true")
