"""ViT classifier parts: a stem that embeds image patches plus the noisy label embedding as one extra
token, adaLN-Zero layers, and a head that reads that token out as class logits.

With ``noisy_target=False`` the stem replaces the noisy-label token by a learned class token and the noise
conditioning by a learned constant: the ordinary end-to-end ViT trained with plain cross-entropy."""

from __future__ import annotations

import torch
from torch import nn

from dblocks.layers import FinalLayer, NoiseEmbedding


def patch_count(image_shape: tuple[int, int, int], patch: int) -> int:
    _, h, w = image_shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {patch}")
    return (h // patch) * (w // patch)


class ViTStem(nn.Module):
    def __init__(
        self, image_shape: tuple[int, int, int], patch: int, width: int, target_dim: int, noisy_target: bool = True
    ) -> None:
        super().__init__()
        channels = image_shape[0]
        self.patch_embed = nn.Conv2d(channels, width, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, patch_count(image_shape, patch) + 1, width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.noisy_target = noisy_target
        if noisy_target:
            self.target_embed = nn.Linear(target_dim, width)
            self.noise_embed = NoiseEmbedding(width)
        else:
            self.class_token = nn.Parameter(torch.zeros(1, 1, width))
            self.constant_cond = nn.Parameter(torch.zeros(1, width))

    def forward(self, z_in, image, c_noise):
        patches = self.patch_embed(image).flatten(2).transpose(1, 2)
        n = patches.shape[0]
        if self.noisy_target:
            token = self.target_embed(z_in).unsqueeze(1)
            c = self.noise_embed(c_noise)
        else:
            token = self.class_token.expand(n, -1, -1)
            c = self.constant_cond.expand(n, -1)
        return torch.cat([token, patches], dim=1) + self.pos_embed, c


class ViTHead(nn.Module):
    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.final = FinalLayer(width, num_classes)

    def forward(self, h, c):
        return self.final(h[:, :1], c)[:, 0]
