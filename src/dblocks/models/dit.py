"""DiT parts (Peebles & Xie 2023): patchified noisy image with fixed 2-D sin-cos positions, conditioning
c = noise embedding + class embedding (with a null class for classifier-free guidance), adaLN-Zero layers,
and a final adaLN layer that un-patchifies back to an image."""

from __future__ import annotations

import torch
from torch import nn

from dblocks.layers import FinalLayer, NoiseEmbedding
from dblocks.models.vit import patch_count


def sincos_2d(width: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, (grid*grid, width)."""
    if width % 4:
        raise ValueError(f"width {width} must be divisible by 4 for 2-D sin-cos positions")
    quarter = width // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        angles = coord[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


class DiTStem(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], patch: int, width: int, num_classes: int) -> None:
        super().__init__()
        channels, h, w = image_shape
        if h != w:
            raise ValueError(f"DiT expects square images, got {h}x{w}")
        self.patch_embed = nn.Conv2d(channels, width, kernel_size=patch, stride=patch)
        patch_count(image_shape, patch)  # raises if the image does not tile into patches
        self.register_buffer("pos_embed", sincos_2d(width, h // patch)[None], persistent=False)
        self.noise_embed = NoiseEmbedding(width)
        self.label_embed = nn.Embedding(num_classes + 1, width)  # last row: the null class
        nn.init.normal_(self.label_embed.weight, std=0.02)
        self.null_label = num_classes  # label dropout (ImageGenerationTask.draw_inputs) trains it

    def forward(self, z_in, labels, c_noise):
        h = self.patch_embed(z_in).flatten(2).transpose(1, 2) + self.pos_embed
        return h, self.noise_embed(c_noise) + self.label_embed(labels)


class DiTHead(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], patch: int, width: int) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.patch = patch
        self.final = FinalLayer(width, patch * patch * image_shape[0])

    def forward(self, h, c):
        channels, height, width = self.image_shape
        p, gh, gw = self.patch, height // self.patch, width // self.patch
        x = self.final(h, c).reshape(-1, gh, gw, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(-1, channels, height, width)
