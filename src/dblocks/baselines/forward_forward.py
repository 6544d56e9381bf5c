"""Forward-Forward (Hinton 2022, "The Forward-Forward Algorithm: Some Preliminary Investigations") on the
DiffusionBlocks ViT, the baseline of the paper's Table 1.

What the paper (Hinton) does, and how it maps onto the ViT here:

* **Label in the input** (section 3.3, supervised FF): the one-hot label replaces the first pixels of the
  image. Here it is a token: the one-hot label in the first C channels of an extra token in front of the
  patch tokens (the place the ViT's noisy label embedding takes in DiffusionBlocks), so C must not exceed
  the width.
* **Positive and negative data** (sections 2-3.3): positive = the image with its true label, negative = the
  same image with a wrong label drawn uniformly from the other C - 1 classes.
* **Goodness and the local objective** (section 2): a layer's goodness is the sum of its squared activities,
  here the mean square over a unit's output tokens and channels (a mean, so it does not grow with the
  number of tokens); p(positive) = sigmoid(goodness - threshold), and each unit minimises the logistic loss
  ``softplus(threshold - g_pos) + softplus(g_neg - threshold)``.
* **Normalisation between layers** (section 2.1): each layer's input is length-normalised, so the next
  layer cannot read the previous one's goodness off the length and must use the direction. The ViT's
  layers are residual, which makes this essential: a unit's output is its input plus its branches, so
  without it a unit would inherit the goodness of its input. Each token is scaled to RMS 1, making the
  residual's own share of the goodness a constant 1.
* **No gradient between layers**: each unit's input is detached, so a unit's loss reaches its own parameters
  only. The stem (patch embedding, positions; the label token is fixed) belongs to the first unit.
* **Classification** (section 3.3): run the image with every label, accumulate goodness over the units and
  pick the label with the most. The paper leaves the first hidden layer out of the sum; here it is in by
  default (``skip_first=False``), because the first unit holds the stem, the only part that sees the label
  and the pixels directly: on the digits it reads better with it (ViT-tiny, 1000 steps: 81 % vs 78 %;
  ViT-micro, 300 steps: 80 % vs 71 %).

A *unit* is ``layers_per_unit`` consecutive ViT layers (default 1: every layer learns on its own; 4 gives
the B = 3 blocks of 4 layers of DiffusionBlocks' ViT, each trained end to end inside). The layers are the
project's adaLN-Zero layers (:class:`dblocks.layers.AdaLNZeroLayer`) with a learned constant in place of
the noise conditioning, as the end-to-end ViT uses them (``noisy_target=False``). All units are trained in
one job, each step updating every unit on its own loss (Hinton trains the layers simultaneously too): a unit
reads the previous unit's output, so unlike NoProp's blocks the units cannot be trained in separate jobs
from the start. Gradient clipping is off by default, because clipping by the global norm would couple the
units' step sizes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dblocks.baselines import seeded, state_of, train_config
from dblocks.layers import AdaLNZeroLayer
from dblocks.models import ArchSpec, get_arch
from dblocks.models.vit import patch_count
from dblocks.train import Objective, train

Batch = dict[str, torch.Tensor]

#: the project's ViT-tiny settings (params/tiny.yaml) with clipping off (see above) and lr 1e-2: measured on
#: the digits, 300 steps of ViT-micro reach 80 % at 1e-2 and 56 % at the ViT's 2e-3
FF_TRAIN = {"lr": 1e-2, "batch_size": 64, "warmup": 50, "schedule": "cosine", "grad_clip": None}

#: the goodness threshold. A unit starts as the identity on RMS-1 tokens, goodness 1; measured on the digits
#: (ViT-tiny, 1000 steps): 81 % test accuracy at threshold 2, 67 % at 1
THRESHOLD = 2.0


def goodness(h: torch.Tensor) -> torch.Tensor:
    """Per example, the mean square of a unit's output (N, tokens, width) -> (N,)."""
    return h.pow(2).mean(dim=(1, 2))


def normalise(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Every token scaled to RMS 1 (length sqrt(width)): only its direction is passed on."""
    return h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)


def ff_loss(good_positive: torch.Tensor, good_negative: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """The logistic loss of p(positive) = sigmoid(goodness - threshold): -log p on positive data,
    -log(1 - p) on negative data, batch means summed."""
    return F.softplus(threshold - good_positive).mean() + F.softplus(good_negative - threshold).mean()


class Unit(nn.Module):
    """A stack of adaLN-Zero layers trained together on one goodness objective. The layers' conditioning is a
    learned constant: only the modulation's bias learns (its weight multiplies silu(0) = 0), a learned
    shift, scale and gate per layer."""

    def __init__(self, spec: ArchSpec, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            AdaLNZeroLayer(spec.width, spec.heads, spec.mlp_ratio, dropout=spec.dropout) for _ in range(layers)
        )
        self.cond = nn.Parameter(torch.zeros(1, spec.width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        c = self.cond.expand(h.shape[0], -1)
        for layer in self.layers:
            h = layer(h, c)
        return h


class ForwardForwardViT(nn.Module):
    def __init__(
        self,
        spec: str | ArchSpec,
        image_shape: Sequence[int],
        num_classes: int,
        layers_per_unit: int = 1,
        threshold: float = THRESHOLD,
        skip_first: bool = False,
    ) -> None:
        super().__init__()
        spec = get_arch(spec) if isinstance(spec, str) else spec
        if spec.family != "vit":
            raise ValueError(f"Forward-Forward runs on a ViT; {spec.family!r} given")
        if num_classes > spec.width:
            raise ValueError(
                f"the label token holds the one-hot label: {num_classes} classes need width >= "
                f"{num_classes}, got {spec.width}"
            )
        if layers_per_unit < 1 or spec.depth % layers_per_unit:
            raise ValueError(f"layers_per_unit={layers_per_unit} does not divide depth {spec.depth}")
        self.num_classes, self.threshold, self.skip_first = num_classes, threshold, skip_first
        self.patch_embed = nn.Conv2d(image_shape[0], spec.width, kernel_size=spec.patch, stride=spec.patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, patch_count(tuple(image_shape), spec.patch) + 1, spec.width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.units = nn.ModuleList(Unit(spec, layers_per_unit) for _ in range(spec.depth // layers_per_unit))

    def embed(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[label token; patch tokens] + positions; the label token is the one-hot label, zero-padded."""
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)
        token = F.one_hot(labels, patches.shape[-1]).to(patches.dtype).unsqueeze(1)
        return torch.cat([token, patches], dim=1) + self.pos_embed

    def unit_outputs(self, images: torch.Tensor, labels: torch.Tensor) -> Iterator[torch.Tensor]:
        """Every unit's output, one at a time (classifying C labels at once need not hold them all). Each unit
        reads the previous output normalised and detached (the stem's output is not detached: the stem is
        part of the first unit)."""
        h = self.embed(images, labels)
        for i, unit in enumerate(self.units):
            h = unit(normalise(h if i == 0 else h.detach()))
            yield h

    def unit_losses(self, images: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> list[torch.Tensor]:
        """Each unit's local loss on the images with labels ``positive`` and ``negative``, one pass for both."""
        n = len(images)
        outputs = self.unit_outputs(torch.cat([images, images]), torch.cat([positive, negative]))
        return [ff_loss(g[:n], g[n:], self.threshold) for g in map(goodness, outputs)]

    def draw(self, batch: Batch, gen: torch.Generator) -> Batch:
        """A wrong label per example, uniform over the other classes."""
        labels = batch["label"]
        shift = torch.randint(1, self.num_classes, (len(labels),), generator=gen).to(labels.device)
        return {**batch, "negative": (labels + shift) % self.num_classes}

    def loss(self, batch: Batch) -> torch.Tensor:
        """The sum of the units' losses; the detached inputs make its gradient every unit's own."""
        return sum(self.unit_losses(batch["image"], batch["label"], batch["negative"]))

    @torch.no_grad()
    def class_goodness(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C): the goodness accumulated over the units (all but the first with ``skip_first``) with each
        label in the label token."""
        n, classes = len(images), self.num_classes
        labels = torch.arange(classes, device=images.device).repeat(n)
        outputs = self.unit_outputs(images.repeat_interleave(classes, dim=0), labels)
        skip = 1 if self.skip_first and len(self.units) > 1 else 0
        return sum(goodness(h) for i, h in enumerate(outputs) if i >= skip).reshape(n, classes)

    def classify(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The label with the highest accumulated goodness (deterministic: ``generator`` is unused)."""
        return self.class_goodness(images).argmax(dim=-1)


def train_forward_forward(
    arch: str | ArchSpec,
    data,
    *,
    seed: int = 0,
    device="cpu",
    layers_per_unit: int = 1,
    threshold: float = THRESHOLD,
    module: ForwardForwardViT | None = None,
    state_path=None,
    on_log=None,
    **overrides,
) -> dict[str, torch.Tensor]:
    """Train a Forward-Forward ViT of architecture ``arch`` (a registry name, e.g. ``ViT-tiny``) on ``data``
    and return its state; ``overrides`` are train settings over :data:`FF_TRAIN` (``steps=...``)."""
    if module is None:
        with seeded(seed):
            module = ForwardForwardViT(arch, data.shape, data.num_classes, layers_per_unit, threshold)
    train(
        module,
        Objective(module.loss, module.draw),
        data,
        train_config(FF_TRAIN, overrides),
        seed=seed,
        device=torch.device(device),
        state_path=state_path,
        on_log=on_log,
        desc="Forward-Forward",
        progress=False,
    )
    return state_of(module)


def forward_forward(
    arch: str | ArchSpec,
    image_shape: Sequence[int],
    num_classes: int,
    state,
    *,
    layers_per_unit: int = 1,
    threshold: float = THRESHOLD,
) -> ForwardForwardViT:
    """A trained Forward-Forward ViT from its state."""
    model = ForwardForwardViT(arch, image_shape, num_classes, layers_per_unit, threshold)
    model.load_state_dict(state)
    return model
