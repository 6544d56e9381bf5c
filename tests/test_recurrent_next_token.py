"""Plain next-token quality of the block-wise Huginn model scores its next-token distribution (the denoiser at
sigma_max), as the AR model's does (tests/test_ar_lm.py), not the confidence of the K-step chain's last logits."""

from __future__ import annotations

import math

import pytest
import torch

from dblocks.blocks import AssembledModel
from dblocks.config import resolve
from dblocks.experiment import Experiment
from dblocks.text_generation import recurrent_next_token_quality
from tests.conftest import train_job_in_process

MICRO = {
    "task": "recurrent_text",
    "arch": "Huginn-micro",
    "dataset": "shakespeare",
    "blocks": 1,
    "device": "cpu",
    "train": {"steps": 30, "batch_size": 8, "lr": 5e-3, "warmup": 3, "log_every": 10, "checkpoint_every": 30},
}


def test_blockwise_recurrent_next_token_bits_are_the_sigma_max_prediction():
    exp = Experiment(resolve(MICRO, []))
    denoiser, _ = train_job_in_process(exp, "blockwise", 1)
    model = AssembledModel([denoiser], exp.partition).eval()
    val = exp.load_data("validation").tokens[:24]
    quality = recurrent_next_token_quality(model, val, 3, torch.Generator().manual_seed(0))
    with torch.no_grad():  # by hand: the denoiser at sigma_max, whose noisy slots carry nothing of their tokens
        z = 80.0 * torch.randn(len(val), val.shape[1] - 1, 32, generator=torch.Generator().manual_seed(1))
        logits = denoiser(z, torch.tensor([80.0]), val[:, :-1]).raw
    by_hand = torch.nn.functional.cross_entropy(logits.transpose(1, 2), val[:, 1:]).item() / math.log(2)
    # another noise draw moves a micro model's bits a little (sigma_max = 80 is rare in training); the chain's
    # last logits, which the bits were once computed from, score 6.3 here
    assert quality["next_token_bits"] == pytest.approx(by_hand, abs=0.25)
    assert quality["next_token_bits"] < math.log2(257) - 2.0
    assert {"chain_bits", "chain_accuracy"} <= set(quality)
