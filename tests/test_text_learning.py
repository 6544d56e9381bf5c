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
from tests.conftest import train_job_in_process

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


#: a short end-to-end run of each text model of the pipeline (micro sizes): steps, learning rate
SHORT_RUNS = {
    "masked_text": ("MDM-micro", 300, 3e-3),
    "ar_text": ("AR-micro", 150, 3e-3),
    "recurrent_text": ("Huginn-micro", 250, 5e-3),
}


@pytest.mark.parametrize("task", list(SHORT_RUNS))
def test_a_short_training_run_gets_below_the_splits_unigram_entropy(task):
    """Learning beyond letter statistics: after a short run each model's held-out bits (the masked LM's bound per
    character; next-token bits per byte) are clearly below what the best context-free model reaches."""
    from dblocks.evaluate import as_assembled
    from dblocks.text_generation import next_token_quality, recurrent_next_token_quality

    torch.manual_seed(0)
    arch, steps, lr = SHORT_RUNS[task]
    exp = Experiment(
        resolve(
            {
                "task": task,
                "arch": arch,
                "dataset": "shakespeare",
                "blocks": 1,
                "device": "cpu",
                "train": {
                    "steps": steps,
                    "batch_size": 32,
                    "lr": lr,
                    "warmup": 10,
                    "log_every": 50,
                    "schedule": "constant",
                    "grad_clip": None,
                    "weight_decay": 0.0,
                },
            }
        )
    )
    model, _ = train_job_in_process(exp, "e2e")
    held_out, gen = exp.load_data("validation").tokens[:200], torch.Generator().manual_seed(1)
    model.eval()
    if task == "masked_text":
        bits = bits_per_token(as_assembled(model, exp), held_out, gen, samples_per_block=2)
        floor = unigram_bits(held_out, 27)
    else:
        quality = (
            recurrent_next_token_quality(model, held_out, exp.arch.spec.recurrence, gen)
            if task == "recurrent_text"
            else next_token_quality(model, held_out, gen)
        )
        bits, floor = quality["next_token_bits"], unigram_bits(held_out[:, 1:], 257)
    assert bits < floor - 0.15, (bits, floor)
