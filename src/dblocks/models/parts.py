"""The parts of a named architecture: a stem, residual layers ``layer(h, c) -> h`` and a head, the three
kinds of part a block denoiser needs. It knows nothing about blocks; ``dblocks.blocks`` composes them."""

from __future__ import annotations

from torch import nn

from dblocks.layers import AdaLNZeroLayer, clean_noisy_mask
from dblocks.models import FAMILIES, ArchSpec
from dblocks.models.dit import DiTHead, DiTStem
from dblocks.models.huginn import HuginnHead, HuginnStem
from dblocks.models.text import ARStem, LastPositionsHead, MDMStem, TokenHead
from dblocks.models.vit import ViTHead, ViTStem


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
            return MDMStem(self.num_classes, s.context, s.width, absolute_positions=s.layer_style != "llama")
        if s.family == "ar":
            return ARStem(
                self.num_classes,
                s.context,
                s.width,
                self.target_dim,
                noisy_target,
                absolute_positions=s.layer_style != "llama",
            )
        if s.family == "huginn":
            return HuginnStem(
                self.num_classes,
                s.context,
                s.width,
                s.heads,
                self.target_dim,
                noisy_target,
                mlp_ratio=s.mlp_ratio,
                style=s.layer_style,
            )
        return DiTStem(self.image_shape, s.patch, s.width, self.num_classes)

    def layers(self, count: int) -> list[nn.Module]:
        s = self.spec
        # Llama-style layers carry rotary positions with the context as period: the noisy half of an AR
        # [clean; noisy] sequence shares the clean half's positions
        rope = s.context if s.layer_style == "llama" else None
        layers = [
            AdaLNZeroLayer(s.width, s.heads, s.mlp_ratio, style=s.layer_style, rope_period=rope, dropout=s.dropout)
            for _ in range(count)
        ]
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
            return HuginnHead(self.num_classes, s.context, s.width, s.heads, mlp_ratio=s.mlp_ratio, style=s.layer_style)
        return DiTHead(self.image_shape, s.patch, s.width)
