"""A small KL-regularised convolutional autoencoder with the interface of diffusers' ``AutoencoderKL``
(``encode(x).latent_dist`` with ``.mean`` and ``.sample(generator)``, ``decode(z).sample``), its training
loop and its checkpoint.

Untrained, with sd-vae-ft-ema's geometry (3 channels, 8x downsampling, 4 latent channels: the defaults), it
is the test double of the ImageNet latent path, which needs no network. Trained, it is the autoencoder of
the ``digits-latent`` dataset (:mod:`dblocks.data.digits_latent`), the tiny-scale stand-in for
sd-vae-ft-ema.

The network: a 3x3 convolution, one 4x4 stride-2 convolution per halving of the resolution, a 3x3
convolution and a 1x1 convolution to the posterior's mean and log-variance; the decoder mirrors it with
transposed convolutions. Checkpoints are safetensors with a JSON record (:mod:`dblocks.checkpoint`):
loading verifies the sha256 and never runs pickle."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from dblocks.checkpoint import save_checkpoint

KIND = "autoencoder"


@dataclass(frozen=True)
class Geometry:
    """How an autoencoder maps images to latents: (image_channels, H, W) -> (latent_channels, H/downsample,
    W/downsample)."""

    image_channels: int
    latent_channels: int
    downsample: int

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        _, h, w = image_shape
        return self.latent_channels, h // self.downsample, w // self.downsample


class Posterior:
    """Diagonal Gaussian posterior, as diffusers' ``DiagonalGaussianDistribution``."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device="cpu").to(self.mean.device)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL(posterior || N(0, I)) per latent element, averaged."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).mean()


@dataclass
class Encoded:
    latent_dist: Posterior


@dataclass
class Decoded:
    sample: torch.Tensor


class ConvAutoencoder(nn.Module):
    """The autoencoder; ``downsample`` is a power of two (one stride-2 convolution per halving). Weights
    are initialised from ``seed`` without touching the global RNG."""

    def __init__(
        self, image_channels: int = 3, latent_channels: int = 4, downsample: int = 8, width: int = 16, seed: int = 0
    ):
        super().__init__()
        halvings = int(math.log2(downsample))
        if downsample < 1 or 2**halvings != downsample:
            raise ValueError(f"downsample must be a power of two, got {downsample}")
        self.geometry = Geometry(image_channels, latent_channels, downsample)
        self.width = width
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            down = [m for _ in range(halvings) for m in (nn.Conv2d(width, width, 4, stride=2, padding=1), nn.SiLU())]
            up = [
                m
                for _ in range(halvings)
                for m in (nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.SiLU())
            ]
            self.encoder = nn.Sequential(
                nn.Conv2d(image_channels, width, 3, padding=1),
                nn.SiLU(),
                *down,
                nn.Conv2d(width, width, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(width, 2 * latent_channels, 1),
            )
            self.decoder = nn.Sequential(
                nn.Conv2d(latent_channels, width, 3, padding=1),
                nn.SiLU(),
                *up,
                nn.Conv2d(width, width, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(width, image_channels, 3, padding=1),
            )

    def encode(self, x: torch.Tensor) -> Encoded:
        return Encoded(Posterior(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> Decoded:
        return Decoded(self.decoder(z))


# ------------------------------------------------------------------------------------------- training


@contextlib.contextmanager
def one_thread():
    """Run on one CPU thread: a multi-threaded backward sums gradients in an order that depends on the
    thread count, so the trained weights (and the sha256 of everything encoded with them) would depend on
    the machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_autoencoder(
    images: torch.Tensor,
    *,
    latent_channels: int,
    downsample: int,
    width: int,
    steps: int,
    kl_weight: float,
    batch_size: int,
    lr: float,
    seed: int,
) -> ConvAutoencoder:
    """Train on ``images`` (N, C, H, W) in [-1, 1]: mean squared reconstruction error of a posterior
    *sample* plus ``kl_weight`` x the KL to N(0, I) per latent element. Decoding samples, not means, teaches
    the decoder a neighbourhood of every latent, so it also decodes the slightly-off latents a diffusion
    model generates. Adam with a one-cycle schedule; seeded and on one thread, so bit-reproducible on one
    CPU type."""
    model = ConvAutoencoder(images.shape[1], latent_channels, downsample, width, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    model.train()
    with one_thread():
        for _ in range(steps):
            x = images[torch.randint(len(images), (batch_size,), generator=gen)]
            posterior = model.encode(x).latent_dist
            loss = (model.decode(posterior.sample(gen)).sample - x).pow(2).mean() + kl_weight * posterior.kl()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return model


@torch.no_grad()
def latent_scale(latents: torch.Tensor) -> float:
    """1 / std of unscaled latents: the factor that brings them to unit variance, computed the way Stable
    Diffusion arrived at sd-vae's 0.18215."""
    return 1.0 / latents.float().std().item()


@torch.no_grad()
def reconstruction_mse(model: nn.Module, images: torch.Tensor) -> float:
    """Mean squared error of decoding the posterior means, outputs clamped to the image range."""
    model.eval()
    return (model.decode(model.encode(images).latent_dist.mean).sample.clamp(-1, 1) - images).pow(2).mean().item()


# ----------------------------------------------------------------------------------------- checkpoint


def save_autoencoder(path: str | os.PathLike, model: ConvAutoencoder, scale: float, record: dict) -> dict:
    """Weights, geometry, width and latent scale (plus ``record``, e.g. how it was trained) as a hashed
    safetensors checkpoint; returns the metadata as written (with its sha256)."""
    meta = {**record, "kind": KIND, "geometry": asdict(model.geometry), "width": model.width, "latent_scale": scale}
    return save_checkpoint(path, {k: v.contiguous() for k, v in model.state_dict().items()}, meta)
