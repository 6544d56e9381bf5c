"""Class agreement: a held-out digit classifier (not the FID feature net) reading class-conditional samples."""

from __future__ import annotations

import torch

from dblocks.data import load_image_dataset
from dblocks.metrics.class_agreement import class_agreement


def test_real_held_out_digits_agree_and_noise_is_at_chance():
    test = load_image_dataset("digits", "test")  # never seen by the judge, which trains on the train split
    assert class_agreement(test.images[:], test.labels) > 0.93
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(1000) % 10
    for noise in (torch.rand((1000, 1, 8, 8), generator=g) * 2 - 1, torch.randn((1000, 1, 8, 8), generator=g)):
        assert abs(class_agreement(noise, labels) - 0.1) < 0.05  # chance: 1 in 10


def test_a_digit_asked_for_as_another_class_disagrees():
    test = load_image_dataset("digits", "test")
    assert class_agreement(test.images[:], (test.labels + 1) % 10) < 0.05
