"""``digits-latent``: the tiny-scale twin of ImageNet-256 latents. scikit-learn's 8x8 digits (the ``digits``
split) encoded by a KL-regularised convolutional autoencoder (:mod:`dblocks.data.autoencoder`) that
``dblocks prepare`` trains here, on the train split only, before encoding both splits. DiT then trains on
the latents, and its samples are decoded by this same autoencoder for FID, as DiT-L/2's are by
sd-vae-ft-ema.

The choice, and why:

* 8x8x1 -> 4x4x4: 2x spatial downsampling and DiT's 4 latent channels. With patch 1 (``DiT-tiny/1``) the
  latent grid is 16 tokens, as many as ``DiT-tiny``'s patch 2 makes of the 8x8 pixels, so the two tiny
  generation setups cost the same. 64 latent numbers for 64 pixels is no compression: what is kept from
  sd-vae is the structure of the path (a learned, KL-regularised, smooth latent space with its own decoder
  between the diffusion model and the pixels), not its 48x compression, which 8x8 digits cannot afford.
  Measured on the held-out digits (posterior-mean reconstruction MSE on [-1, 1] pixels, the settings
  below): 4x4x4 0.0022; 4x4x2 0.0075; 2x2x4 (4x downsampling) 0.021; untrained 0.75.
* KL weight 0.01 per latent element: the posterior keeps a standard deviation of about 0.4 against latents
  of about 0.85 (a weight of 0.001 shrinks it to 0.05 for an MSE of 0.0009), and the decoder, trained on
  posterior samples, learns to decode that whole neighbourhood, which is what generated latents need;
  reconstruction stays at an RMS error of ~0.05, below the digits' own quantisation step (2/16 = 0.125).
* Width 32, 2000 Adam steps of batch 128, one-cycle learning rate peaking at 2e-3: about 30 s on one
  core; 1000 steps reach an MSE of 0.0037, 200 steps 0.053.
* Latent scale: 1 / std of the training split's posterior means (about 1.2), computed here and stored
  with the autoencoder and in every prepared split, as Stable Diffusion derived 0.18215 for its VAE.

``prepare`` writes ``train.safetensors``, ``test.safetensors`` (float32 latents with ``latent_scale`` and
the autoencoder's sha256 in their records) and the autoencoder itself as
:data:`dblocks.config.AUTOENCODER_FILE` in the same directory, so DVC versions it with the latents it made,
and :func:`dblocks.data.latents.decoder_for` decodes with it."""

from __future__ import annotations

import os
from pathlib import Path

from dblocks.config import AUTOENCODER_FILE
from dblocks.data.autoencoder import (
    Geometry,
    latent_scale,
    one_thread,
    reconstruction_mse,
    save_autoencoder,
    train_autoencoder,
)
from dblocks.data.dataset import ImageDataset
from dblocks.data.images import load_image_dataset
from dblocks.data.latents import LatentCodec
from dblocks.data.prepared import save_prepared

NAME = "digits-latent"
GEOMETRY = Geometry(image_channels=1, latent_channels=4, downsample=2)
IMAGE_SHAPE = (1, 8, 8)
LATENT_SHAPE = GEOMETRY.latent_shape(IMAGE_SHAPE)
WIDTH = 32
STEPS = 2000
BATCH_SIZE = 128
LR = 2e-3
KL_WEIGHT = 0.01


def prepare_digits_latent(out: str | os.PathLike, steps: int = STEPS, seed: int = 0) -> list[Path]:
    """Train the autoencoder on the digits train split, then write it and both splits' latents to ``out``;
    returns the written paths (autoencoder first). The same ``steps`` and ``seed`` give the same bytes."""
    out = Path(out)
    digits = {split: load_image_dataset("digits", split) for split in ("train", "test")}
    with one_thread():  # encoding too, so the written bytes do not depend on the machine's core count
        model = train_autoencoder(
            digits["train"].images,
            latent_channels=GEOMETRY.latent_channels,
            downsample=GEOMETRY.downsample,
            width=WIDTH,
            steps=steps,
            kl_weight=KL_WEIGHT,
            batch_size=BATCH_SIZE,
            lr=LR,
            seed=seed,
        )
        # each split is encoded once, unscaled; the scale comes from the train split's latents
        raw = {split: LatentCodec(model, scale=1.0).encode(ds.images) for split, ds in digits.items()}
        scale = latent_scale(raw["train"])
        latents = {
            split: ImageDataset(NAME, split, raw[split] * scale, ds.labels, ds.num_classes, latent_scale=scale)
            for split, ds in digits.items()
        }
        mse = reconstruction_mse(model, digits["test"].images)
    record = {
        "dataset": NAME,
        "trained_on": "digits train",
        "steps": steps,
        "seed": seed,
        "batch_size": BATCH_SIZE,
        "lr": LR,
        "kl_weight": KL_WEIGHT,
        "test_reconstruction_mse": mse,
    }
    meta = save_autoencoder(out / AUTOENCODER_FILE, model, scale, record)
    return [out / AUTOENCODER_FILE] + [
        save_prepared(ds, out, provenance={"autoencoder_sha256": meta["sha256"]}) for ds in latents.values()
    ]
