"""The latent path of DiT-L/2 on ImageNet 256: images are encoded once by a VAE into 4 x 32 x 32 latents
that the diffusion model denoises; generated latents are decoded back to images for FID.

The autoencoder is anything with the interface of diffusers' ``AutoencoderKL``: ``encode(x).latent_dist``
(with ``.mean`` and ``.sample(generator)``) and ``decode(z).sample``, 8x spatial downsampling, 4 latent
channels. For users with a network, :func:`load_sd_vae` loads ``stabilityai/sd-vae-ft-ema`` (the paper's
VAE) through ``diffusers`` (the optional extra ``[latents]``); tests use :class:`TinyAutoencoder`, a small
randomly initialised network with the same interface, so nothing here needs the network.

Latents are stored scaled by :data:`LATENT_SCALE` (0.18215, Stable Diffusion's factor, which brings them
to roughly unit variance), as DiT does; :meth:`LatentCodec.decode` undoes it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

LATENT_SCALE = 0.18215
DOWNSAMPLE = 8
LATENT_CHANNELS = 4
SD_VAE = "stabilityai/sd-vae-ft-ema"
IMAGE_SIZE = 256


@dataclass
class LatentCodec:
    """Images in [-1, 1] <-> scaled latents through an ``AutoencoderKL``-like ``vae``."""

    vae: nn.Module
    scale: float = LATENT_SCALE

    def _device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 64, sample: bool = False,
               generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, 4, H/8, W/8) scaled latents: the posterior mean (deterministic,
        the default) or a sample from it."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] % DOWNSAMPLE or images.shape[-2] % DOWNSAMPLE:
            raise ValueError(f"expected RGB images (N, 3, H, W) with H, W divisible by {DOWNSAMPLE}, "
                             f"got {tuple(images.shape)}")
        self.vae.eval()
        out = []
        for chunk in tqdm(images.split(batch_size), desc="encode", disable=not progress, mininterval=1.0):
            dist = self.vae.encode(chunk.to(self._device())).latent_dist
            z = dist.sample(generator=generator) if sample else dist.mean
            out.append((z * self.scale).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """(N, 4, h, w) scaled latents -> (N, 3, 8h, 8w) images in [-1, 1]."""
        if latents.ndim != 4 or latents.shape[1] != LATENT_CHANNELS:
            raise ValueError(f"expected latents (N, {LATENT_CHANNELS}, h, w), got {tuple(latents.shape)}")
        self.vae.eval()
        out = []
        for chunk in tqdm(latents.split(batch_size), desc="decode", disable=not progress, mininterval=1.0):
            x = self.vae.decode(chunk.to(self._device()) / self.scale).sample
            out.append(x.clamp(-1, 1).float().cpu())
        return torch.cat(out)


def load_sd_vae(name: str = SD_VAE, device: str | torch.device = "cpu") -> LatentCodec:
    """The paper's VAE through diffusers (downloads on first use; needs ``pip install 'diffusion-blocks[latents]'``)."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as exc:
        raise RuntimeError(f"the ImageNet latent path needs diffusers to load {name}: "
                           "pip install 'diffusion-blocks[latents]'") from exc
    return LatentCodec(AutoencoderKL.from_pretrained(name).to(device))


# ------------------------------------------------------------------------------- the test double


class _Posterior:
    """Diagonal Gaussian posterior, as diffusers' ``DiagonalGaussianDistribution``."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device="cpu").to(self.mean.device)
        return self.mean + self.std * noise


@dataclass
class _Encoded:
    latent_dist: _Posterior


@dataclass
class _Decoded:
    sample: torch.Tensor


class TinyAutoencoder(nn.Module):
    """A small randomly initialised autoencoder with ``AutoencoderKL``'s interface, 8x downsampling and 4
    latent channels: three stride-2 convolutions down, three transposed convolutions up. It stands in for
    sd-vae-ft-ema where no network is available; it reconstructs nothing (it is untrained)."""

    def __init__(self, width: int = 16, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = nn.Sequential(
                nn.Conv2d(3, width, 3, stride=2, padding=1), nn.SiLU(),
                nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
                nn.Conv2d(width, 2 * LATENT_CHANNELS, 3, stride=2, padding=1))
            self.decoder = nn.Sequential(
                nn.ConvTranspose2d(LATENT_CHANNELS, width, 4, stride=2, padding=1), nn.SiLU(),
                nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.SiLU(),
                nn.ConvTranspose2d(width, 3, 4, stride=2, padding=1), nn.Tanh())

    def encode(self, x: torch.Tensor) -> _Encoded:
        return _Encoded(_Posterior(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> _Decoded:
        return _Decoded(self.decoder(z))


# --------------------------------------------------------------------------------- ImageNet images


def center_crop_arr(image, size: int = IMAGE_SIZE):
    """ADM's (and DiT's) ImageNet preprocessing: halve with BOX while the short side is >= 2x size, resize
    with BICUBIC so the short side is ``size``, then center-crop to size x size. PIL image -> uint8 HWC."""
    import numpy as np
    from PIL import Image

    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image.convert("RGB"))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def encode_folder(codec: LatentCodec, root: str | os.PathLike, size: int = IMAGE_SIZE, batch_size: int = 64,
                  progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """An ImageNet-style folder (``root/<class>/*.JPEG``, classes sorted by name as torchvision's
    ImageFolder does) -> (scaled latents (N, 4, size/8, size/8), labels, class names). Images are
    center-cropped (:func:`center_crop_arr`) and encoded a batch at a time, so only the latents are
    held in memory."""
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(os.fspath(root))
    if len(folder) == 0:
        raise FileNotFoundError(f"no images under {root}")
    latents = []
    samples = folder.samples
    for start in tqdm(range(0, len(samples), batch_size), desc="encode", disable=not progress, mininterval=1.0):
        batch = [torch.from_numpy(center_crop_arr(folder.loader(path), size)).permute(2, 0, 1)
                 for path, _ in samples[start:start + batch_size]]
        latents.append(codec.encode(torch.stack(batch).float().div(127.5).sub(1.0), batch_size=batch_size))
    labels = torch.tensor([label for _, label in samples], dtype=torch.long)
    return torch.cat(latents), labels, list(folder.classes)


#: ImageNet's folders per split (the validation set is the test split, as in the paper's test FID)
IMAGENET_FOLDERS = {"train": "train", "test": "val"}


def load_imagenet_latents(split: str, root: str | os.PathLike | None, codec: LatentCodec | None = None,
                          batch_size: int = 64, progress: bool = False):
    """ImageNet 256 as VAE latents: ``root/train`` and ``root/val`` in ImageFolder layout, encoded by
    ``codec`` (default: sd-vae-ft-ema through diffusers). Returns an ImageDataset of (4, 32, 32) latents."""
    from dblocks.data.images import ImageDataset

    if root is None:
        raise ValueError("imagenet256 needs data_root: a local ImageNet copy with train/ and val/ class folders "
                         "(ImageNet cannot be downloaded automatically)")
    codec = codec or load_sd_vae()
    latents, labels, classes = encode_folder(codec, Path(root) / IMAGENET_FOLDERS[split], batch_size=batch_size,
                                             progress=progress)
    return ImageDataset("imagenet256", split, latents, labels, max(len(classes), 1000))


def decoder_for(dataset: str):
    """How to turn a dataset's samples into images for FID: None for pixel datasets, the VAE decoder for
    latent ones."""
    from dblocks.data.prepared import LATENT_DATASETS

    return load_sd_vae().decode if dataset in LATENT_DATASETS else None
