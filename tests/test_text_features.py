"""The tiny-scale ``ngram`` MAUVE featurizer (dblocks.metrics.text_features) can fail: at the pipeline's tiny
protocol it rates held-out Shakespeare high against held-out Shakespeare, and low for the same texts with the
continuation's words shuffled or replaced by letter salad; the word statistic beside it."""

from __future__ import annotations

import random

import numpy as np
import pytest

from dblocks.data.text import load_text_dataset
from dblocks.metrics.mauve import mauve_from_features
from dblocks.metrics.text_features import EMPTY_BITS, NgramProfile, whole_words

# params/tiny-text.yaml's protocol (evaluate_ar_lm): 50 reference windows of AR-tiny's 64-byte context; 50 x 5
# generated texts, each a 14-byte prompt from a window and a 50-byte continuation
CONTEXT, NEW_TOKENS, REFERENCES, GENERATED = 64, 50, 50, 250
PROMPT = CONTEXT - NEW_TOKENS


@pytest.fixture(scope="module")
def train():
    return load_text_dataset("shakespeare", "train", CONTEXT, "bytes")


@pytest.fixture(scope="module")
def profile(train):
    return NgramProfile.from_dataset(train)


@pytest.fixture(scope="module")
def held_out():
    """Disjoint random draws from the first 500 test windows (one passage, as the pipeline's references are):
    50 references and 250 other windows that stand in for the continuations of a perfect model."""
    test = load_text_dataset("shakespeare", "test", CONTEXT, "bytes")
    windows = [bytes(w.tolist()) for w in test.tokens[:500]]
    order = np.random.default_rng(1000).permutation(len(windows))
    return [windows[i] for i in order[:REFERENCES]], [windows[i] for i in order[REFERENCES : REFERENCES + GENERATED]]


def _text(chunks: list[bytes]) -> list[str]:
    return [c.decode("utf-8", errors="replace") for c in chunks]


def _shuffled(window: bytes, rng: random.Random) -> bytes:
    """The prompt, then the continuation's words (space-separated) in a random order."""
    words = window[PROMPT:].split(b" ")
    rng.shuffle(words)
    return window[:PROMPT] + b" ".join(words)


def _salad(train, windows: list[bytes], seed: int) -> list[bytes]:
    """The prompts, then continuations of bytes drawn independently at the training split's byte frequencies
    (letters, spaces, newlines, punctuation)."""
    stream = train.tokens.reshape(-1)
    counts = np.bincount(stream[stream < 256].numpy(), minlength=256)
    gen = np.random.default_rng(seed)
    return [w[:PROMPT] + bytes(gen.choice(256, NEW_TOKENS, p=counts / counts.sum()).tolist()) for w in windows]


def test_ngram_mauve_is_high_for_held_out_text_and_low_for_shuffled_words_and_letter_salad(train, profile, held_out):
    # measured (references and texts drawn 16 ways from 4 passages of the test split): held-out 0.94-1.0,
    # shuffled continuations 0.03-0.18, letter salad 0.004; MiniLM: 0.99, 0.91-1.0, 0.006 (blind to order)
    references, others = held_out
    q = profile.features(_text(references))
    real = mauve_from_features(profile.features(_text(others)), q)
    rng = random.Random(0)
    shuffled = mauve_from_features(profile.features(_text([_shuffled(w, rng) for w in others])), q)
    salad = mauve_from_features(profile.features(_text(_salad(train, others, 0))), q)
    assert real >= 0.9, real
    assert shuffled <= 0.2, shuffled
    assert salad <= 0.05, salad


def test_profiles_rise_with_shuffling_and_salad_and_fall_for_copied_training_text(train, profile, held_out):
    _, others = held_out
    rng = random.Random(0)
    real = profile.features(_text(others)).mean(0)
    shuffled = profile.features(_text([_shuffled(w, rng) for w in others])).mean(0)
    salad = profile.features(_text(_salad(train, others, 0))).mean(0)
    copied = profile.features(_text([bytes(w.tolist()) for w in train.tokens[:GENERATED]])).mean(0)
    assert real.shape == (8,) and np.all(np.diff(real[:5]) < 0)  # bits fall with the order, then level off
    assert abs(shuffled[0] - real[0]) < 0.1 and shuffled[-1] > real[-1] + 1  # unigrams alike, 8-grams not
    assert salad[-1] > 8 > real[-1]
    assert copied[-1] < real[-1] - 0.5  # the training split itself is more familiar than held-out text


def test_surprisal_of_a_toy_corpus():
    profile = NgramProfile("abab" * 50, max_order=3)
    bits = profile.surprisal("abab")
    assert bits.shape == (3, 4)
    # unigrams: add-one over 256 byte values, 100 of 200 bytes are 'a'
    assert bits[0, 0] == pytest.approx(-np.log2(101 / 456))
    # bigram 'ab': the context 'a' was seen 100 times, always before 'b' (one kind of continuation); Witten-Bell:
    # (100 hits + 1 kind x unigram p('b') = 101/456) / (100 seen + 1 kind)
    assert bits[0, 1] == pytest.approx(-np.log2(101 / 456))
    assert bits[1, 1] == pytest.approx(-np.log2((100 + 101 / 456) / 101))
    assert bits[1, 0] == bits[0, 0] and bits[2, 1] == bits[1, 1]  # too little context: the order below's bits
    assert np.all(profile.surprisal("abba")[:, 3] > bits[:, 3] - 1e-12)  # 'ba' then 'a' fits, 'bb' does not
    assert profile.profile("").tolist() == [EMPTY_BITS] * 3
    assert profile.features([]).shape == (0, 3)
    again = NgramProfile("abab" * 50, max_order=3)
    np.testing.assert_array_equal(profile.features(["abba", "abab"]), again.features(["abba", "abab"]))
    with pytest.raises(ValueError, match="allowed: 1..8"):
        NgramProfile("abc", max_order=9)


def test_word_rate_counts_whole_words_of_the_training_vocabulary(train, profile, held_out):
    assert whole_words("ead it, Master Ford") == ["it", "master"]  # cut ends left out
    assert whole_words(" read it. ") == ["read", "it"] and whole_words("xyz") == []
    toy = NgramProfile("the cat sat on the mat", max_order=2)
    assert toy.word_rate([" the dog sat "]) == pytest.approx(2 / 3)
    assert toy.word_rate(["", "abc"]) == 0.0  # no whole word
    _, others = held_out
    continuations = _text([w[PROMPT:] for w in others])
    assert profile.word_rate(continuations) > 0.9  # measured 0.96
    assert profile.word_rate(_text([w[PROMPT:] for w in _salad(train, others, 0)])) < 0.5  # measured 0.30


def test_cli_evaluates_ngram_mauve_offline(tmp_path, capsys):
    import json

    from dblocks.cli import main

    cfg = tmp_path / "ar.yaml"
    cfg.write_text(
        json.dumps(
            {
                "name": "ar-micro",
                "task": "ar_text",
                "arch": "AR-micro",
                "dataset": "shakespeare",
                "blocks": 2,
                "device": "cpu",
                "train": {"steps": 2, "batch_size": 4, "warmup": 1},
            }
        )
    )
    assert (
        main(["train-baseline", "--config", str(cfg), "--no-progress", "--out", str(tmp_path / "e.safetensors")]) == 0
    )
    args = [
        "evaluate",
        str(tmp_path / "e.safetensors"),
        "--out",
        str(tmp_path / "m.json"),
        "--prompts",
        "6",
        "--continuations",
        "2",
        "--new-tokens",
        "6",
        "--max-windows",
        "4",
        "--mauve-features",
    ]
    assert main([*args, "ngram"]) == 0
    record = json.loads((tmp_path / "m.json").read_text())
    assert 0 <= record["mauve_ngram"] <= 1 and "n-gram models" in record["mauve_ngram_label"]
    assert 0 <= record["train_word_rate"] <= 1 and 0 <= record["train_word_rate_reference"] <= 1
    assert "mauve_ngram" in capsys.readouterr().out
    assert main([*args, "bigram"]) == 2
    assert "allowed: reference-lm, minilm, ngram, gpt2-large" in capsys.readouterr().err
