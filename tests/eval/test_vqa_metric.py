"""VQAv2 accuracy, exact match and GQA accuracy against the official scorers' documented behaviour.

References: GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (``processPunctuation``,
``processDigitArticle``, ``evaluate``, ``setAccuracy``); GQA ``eval.py`` (``predicted == gold``); LLaVA
``scripts/convert_gqa_for_eval.py``; lmms-eval ``tasks/gqa/gqa.yaml`` (exact_match, ignore_case,
ignore_punctuation).
Expected values below are worked out by hand from that code.
"""

from __future__ import annotations

import math

import pytest

from vlmkit.errors import ConfigError, DataError
from vlmkit.eval.metrics.vqa import (
    AnswerScore,
    aggregate_accuracy,
    exact_match,
    gqa_accuracy,
    normalize_exact_match,
    vqa_accuracy,
    vqa_aggregate,
    vqa_normalize_answer,
    vqa_process_digit_article,
    vqa_process_punctuation,
)


def _refs(matching: str, k: int, other: str = "cat", n: int = 10) -> list[str]:
    return [matching] * k + [other] * (n - k)


# --- answer processing ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("yes.", "yes"),                  # period not before a digit is deleted
    ("2.5", "2.5"),                   # period before a digit is kept
    ("3.", "3"),                      # the mistyped look-behind never protects a period after a digit
    (".5", ".5"),
    ("10,000", "10000"),              # digit,digit: every listed mark is deleted
    ("10,000 (approx)", "10000 approx"),
    ("black/white", "black white"),   # mark not next to a space: replaced by a space
    ("red, white", "red white"),      # mark next to a space: deleted
    ("yes!", "yes "),                 # '!' with no space around it becomes a space (stripped later by split)
    ("it's", "it's"),                 # apostrophe is not in the list
    ("12:30", "12:30"),               # colon is not in the list
    ("a-b c- d", "ab c d"),           # "- " occurs in the text, so every "-" is deleted, even in "a-b"
    ("a-b c-", "a b c "),             # no "- " or " -": every "-" becomes a space
    ("a;-b", "a  b"),                 # adjacency is tested on the input, not on the text after ";" -> " "
])
def test_process_punctuation(text: str, expected: str) -> None:
    assert vqa_process_punctuation(text) == expected


def test_process_punctuation_deletes_at_most_32_periods() -> None:
    # Official code passes re.UNICODE (== 32) as re.sub's count argument.
    assert vqa_process_punctuation("." * 40 + "x") == "." * 8 + "x"


@pytest.mark.parametrize(("text", "expected"), [
    ("Two", "2"),
    ("none", "0"),
    ("ten dogs", "10 dogs"),
    ("eleven", "eleven"),             # only none/zero..ten are mapped
    ("a dog", "dog"),
    ("The  Red   Car", "red car"),
    ("an apple", "apple"),
    ("dont know", "don't know"),
    ("isnt", "isn't"),
    ("its", "its"),                   # "its" is not in the contractions table
    ("Im", "im"),                     # capitalised official key can never match after lower-casing
    ("somebody'd", "somebodyd"),      # official table maps this one backwards
])
def test_process_digit_article(text: str, expected: str) -> None:
    assert vqa_process_digit_article(text) == expected


def test_normalize_answer_full_pipeline() -> None:
    assert vqa_normalize_answer("  The two\tdogs.\n") == "2 dogs"
    # "\n" becomes a space before punctuation handling, so " -" is present and every "-" is deleted ...
    assert vqa_normalize_answer("x-y\n-") == "xy"
    # ... and the text is stripped first, so a leading " -" does not count.
    assert vqa_normalize_answer(" -x-y") == "x y"
    assert vqa_normalize_answer("Yes.") == "yes"


# --- per-question accuracy -----------------------------------------------------------------------------

@pytest.mark.parametrize(("k", "expected"), [
    # k of 10 humans gave the predicted answer. Leave-one-out: the k subsets that drop a matching human see
    # k-1 matches, the 10-k others see k; each subset scores min(1, matches/3).
    (0, 0.0),
    (1, (1 * 0 + 9 * (1 / 3)) / 10),          # 0.3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),    # 0.6
    (3, (3 * (2 / 3) + 7 * 1) / 10),          # 0.9: three agreeing humans do NOT give full credit
    (4, (4 * 1 + 6 * 1) / 10),                # 1.0
    (10, 1.0),
])
def test_leave_one_out_accuracy(k: int, expected: float) -> None:
    result = vqa_accuracy("dog", _refs("dog", k))
    assert result.score == pytest.approx(expected, abs=1e-12)
    assert result.parsed


def test_hand_values_are_the_known_ones() -> None:
    assert vqa_accuracy("dog", _refs("dog", 1)).score == pytest.approx(0.3)
    assert vqa_accuracy("dog", _refs("dog", 2)).score == pytest.approx(0.6)
    assert vqa_accuracy("dog", _refs("dog", 3)).score == pytest.approx(0.9)


def test_prediction_is_normalised_against_processed_answers() -> None:
    assert vqa_accuracy("two", _refs("2", 10)).score == 1.0
    assert vqa_accuracy("Two.", _refs("2", 4)).score == 1.0
    assert vqa_accuracy("a dog", _refs("dog", 10)).score == 1.0
    assert vqa_accuracy("Yes.", _refs("yes", 10)).score == 1.0
    assert vqa_accuracy("dont", _refs("don't", 10)).score == 1.0
    assert vqa_accuracy("it's", _refs("it's", 10)).score == 1.0
    assert vqa_accuracy("its", _refs("it's", 10)).score == 0.0
    assert vqa_accuracy("10,000", _refs("10000", 10)).score == 1.0


def test_references_get_punctuation_processing_only_when_they_disagree() -> None:
    # Humans disagree -> "10,000" in the references becomes "10000", matching the prediction.
    assert vqa_accuracy("10000", _refs("10,000", 4, other="many")).score == 1.0
    # All ten identical -> references used raw; "10,000" never equals the processed prediction "10000".
    assert vqa_accuracy("10,000", ["10,000"] * 10).score == 0.0
    # References are never digit-mapped, article-stripped or lower-cased, even when they disagree.
    assert vqa_accuracy("two", ["two"] * 10).score == 0.0
    assert vqa_accuracy("2", _refs("two", 4)).score == 0.0
    assert vqa_accuracy("dog", _refs("a dog", 4)).score == 0.0
    assert vqa_accuracy("yes", _refs("Yes", 4)).score == 0.0


@pytest.mark.parametrize("prediction", [None, 3, "", "   ", "\n\t", "the", "?!.", ["dog"]])
def test_unparsable_prediction_scores_zero(prediction: object) -> None:
    result = vqa_accuracy(prediction, _refs("dog", 10))
    assert result == AnswerScore(0.0, "", False)


def test_references_validated() -> None:
    with pytest.raises(DataError, match="references"):
        vqa_accuracy("dog", [])
    with pytest.raises(DataError, match="single string"):
        vqa_accuracy("dog", "dog")
    with pytest.raises(DataError, match=r"references\[1\]"):
        vqa_accuracy("dog", ["dog", None])


# --- aggregation ---------------------------------------------------------------------------------------

def test_vqa_aggregate_overall_and_per_type() -> None:
    scores = [
        vqa_accuracy("yes", _refs("yes", 10)),   # 1.0
        vqa_accuracy("no", _refs("no", 2)),      # 0.6
        vqa_accuracy("2", _refs("3", 10)),       # 0.0
        vqa_accuracy(None, _refs("red", 10)),    # 0.0, unparsed
    ]
    result = vqa_aggregate(scores, answer_types=["yes/no", "yes/no", "number", "other"],
                           question_types=["is the", "is the", "how many", "what color is the"])
    assert result["accuracy"] == pytest.approx((1.0 + 0.6 + 0.0 + 0.0) / 4)
    assert result["n"] == 4.0
    assert result["n_unparsed"] == 1.0
    assert result["answer_type/yes/no"] == pytest.approx(0.8)
    assert result["answer_type/number"] == 0.0
    assert result["answer_type/other"] == 0.0
    assert result["question_type/is the"] == pytest.approx(0.8)
    assert result["question_type/how many"] == 0.0
    assert set(result) == {"accuracy", "n", "n_unparsed", "answer_type/yes/no", "answer_type/number",
                           "answer_type/other", "question_type/is the", "question_type/how many",
                           "question_type/what color is the"}


def test_aggregate_accepts_floats_and_handles_empty() -> None:
    assert aggregate_accuracy([1.0, 0.0, 0.5])["accuracy"] == pytest.approx(0.5)
    empty = aggregate_accuracy([])
    assert math.isnan(empty["accuracy"]) and empty["n"] == 0.0 and empty["n_unparsed"] == 0.0


def test_aggregate_validates_inputs() -> None:
    with pytest.raises(DataError, match="answer_type"):
        vqa_aggregate([1.0, 0.0], answer_types=["yes/no"])
    with pytest.raises(DataError, match=r"scores\[1\]"):
        aggregate_accuracy([1.0, 1.5])


# --- exact match ---------------------------------------------------------------------------------------

def test_exact_match_light_normalisation() -> None:
    assert normalize_exact_match("  The  Dog. ") == "the dog"
    assert exact_match("Yes.", "yes").score == 1.0
    assert exact_match(" RED ", ["blue", "red"]).score == 1.0
    assert exact_match("a dog", "dog").score == 0.0      # no article removal
    assert exact_match("two", "2").score == 0.0          # no number mapping
    assert exact_match("dog", "dogs").score == 0.0
    assert exact_match(None, "dog") == AnswerScore(0.0, "", False)
    assert exact_match(" . ", "dog") == AnswerScore(0.0, "", False)


# --- GQA -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("prediction", "answer", "convention", "expected"), [
    ("Yes.", "yes", "llava", 1.0),          # strip + rstrip('.') + lower
    (" left \n", "left", "llava", 1.0),
    ("left side", "left", "llava", 0.0),    # no partial credit
    ("The table", "table", "llava", 0.0),   # no article removal
    ("Yes", "yes", "official", 0.0),        # GQA eval.py compares raw strings
    ("yes", "yes", "official", 1.0),
    ("Yes!", "yes", "lmms_eval", 1.0),      # case and punctuation ignored
    ("t-shirt", "tshirt", "lmms_eval", 1.0),
    ("yes ", "yes", "lmms_eval", 0.0),      # lmms-eval does not trim whitespace
])
def test_gqa_conventions(prediction: str, answer: str, convention: str, expected: float) -> None:
    assert gqa_accuracy(prediction, answer, convention=convention).score == expected  # type: ignore[arg-type]


def test_gqa_unparsable_and_bad_arguments() -> None:
    assert gqa_accuracy(None, "yes") == AnswerScore(0.0, "", False)
    assert gqa_accuracy("...", "yes") == AnswerScore(0.0, "", False)
    with pytest.raises(ConfigError, match="convention"):
        gqa_accuracy("yes", "yes", convention="vqa")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="answer"):
        gqa_accuracy("yes", None)  # type: ignore[arg-type]


def test_float_conversion() -> None:
    assert float(vqa_accuracy("dog", _refs("dog", 2))) == pytest.approx(0.6)
