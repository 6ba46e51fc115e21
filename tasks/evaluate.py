"""DVC stage ``evaluate``: answers for the test split scored against the reference captions.

Answerers (``evaluate.answerer``): ``retrieval`` (adjectives voted by the top-k retrieved neighbours' captions:
the offline default), ``chat`` (TouchQA with the base model) and ``finetuned`` (TouchQA with
``artifacts/finetune/model.json``).  Writes ``artifacts/metrics/eval.json`` and ``eval_predictions.csv``
(metrics: touchvl.evaluation).
"""
from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd

from touchvl import disk, headline
from touchvl.devices import apply_threads
from touchvl.errors import StageError
from touchvl.evaluation import (adjective_prf, bertscore_setup, constant_answer, judge, neighbour_answers, paired_comparison,
                                retrieval_answer, score_answer_sets, tune_prior_weight, validation_tables, word_prior, words)
from touchvl.finetune.remote import KEY_VARS, api_errors
from touchvl import checks  # light: Great Expectations is imported only when it runs
from touchvl.logs import run_stage
from touchvl.params import Params

log = logging.getLogger(__name__)


def run(params: Params) -> dict:
    from touchvl.qa import TouchQAModel

    p = params.evaluate
    apply_threads(p.threads)
    manifest = disk.read_manifest(params.prepare.out_dir / "manifest.csv")
    test = disk.evaluation_rows(manifest)
    vocabulary = {w for c in manifest["caption"] for w in words(c)}
    if p.answerer == "finetuned" and not (params.finetune.out_dir / "model.json").is_file():
        raise StageError("evaluate.answerer=finetuned but artifacts/finetune/model.json does not exist (submit a job first)")
    qa = TouchQAModel(params)
    if p.answerer == "chat":
        qa.model = params.qa.base_model
    def neighbour_captions(row) -> list[str]:
        # the query's own pair is in the database: leave it out, or the answer would be read off it
        return [h.caption for h in qa.retrieve(row.tac_path, row.sensor_id, p.retrieval_k, exclude_source=row.source_id)]

    originals = manifest[(manifest["split"] == "train") & (manifest["copy"] == 0)]
    prior = word_prior(originals["caption"].astype(str).tolist())
    weight, curve = prior_weight(params, originals, vocabulary, prior, neighbour_captions)
    predictions, retrieved = [], []
    for row in test.itertuples():
        retrieved.append(retrieval_answer(neighbour_captions(row), p.retrieval_k, prior, weight))
        if p.answerer == "retrieval":
            predictions.append(retrieved[-1])
        else:
            predictions.append(qa.answer(row.tac_path, p.prompt, row.sensor_id, exclude_source=row.source_id).text)
    # the answerer and the baselines scored together: one BERTScore call embeds the references once for all four
    baseline_sets = baseline_answers(params, manifest, test)
    scores = score_answer_sets({"answerer": predictions, **baseline_sets}, test["caption"].tolist(), vocabulary,
                               p.bertscore_model, p.bertscore_layers, p.wordnet_dir)
    metrics = {"answerer": p.answerer, "model": None if p.answerer == "retrieval" else qa.model, "prompt": p.prompt,
               **scores["answerer"], **bertscore_setup(p.bertscore_model, p.bertscore_layers),
               "retrieval_prior_weight": weight,
               "retrieval_prior_curve": None if curve is None else {str(w): f1 for w, f1 in curve.items()}}
    metrics["baselines"] = {name: {key: scores[name][key] for key in BASELINE_SCORES} for name in baseline_sets}
    log.info("baselines (constant answer %r): %s", baseline_sets["constant"][0], metrics["baselines"])
    # is the answerer's lead over the constant answer more than noise? per item, paired (Wilcoxon signed-rank)
    constant = constant_answer(manifest[manifest["split"] == "train"]["caption"].astype(str).tolist())
    per_item = lambda answers: [adjective_prf(a, ref, vocabulary)[2] for a, ref in zip(answers, test["caption"])]  # noqa: E731
    metrics["adjective_f1_vs_constant"] = paired_comparison(per_item(predictions), per_item([constant] * len(test)))
    if p.judge == "auto" and os.environ.get(KEY_VARS[params.finetune.provider]):
        answerers = {p.answerer: predictions}
        if p.answerer != "retrieval":  # the offline baseline, judged on the same items: a paired comparison
            answerers["retrieval"] = retrieved
        items = [(name, int(uid), answer, ref) for name, answers in answerers.items()
                 for uid, answer, ref in zip(test["uid"], answers, test["caption"])]
        log_path = p.judge_log
        with api_errors(params.finetune.provider):
            ratings = judge(qa.client, p.judge_model, items, log_path)
        per = {name: [ratings[(name, int(uid))] for uid in test["uid"]] for name in answerers}
        valid = [r for r in per[p.answerer] if r is not None]
        metrics["gpt_judge"] = {"model": p.judge_model, "mean": round(float(np.mean(valid)), 3) if valid else None,
                                "scored": len(valid), "ratings": str(log_path)}
        if "retrieval" in per and p.answerer != "retrieval":
            metrics["gpt_judge"]["vs_retrieval"] = paired_comparison(per[p.answerer], per["retrieval"])
    else:
        metrics["gpt_judge"] = "skipped (no API key)" if p.judge == "auto" else "off"
    frame = pd.DataFrame({"uid": test["uid"], "reference": test["caption"], "prediction": predictions})
    checks.run_validation("evaluate", validation_tables(frame, test["uid"].tolist(), metrics), params.validation).raise_if_failed()
    disk.write_json(p.metrics, metrics)
    disk.write_json(p.headline, headline.answers(metrics))
    disk.write_csv(p.metrics.with_name("eval_predictions.csv"), frame)
    return metrics


def prior_weight(params: Params, train_originals, vocabulary: set[str], prior: dict[str, float], neighbour_captions):
    """``evaluate.prior_weight``, or with ``auto`` the weight that scores best on the train source ids the projector
    held out (``projector.val_fraction``): chosen on held-out training items, never on the test split."""
    from touchvl.projector.pairs import validation_holdout

    p = params.evaluate
    if p.prior_weight != "auto":
        return float(p.prior_weight), None
    held = train_originals[validation_holdout(train_originals["source_id"].to_numpy(), params.projector.val_fraction)]
    if held.empty:
        log.warning("evaluate.prior_weight=auto: no held-out training item to choose it on; using 0 (neighbours only)")
        return 0.0, None
    captions = [neighbour_captions(row) for row in held.itertuples()]
    weight, curve = tune_prior_weight(captions, held["caption"].astype(str).tolist(), p.retrieval_k, prior, vocabulary)
    log.info("retrieval answerer: prior weight %.1f (adjective F1 on %d held-out training items by weight: %s)",
             weight, len(held), curve)
    return weight, curve


BASELINE_SCORES = ("adjective_f1", "bertscore_f1", "meteor", "bleu")


def baseline_answers(params: Params, manifest, test) -> dict[str, list[str]]:
    """The same test items answered three ways, side by side: a constant answer (the training captions' most
    used adjectives), the captions of the nearest RGB photos to the *raw* tactile vector (no projector), and to
    the projected one (the pipeline). An answerer that does not beat the first two has learnt nothing."""
    train = manifest[manifest["split"] == "train"]
    k = params.evaluate.retrieval_k
    rgb, rgb_ids = disk.read_vectors(params.embed.out_dir / "embeddings_rgb")
    by_uid = manifest.set_index("uid")
    gallery_sources = by_uid.loc[rgb_ids, "source_id"].to_numpy()
    gallery_captions = by_uid.loc[rgb_ids, "caption"].astype(str).tolist()
    answers = {"constant": [constant_answer(train["caption"].astype(str).tolist())] * len(test)}
    for name, folder in (("raw_neighbour", params.embed.out_dir / "embeddings_tac"),
                         ("projected_neighbour", params.projector.projected_dir)):
        vectors, ids = disk.read_vectors(folder)
        pos = {int(u): i for i, u in enumerate(ids)}
        queries = vectors[[pos[int(u)] for u in test["uid"]]]
        answers[name] = neighbour_answers(queries, test["source_id"].to_numpy(), rgb,
                                          gallery_sources, gallery_captions, k)
    return answers


def main(argv: list[str] | None = None) -> None:
    run_stage("evaluate", __doc__, lambda params, args: log.info("evaluate: %s", run(params)), argv, start=checks.stage_starts)


if __name__ == "__main__":
    main()
