"""The one real tactile data reachable offline: ImageBind-huge embeddings of 46 SSVTP test pairs, their captions
and 138 TouchQA questions (``../shared/real-ssvtp``, see its README).  No images, so what applies is measured
on it, honestly:

* the question and intent mix, and how well the offline intent classifier (the one the chat page and
  ``touchvl ask --offline`` use) reads the real questions;
* answers of the baselines every evaluation reports -- a constant answer, the caption of the nearest raw
  neighbour (ImageBind-huge tactile -> RGB, the question's own pair left out) and its nearest tactile neighbour
  -- against the real reference answers, with an oracle (the item's own caption) as the ceiling;
* raw retrieval on the real geometry (tactile -> RGB R@1 over the 46 pairs, the tactile cone).

    touchvl evaluate-real [--dir ../shared/real-ssvtp]
"""
from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from touchvl import disk
from touchvl.errors import StageError

# the real set's intents -> the labels of ours (qa.INTENTS) that answer them: "judgement" questions ask what the
# material is; its "property" questions ("What are the tactile features of this sample?", "How does the surface
# feel to the touch?") are what we call describe -- or property when they name hardness or roughness
REAL_TO_OURS = {"judgement": ("identify_material",), "comparison": ("compare",), "property": ("describe", "property")}


@dataclass(frozen=True)
class RealSet:
    ids: list[str]
    tac: np.ndarray  # [N, 1024] unit rows
    rgb: np.ndarray
    captions: dict[str, str]
    questions: list[dict]  # index, intent, question, answer


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def load(folder: Path) -> RealSet:
    folder = Path(folder)
    try:
        ids = [str(i) for i in np.load(folder / "test_ids.npy", allow_pickle=False).tolist()]
        tac = _unit(np.load(folder / "test_tac_imagebind_huge.npy", allow_pickle=False).astype(np.float32))
        rgb = _unit(np.load(folder / "test_rgb_imagebind_huge.npy", allow_pickle=False).astype(np.float32))
        with open(folder / "test_captions.csv", encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
        questions = [question for _where, question in disk.read_jsonl(folder / "test_qa_pairs.jsonl")]
    except (OSError, ValueError, KeyError) as exc:
        raise StageError(f"{folder}: not the real SSVTP reference folder ({exc})") from None
    if not (len(ids) == len(tac) == len(rgb) == len(rows)):
        raise StageError(f"{folder}: {len(ids)} ids, {len(tac)} tactile, {len(rgb)} RGB, {len(rows)} captions: not aligned")
    return RealSet(ids, tac, rgb, {i: r["caption"] for i, r in zip(ids, rows)}, questions)


def adjectives(caption: str) -> list[str]:
    return [w.strip().lower() for w in caption.split(",") if w.strip()]


def evaluate(data: RealSet, bert_model: str, bert_layers: int, wordnet_dir: Path | None = None) -> dict:
    from touchvl.answering import keyword_intent
    from touchvl.evaluation import bertscore_setup, score_answer_sets, words

    row = {i: k for k, i in enumerate(data.ids)}
    tac_rgb = data.tac @ data.rgb.T
    tac_tac = data.tac @ data.tac.T
    np.fill_diagonal(tac_tac, -2.0)
    counts = Counter(w for c in data.captions.values() for w in adjectives(c))

    def constant(leave_out: str) -> str:  # the most common adjectives of the OTHER items (leave-one-out)
        left = counts - Counter(adjectives(data.captions[leave_out]))
        return ", ".join(w for w, _ in left.most_common(3))

    def nearest(similarity: np.ndarray, i: str) -> str:
        scores = similarity[row[i]].copy()
        scores[row[i]] = -2.0  # the question's own pair is never its evidence
        return data.captions[data.ids[int(np.argmax(scores))]]

    answerers = {"constant": constant, "nearest_raw_rgb": lambda i: nearest(tac_rgb, i),
                 "nearest_raw_tactile": lambda i: nearest(tac_tac, i), "oracle_own_caption": lambda i: data.captions[i]}
    references = [q["answer"] for q in data.questions]
    vocabulary = {w for c in data.captions.values() for w in words(c)}
    scores = score_answer_sets({name: [answer(str(q["index"])) for q in data.questions] for name, answer in answerers.items()},
                               references, vocabulary, bert_model, bert_layers, wordnet_dir)
    predicted = [keyword_intent(q["question"]) for q in data.questions]
    real = [q["intent"] for q in data.questions]
    right = [p in REAL_TO_OURS.get(r, ()) for p, r in zip(predicted, real)]
    per_intent = {r: round(float(np.mean([ok for ok, x in zip(right, real) if x == r])), 4) for r in sorted(set(real))}
    truth = np.arange(len(data.ids))
    rank = (tac_rgb >= tac_rgb[truth, truth][:, None]).sum(axis=1) - 1
    upper = np.triu_indices(len(data.ids), 1)
    return {
        "items": len(data.ids), "questions": len(data.questions),
        "intent_mix": dict(Counter(q["intent"] for q in data.questions)),
        "intent_classifier": {"accuracy": round(float(np.mean(right)), 4), "by_intent": per_intent,
                              "mapping": {k: list(v) for k, v in REAL_TO_OURS.items()},
                              "confusion": {f"{r}->{p}": n for (r, p), n in sorted(Counter(zip(real, predicted)).items())}},
        "answers_vs_reference": scores, **bertscore_setup(bert_model, bert_layers),
        "raw_retrieval": {"tac_to_rgb_R@1": round(float(np.mean(rank < 1)), 4), "tac_to_rgb_R@5": round(float(np.mean(rank < 5)), 4),
                          "tactile_cone": round(float(tac_tac[upper].mean()), 4),
                          "rgb_cone": round(float((data.rgb @ data.rgb.T)[upper].mean()), 4)},
    }
