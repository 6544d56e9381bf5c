"""An experiment = task x architecture x partition, built from a resolved config.

This is the only place that turns a config into objects. Building block b constructs that block and
nothing else: no other block's layers, stem or head are created, loaded or touched."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import torch

from dblocks.blocks import AssembledModel, BlockDenoiser, convert_stack
from dblocks.config import UNKNOWN_SCALE
from dblocks.data import ImageDataset, load_image_dataset, load_prepared, load_prepared_text
from dblocks.data.digits_latent import LATENT_SHAPE as DIGITS_LATENT_SHAPE
from dblocks.data.text import VOCAB_SIZE, TextDataset, load_text_dataset
from dblocks.masked_diffusion import MaskedTextTask, MaskingPartition
from dblocks.models import get_arch
from dblocks.models.parts import Architecture
from dblocks.noise import NoiseDistribution, Partition, layer_ranges, layer_split
from dblocks.tasks import ARTextTask, ClassificationTask, ImageGenerationTask, NextTokenEmbeddingTask, Task

METHODS = ("blockwise", "paper", "e2e")

#: (channels, height, width) and class count of each dataset, known without loading it
DATASET_SHAPES = {
    "digits": ((1, 8, 8), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "imagenet256": ((4, 32, 32), 1000),  # sd-vae-ft-ema latents of 256x256 images
    "digits-latent": (DIGITS_LATENT_SHAPE, 10),
}  # its trained autoencoder's latents of the digits

#: the tokenizer each text task reads its dataset with (dblocks.data.text)
TASK_TOKENIZER = {"masked_text": "char27", "ar_text": "bytes", "recurrent_text": "bytes"}


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from the experiment seed and a purpose, e.g. derive_seed(0, "block", 2)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class Experiment:
    config: dict
    #: the scale label of the params file it came from (tiny | smoke | paper), recorded with what it trains
    scale: str = UNKNOWN_SCALE

    @property
    def name(self) -> str:
        return self.config["name"]

    @cached_property
    def noise(self) -> NoiseDistribution:
        n = self.config["noise"]
        return NoiseDistribution(n["p_mean"], n["p_std"], n["sigma_min"], n["sigma_max"])

    @property
    def tokenizer(self) -> str | None:
        return TASK_TOKENIZER.get(self.config["task"])

    @cached_property
    def partition(self) -> Partition:
        if self.config["task"] == "masked_text":  # the masking schedule is partitioned instead of sigma
            return MaskingPartition.make(self.config["blocks"], overlap=self.config["overlap"])
        return Partition.make(self.config["blocks"], self.config["partition"], self.config["overlap"], self.noise)

    @cached_property
    def full_range(self) -> Partition:
        """One block over the whole range: the end-to-end denoiser's schedule."""
        if self.config["task"] == "masked_text":
            return MaskingPartition.make(1)
        return Partition.make(1, "equiprobable", 0.0, self.noise)

    @cached_property
    def arch(self) -> Architecture:
        if self.tokenizer is not None:
            return Architecture(get_arch(self.config["arch"]), None, VOCAB_SIZE[self.tokenizer])
        image_shape, num_classes = DATASET_SHAPES[self.config["dataset"]]
        return Architecture(get_arch(self.config["arch"]), image_shape, num_classes)

    @cached_property
    def split(self) -> list[int]:
        return layer_split(self.arch.spec.depth, self.config["blocks"], self.config["layer_split"])

    @cached_property
    def task(self) -> Task:
        sd = self.config["noise"]["sigma_data"]
        if self.config["task"] == "masked_text":
            return MaskedTextTask(self.arch.num_classes, self.arch.spec.context)
        if self.config["task"] in ("ar_text", "recurrent_text"):  # token embeddings: shared, as labels are
            cls = ARTextTask if self.config["task"] == "ar_text" else NextTokenEmbeddingTask
            return cls(
                self.arch.num_classes,
                self.arch.spec.context,
                self.arch.target_dim,
                derive_seed(self.config["seed"], "token-embedding"),
                sd,
            )
        if self.config["task"] == "classification":
            # the shared target space: every job derives the same table from the experiment seed
            return ClassificationTask(
                self.arch.num_classes, self.arch.target_dim, derive_seed(self.config["seed"], "label-embedding"), sd
            )
        return ImageGenerationTask(self.arch.image_shape, self.arch.num_classes, sd, self.arch.spec.class_dropout)

    def load_data(self, split: str, prepared: str | None = None) -> ImageDataset | TextDataset:
        """One split: from a prepared directory (what the pipeline's prepare step wrote) or the source."""
        if self.tokenizer is not None:
            if prepared is not None:
                return load_prepared_text(
                    prepared, split, self.arch.spec.context, self.tokenizer, expected_name=self.config["dataset"]
                )
            return load_text_dataset(
                self.config["dataset"], split, self.arch.spec.context, self.tokenizer, self.config["data_root"]
            )
        if prepared is not None:
            return load_prepared(prepared, split, expected_name=self.config["dataset"])
        return load_image_dataset(self.config["dataset"], split, self.config["data_root"])

    # --- model construction -------------------------------------------------------------------------
    def block(self, b: int) -> BlockDenoiser:
        """Block b alone (independent mode): its own stem, its L_b layers and its own head."""
        self.partition.interval(b)  # validates b
        torch.manual_seed(derive_seed(self.config["seed"], "init-block", b))
        return BlockDenoiser(self.arch.stem(), self.arch.layers(self.split[b - 1]), self.arch.head(), self.task)

    def shared_blocks(self) -> AssembledModel:
        """The paper's single-process mode: one stem and head shared by all B blocks (and, for classification,
        a learned label table: the task's target space follows it)."""
        torch.manual_seed(derive_seed(self.config["seed"], "init-shared"))
        layers = self.arch.layers(self.arch.spec.depth)
        model = convert_stack(
            layers,
            self.partition,
            self.arch.stem(),
            self.arch.head(),
            self.task,
            split=self.split,
            share_stem_head=True,
        )
        if self.config["task"] == "classification":  # the authors' learned label table, trained with the rest
            model.label_table = self.task.learn_embedding()
        return model

    def e2e(self) -> BlockDenoiser:
        """The end-to-end baseline on the same architecture: all L layers, one stem and head.

        Classification: a plain ViT (learned class token, no noise input) trained with cross-entropy.
        Autoregressive text: the plain causal transformer trained with next-token cross-entropy.
        Generation: one EDM denoiser over the whole sigma range."""
        torch.manual_seed(derive_seed(self.config["seed"], "init-e2e"))
        noisy = self.config["task"] not in ("classification", "ar_text", "recurrent_text")
        return BlockDenoiser(
            self.arch.stem(noisy_target=noisy), self.arch.layers(self.arch.spec.depth), self.arch.head(), self.task
        )

    def empty_blocks(self) -> list[BlockDenoiser]:
        """All B blocks freshly built, to load assembled weights into (inference only)."""
        return [self.block(b) for b in range(1, self.config["blocks"] + 1)]

    def layer_indices(self, b: int) -> list[int]:
        return list(layer_ranges(self.split)[b - 1])
