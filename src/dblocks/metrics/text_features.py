"""Offline, order-sensitive text features for MAUVE at tiny scale, and a plain word statistic beside it.

:class:`NgramProfile` is fitted once on the training split (counting, no optimisation, nothing from the
samples). A text's features are its **surprisal profile**: the mean number of bits per byte that byte
n-gram models of the training split need for it, one number per order n = 1..8 (contexts of 0..7 bytes;
interpolated Witten-Bell smoothing, add-one unigrams over the 256 byte values). Held-out text has a
characteristic profile (bits fall with n, then level off, since held-out text is partly novel at long
orders); each failure mode moves it:

* letter salad (bytes drawn at the training split's frequencies): the same bits at n = 1, ~10 bits at n >= 3;
* shuffled words (words and spelling right, order wrong): more bits from n = 2 on, growing with n as
  contexts span word boundaries (4.1 instead of 2.7 bits at n = 8 on Shakespeare);
* text copied from the training split (or a model that recites it): *fewer* bits at long orders than
  held-out text (1.3 instead of 2.7 at n = 8), so MAUVE against held-out text falls for it too (0.01): the
  features compare generated text with held-out text, and reciting the training split is not that.

MAUVE itself (mauve-text's PCA, k-means and divergence frontier) runs on these 8-d vectors
(:func:`dblocks.metrics.mauve.mauve_from_features`). Measured at the tiny protocol (64-byte windows of
Shakespeare's test split, 50 reference windows, 250 texts whose last 50 bytes are changed;
tests/test_text_features.py; 16 draws from 4 passages): held-out vs held-out 0.94-1.0, shuffled continuations
0.03-0.18, letter salad 0.004. Hashed character n-gram count vectors (the text's own n-grams, 1..4 across word
boundaries, and word bigrams; no training split) rated shuffled text like real (MAUVE 0.98) at this text
length; MiniLM sentence embeddings do too (0.91-1.0).

:meth:`NgramProfile.word_rate` is the honest statistic to read beside it: the fraction of whole words of
the texts that occur in the training split's vocabulary (held-out Shakespeare continuations: 0.96, letter
salad: 0.30).
"""

from __future__ import annotations

import re

import numpy as np

NGRAM_LABEL = (
    "MAUVE (features: bits per byte under byte n-gram models, n = 1..8, of the training split; "
    "offline, order-sensitive; not GPT-2 large)"
)
#: the index reads at most this many bytes from the start of the training split (all of tiny Shakespeare's
#: 4.5 MB; a bound on memory and time at paper scale)
MAX_TRAIN_BYTES = 1 << 23
#: features of an empty text: the bits of a uniformly random byte at every order
EMPTY_BITS = 8.0

_WORD = re.compile(r"[a-z']+")
_LETTER = re.compile(r"[A-Za-z']")


def _grams(ids: np.ndarray, n: int) -> np.ndarray:
    """The byte n-grams of ``ids`` as uint64 codes (big-endian: a context's continuations are one code range)."""
    if len(ids) < n:
        return np.zeros(0, np.uint64)
    ids = ids.astype(np.uint64)
    codes = np.zeros(len(ids) - n + 1, np.uint64)
    for k in range(n):
        codes = (codes << np.uint64(8)) | ids[k : len(ids) - n + 1 + k]
    return codes


def _unique_counts(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique codes and their counts (a sort: numpy 2's np.unique is ~15x slower on 4 M int64)."""
    s = np.sort(codes)
    first = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1]))) if len(s) else np.zeros(0, np.int64)
    return s[first], np.diff(np.append(first, len(s)))


def whole_words(text: str) -> list[str]:
    """Lower-case words (letters and apostrophes) of ``text``, less a first or last word that touches the
    text's ends (a window or a continuation may cut it)."""
    words = _WORD.findall(text.lower())
    if words and text[:1] and _LETTER.match(text[:1]):
        words = words[1:]
    if words and text[-1:] and _LETTER.match(text[-1:]):
        words = words[:-1]
    return words


class NgramProfile:
    """Byte n-gram counts (n = 1..``max_order``) and the word vocabulary of a training text."""

    def __init__(self, train_text: str, max_order: int = 8):
        if not 1 <= max_order <= 8:
            raise ValueError(f"max_order {max_order}: allowed: 1..8 (n-grams are 64-bit codes)")
        data = np.frombuffer(train_text.encode("utf-8"), np.uint8)
        if len(data) < max_order:
            raise ValueError(f"a training text of {len(data)} bytes is too short for {max_order}-grams")
        self.max_order, self.train_bytes = max_order, len(data)
        self.keys, self.cumulative = [], []  # per order: sorted unique codes, and counts' running sums (0 first)
        for n in range(1, max_order + 1):
            keys, counts = _unique_counts(_grams(data, n))
            self.keys.append(keys)
            self.cumulative.append(np.concatenate(([0], np.cumsum(counts))))
        self.vocabulary = frozenset(_WORD.findall(train_text.lower()))

    @classmethod
    def from_dataset(cls, data, max_bytes: int = MAX_TRAIN_BYTES, max_order: int = 8) -> NgramProfile:
        """From a text split (:class:`dblocks.data.text.TextDataset`, e.g. the experiment's training split):
        its first ``max_bytes`` tokens, end-of-document ids dropped."""
        from dblocks.data.text import CHAR27_ALPHABET

        rows = max(1, min(len(data), max_bytes // data.seq_len))
        tokens = np.asarray(data.tokens[:rows]).reshape(-1)
        if data.tokenizer == "char27":
            text = np.frombuffer(CHAR27_ALPHABET.encode(), np.uint8)[tokens].tobytes().decode("ascii")
        else:
            text = tokens[tokens < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        return cls(text, max_order)

    def _count(self, n: int, codes: np.ndarray) -> np.ndarray:
        """Training counts of n-gram codes."""
        keys, cum = self.keys[n - 1], self.cumulative[n - 1]
        at = np.searchsorted(keys, codes).clip(max=len(keys) - 1)
        return np.where(keys[at] == codes, cum[at + 1] - cum[at], 0)

    def surprisal(self, text: str) -> np.ndarray:
        """(max_order, bytes) bits of each byte of ``text`` under the n-gram models n = 1..max_order; the
        first n - 1 bytes (too little context) keep order n - 1's bits."""
        b = np.frombuffer(text.encode("utf-8"), np.uint8)
        p = (self._count(1, b.astype(np.uint64)) + 1.0) / (self.train_bytes + 256)
        orders = [p]
        for n in range(2, self.max_order + 1):
            p = p.copy()
            if len(b) >= n:
                context = _grams(b[:-1], n - 1)[: len(b) - n + 1] << np.uint64(8)
                keys, cum = self.keys[n - 1], self.cumulative[n - 1]
                lo = np.searchsorted(keys, context)
                hi = np.searchsorted(keys, context | np.uint64(255), side="right")
                seen, kinds = cum[hi] - cum[lo], hi - lo  # the context's count and its distinct continuations
                hits = self._count(n, context | b[n - 1 :].astype(np.uint64))
                lower = p[n - 1 :]
                p[n - 1 :] = np.where(seen > 0, (hits + kinds * lower) / np.maximum(seen + kinds, 1), lower)
            orders.append(p)
        return -np.log2(np.stack(orders))

    def profile(self, text: str) -> np.ndarray:
        """(max_order,) mean bits per byte of ``text`` under each order."""
        if not text:
            return np.full(self.max_order, EMPTY_BITS)
        return self.surprisal(text).mean(axis=1)

    def features(self, texts: list[str]) -> np.ndarray:
        """(N, max_order) surprisal profiles: MAUVE features (:data:`NGRAM_LABEL`)."""
        return np.stack([self.profile(t) for t in texts]) if texts else np.zeros((0, self.max_order))

    def word_rate(self, texts: list[str]) -> float:
        """Fraction of the texts' whole words (:func:`whole_words`) that occur in the training split; 0 when
        the texts hold no whole word (gibberish without spaces)."""
        words = [w for t in texts for w in whole_words(t)]
        return sum(w in self.vocabulary for w in words) / len(words) if words else 0.0
