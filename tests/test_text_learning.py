"""The floor every text number is read against: the entropy of a split's own token frequencies (what a
context-free model reaches), checked by hand and through the masked LM's bound."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from dblocks.blocks import AssembledModel
from dblocks.config import resolve
from dblocks.data.text import unigram_bits
from dblocks.experiment import Experiment
from dblocks.masked_diffusion import bits_per_token

MICRO = {"task": "masked_text", "arch": "MDM-micro", "dataset": "shakespeare", "blocks": 3, "device": "cpu"}


def test_unigram_bits_is_the_entropy_of_the_letter_frequencies():
    counts = Counter("abracadabra")  # a 5, b 2, r 2, c 1, d 1 of 11
    by_hand = -sum(n / 11 * math.log2(n / 11) for n in counts.values())
    ids = torch.tensor([ord(ch) - ord("a") for ch in "abracadabra"]).reshape(1, -1)
    assert unigram_bits(ids, 27) == pytest.approx(by_hand, abs=1e-12)
    assert unigram_bits(torch.zeros(3, 4, dtype=torch.long), 27) == 0.0


def test_bpc_of_a_unigram_model_is_the_letter_entropy_of_the_split():
    """A masked LM whose every block predicts the split's letter frequencies whatever it reads: each masked
    letter costs -log2 p(letter), so its bound (the BPC the tables report) is the split's unigram entropy."""
    exp = Experiment(resolve(MICRO))
    tokens = exp.load_data("validation").tokens[:1500]
    counts = Counter(tokens.reshape(-1).tolist())
    total = sum(counts.values())
    by_hand = -sum(n / total * math.log2(n / total) for n in counts.values())
    assert 3.9 < by_hand < 4.2  # letters and spaces of English verse
    p = torch.bincount(tokens.reshape(-1), minlength=27).double() / total
    blocks = exp.empty_blocks()
    for block in blocks:
        final = block.head.final.linear
        final.weight.data.zero_()  # reads nothing ...
        final.bias.data.copy_(p.clamp(min=1e-12).log().float())  # ... and says the letter frequencies
    model = AssembledModel(blocks, exp.partition).eval()
    bpc = bits_per_token(model, tokens, torch.Generator().manual_seed(0), samples_per_block=4)
    assert bpc == pytest.approx(by_hand, rel=0.01)
    assert unigram_bits(tokens, 27) == pytest.approx(by_hand, abs=1e-9)
