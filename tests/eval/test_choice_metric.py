"""Multiple-choice letter extraction and accuracy, checked against the official scorers' behaviour.

Expected letters are worked out by hand from the reference code: MMMU ``eval/eval_utils.py::
parse_multi_choice_response``, VLMEvalKit ``vlmeval/utils/matching_util.py::can_infer`` (MMBench) and LLaVA
``llava/eval/eval_science_qa.py`` (ScienceQA). Where the official MMMU code would pick a random letter, the
expected value is None (documented difference).
"""

from __future__ import annotations

import pytest

from vlmkit.eval.metrics.choice import (
    ChoiceResult,
    choice_accuracy,
    circular_accuracy,
    circular_rotations,
    extract_choice,
    normalize_options,
    parse_choice_mmbench,
    parse_choice_mmmu,
    parse_choice_scienceqa,
    score_choice,
)

CAPITALS = {"A": "London", "B": "Paris", "C": "Berlin", "D": "Rome"}  # key: B


# --------------------------------------------------------------------------------------------------- MMMU
@pytest.mark.parametrize("prediction, expected", [
    ("(B) because the capital of France is Paris.", "B"),   # tier 1: bracketed letter
    ("The answer is C.", "C"),                              # trailing '.' stripped, then " C "
    ("I think it's the second option: Paris", "B"),         # no letter, > 5 words: option text
    ("B!", "B"),                                            # '!' stripped from the end
    ("'C'", "C"),                                           # quotes stripped from both ends
    ("B. Paris", "B"),                                      # "B." tier
    ("B\n", "B"),                                           # surrounding whitespace stripped first
    ("A is tempting, but B is right", "B"),                 # two letters: the last occurrence wins
    ("(A) or (B)? I pick (A)", "A"),                        # last occurrence of the bracketed form
    ("(A) is wrong; the answer is B", "A"),                 # a bracketed letter outranks a bare one
    ("It is not London, it is clearly Paris", "B"),         # two option texts: the last one wins
    ("Paris, not London, and Paris once more", "B"),        # last *occurrence* (rfind), not first
    ("a", None),                                            # lower case is not a letter; official: random
    ("I don't know", None),                                 # nothing found; official: random
    ("Paris", None),                                        # text only counts in responses over 5 words
    ("", None),
    (None, None),
])
def test_mmmu_extraction(prediction, expected):
    assert parse_choice_mmmu(prediction, CAPITALS) == expected


def test_mmmu_period_tier_needs_a_word_start():
    # lmms-eval's bare "A." substring reads "DNA." as option A; here only a letter starting a word counts.
    options = ["one strand", "two strands", "three strands", "four strands"]
    assert parse_choice_mmmu("The DNA. It has a double helix shape", options) is None
    assert parse_choice_mmmu("It has a double helix shape, so B. two strands", options) == "B"


def test_mmmu_text_candidates_ordered_by_start_of_last_match():
    # Official: rfind of each option text, argmax. "red" occurs last (inside "dark red"): it beats "dark red".
    options = {"A": "red", "B": "dark red", "C": "blue"}
    assert parse_choice_mmmu("the colour of this car is dark red today", options) == "A"


# ------------------------------------------------------------------------------------------------ MMBench
@pytest.mark.parametrize("prediction, expected", [
    ("(B) because the capital of France is Paris.", "B"),   # the only option letter among the tokens
    ("The answer is C.", "C"),
    ("I think it's the second option: Paris", "B"),         # no letter: exactly one option text
    ("B. Paris", "B"),
    ("A is tempting, but B is right", None),                # two letters and no option text: ambiguous
    ("A or B, it is Paris", "B"),                           # two letters fall through to text matching
    ("A or B? It is Paris", "A"),                           # '?' is not a separator: "B?" is no letter
    ("London or Paris", None),                              # two option texts: ambiguous
    ("a", None),                                            # lower case is not a letter
    ("A cat sits on the mat", "A"),                         # VLMEvalKit's known "quantifier" reading
    ("Z", None),                                            # 'Z': none of the options
    ("Z, none fit, not even Rome", None),                   # a lone Z stops before text matching
    ("Cannot determine the answer, maybe B", None),         # refusal phrase wins over the letter
    ("Well, considering everything about European geography: Paris", None),  # > 2x total option length
    ("", None),
    (None, None),
])
def test_mmbench_extraction(prediction, expected):
    assert parse_choice_mmbench(prediction, CAPITALS) == expected


# ---------------------------------------------------------------------------------------------- ScienceQA
@pytest.mark.parametrize("prediction, expected", [
    ("B", "B"),
    ("B. Paris", "B"),
    ("The answer is C.", "C"),
    ("Because of X. The answer is C.", "C"),
    ("The answer is C", None),                               # regex needs one character after the letter
    ("The answer is A. No wait. The answer is B.", None),    # two matches
    ("The answer is A. No wait, the answer is B.", "A"),    # the regex is case-sensitive: one match
    ("The answer is E.", None),                              # not an option of this question
    ("(B) because the capital of France is Paris.", None),  # not a form LLaVA's scorer accepts
    ("I think it's the second option: Paris", None),
    ("b", None),
    (None, None),
])
def test_scienceqa_extraction(prediction, expected):
    assert parse_choice_scienceqa(prediction, CAPITALS) == expected


def test_extract_choice_dispatches_and_rejects_unknown_style():
    text = "A is tempting, but B is right"
    assert extract_choice(text, CAPITALS, style="mmmu") == "B"
    assert extract_choice(text, CAPITALS, style="mmbench") is None
    with pytest.raises(ValueError, match="style"):
        extract_choice(text, CAPITALS, style="mmlu")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ options
def test_normalize_options_letters_a_list_and_keeps_a_mapping():
    assert normalize_options(["x", "y", "z"]) == {"A": "x", "B": "y", "C": "z"}
    assert list(normalize_options({"B": "y", "A": "x"})) == ["B", "A"]


@pytest.mark.parametrize("options, error", [
    (["only"], ValueError),
    ({"a": "x", "b": "y"}, ValueError),
    ({"AB": "x", "C": "y"}, ValueError),
    (["x", 3], TypeError),
    ("ABCD", TypeError),
])
def test_normalize_options_rejects_malformed(options, error):
    with pytest.raises(error, match="options"):
        normalize_options(options)


# ---------------------------------------------------------------------------------------------- scoring
def test_score_choice_result():
    hit = score_choice("The answer is B.", CAPITALS, "B", style="mmbench")
    assert (hit.predicted, hit.correct, hit.parsed, hit.score, hit.n_options) == ("B", True, True, 1.0, 4)
    miss = score_choice("C", CAPITALS, "B", style="scienceqa")
    assert (miss.correct, miss.parsed, miss.score) == (False, True, 0.0)
    unparsed = score_choice("no idea", CAPITALS, "B", style="mmmu")
    assert (unparsed.predicted, unparsed.correct, unparsed.parsed) == (None, False, False)
    assert unparsed.score == 0.0


def test_score_choice_rejects_an_answer_that_is_not_an_option():
    with pytest.raises(ValueError, match="answer"):
        score_choice("B", CAPITALS, "E", style="mmmu")


def test_choice_accuracy_counts_unparsable_as_wrong_and_reports_them():
    preds = ["(B)", "C", "hmm", "", "Paris is the one I would choose here"]
    results = [score_choice(p, CAPITALS, "B", style="mmmu") for p in preds]
    assert [r.predicted for r in results] == ["B", "C", None, None, "B"]
    assert choice_accuracy(results) == {"accuracy": 2 / 5, "n": 5, "n_correct": 2, "n_unparsable": 2,
                                        "unparsable_rate": 2 / 5}


def test_choice_accuracy_empty():
    assert choice_accuracy([]) == {"accuracy": 0.0, "n": 0, "n_correct": 0, "n_unparsable": 0,
                                   "unparsable_rate": 0.0}


# ------------------------------------------------------------------------------------------ CircularEval
def test_circular_rotations_four_options_by_hand():
    rotations = circular_rotations({"A": "dog", "B": "cat", "C": "pig", "D": "fox"}, "B")
    shown = [(r.shift, list(r.options.values()), r.answer) for r in rotations]
    assert shown == [
        (0, ["dog", "cat", "pig", "fox"], "B"),
        (1, ["cat", "pig", "fox", "dog"], "A"),
        (2, ["pig", "fox", "dog", "cat"], "D"),
        (3, ["fox", "dog", "cat", "pig"], "C"),
    ]
    assert all(list(r.options) == ["A", "B", "C", "D"] for r in rotations)
    assert all(r.options[r.answer] == "cat" for r in rotations)


def test_circular_rotations_three_options_by_hand():
    rotations = circular_rotations(["x", "y", "z"], "C")
    assert [(r.options, r.answer) for r in rotations] == [
        ({"A": "x", "B": "y", "C": "z"}, "C"),
        ({"A": "y", "B": "z", "C": "x"}, "B"),
        ({"A": "z", "B": "x", "C": "y"}, "A"),
    ]


def test_circular_rotations_rejects_bad_answer():
    with pytest.raises(ValueError, match="answer"):
        circular_rotations(["x", "y"], "C")


def _result(predicted, answer, n):
    return ChoiceResult(predicted=predicted, answer=answer, n_options=n)


def test_circular_accuracy_by_hand():
    groups = {
        "all right": [_result("B", "B", 4), _result("A", "A", 4), _result("D", "D", 4), _result("C", "C", 4)],
        "one wrong": [_result("B", "B", 4), _result("A", "A", 4), _result("B", "D", 4), _result("C", "C", 4)],
        "unparsed": [_result(None, "B", 4), _result("A", "A", 4), _result("D", "D", 4), _result("C", "C", 4)],
        "two opts": [_result("A", "A", 2), _result("B", "B", 2)],
    }
    assert circular_accuracy(groups) == {"circular_accuracy": 2 / 4, "vanilla_accuracy": 3 / 4, "n": 4,
                                         "n_correct": 2, "n_passes": 14, "n_unparsable": 1}


def test_circular_eval_catches_a_model_that_always_says_b():
    # Vanilla accuracy rewards the position bias; CircularEval does not.
    groups = {}
    for qid, (options, answer) in enumerate([(CAPITALS, "B"), (["x", "y", "z"], "B"), (["p", "q"], "A")]):
        groups[qid] = [score_choice("B", r.options, r.answer, style="mmbench")
                       for r in circular_rotations(options, answer)]
    metrics = circular_accuracy(groups)
    assert metrics["vanilla_accuracy"] == 2 / 3
    assert metrics["circular_accuracy"] == 0.0


def test_circular_accuracy_requires_one_result_per_rotation():
    with pytest.raises(ValueError, match="groups"):
        circular_accuracy({"q": [_result("B", "B", 4), _result("A", "A", 4)]})
    with pytest.raises(ValueError, match="groups"):
        circular_accuracy({"q": []})


def test_circular_accuracy_empty():
    assert circular_accuracy({})["circular_accuracy"] == 0.0
