"""The latent path: images are encoded once by an autoencoder into latents that the diffusion model
denoises; generated latents are decoded back to images for FID. DiT-L/2 on ImageNet 256 uses
sd-vae-ft-ema (3 x 256 x 256 -> 4 x 32 x 32); its tiny-scale twin ``digits-latent`` uses an autoencoder
that its own prepare step trains (:mod:`dblocks.data.digits_latent`).

The autoencoder is anything with the interface of diffusers' ``AutoencoderKL``: ``encode(x).latent_dist``
(with ``.mean`` and ``.sample(generator)``) and ``decode(z).sample``. :class:`LatentCodec` reads the image
channels, latent channels and downsampling factor from the autoencoder itself (:func:`geometry_of`), so
one codec serves both. For users with a network, :func:`load_sd_vae` loads ``stabilityai/sd-vae-ft-ema``
(the paper's VAE) through ``diffusers`` (the optional extra ``[latents]``); tests use an untrained
:class:`dblocks.data.autoencoder.ConvAutoencoder` of the same geometry, so nothing here needs the network.

Which autoencoder encodes ImageNet is a setting (params ``autoencoders.imagenet256``, ``prepare --autoencoder``):
``sd-vae-ft-ema`` (the paper's), or ``untrained-conv``, that test double, written beside the prepared splits so
that a smoke run exercises the whole path (center crop, encode, scale, decode for FID) offline. The prepared
splits record which one encoded them (``autoencoder``, and the sha256 of a file beside them), and
:func:`decoder_for` decodes with exactly that one.

Latents are stored multiplied by the codec's scale, which brings them to roughly unit variance, as DiT
does: :data:`LATENT_SCALE` (0.18215, Stable Diffusion's factor) for sd-vae-ft-ema, 1/std of the training
latents for a trained autoencoder; :meth:`LatentCodec.decode` undoes it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from dblocks.checkpoint import load_checkpoint, load_metadata
from dblocks.config import AUTOENCODER_FILE, LATENT_DATASETS, TRAINED_AUTOENCODER_DATASETS
from dblocks.data.autoencoder import KIND, ConvAutoencoder, Geometry, save_autoencoder
from dblocks.data.dataset import ImageDataset
from dblocks.data.prepared import ShardWriter, dataset_record, prepared_path
from dblocks.errors import CheckpointError, DataError

LATENT_SCALE = 0.18215
SD_VAE = "stabilityai/sd-vae-ft-ema"
IMAGE_SIZE = 256
#: the autoencoders that may encode imagenet256 (params ``autoencoders.imagenet256``; the first is the default)
IMAGENET_AUTOENCODERS = ("sd-vae-ft-ema", "untrained-conv")


def geometry_of(vae: nn.Module) -> Geometry:
    """This project's autoencoders carry their :class:`Geometry`; diffusers' ``AutoencoderKL`` describes it in
    its config, halving the resolution between consecutive encoder blocks (sd-vae-ft-ema: 4 blocks, 8x)."""
    if hasattr(vae, "geometry"):
        return vae.geometry
    config = vae.config
    return Geometry(config.in_channels, config.latent_channels, 2 ** (len(config.block_out_channels) - 1))


@dataclass
class LatentCodec:
    """Images in [-1, 1] <-> scaled latents through an ``AutoencoderKL``-like ``vae``."""

    vae: nn.Module
    scale: float = LATENT_SCALE

    @cached_property
    def geometry(self) -> Geometry:
        return geometry_of(self.vae)

    def _device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(
        self,
        images: torch.Tensor,
        batch_size: int = 64,
        sample: bool = False,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, latent channels, H/downsample, W/downsample) scaled latents: the
        posterior mean (deterministic, the default) or a sample from it."""
        g = self.geometry
        if (
            images.ndim != 4
            or images.shape[1] != g.image_channels
            or images.shape[-1] % g.downsample
            or images.shape[-2] % g.downsample
        ):
            raise ValueError(
                f"expected images (N, {g.image_channels}, H, W) with H, W divisible by {g.downsample}, "
                f"got {tuple(images.shape)}"
            )
        self.vae.eval()
        out = []
        for chunk in tqdm(images.split(batch_size), desc="encode", disable=not progress, mininterval=1.0):
            dist = self.vae.encode(chunk.to(self._device())).latent_dist
            z = dist.sample(generator=generator) if sample else dist.mean
            out.append((z * self.scale).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """(N, latent channels, h, w) scaled latents -> (N, C, h * downsample, w * downsample) images in [-1, 1]."""
        channels = self.geometry.latent_channels
        if latents.ndim != 4 or latents.shape[1] != channels:
            raise ValueError(f"expected latents (N, {channels}, h, w), got {tuple(latents.shape)}")
        self.vae.eval()
        out = []
        for chunk in tqdm(latents.split(batch_size), desc="decode", disable=not progress, mininterval=1.0):
            x = self.vae.decode(chunk.to(self._device()) / self.scale).sample
            out.append(x.clamp(-1, 1).float().cpu())
        return torch.cat(out)


def load_sd_vae(name: str = SD_VAE, device: str | torch.device | None = None) -> LatentCodec:
    """The paper's VAE through diffusers (downloads on first use; needs ``pip install 'diffusion-blocks[latents]'``),
    on ``device`` (default: the GPU where there is one: encoding ImageNet's 2.6M images, both flips, or decoding
    150k FID samples is GPU work)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as exc:
        raise RuntimeError(
            f"the ImageNet latent path needs diffusers to load {name}: pip install 'diffusion-blocks[latents]'"
        ) from exc
    return LatentCodec(AutoencoderKL.from_pretrained(name).to(device))


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
    return arr[top : top + size, left : left + size]


def encode_batches(
    codec: LatentCodec,
    folder,
    size: int = IMAGE_SIZE,
    batch_size: int = 64,
    progress: bool = False,
    mirrored: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """A torchvision ``ImageFolder``'s images in its order, center-cropped (:func:`center_crop_arr`) and encoded
    a batch at a time: (scaled latents, latents of the mirrored images if ``mirrored`` else None) per batch.

    ``mirrored`` keeps both flips for DiT's random horizontal flip (``train.augment: flip``): the encoder is
    not flip-equivariant, so mirroring a latent is not the latent of the mirrored image, and encoding one
    random flip per image once (fast-DiT's cache) would fix each image's flip for the whole run. The price
    is a second encoding and twice the storage of the train split."""
    samples = folder.samples
    for start in tqdm(range(0, len(samples), batch_size), desc="encode", disable=not progress, mininterval=1.0):
        batch = [
            torch.from_numpy(center_crop_arr(folder.loader(path), size)).permute(2, 0, 1)
            for path, _ in samples[start : start + batch_size]
        ]
        images = torch.stack(batch).float().div(127.5).sub(1.0)
        yield (
            codec.encode(images, batch_size=batch_size),
            codec.encode(images.flip(-1), batch_size=batch_size) if mirrored else None,
        )


def image_folder(root: str | os.PathLike):
    """An ImageNet-style folder (``root/<class>/*.JPEG``, classes sorted by name as torchvision's ImageFolder
    does), with at least one image."""
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(os.fspath(root))
    if len(folder) == 0:
        raise FileNotFoundError(f"no images under {root}")
    return folder


def encode_folder(
    codec: LatentCodec,
    root: str | os.PathLike,
    size: int = IMAGE_SIZE,
    batch_size: int = 64,
    progress: bool = False,
    mirrored: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor | None]:
    """An ImageNet-style folder -> (scaled latents (N, 4, size/8, size/8), labels, class names, latents of the
    mirrored images if ``mirrored`` else None), all in memory (:func:`encode_batches`; ``prepare`` writes
    shards instead, :func:`write_imagenet_split`)."""
    folder = image_folder(root)
    latents, flipped = zip(*encode_batches(codec, folder, size, batch_size, progress, mirrored))
    labels = torch.tensor([label for _, label in folder.samples], dtype=torch.long)
    return torch.cat(latents), labels, list(folder.classes), torch.cat(flipped) if mirrored else None


#: ImageNet's folders per split (the validation set is the test split, as in the paper's test FID)
IMAGENET_FOLDERS = {"train": "train", "test": "val"}


def _imagenet_root(root: str | os.PathLike | None) -> Path:
    if root is None:
        raise ValueError(
            "imagenet256 needs data_root: a local ImageNet copy with train/ and val/ class folders "
            "(ImageNet cannot be downloaded automatically)"
        )
    return Path(root)


def load_imagenet_latents(
    split: str,
    root: str | os.PathLike | None,
    codec: LatentCodec | None = None,
    batch_size: int = 64,
    progress: bool = False,
):
    """ImageNet 256 as VAE latents, in memory: ``root/train`` and ``root/val`` in ImageFolder layout, encoded by
    ``codec`` (default: sd-vae-ft-ema through diffusers). Returns an ImageDataset of (4, 32, 32) latents; the
    train split also carries the latents of the mirrored images (``flipped``, for ``train.augment: flip``)."""
    root = _imagenet_root(root)
    codec = codec or load_sd_vae()
    latents, labels, classes, flipped = encode_folder(
        codec, root / IMAGENET_FOLDERS[split], batch_size=batch_size, progress=progress, mirrored=split == "train"
    )
    return ImageDataset(
        "imagenet256", split, latents, labels, max(len(classes), 1000), latent_scale=codec.scale, flipped=flipped
    )


def write_imagenet_split(
    codec: LatentCodec,
    root: str | os.PathLike | None,
    split: str,
    out: str | os.PathLike,
    provenance: dict | None = None,
    shard_size: int | str | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> Path:
    """Encode one ImageNet split straight into shards under ``out`` (:class:`dblocks.data.prepared.ShardWriter`,
    ``shard_size`` examples each, default :func:`dblocks.data.prepared.shard_examples`): at most one shard of
    latents is in memory, whatever the split's size. The latents' scale is the codec's own (sd-vae-ft-ema's
    0.18215, which its untrained stand-in shares), so nothing is computed over the whole split first. Returns
    the split file; the train split carries the mirrored images' latents (``flipped``)."""
    folder = image_folder(_imagenet_root(root) / IMAGENET_FOLDERS[split])
    meta = dataset_record("imagenet256", split, max(len(folder.classes), 1000), len(folder), codec.scale, provenance)
    writer = ShardWriter(out, meta, shard_size)
    for latents, flipped in encode_batches(
        codec, folder, batch_size=batch_size, progress=progress, mirrored=split == "train"
    ):
        writer.add({"images": latents} if flipped is None else {"images": latents, "flipped": flipped})
    return writer.finish(torch.tensor([label for _, label in folder.samples], dtype=torch.long))


def prepare_imagenet_latents(
    root: str | os.PathLike | None,
    out: str | os.PathLike,
    autoencoder: str = IMAGENET_AUTOENCODERS[0],
    batch_size: int = 64,
    progress: bool = False,
    shard_size: int | str | None = None,
) -> list[Path]:
    """``dblocks prepare --dataset imagenet256``: encode ``root/train`` and ``root/val`` once with
    ``autoencoder`` and write both splits to ``out`` as shards (:func:`write_imagenet_split`; with
    ``untrained-conv``, the autoencoder first, beside them); every split records the autoencoder that encoded
    it. Returns the written autoencoder and split files (the shards are listed in the splits' records)."""
    if autoencoder not in IMAGENET_AUTOENCODERS:
        raise ValueError(f"autoencoder {autoencoder!r}: allowed: {', '.join(IMAGENET_AUTOENCODERS)}")
    _imagenet_root(root)  # before an autoencoder is built or downloaded
    written, provenance = [], {"autoencoder": autoencoder}
    if autoencoder == "untrained-conv":  # sd-vae-ft-ema's geometry and scale; weights from seed 0, untrained
        codec = LatentCodec(ConvAutoencoder(seed=0))
        meta = save_autoencoder(
            Path(out) / AUTOENCODER_FILE,
            codec.vae,
            codec.scale,
            {
                "dataset": "imagenet256",
                "autoencoder": autoencoder,
                "trained_on": None,
                "seed": 0,
                "stands_in_for": SD_VAE,
            },
        )
        written.append(Path(out) / AUTOENCODER_FILE)
        provenance["autoencoder_sha256"] = meta["sha256"]
    else:
        codec = load_sd_vae()
    for split in IMAGENET_FOLDERS:
        written.append(write_imagenet_split(codec, root, split, out, provenance, shard_size, batch_size, progress))
    return written


def load_autoencoder(path: str | os.PathLike):
    """(:class:`LatentCodec`, metadata) of an autoencoder checkpoint: the hash is
    verified, the weights must fit the recorded geometry exactly, and nothing is unpickled."""
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != KIND:
        raise CheckpointError(path, f"is a {meta.get('kind')!r} file, not an autoencoder", field="kind")
    geometry = Geometry(**meta["geometry"])
    model = ConvAutoencoder(geometry.image_channels, geometry.latent_channels, geometry.downsample, meta["width"])
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(path, f"weights do not fit the recorded geometry: {exc}", field="tensors") from None
    return LatentCodec(model.eval(), scale=float(meta["latent_scale"])), meta


def decoder_for(dataset: str, data_dir: str | os.PathLike | None = None):
    """How to turn a dataset's samples into images for FID: None for pixel datasets; for latent ones the
    decoder of the autoencoder that encoded them. Where the prepared split in ``data_dir`` records an
    autoencoder file (digits-latent's trained one, imagenet256's untrained stand-in) that file, read from
    ``data_dir`` and checked to be the one that encoded the split; otherwise (imagenet256) sd-vae-ft-ema."""

    if dataset not in LATENT_DATASETS:
        return None
    if data_dir is None:
        if dataset in TRAINED_AUTOENCODER_DATASETS:
            raise DataError(
                f"{dataset} samples are decoded by the autoencoder its prepare step trained: pass the "
                f"prepared directory (--data) that holds {AUTOENCODER_FILE}"
            )
        return load_sd_vae().decode
    split = prepared_path(data_dir, "train")
    encoded_by = load_metadata(split).get("autoencoder_sha256")
    if encoded_by is None and dataset not in TRAINED_AUTOENCODER_DATASETS:
        return load_sd_vae().decode
    codec, meta = load_autoencoder(Path(data_dir) / AUTOENCODER_FILE)
    if encoded_by != meta["sha256"]:
        raise CheckpointError(
            split,
            f"was encoded by autoencoder {encoded_by}, not by the {AUTOENCODER_FILE} "
            f"beside it ({meta['sha256']}); run 'dblocks prepare' again",
            field="autoencoder_sha256",
        )
    return codec.decode
