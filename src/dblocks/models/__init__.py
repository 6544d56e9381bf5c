"""The named architecture registry (``DiT-S/2`` -> sizes), as the CLI and params files use it.

An architecture is a family and sizes; :class:`dblocks.models.parts.Architecture` builds its parts. This
module imports no torch: params validation (in the Snakefile, before any job) only needs names and
depths, and every SLURM job parses the Snakefile again."""

from __future__ import annotations

from dataclasses import asdict, dataclass

FAMILIES = ("vit", "dit", "mdm", "ar", "huginn")


@dataclass(frozen=True)
class ArchSpec:
    family: str
    depth: int
    width: int
    heads: int
    patch: int
    mlp_ratio: float = 4.0
    class_dropout: float = 0.1  # DiT only: label dropout for classifier-free guidance
    target_dim: int | None = None  # ViT only: label-embedding size (defaults to width)
    context: int | None = None  # text only: sequence length in tokens
    layer_style: str = "dit"  # residual layer body (dblocks.layers.LAYER_STYLES): "dit" or "llama" (AR models)
    recurrence: int | None = None  # huginn only: mean number of recurrent-block iterations (and K at inference)
    backprop_depth: int | None = None  # huginn only: iterations the baseline backpropagates through
    dropout: float = 0.0  # on each layer's attention and MLP outputs while training (the authors' ViT: 0.1)

    def to_dict(self) -> dict:
        return asdict(self)


ARCHITECTURES: dict[str, ArchSpec] = {
    # paper sizes (docs/method.md §5)
    "ViT-paper": ArchSpec("vit", depth=12, width=128, heads=4, patch=4, dropout=0.1),  # the authors' ViT code
    "DiT-S/2": ArchSpec("dit", depth=12, width=384, heads=6, patch=2),
    "DiT-B/2": ArchSpec("dit", depth=12, width=768, heads=12, patch=2),
    "DiT-L/2": ArchSpec("dit", depth=24, width=1024, heads=16, patch=2),
    # CPU sizes for the embedded 8x8 digits. Both keep the paper's 12 layers, so a block of B=3 has the paper's
    # 4 layers (and DiT's layer-split ablation [4,4,4] / [3,6,3] / [6,4,2] / [2,4,6] and B in {1,2,3,4,6} apply
    # unchanged); they are narrow instead (width 32: a 2-core CPU trains all of Table 1's seeds in minutes)
    "ViT-tiny": ArchSpec("vit", depth=12, width=32, heads=2, patch=2),
    "DiT-tiny": ArchSpec("dit", depth=12, width=32, heads=2, patch=2),
    # DiT-tiny on the 4x4x4 digits-latent latents (DiT-L/2's tiny twin): patch 1 makes the same 16 tokens
    # that patch 2 makes of 8x8 pixels
    "DiT-tiny/1": ArchSpec("dit", depth=12, width=32, heads=2, patch=1),
    # masked diffusion LM (docs/method.md §5: 12 layers, d=768, 12 heads, sequence 256 on text8). Llama layers with
    # rotary positions (MDLM's backbone has rotary positions too): with learned absolute positions MDM-tiny stayed
    # at the letter-unigram entropy (BPC 4.09) after its budget, with rotary ones it learns from the first steps
    "MDM-paper": ArchSpec("mdm", depth=12, width=768, heads=12, patch=1, context=256, layer_style="llama"),
    # MDM-tiny is narrow for its budget: at a fixed cost width 64 trained for more steps matched width 128
    # (docs/text-models.md), a step of it costing under half of one at width 128. It keeps the paper's 12 layers
    # (4 per block at B=3): with 6 layers the block-wise model trailed the end-to-end one by 0.09 BPC, most of it
    # where little is masked and two layers per block could not do what six did
    "MDM-tiny": ArchSpec("mdm", depth=12, width=64, heads=4, patch=1, context=64, layer_style="llama"),
    # autoregressive transformer (docs/method.md §5: 12 layers, d=768; B=4 -> 3 layers per block). Byte-level
    # tokens here, so the context is counted in bytes. AR-tiny keeps the paper's 12 layers (narrow instead
    # of shallow) so that Table 11's B in {2, 3, 4, 6} splits it into equal blocks as at paper scale
    "AR-paper": ArchSpec("ar", depth=12, width=768, heads=12, patch=1, context=512, layer_style="llama"),
    "AR-tiny": ArchSpec("ar", depth=12, width=64, heads=4, patch=1, context=64, layer_style="llama"),
    # Huginn recurrent depth (docs/method.md §5: d=512, 8 heads; 2 prelude + 4-layer recurrent block + 2 coda
    # layers; depth counts the recurrent block only). Baseline: mean 32 iterations, backprop through 8.
    # Llama layers with rotary positions, as Huginn's own model (with learned absolute positions Huginn-tiny
    # did not get past the byte unigram entropy in its budget)
    "Huginn-paper": ArchSpec(
        "huginn",
        depth=4,
        width=512,
        heads=8,
        patch=1,
        context=512,
        recurrence=32,
        backprop_depth=8,
        layer_style="llama",
    ),
    # Huginn-tiny at AR-tiny's width: the baseline runs ~37 layer calls per step, and width 64 trains 1000 steps of
    # batch 32 (next-token 2.74 bits/byte) in the time width 128 took for 300 of batch 16 (4.0)
    "Huginn-tiny": ArchSpec(
        "huginn", depth=4, width=64, heads=4, patch=1, context=64, recurrence=8, backprop_depth=2, layer_style="llama"
    ),
    # the smallest sizes, for tests
    "ViT-micro": ArchSpec("vit", depth=3, width=32, heads=2, patch=4),
    "DiT-micro": ArchSpec("dit", depth=3, width=32, heads=2, patch=4),
    "MDM-micro": ArchSpec("mdm", depth=3, width=32, heads=2, patch=1, context=16, layer_style="llama"),
    "AR-micro": ArchSpec("ar", depth=4, width=32, heads=2, patch=1, context=24, layer_style="llama"),
    "Huginn-micro": ArchSpec(
        "huginn", depth=4, width=32, heads=2, patch=1, context=24, recurrence=3, backprop_depth=2, layer_style="llama"
    ),
}


def get_arch(name: str) -> ArchSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; allowed: {', '.join(ARCHITECTURES)}") from None
