"""The named architecture registry (``DiT-S/2`` -> sizes -> parts), as the CLI and params files use it.

An architecture is a family (``vit`` classifier or ``dit`` generator) and sizes. It builds the three kinds
of part a block denoiser needs: a stem, residual layers ``layer(h, c) -> h`` and a head. It knows nothing
about blocks; ``dblocks.blocks`` composes the parts."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from dblocks.layers import AdaLNZeroLayer, clean_noisy_mask
from dblocks.models.dit import DiTHead, DiTStem
from dblocks.models.huginn import HuginnHead, HuginnStem
from dblocks.models.text import ARStem, LastPositionsHead, MDMStem, TokenHead
from dblocks.models.vit import ViTHead, ViTStem

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
    recurrence: int | None = None  # huginn only: mean number of recurrent-block iterations (and K at inference)
    backprop_depth: int | None = None  # huginn only: iterations the baseline backpropagates through

    def to_dict(self) -> dict:
        return asdict(self)


ARCHITECTURES: dict[str, ArchSpec] = {
    # paper sizes (SPEC section 5)
    "ViT-paper": ArchSpec("vit", depth=12, width=128, heads=4, patch=4),
    "DiT-S/2": ArchSpec("dit", depth=12, width=384, heads=6, patch=2),
    "DiT-B/2": ArchSpec("dit", depth=12, width=768, heads=12, patch=2),
    "DiT-L/2": ArchSpec("dit", depth=24, width=1024, heads=16, patch=2),
    # CPU sizes for the embedded 8x8 digits (DiT-tiny keeps the paper's 12 layers so that the layer-split
    # ablation [4,4,4] / [3,6,3] / [6,4,2] / [2,4,6] and B in {1,2,3,4,6} apply unchanged)
    "ViT-tiny": ArchSpec("vit", depth=6, width=64, heads=4, patch=2),
    "DiT-tiny": ArchSpec("dit", depth=12, width=32, heads=2, patch=2),
    # masked diffusion LM (SPEC section 5: 12 layers, d=768, 12 heads, sequence 256 on text8)
    "MDM-paper": ArchSpec("mdm", depth=12, width=768, heads=12, patch=1, context=256),
    "MDM-tiny": ArchSpec("mdm", depth=6, width=128, heads=4, patch=1, context=64),
    # autoregressive transformer (SPEC section 5: 12 layers, d=768; B=4 -> 3 layers per block). Byte-level
    # tokens here, so the context is counted in bytes
    "AR-paper": ArchSpec("ar", depth=12, width=768, heads=12, patch=1, context=512),
    "AR-tiny": ArchSpec("ar", depth=4, width=128, heads=4, patch=1, context=64),
    # Huginn recurrent depth (SPEC section 5: d=512, 8 heads; 2 prelude + 4-layer recurrent block + 2 coda
    # layers; depth counts the recurrent block only). Baseline: mean 32 iterations, backprop through 8
    "Huginn-paper": ArchSpec("huginn", depth=4, width=512, heads=8, patch=1, context=512, recurrence=32,
                             backprop_depth=8),
    "Huginn-tiny": ArchSpec("huginn", depth=4, width=128, heads=4, patch=1, context=64, recurrence=8,
                            backprop_depth=2),
    # the smallest sizes, for tests
    "ViT-micro": ArchSpec("vit", depth=3, width=32, heads=2, patch=4),
    "DiT-micro": ArchSpec("dit", depth=3, width=32, heads=2, patch=4),
    "MDM-micro": ArchSpec("mdm", depth=3, width=32, heads=2, patch=1, context=16),
    "AR-micro": ArchSpec("ar", depth=4, width=32, heads=2, patch=1, context=24),
    "Huginn-micro": ArchSpec("huginn", depth=4, width=32, heads=2, patch=1, context=24, recurrence=3,
                             backprop_depth=2),
}


def get_arch(name: str) -> ArchSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; allowed: {', '.join(ARCHITECTURES)}") from None


class Architecture:
    """Factories for one architecture's parts, bound to a data shape."""

    def __init__(self, spec: ArchSpec, image_shape: tuple[int, int, int] | None, num_classes: int) -> None:
        """``num_classes`` is the vocabulary size for text families (which have no image shape)."""
        if spec.family not in FAMILIES:
            raise ValueError(f"unknown family {spec.family!r}; allowed: {', '.join(FAMILIES)}")
        self.spec = spec
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.num_classes = num_classes

    @property
    def target_dim(self) -> int:
        return self.spec.target_dim or self.spec.width

    def stem(self, noisy_target: bool = True) -> nn.Module:
        s = self.spec
        if s.family == "vit":
            return ViTStem(self.image_shape, s.patch, s.width, self.target_dim, noisy_target)
        if s.family == "mdm":
            return MDMStem(self.num_classes, s.context, s.width)
        if s.family == "ar":
            return ARStem(self.num_classes, s.context, s.width, self.target_dim, noisy_target)
        if s.family == "huginn":
            return HuginnStem(self.num_classes, s.context, s.width, s.heads, self.target_dim, noisy_target,
                              mlp_ratio=s.mlp_ratio)
        return DiTStem(self.image_shape, s.patch, s.width, self.num_classes, s.class_dropout)

    def layers(self, count: int) -> list[nn.Module]:
        s = self.spec
        layers = [AdaLNZeroLayer(s.width, s.heads, s.mlp_ratio) for _ in range(count)]
        if s.family in ("ar", "huginn"):
            # its causal corner serves the clean-only baseline and the single causal stream of Huginn
            mask = clean_noisy_mask(s.context)
            for layer in layers:
                layer.attn_mask = mask
        return layers

    def head(self) -> nn.Module:
        s = self.spec
        if s.family == "vit":
            return ViTHead(s.width, self.num_classes)
        if s.family == "mdm":
            return TokenHead(s.width, self.num_classes)
        if s.family == "ar":
            return LastPositionsHead(s.width, self.num_classes, s.context)
        if s.family == "huginn":
            return HuginnHead(self.num_classes, s.context, s.width, s.heads, mlp_ratio=s.mlp_ratio)
        return DiTHead(self.image_shape, s.patch, s.width)
