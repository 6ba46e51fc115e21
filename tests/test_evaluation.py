"""The evaluate stage's scoring functions on known inputs, exact numbers (no pipeline, no model)."""
import numpy as np
import pytest
from scipy.stats import wilcoxon

from touchvl.evaluation import adjective_prf, paired_comparison

VOCAB = {"smooth", "glossy", "hard", "rough", "soft", "coarse", "cold"}


@pytest.mark.parametrize(("prediction", "reference", "expected"), [
    ("smooth, glossy, hard", "smooth, glossy, hard", (1.0, 1.0, 1.0)),
    ("rough, soft", "smooth, glossy", (0.0, 0.0, 0.0)),
    # 1 of 2 said is right, 1 of 2 expected is said: words outside the vocabulary ("it", "feels") are ignored
    ("It feels smooth and rough.", "smooth, glossy", (0.5, 0.5, 0.5)),
    # 1 of 3 said is right, 1 of 2 expected is said: F1 = 2 * (1/3 * 1/2) / (1/3 + 1/2) = 0.4
    ("smooth, hard, cold", "smooth, glossy", (1 / 3, 0.5, 0.4)),
    # 2 of 2 said are right, 2 of 4 expected: F1 = 2 * (1 * 1/2) / (3/2) = 2/3
    ("Smooth and HARD", "smooth, hard, glossy, cold", (1.0, 0.5, 2 / 3)),
    # sets, not counts: repeating a right word does not raise precision or recall
    ("smooth smooth smooth", "smooth, glossy", (1.0, 0.5, 2 / 3)),
    # exact words: a synonym is a miss (METEOR credits it, this metric does not)
    ("coarse", "rough", (0.0, 0.0, 0.0)),
    ("coarse, hard", "rough, hard", (0.5, 0.5, 0.5)),
    # an answer naming no vocabulary adjective, an empty answer, a reference naming none: all zero
    ("I cannot tell", "smooth, glossy", (0.0, 0.0, 0.0)),
    ("", "smooth, glossy", (0.0, 0.0, 0.0)),
    ("smooth", "", (0.0, 0.0, 0.0)),
    ("", "", (0.0, 0.0, 0.0)),
])
def test_adjective_precision_recall_f1_on_known_pairs(prediction, reference, expected):
    assert adjective_prf(prediction, reference, VOCAB) == pytest.approx(expected, abs=1e-12)


def test_a_word_outside_the_vocabulary_is_not_an_adjective():
    # "shiny" is in no caption: saying it neither helps nor hurts, however the reference reads
    assert adjective_prf("shiny, smooth", "shiny, smooth, hard", VOCAB) == pytest.approx((1.0, 0.5, 2 / 3))


def test_paired_comparison_p_value_is_scipys_wilcoxon_on_the_pairs_rated_by_both():
    a = [7, 8, None, 6, 9, 5, 7, 8, 6, 9]
    b = [5, 8, 4, 7, 6, 5, 3, None, 1, 2]
    # by hand: the pairs rated by both (items 3 and 8 dropped), their differences, zeros dropped by the test
    x = np.array([7, 8, 6, 9, 5, 7, 6, 9], dtype=float)
    y = np.array([5, 8, 7, 6, 5, 3, 1, 2], dtype=float)
    result = paired_comparison(a, b)
    assert (result["pairs"], result["wins"], result["ties"], result["losses"]) == (8, 5, 2, 1)
    assert result["mean_difference"] == pytest.approx(np.mean(x - y)) == pytest.approx(2.5)
    expected = wilcoxon(x, y, zero_method="wilcox", alternative="two-sided").pvalue
    assert result["p_value"] == pytest.approx(expected, abs=1e-6) and 0.0 < result["p_value"] < 1.0
    assert result["test"] == "wilcoxon signed-rank, two-sided"


def test_paired_comparison_exact_p_value_and_the_degenerate_cases():
    # five wins of distinct sizes: the exact two-sided p is 2 / 2**5 (only all-plus or all-minus is as extreme)
    assert paired_comparison([2, 3, 4, 5, 6], [1, 1, 1, 1, 1])["p_value"] == pytest.approx(0.0625, abs=1e-6)
    assert paired_comparison([1, 1, 1, 1, 1], [2, 3, 4, 5, 6])["p_value"] == pytest.approx(0.0625, abs=1e-6)
    # every pair tied: no test to run, said as None rather than a made-up p
    tied = paired_comparison([5, 6, 7], [5, 6, 7])
    assert (tied["ties"], tied["p_value"], tied["mean_difference"]) == (3, None, 0.0)
    # nothing rated by both: no pairs, no mean, no p
    empty = paired_comparison([None, 3], [4, None])
    assert (empty["pairs"], empty["mean_difference"], empty["p_value"]) == (0, None, None)
