"""FID against cached reference statistics, all arithmetic by torch-fidelity.

A :class:`FeatureSpace` names a torch-fidelity feature extractor, its layer and its weights file: the
digits classifier (``dblocks-digits``, domain FID, the tiny scale) or the converted offline Inception
(``inception-v3-compat``, the paper's FID). Features come from torch-fidelity's own extractor and data
loop; mean and covariance from ``torch_fidelity.metric_fid.fid_features_to_statistics``; the distance
from ``fid_statistics_to_metric``.

Reference statistics (mu, sigma of one dataset split) are computed once and stored by this module, not by
torch-fidelity's cache (which pickles): a safetensors file with a JSON sidecar (through
:mod:`dblocks.checkpoint`, hashed) whose ``key`` records the dataset, split, the prepared split's sha256,
the extractor, layer, the weights' sha256 and the sample count, and ``key_sha256`` a digest of that key.
:func:`reference_statistics` reuses the file when the key matches and recomputes it otherwise, so a
retrained feature net or changed data never reads stale statistics."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from dblocks.checkpoint import load_checkpoint, load_metadata, save_checkpoint, sha256_file
from dblocks.errors import CheckpointError
from dblocks.metrics import fid, inception

KIND = "fid_reference_statistics"
INCEPTION_LABEL = "FID (Inception-v3, torch-fidelity)"


@dataclass(frozen=True)
class FeatureSpace:
    """Which torch-fidelity extractor embeds the images, with which weights file."""

    extractor: str
    layer: str
    weights: Path
    label: str

    @classmethod
    def from_weights(cls, path: str | os.PathLike) -> FeatureSpace:
        """A digits feature net (domain FID) or converted Inception weights (``dblocks inception-weights``),
        told apart by the checkpoint's record; both are safetensors, loaded without pickle."""
        path = Path(path)
        kind = load_metadata(path).get("kind")
        if kind == inception.KIND:
            return cls(inception.EXTRACTOR, inception.FEATURE_LAYER, path, INCEPTION_LABEL)
        if kind == fid.FEATURE_NET_KIND:
            return cls(fid.FEATURE_EXTRACTOR_NAME, fid.FEATURE_LAYER, path, fid.FID_LABEL)
        raise ValueError(
            f"{path}: FID features must be a digits feature net ('dblocks train-feature-net') or "
            f"Inception weights ('dblocks inception-weights'), not a {kind!r} checkpoint"
        )

    @property
    def kind(self) -> str:
        return "digits" if self.extractor == fid.FEATURE_EXTRACTOR_NAME else "inception"

    @cached_property
    def weights_sha256(self) -> str:
        return sha256_file(self.weights)


def _cuda() -> bool:
    return torch.cuda.is_available()


def extract_features(
    images,
    space: FeatureSpace,
    batch_size: int = 256,
    progress: bool = False,
    *,
    rows: torch.Tensor | None = None,
    decode=None,
) -> torch.Tensor:
    """(N, D) features of float images (N, C, H, W) in [-1, 1], by torch-fidelity's extractor and data
    loop (its progress bar with ``progress``). ``images`` is a tensor or a prepared split's rows
    (:class:`dblocks.data.prepared.StoredRows`), read, ``decode``d (latents to images) and converted a batch at a
    time; ``rows`` picks which of them (default all). Gray images are repeated to RGB for Inception."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    if not hasattr(images, "ndim") or images.ndim != 4 or images.shape[0] < 2:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"expected images (N, C, H, W) with N >= 2, got {shape}")
    if rows is not None and len(rows) < 2:
        raise ValueError(f"expected at least 2 images, got rows {rows.tolist()}")
    fid.register_digits_feature_extractor()
    inception.register_inception_feature_extractor()
    extractor = create_feature_extractor(
        space.extractor,
        [space.layer],
        cuda=_cuda(),
        feature_extractor_weights_path=str(space.weights),
        verbose=progress,
    )
    dataset = fid.RowImageDataset(images, rows, decode, channels=3 if space.kind == "inception" else None)
    features = get_featuresdict_from_dataset(
        dataset, extractor, int(batch_size), _cuda(), save_cpu_ram=True, verbose=progress
    )
    return features[space.layer]


def statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """{"mu", "sigma"} of (N, D) features, by torch-fidelity."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(features)


def fid_from_statistics(generated: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """The Frechet distance between two {"mu", "sigma"}, by torch-fidelity."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return float(fid_statistics_to_metric(generated, reference, False)[KEY_METRIC_FID])


def image_statistics(
    images,
    space: FeatureSpace,
    batch_size: int = 256,
    progress: bool = False,
    *,
    rows: torch.Tensor | None = None,
    decode=None,
) -> dict[str, np.ndarray]:
    """{"mu", "sigma"} of the features of ``images`` (or of their ``rows``, ``decode``d first): see
    :func:`extract_features`."""
    return statistics(extract_features(images, space, batch_size, progress, rows=rows, decode=decode))


# ------------------------------------------------------------------------------- the reference cache


def reference_key(data_dir: str | os.PathLike, split: str, space: FeatureSpace, samples: int | None) -> dict:
    """What the statistics depend on; a cached file is reused only if its key is equal."""
    from dblocks.data import prepared_path

    data = load_metadata(prepared_path(data_dir, split))
    return {
        "dataset": data["name"],
        "split": split,
        "data_sha256": data["sha256"],
        "extractor": space.extractor,
        "layer": space.layer,
        "weights_sha256": space.weights_sha256,
        "samples": int(samples) if samples is not None else int(data["examples"]),
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def reference_rows(examples: int, split: str, samples: int | None) -> torch.Tensor | None:
    """Which rows of a split of ``examples`` the reference statistics summarize: all (None), or a fixed random
    subset of ``samples`` of them (seeded, the same every time)."""
    if samples is None or samples >= examples:
        if samples is not None and samples > examples:
            raise ValueError(f"reference samples {samples} exceed the {examples} images of split {split!r}")
        return None
    return torch.randperm(examples, generator=torch.Generator().manual_seed(0))[:samples]


def load_reference_statistics(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """(statistics, metadata) of a file written by :func:`reference_statistics` (hash verified)."""
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != KIND:
        raise CheckpointError(path, f"is a {meta.get('kind')!r} file, not FID reference statistics", field="kind")
    return {"mu": tensors["mu"].numpy(), "sigma": tensors["sigma"].numpy()}, meta


def reference_statistics(
    data_dir: str | os.PathLike,
    split: str,
    space: FeatureSpace,
    out: str | os.PathLike,
    samples: int | None = None,
    batch_size: int = 256,
    progress: bool = False,
    decode=None,
) -> tuple[dict[str, np.ndarray], dict, bool]:
    """Statistics of a prepared split in ``space``, cached at ``out`` (``.safetensors`` + ``.json``).

    Returns (statistics, metadata, reused): ``reused`` is True when ``out`` already held statistics
    with the same key (nothing was embedded)."""
    key = reference_key(data_dir, split, space, samples)
    digest = key_digest(key)
    try:
        if load_metadata(out).get("key_sha256") == digest:
            stats, meta = load_reference_statistics(out)
            return stats, meta, True
    except CheckpointError:
        pass  # missing or damaged: compute it
    from dblocks.data import load_prepared
    from dblocks.data.latents import decoder_for

    # the split's rows are read, decoded (a latent dataset's: by the autoencoder that encoded them, so its
    # statistics are those of the reconstructions) and embedded a batch at a time
    data = load_prepared(data_dir, split)
    stats = image_statistics(
        data.images,
        space,
        batch_size,
        progress,
        rows=reference_rows(len(data), split, samples),
        decode=decode or decoder_for(data.name, data_dir),
    )
    meta = save_checkpoint(
        out,
        {
            "mu": torch.from_numpy(np.ascontiguousarray(stats["mu"])),
            "sigma": torch.from_numpy(np.ascontiguousarray(stats["sigma"])),
        },
        {"kind": KIND, "key": key, "key_sha256": digest, "fid_label": space.label},
    )
    return stats, meta, False


def inception_fid(
    generated: torch.Tensor,
    reference: torch.Tensor,
    weights_path: str | os.PathLike,
    batch_size: int = 64,
    progress: bool = False,
) -> float:
    """The standard FID (paper scale): torch-fidelity's ``inception-v3-compat`` features with the offline
    weights written by ``dblocks inception-weights`` (``weights_path``, safetensors, checksum verified). For the
    full protocol (cached reference statistics, train and test FID, best of k) see
    :mod:`dblocks.metrics.reference` and :func:`dblocks.evaluate.evaluate_generator`."""
    space = FeatureSpace.from_weights(weights_path)
    if space.kind != "inception":
        raise ValueError(f"{weights_path}: not Inception weights (from 'dblocks inception-weights')")
    return fid_from_statistics(
        image_statistics(generated, space, batch_size, progress),
        image_statistics(reference, space, batch_size, progress),
    )


def domain_fid(
    generated: torch.Tensor, reference: torch.Tensor, feature_net_path: str | os.PathLike, batch_size: int = 256
) -> float:
    """Domain FID (:data:`FID_LABEL`) between ``generated`` and ``reference`` (float images
    (N, C, H, W) in [-1, 1], N >= 2 each): torch-fidelity's features, statistics and distance in the
    features of the digits net saved at ``feature_net_path``."""
    feature_net_path = Path(feature_net_path)
    if not feature_net_path.is_file():
        raise FileNotFoundError(f"no digits feature net at {feature_net_path}")
    space = FeatureSpace.from_weights(feature_net_path)
    if space.kind != "digits":
        raise ValueError(f"{feature_net_path}: not a digits feature net (.safetensors)")
    for name, images in (("generated", generated), ("reference", reference)):
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[0] < 2:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"{name} must be images (N, C, H, W) with N >= 2, got {shape}")
    return fid_from_statistics(
        image_statistics(generated, space, batch_size), image_statistics(reference, space, batch_size)
    )
