"""Domain FID: the Frechet distance, computed by torch-fidelity, in the feature space of a small
classifier trained on the 8x8 digits, instead of Inception-v3 (whose weights cannot be fetched
offline and which is meaningless on 8x8 grayscale images anyway).

The numbers this module produces must be labelled :data:`FID_LABEL` ("domain FID (digits-classifier
features)"), never "FID" or "Inception FID": they are only comparable with each other, for the same
feature-net file.

Pieces:

- :class:`DigitsFeatureNet`, a small CNN classifier for (N, 1, 8, 8) images in [-1, 1]; its 64-d
  penultimate activations (:meth:`DigitsFeatureNet.features`) are the feature space.
- :func:`train_feature_net`, deterministic CPU training in seconds; :func:`build_digits_feature_net`
  trains on the digits train split, measures test accuracy and saves the net.
- :func:`save_feature_net` / :func:`load_feature_net`: safetensors + JSON through
  :mod:`dblocks.checkpoint` (no pickle, no ``torch.load``).
- :class:`DigitsFeatureExtractor`, a torch-fidelity ``FeatureExtractorBase`` registered as
  :data:`FEATURE_EXTRACTOR_NAME` ("dblocks-digits") providing the feature :data:`FEATURE_LAYER`
  ("digits64"); torch-fidelity hands it ``feature_extractor_weights_path``, the feature-net checkpoint.
- :class:`ImageTensorDataset`, float images in [-1, 1] -> the uint8 CHW tensors torch-fidelity reads;
  :class:`RowImageDataset` the same a batch at a time, for splits that are not held in memory.
- FID between two image sets in these features (:func:`dblocks.metrics.reference.domain_fid`) and cached
  reference statistics (train and test, reused across evaluations) live in :mod:`dblocks.metrics.reference`, in safetensors:
  torch-fidelity's own statistics cache is not used, because it reads its files back with
  ``torch.load(weights_only=False)``, i.e. pickle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torch_fidelity
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from dblocks.checkpoint import load_checkpoint, save_checkpoint
from dblocks.errors import CheckpointError

FEATURE_EXTRACTOR_NAME = "dblocks-digits"
FEATURE_LAYER = "digits64"
FID_LABEL = "domain FID (digits-classifier features)"
FEATURE_NET_KIND = "digits_feature_net"

IMAGE_SIZE = 8
NUM_CLASSES = 10
DEFAULT_TRAIN_STEPS = 600
DEFAULT_BATCH_SIZE = 128
DEFAULT_LR = 2e-3

# Metadata keys that save_feature_net writes itself.
_NET_KEYS = ("kind", "arch")


# ------------------------------------------------------------------------------------ pixel formats


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 in 0..255 (values outside the range are clamped)."""
    if not torch.is_floating_point(images):
        raise ValueError(f"expected floating-point images in [-1, 1], got dtype {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    return ((images.detach().cpu().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 in 0..255 -> float32 in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


# ------------------------------------------------------------------------------------- feature net


class DigitsFeatureNet(nn.Module):
    """Small CNN classifier for (N, 1, 8, 8) images in [-1, 1].

    conv 1->c1 3x3, ReLU, conv c1->c2 3x3, ReLU, 2x2 max-pool, linear (c2*4*4)->feature_dim, ReLU
    (the features), linear feature_dim->10 (the logits)."""

    def __init__(self, channels: tuple[int, int] = (32, 64), feature_dim: int = 64, num_classes: int = NUM_CLASSES):
        super().__init__()
        c1, c2 = (int(c) for c in channels)
        self.channels = (c1, c2)
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * (IMAGE_SIZE // 2) ** 2, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def arch(self) -> dict[str, Any]:
        return {"channels": list(self.channels), "feature_dim": self.feature_dim, "num_classes": self.num_classes}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate (post-ReLU) activations, (N, feature_dim)."""
        if x.ndim != 4 or x.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"expected (N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}) images, got {tuple(x.shape)}")
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        h = F.max_pool2d(h, 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_feature_net(
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = DEFAULT_TRAIN_STEPS,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
) -> DigitsFeatureNet:
    """Train a :class:`DigitsFeatureNet` on CPU, deterministically for a given ``seed`` (the global
    RNG is neither used nor changed). ``images`` (N, 1, 8, 8) in [-1, 1], ``labels`` (N,) in 0..9.

    Training sees the images after the same uint8 round trip that torch-fidelity's input goes
    through, so the net is fit to exactly the pixels it later embeds. It runs on one intra-op thread
    (the caller's setting is restored afterwards): the net is too small to gain from more, the result
    then does not depend on the thread count, and on a busy machine several spinning OpenMP threads
    are many times slower."""
    if images.ndim != 4 or images.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected (N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}) images, got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"expected labels of shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    x_all = from_uint8(to_uint8(images))
    y_all = labels.detach().cpu().long()
    batch_size = min(batch_size, x_all.shape[0])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(x_all, y_all, steps, seed, batch_size, lr)
    finally:
        torch.set_num_threads(threads)


def _train(
    x_all: torch.Tensor, y_all: torch.Tensor, steps: int, seed: int, batch_size: int, lr: float
) -> DigitsFeatureNet:
    n = x_all.shape[0]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsFeatureNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    net.train()
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        loss = F.cross_entropy(net(x_all[idx]), y_all[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    net.eval()
    net.requires_grad_(False)
    return net


@torch.no_grad()
def feature_net_accuracy(net: DigitsFeatureNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Classification accuracy of ``net`` on float images in [-1, 1] (after the uint8 round trip)."""
    was_training = net.training
    net.eval()
    try:
        pred = net(from_uint8(to_uint8(images))).argmax(dim=1)
    finally:
        net.train(was_training)
    return float((pred == labels.cpu()).float().mean())


def save_feature_net(net: DigitsFeatureNet, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> dict:
    """Save ``net`` as a ``.safetensors`` checkpoint with a JSON sidecar (see :mod:`dblocks.checkpoint`);
    returns the metadata as written. ``metadata`` may not set ``kind`` or ``arch``."""
    metadata = dict(metadata or {})
    clash = sorted(set(metadata) & set(_NET_KEYS))
    if clash:
        raise CheckpointError(path, "metadata key is written by save_feature_net itself", field=clash[0])
    return save_checkpoint(path, net.state_dict(), {**metadata, "kind": FEATURE_NET_KIND, "arch": net.arch()})


def load_feature_net(path: str | os.PathLike) -> DigitsFeatureNet:
    """Load a net written by :func:`save_feature_net` (checksum verified; safetensors, never pickle),
    in eval mode with gradients off."""
    tensors, record = load_checkpoint(path)
    if record.get("kind") != FEATURE_NET_KIND:
        raise CheckpointError(path, f"not a digits feature net (kind {record.get('kind')!r})", field="kind")
    arch = record.get("arch")
    try:
        net = DigitsFeatureNet(
            channels=tuple(arch["channels"]), feature_dim=arch["feature_dim"], num_classes=arch["num_classes"]
        )
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(path, f"invalid architecture description: {exc}", field="arch") from exc
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(path, f"tensors do not fit the architecture: {exc}", field="tensors") from exc
    net.eval()
    net.requires_grad_(False)
    return net


def build_digits_feature_net(
    path: str | os.PathLike,
    steps: int = DEFAULT_TRAIN_STEPS,
    seed: int = 0,
    min_test_accuracy: float = 0.95,
    train=None,
    test=None,
) -> dict:
    """Train the feature net on the digits train split, check its test-split accuracy, save it to
    ``path``; returns the metadata written (including ``test_accuracy``). ``train``/``test`` default to
    the embedded digits splits (the pipeline passes its prepared copies)."""
    from dblocks.data import load_image_dataset

    train = train if train is not None else load_image_dataset("digits", "train")
    test = test if test is not None else load_image_dataset("digits", "test")
    # [:] holds the whole split in memory (prepared splits are read from their files when indexed): the
    # digits are 1437 + 360 images of 8x8, and training draws from all of them at every step
    net = train_feature_net(train.images[:], train.labels, steps=steps, seed=seed)
    accuracy = feature_net_accuracy(net, test.images[:], test.labels)
    if accuracy < min_test_accuracy:
        raise RuntimeError(f"digits feature net reached only {accuracy:.4f} test accuracy (< {min_test_accuracy})")
    metadata = {"dataset": "digits", "steps": int(steps), "seed": int(seed), "test_accuracy": accuracy}
    return save_feature_net(net, path, metadata)


# ------------------------------------------------------------------------------ torch-fidelity side


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor wrapping a saved :class:`DigitsFeatureNet`.

    Input: what torch-fidelity feeds, uint8 (N, C, H, W) in 0..255 with C = 1 or 3 (RGB is averaged
    to gray); other sizes are resized to 8x8 (antialiased bilinear). Provides ``"digits64"``."""

    def __init__(
        self,
        name: str,
        features_list,
        feature_extractor_weights_path: str | os.PathLike | None = None,
        feature_extractor_internal_dtype: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(
                f"feature extractor {name!r} needs feature_extractor_weights_path: the digits feature-net "
                "checkpoint (.safetensors); there is nothing to download"
            )
        if feature_extractor_internal_dtype not in (None, "float32", "float64"):
            raise ValueError(f"unsupported feature_extractor_internal_dtype {feature_extractor_internal_dtype!r}")
        self.internal_dtype = torch.float64 if feature_extractor_internal_dtype == "float64" else torch.float32
        self.weights_path = str(feature_extractor_weights_path)
        self.net = load_feature_net(self.weights_path).to(self.internal_dtype)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return (FEATURE_LAYER,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": FEATURE_LAYER, "fid": FEATURE_LAYER, "kid": FEATURE_LAYER, "prc": FEATURE_LAYER}[metric]

    @staticmethod
    def can_be_compiled():
        return True

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 1, IMAGE_SIZE, IMAGE_SIZE]) * 255).to(torch.uint8)

    def forward(self, x: torch.Tensor):
        if not torch.is_tensor(x) or x.dtype != torch.uint8:
            raise ValueError("expecting images as a torch.uint8 tensor")
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expecting (N, 1 or 3, H, W) images, got {tuple(x.shape)}")
        x = x.to(self.internal_dtype).div(127.5).sub(1.0)
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        features = {FEATURE_LAYER: self.net.features(x).to(torch.float32)}
        return tuple(features[name] for name in self.features_list)


def register_feature_extractor(name: str, cls: type) -> None:
    """Register ``cls`` with torch-fidelity under ``name``; safe to call any number of times (and after a
    module reload, which makes a new class object of the same name)."""
    existing = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if existing is cls:
        return
    if existing is None:
        torch_fidelity.register_feature_extractor(name, cls)
        return
    if existing.__module__ == cls.__module__ and existing.__qualname__ == cls.__qualname__:
        FEATURE_EXTRACTORS_REGISTRY[name] = cls  # its module was reloaded
        return
    raise ValueError(
        f"torch-fidelity feature extractor {name!r} is already registered to "
        f"{existing.__module__}.{existing.__qualname__}"
    )


def register_digits_feature_extractor() -> None:
    """Register :class:`DigitsFeatureExtractor` under :data:`FEATURE_EXTRACTOR_NAME`."""
    register_feature_extractor(FEATURE_EXTRACTOR_NAME, DigitsFeatureExtractor)


register_digits_feature_extractor()


class ImageTensorDataset(torch.utils.data.Dataset):
    """Float images (N, C, H, W) in [-1, 1] as the uint8 CHW tensors (0..255) torch-fidelity expects.
    Values outside [-1, 1] are clamped; NaN or infinite values are rejected."""

    def __init__(self, images: torch.Tensor):
        if not torch.is_tensor(images) or images.ndim != 4:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"expected images (N, C, H, W), got {shape}")
        self.data = to_uint8(images).contiguous()

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data[index]


class RowImageDataset(torch.utils.data.Dataset):
    """The rows of ``images`` (a tensor, or a prepared split's :class:`dblocks.data.prepared.StoredRows`) as the
    uint8 CHW tensors torch-fidelity reads, made one DataLoader batch at a time (``__getitems__``), so that a
    split is never held whole as floats or images: ``rows`` picks which rows, in which order (default all);
    ``decode`` turns a batch into float images in [-1, 1] first (a latent dataset's autoencoder decoder); gray
    images are repeated to ``channels`` (3 for Inception) if given."""

    def __init__(self, images, rows: torch.Tensor | None = None, decode=None, channels: int | None = None):
        if images.ndim != 4:
            raise ValueError(f"expected images (N, C, H, W), got {tuple(images.shape)}")
        self.images, self.rows, self.decode, self.channels = images, rows, decode, channels

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else self.images.shape[0]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[self.rows[index] if self.rows is not None else index]
        if self.decode is not None:
            x = self.decode(x)
        if self.channels is not None and x.shape[1] == 1:
            x = x.expand(-1, self.channels, -1, -1)
        return list(to_uint8(x))

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]
