"""The headline metrics: one small numeric file per question a researcher asks, short keys, so that
``dvc metrics show`` (and ``dvc exp show``) fit on a screen. The detailed files each stage writes (every R@k in
both directions, per-reason counts, prompts, hashes, strings) stay beside them as cached non-metric outputs.

=====================  ============================================================================
file (DVC metric)      keys
=====================  ============================================================================
``data.json``          ``pairs`` kept, ``quar`` quarantined / candidates (duplicates: a reason in the detail)
``encoder.json``       ``text_p5`` adjective search P@5, ``chance`` a random photo's P@5, ``cone`` (tactile cone)
``retrieval.json``     tactile->RGB R@1 on the test ids: ``raw_r1``, ``proj_r1`` (R@5/10: the detail)
``cost.json``          ``usd``: the estimated price of fine-tuning on ``finetune.dataset``'s training file
                       (every epoch, at ``jsonl.prices_per_million``; the per-file figures: jsonl's summary.json)
``answers.json``       ``adj_f1`` the answerer, ``const_f1`` a constant answer, ``meteor``, ``bert_f1``,
                       ``judge`` (GPT judge mean, only when it ran)
=====================  ============================================================================

Rates keep 3 decimals and dollars 2: every column is then as narrow as its key, and the worst case (every key,
the judge too, a four-figure price) stays within 160 columns, which ``tests/test_headline.py`` checks with DVC.
"""
from __future__ import annotations


def _r(value, digits: int = 3):
    return None if value is None else round(float(value), digits)


def data(summary: dict) -> dict:
    return {"pairs": int(summary.get("good", 0)), "quar": _r(summary.get("bad_fraction", 0.0))}


def encoder(metrics: dict) -> dict:
    return {"text_p5": _r(metrics.get("adjective_P@5")), "chance": _r(metrics.get("adjective_P@5_chance")),
            "cone": _r(metrics.get("tac_cone"))}


def retrieval(metrics: dict) -> dict:
    return {"raw_r1": _r(metrics["raw"]["tac_to_rgb"]["R@1"]), "proj_r1": _r(metrics["projected"]["tac_to_rgb"]["R@1"])}


def cost(summary: dict, dataset: str) -> dict:
    return {"usd": _r(summary[f"{dataset}_train"]["cost_usd"], 2)}


def answers(metrics: dict) -> dict:
    row = {"adj_f1": _r(metrics["adjective_f1"]), "const_f1": _r(metrics["baselines"]["constant"]["adjective_f1"]),
           "meteor": _r(metrics.get("meteor")), "bert_f1": _r(metrics["bertscore_f1"])}
    judge = metrics.get("gpt_judge")
    if isinstance(judge, dict) and judge.get("mean") is not None:
        row["judge"] = _r(judge["mean"], 2)
    return row
