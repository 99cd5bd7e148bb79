"""POPE metric: parsing rules of the official evaluate.py (RUCAIBox/POPE, LLaVA eval_pope) and hand-computed metrics."""

from __future__ import annotations

import pytest

from vlmkit.errors import DataError
from vlmkit.eval.metrics.pope import parse_pope_answer, pope_metrics, score_pope


@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is no dog.", "no"),
    ("no", "no"),
    ("no.", "no"),  # first sentence is "no"
    ("There is not a dog in the image", "no"),
    ("Yes. There is no dog.", "yes"),  # only the first sentence counts
    ("There is no dog. Yes, I am sure.", "no"),
    (" No", "no"),  # leading space gives an empty first word, "No" is still a word
    ("No, ", "no"),  # the comma is deleted
    # Quirks of the official rule, kept because they change published numbers:
    ("", "yes"),  # empty answer: no negative word -> yes
    ("NO", "yes"),  # only "No", "no", "not" match, case-sensitively
    ("Not really", "yes"),
    ("There isn't a dog", "yes"),
    ("Nope", "yes"),
    ("No!", "yes"),  # only "." ends a sentence, so "No!" is not the word "No"
    ("No\nthere is none", "yes"),  # words are split on single spaces only
    ("No,there is none", "yes"),  # commas are deleted, not replaced by a space -> "Nothere"
    (".no", "yes"),  # first sentence is empty
    ("Yes there is, no doubt.", "no"),  # any negative word in the first sentence wins
])
def test_parse_pope_answer_follows_official_rule(text, expected):
    assert parse_pope_answer(text) == expected


def test_non_string_prediction_is_an_error_naming_the_type():
    with pytest.raises(DataError, match="string"):
        parse_pope_answer(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("label", ["maybe", "", "1", None])
def test_bad_label_is_rejected(label):
    with pytest.raises(DataError, match="'label'"):
        score_pope("yes", label)


def test_label_case_and_spaces_are_ignored():
    assert score_pope("Yes", " YES ").correct
    assert score_pope("No", "No").score == 1.0


def _samples():
    return [
        # random: TP=2 FP=1 TN=1 FN=1
        ("Yes, there is.", "yes", "random"),  # TP
        ("No.", "yes", "random"),  # FN
        ("There is no cat.", "no", "random"),  # TN
        ("Yes.", "no", "random"),  # FP
        ("Yes", "yes", "random"),  # TP
        # adversarial: TP=0 FP=0 TN=2 FN=1
        ("No", "no", "adversarial"),  # TN
        ("no", "no", "adversarial"),  # TN
        ("not sure", "yes", "adversarial"),  # FN
    ]


def test_metrics_match_hand_computed_confusion_matrices():
    m = pope_metrics(score_pope(p, l, s) for p, l, s in _samples())
    # pooled: TP=2 FP=1 TN=3 FN=2, n=8
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"]) == (2, 1, 3, 2, 8)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(4 / 7)  # 2 * (2/3) * (1/2) / (2/3 + 1/2)
    assert m["yes_ratio"] == pytest.approx(3 / 8)
    # random split
    assert (m["random/tp"], m["random/fp"], m["random/tn"], m["random/fn"]) == (2, 1, 1, 1)
    assert m["random/accuracy"] == pytest.approx(3 / 5)
    assert m["random/precision"] == pytest.approx(2 / 3)
    assert m["random/recall"] == pytest.approx(2 / 3)
    assert m["random/f1"] == pytest.approx(2 / 3)
    assert m["random/yes_ratio"] == pytest.approx(3 / 5)
    # adversarial split: no "yes" answer -> precision 0/0, reported as 0 (the official script would crash)
    assert m["adversarial/accuracy"] == pytest.approx(2 / 3)
    assert (m["adversarial/precision"], m["adversarial/recall"], m["adversarial/f1"]) == (0.0, 0.0, 0.0)
    assert m["adversarial/yes_ratio"] == 0.0
    # unweighted mean over splits
    assert m["split_mean/f1"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["split_mean/accuracy"] == pytest.approx((3 / 5 + 2 / 3) / 2)
    assert "popular/f1" not in m


def test_without_splits_only_pooled_keys():
    m = pope_metrics([score_pope("Yes", "yes"), score_pope("No", "yes")])
    assert not any("/" in key for key in m)
    assert m["accuracy"] == 0.5 and m["precision"] == 1.0 and m["recall"] == 0.5
    assert m["f1"] == pytest.approx(2 / 3)


def test_no_positive_labels_gives_zero_recall_and_f1():
    m = pope_metrics([score_pope("Yes", "no"), score_pope("No", "no")])  # TP=0 FP=1 TN=1 FN=0
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert m["accuracy"] == 0.5 and m["yes_ratio"] == 0.5


def test_implicit_yes_is_counted_but_scored_as_yes():
    results = [score_pope("", "yes"), score_pope("I think so!", "no"), score_pope("Yes!", "yes"),
               score_pope("No", "no")]
    assert [r.prediction for r in results] == ["yes", "yes", "yes", "no"]
    assert [r.implicit_yes for r in results] == [True, True, False, False]
    m = pope_metrics(results)
    assert m["n_implicit_yes"] == 2
    assert m["accuracy"] == pytest.approx(3 / 4)


def test_empty_input_is_an_error():
    with pytest.raises(DataError, match="at least one"):
        pope_metrics([])
