"""Class agreement: the fraction of class-conditional samples that a held-out digit classifier reads as the class
they were asked for.

FID says how far the samples' feature statistics are from the data's; it does not say whether a sample of
class 3 is a 3, and at tiny scale a model that draws blurry ink can score a middling FID. The judge here is a
different model from the FID feature net (a multinomial logistic regression of scikit-learn on the 64 pixels,
not a network's features), trained on the digits' train split only: it never sees a sample, and its
accuracy on the held-out test digits is the ceiling a perfect generator would reach (about 0.96). Digit data
sets only (``dblocks.config.JUDGED_DATASETS``; digits-latent samples are judged after decoding); other data sets have no
judge here.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=1)
def digit_judge():
    """The judge: logistic regression on the flattened train digits in [-1, 1] (deterministic: lbfgs, no
    random state involved). Built once per process, in well under a second."""
    from sklearn.linear_model import LogisticRegression

    from dblocks.data.images import load_image_dataset

    train = load_image_dataset("digits", "train")
    judge = LogisticRegression(max_iter=5000, C=1.0)
    judge.fit(_features(train.images[:]), train.labels.numpy())
    return judge


def _features(images: torch.Tensor) -> np.ndarray:
    if tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"the digit judge reads 8x8 single-channel images, got shape {tuple(images.shape[1:])}")
    return images.reshape(len(images), -1).double().clamp(-1, 1).numpy()


def class_agreement(images: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of ``images`` (N, 1, 8, 8) in [-1, 1] that the judge assigns to ``labels`` (N,)."""
    predicted = digit_judge().predict(_features(images))
    return float((predicted == labels.numpy()).mean())
