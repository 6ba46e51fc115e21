"""The headline metrics: few keys, numbers only, computed from the detailed files the stages write."""
import json
import subprocess
import sys
from pathlib import Path

import yaml

from touchvl import headline
from touchvl.params import parse_params


def _numeric(row: dict) -> bool:
    return all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in row.values())


def test_each_question_gets_a_few_numeric_keys():
    data = headline.data({"candidates": 200, "good": 190, "quarantined": 10, "bad_fraction": 0.05,
                          "by_reason": {"duplicate_id": 4, "corrupt_image": 6}})
    assert data == {"pairs": 190, "quar": 0.05}
    encoder = headline.encoder({"adjective_P@5": 0.46667, "adjective_P@5_chance": 0.2556, "tac_cone": 0.59183,
                                "caption_to_rgb_R@1": 0.1})
    assert encoder == {"text_p5": 0.467, "chance": 0.256, "cone": 0.592}
    detailed = {"projector_hash": "6de1a4e930ec8c40", "test_queries": 60,
                "raw": {"tac_to_rgb": {"R@1": 1 / 60, "R@5": 0.05}},
                "projected": {"tac_to_rgb": {"R@1": 4 / 60, "R@5": 13 / 60}}}
    assert headline.retrieval(detailed) == {"raw_r1": 0.017, "proj_r1": 0.067}
    evaluation = {"answerer": "retrieval", "prompt": "This image gives tactile feelings of?", "adjective_f1": 0.3982,
                  "bertscore_f1": 0.7272, "meteor": 0.2429, "gpt_judge": "skipped (no API key)",
                  "baselines": {"constant": {"adjective_f1": 0.4235}}}
    answers = headline.answers(evaluation)
    assert answers == {"adj_f1": 0.398, "const_f1": 0.423, "meteor": 0.243, "bert_f1": 0.727}
    judged = headline.answers({**evaluation, "gpt_judge": {"model": "gpt-4o-2024-08-06", "mean": 6.254, "scored": 60}})
    assert judged["judge"] == 6.25
    for row in (data, encoder, answers, judged):
        assert _numeric(row) and len(row) <= 5  # strings, hashes and prompts stay in the detailed files


def test_cost_is_the_fine_tuned_datasets_training_file():
    summary = {"tactile_train": {"examples": 1500, "cost_usd": 0.70312}, "tactile_val": {"cost_usd": 0.14},
               "rgb_tac_train": {"examples": 600, "cost_usd": 2.5}}
    assert headline.cost(summary, "tactile") == {"usd": 0.7}
    assert headline.cost(summary, "rgb_tac") == {"usd": 2.5}
    assert headline.cost({"tactile_train": {"cost_usd": None}}, "tactile") == {"usd": None}  # no published price


def test_the_widest_headline_fits_160_columns_in_dvc_metrics_show(tmp_path):
    """Every key present (METEOR computed, the judge ran), the widest plausible values: DVC's own table."""
    params = parse_params({})
    rows = {
        params.prepare.headline: headline.data({"good": 123456, "bad_fraction": 0.123456}),
        params.embed.headline: headline.encoder({"adjective_P@5": 0.123456, "adjective_P@5_chance": 0.123456,
                                                 "tac_cone": 0.123456}),
        params.projector.headline: headline.retrieval({"raw": {"tac_to_rgb": {"R@1": 0.123456}},
                                                       "projected": {"tac_to_rgb": {"R@1": 0.123456}}}),
        params.jsonl.headline: headline.cost({"tactile_train": {"cost_usd": 1234.5678}}, "tactile"),
        params.evaluate.headline: headline.answers({"adjective_f1": 0.123456, "meteor": 0.123456,
                                                    "bertscore_f1": 0.123456, "gpt_judge": {"mean": 10.0},
                                                    "baselines": {"constant": {"adjective_f1": 0.123456}}}),
    }
    assert "judge" in rows[params.evaluate.headline] and None not in {v for r in rows.values() for v in r.values()}
    for path, row in rows.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(json.dumps(row))
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"metrics": [str(p) for p in rows]}))
    dvc = str(Path(sys.executable).parent / "dvc")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    shown = subprocess.run([dvc, "metrics", "show"], cwd=tmp_path, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == 6 and all(key in lines[0] for row in rows.values() for key in row), shown.stdout
    assert max(len(line) for line in lines) <= 160, shown.stdout
