"""What the encoder sees, before any projector: text->photo search, raw tactile->photo alignment, the cones.

Computed by the ``embed`` stage on the test split's originals (never used to train anything):

* ``caption_to_rgb_R@1``: a caption's nearest test photo carries that same caption string (captions repeat);
* ``adjective_P@5``: for each single adjective of the test captions, the share of the 5 nearest test photos whose
  caption carries it (mean over adjectives), beside ``adjective_P@5_chance``, the share a random photo carries;
* ``raw_tac_to_rgb_R@1``: tactile -> its own photo, raw vectors (the modality gap: low for a real encoder);
* ``tac_cone`` / ``rgb_cone``: mean pairwise cosine (real SSVTP with ImageBind-huge: 0.93 and 0.55).
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def _words(caption: str) -> set[str]:
    return {w.strip().lower() for w in str(caption).split(",") if w.strip()}


def mean_pairwise_cosine(x: np.ndarray) -> float:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    if n < 2:
        return float("nan")
    s = x @ x.T
    return float((s.sum() - np.trace(s)) / (n * n - n))


def encoder_metrics(tac: np.ndarray, rgb: np.ndarray, text: np.ndarray, captions: list[str],
                    encode_texts: Callable[[list[str]], np.ndarray], k: int = 5) -> tuple[dict, dict]:
    """(headline metrics, per-adjective detail) over one gallery of paired rows (the test originals)."""
    n = len(rgb)
    captions = [str(c) for c in captions]
    rgb_unit = rgb / np.linalg.norm(rgb, axis=1, keepdims=True)
    nearest = np.argmax(text @ rgb_unit.T, axis=1)
    caption_r1 = float(np.mean([captions[j] == captions[i] for i, j in enumerate(nearest)]))
    raw_r1 = float(np.mean(np.argmax(tac @ rgb_unit.T, axis=1) == np.arange(n)))
    word_sets = [_words(c) for c in captions]
    vocabulary = sorted(set().union(*word_sets)) if word_sets else []
    detail: dict[str, dict] = {}
    if vocabulary:
        queries = encode_texts(vocabulary)
        top = np.argsort(-(queries @ rgb_unit.T), axis=1, kind="stable")[:, :min(k, n)]
        for word, hits in zip(vocabulary, top):
            carried = [word in word_sets[j] for j in hits]
            detail[word] = {"P@5": float(np.mean(carried)),
                            "chance": float(np.mean([word in s for s in word_sets])),
                            "top": [captions[j] for j in hits]}
    headline = {
        "gallery": n,
        "caption_to_rgb_R@1": round(caption_r1, 4),
        "adjective_P@5": round(float(np.mean([d["P@5"] for d in detail.values()])), 4) if detail else None,
        "adjective_P@5_chance": round(float(np.mean([d["chance"] for d in detail.values()])), 4) if detail else None,
        "raw_tac_to_rgb_R@1": round(raw_r1, 4),
        "tac_cone": round(mean_pairwise_cosine(tac), 4),
        "rgb_cone": round(mean_pairwise_cosine(rgb), 4),
    }
    return headline, detail
