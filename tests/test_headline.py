"""The headline metrics: few keys, numbers only, computed from the detailed files the stages write."""
from touchvl import headline


def _numeric(row: dict) -> bool:
    return all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in row.values())


def test_each_question_gets_a_few_numeric_keys():
    data = headline.data({"candidates": 200, "good": 190, "quarantined": 10, "bad_fraction": 0.05,
                          "by_reason": {"duplicate_id": 4, "corrupt_image": 6}})
    assert data == {"pairs": 190, "quar_rate": 0.05}
    encoder = headline.encoder({"adjective_P@5": 0.46667, "adjective_P@5_chance": 0.2556, "tac_cone": 0.59183,
                                "caption_to_rgb_R@1": 0.1})
    assert encoder == {"text_p5": 0.4667, "p5_chance": 0.2556, "tac_cone": 0.5918}
    detailed = {"projector_hash": "6de1a4e930ec8c40", "test_queries": 60,
                "raw": {"tac_to_rgb": {"R@1": 1 / 60, "R@5": 0.05}},
                "projected": {"tac_to_rgb": {"R@1": 4 / 60, "R@5": 13 / 60}}}
    assert headline.retrieval(detailed) == {"raw_r1": 0.0167, "proj_r1": 0.0667}
    evaluation = {"answerer": "retrieval", "prompt": "This image gives tactile feelings of?", "adjective_f1": 0.3982,
                  "bertscore_f1": 0.7272, "meteor": 0.2429, "gpt_judge": "skipped (no API key)",
                  "baselines": {"constant": {"adjective_f1": 0.4235}}}
    answers = headline.answers(evaluation)
    assert answers == {"adj_f1": 0.3982, "const_f1": 0.4235, "meteor": 0.2429, "bertscore": 0.7272}
    judged = headline.answers({**evaluation, "gpt_judge": {"model": "gpt-4o-2024-08-06", "mean": 6.25, "scored": 60}})
    assert judged["judge"] == 6.25
    for row in (data, encoder, answers, judged):
        assert _numeric(row) and len(row) <= 5  # strings, hashes and prompts stay in the detailed files


def test_cost_is_the_fine_tuned_datasets_training_file():
    summary = {"tactile_train": {"examples": 1500, "cost_usd": 0.70312}, "tactile_val": {"cost_usd": 0.14},
               "rgb_tac_train": {"examples": 600, "cost_usd": 2.5}}
    assert headline.cost(summary, "tactile") == {"usd": 0.7031}
    assert headline.cost(summary, "rgb_tac") == {"usd": 2.5}
    assert headline.cost({"tactile_train": {"cost_usd": None}}, "tactile") == {"usd": None}  # no published price
