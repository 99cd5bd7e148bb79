"""COCO caption metrics (vlmkit.eval.metrics.caption) against pycocoevalcap, the official implementation.

(a) the whole pipeline against pycocoevalcap's PTBTokenizer and scorer classes called directly, as
    ``COCOEvalCap.evaluate`` calls them, to 1e-9 (corpus and per image);
(b) properties worked out by hand from the scorers' definitions: identical captions, disjoint captions,
    BLEU-1 with clipping, brevity penalty and the "closest" reference length (tie -> shorter), corpus BLEU
    pooling counts, CIDEr-D's maximum of 10 and its corpus idf (one image -> 0);
(c) the errors.

Java-dependent tests are skipped without ``java``. METEOR loads a paraphrase table for ~10 s per process, so
it runs only in the comparison test (marked slow); the other Java tests start one PTBTokenizer process each.
"""

from __future__ import annotations

import importlib.util
import math
import shutil

import pytest

from vlmkit.errors import ConfigError, DataError
from vlmkit.eval.metrics import caption
from vlmkit.eval.metrics.caption import (
    JavaNotFoundError,
    caption_scores,
    evaluate_captions,
    ptb_tokenize,
)

HAVE_JAVA = shutil.which("java") is not None
HAVE_COCOCAP = importlib.util.find_spec("pycocoevalcap") is not None
requires_java = pytest.mark.skipif(not HAVE_JAVA, reason="no `java` on PATH: the PTBTokenizer and METEOR jars "
                                                          "that pycocoevalcap runs need a Java runtime")
requires_cococap = pytest.mark.skipif(not HAVE_COCOCAP, reason="pycocoevalcap is not installed "
                                                                "(pip install 'pycocoevalcap>=1.2')")

# ShapesWorld-like captions. Ids mix int and str on purpose.
PREDICTIONS: dict = {
    0: "A red square is to the left of a blue circle.",  # identical to all its references
    1: "There is a green triangle above a yellow square.",
    2: "The the the circle.",  # BLEU-1 by hand: clipping and brevity penalty
    3: "Red square on top.",  # BLEU-1 by hand: tie for the closest reference length
    "empty": "...",  # empty after tokenisation: scored 0
    5: "zebra xylophone quantum",  # no word in common with its references
    6: "Two blue circles and one magenta cross.",
}
REFERENCES: dict = {
    0: ["A red square is to the left of a blue circle."] * 3,
    1: ["A green triangle is above a yellow square.", "There is a yellow square below a green triangle.",
        "A triangle above a square."],
    2: ["The circle is on the left.", "A small circle is next to the big green square."],
    3: ["A red square.", "The red square is small."],
    "empty": ["A gray ellipse.", "An ellipse in gray."],
    5: ["A blue cross below a red circle.", "There is a cross under the circle."],
    6: ["There are two blue circles and a magenta cross.", "Two circles, both blue, and a magenta cross!"],
}
FAST = ("Bleu", "ROUGE_L", "CIDEr")  # everything but METEOR
BLEU_KEYS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]


def official(predictions: dict, references: dict) -> tuple[dict, dict, dict, dict]:
    """pycocoevalcap called as COCOEvalCap.evaluate calls it (without SPICE): scores, per-image, tokens."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in predictions})
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in predictions})
    scores: dict = {}
    per_image: dict = {i: {} for i in gts}
    for scorer, method in [(Bleu(4), BLEU_KEYS), (Meteor(), "METEOR"), (Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]:
        if isinstance(scorer, Bleu):
            score, image_scores = scorer.compute_score(gts, res, verbose=0)
        else:
            score, image_scores = scorer.compute_score(gts, res)
        if isinstance(method, list):
            pairs = list(zip(method, score, image_scores))
        else:
            pairs = [(method, score, image_scores)]
        for name, sc, scs in pairs:
            scores[name] = sc
            for i, s in zip(gts.keys(), scs):
                per_image[i][name] = s
    return scores, per_image, res, gts


@pytest.fixture(scope="module")
def fast():
    """One pipeline run (one PTBTokenizer process) on the whole corpus, without METEOR."""
    return evaluate_captions(PREDICTIONS, REFERENCES, metrics=FAST)


# ---------------------------------------------------------------- (a) against pycocoevalcap itself


@pytest.mark.slow  # two METEOR processes, ~10 s each to load the paraphrase table
@requires_cococap
@requires_java
def test_pipeline_matches_pycocoevalcap_classes_called_directly():
    ours = evaluate_captions(PREDICTIONS, REFERENCES)
    scores, per_image, res, gts = official(PREDICTIONS, REFERENCES)

    assert ours.tokenized_predictions == {i: res[i][0] for i in PREDICTIONS}
    assert ours.tokenized_references == gts
    assert list(ours.scores) == BLEU_KEYS + ["METEOR", "ROUGE_L", "CIDEr"]  # COCOEvalCap.eval's names and order
    for name, value in scores.items():
        assert ours.scores[name] == pytest.approx(value, abs=1e-9), name
        assert type(ours.scores[name]) is float
    assert list(ours.per_image) == list(PREDICTIONS)
    for i in PREDICTIONS:
        assert set(ours.per_image[i]) == set(per_image[i])
        for name, value in per_image[i].items():
            assert ours.per_image[i][name] == pytest.approx(value, abs=1e-9), (i, name)
    # METEOR by hand only where it is clear-cut: identical -> near 1 (one chunk), nothing in common -> 0
    assert ours.per_image[0]["METEOR"] > 0.95
    assert ours.per_image[5]["METEOR"] == 0.0
    assert ours.per_image["empty"]["METEOR"] == 0.0
    # corpus METEOR is the jar's aggregate, not the mean over images; it lies between the extremes
    assert 0.0 < ours.scores["METEOR"] < 1.0
    assert caption_scores(PREDICTIONS, REFERENCES, metrics=("ROUGE_L",)) == {"ROUGE_L": scores["ROUGE_L"]}


# ---------------------------------------------------------------- (b) properties by hand


@requires_cococap
@requires_java
def test_tokenisation_lowercases_and_drops_ptb_punctuation(fast):
    assert fast.tokenized_predictions[2] == "the the the circle"
    assert fast.tokenized_references[6][1] == "two circles both blue and a magenta cross"
    assert fast.tokenized_predictions["empty"] == ""
    assert fast.empty_predictions == ["empty"]


@requires_cococap
@requires_java
def test_prediction_identical_to_every_reference(fast):
    image = fast.per_image[0]
    assert image["Bleu_4"] == pytest.approx(1.0, abs=1e-8)  # the scorer's 1e-9 smoothing only
    assert image["ROUGE_L"] == pytest.approx(1.0, abs=1e-12)
    # CIDEr-D: cosine 1 for every n-gram order, no length penalty, averaged over references, times 10
    assert image["CIDEr"] == pytest.approx(10.0, abs=1e-9)


@requires_cococap
@requires_java
@pytest.mark.parametrize("image_id", [5, "empty"])
def test_prediction_with_no_word_in_common_scores_zero(fast, image_id):
    image = fast.per_image[image_id]
    for name in BLEU_KEYS:
        assert image[name] < 1e-6, name
    assert image["ROUGE_L"] == 0.0
    assert image["CIDEr"] == 0.0


@requires_cococap
@requires_java
def test_bleu1_by_hand(fast):
    # "the the the circle" vs "the circle is on the left" (6 words) / "a small circle is next to the big green
    # square" (10): "the" clipped to 2 (its most in one reference), "circle" 1 -> precision 3/4; closest
    # reference length 6 > 4 words -> brevity penalty exp(1 - 6/4)
    assert fast.per_image[2]["Bleu_1"] == pytest.approx(0.75 * math.exp(1 - 6 / 4), rel=1e-8)
    # "red square on top" vs "a red square" (3) / "the red square is small" (5): 2/4 matched; 3 and 5 are
    # equally close to 4 and the shorter one wins (min over (distance, length)) -> no brevity penalty
    assert fast.per_image[3]["Bleu_1"] == pytest.approx(0.5, rel=1e-8)
    # BLEU-2 is the geometric mean of the 1- and 2-gram precisions: only "red square" of 3 bigrams matches
    assert fast.per_image[3]["Bleu_2"] == pytest.approx(math.sqrt(2 / 4 * 1 / 3), rel=1e-8)


@requires_cococap
@requires_java
def test_corpus_bleu_pools_counts_and_single_image_cider_is_zero():
    # the two images above together: 5 of 8 words matched, reference lengths 6 + 3 = 9 > 8
    pair = {i: PREDICTIONS[i] for i in (2, 3)}
    result = evaluate_captions(pair, {i: REFERENCES[i] for i in pair}, metrics=("Bleu",))
    expected = 5 / 8 * math.exp(1 - 9 / 8)
    assert result.scores["Bleu_1"] == pytest.approx(expected, rel=1e-8)
    mean = sum(v["Bleu_1"] for v in result.per_image.values()) / 2
    assert abs(expected - mean) > 0.05  # pooled, not averaged
    assert set(result.scores) == set(BLEU_KEYS)

    # CIDEr's idf comes from the scored set's references: with one image every n-gram has df = N = 1
    alone = caption_scores({0: PREDICTIONS[0]}, {0: REFERENCES[0]}, metrics=["CIDEr"])
    assert alone == {"CIDEr": 0.0}


@requires_cococap
@requires_java
def test_line_breaks_inside_a_caption_do_not_shift_later_captions():
    # pycocoevalcap's PTBTokenizer replaces only "\n": "\r" or U+2028 splits the caption over two lines and
    # pairs every later caption with the wrong id
    assert ptb_tokenize(["A red\rsquare.", "Two\u2028blue circles!", "A cross."]) == [
        "a red square", "two blue circles", "a cross"]
    assert ptb_tokenize([]) == []


# ---------------------------------------------------------------- (c) errors


@pytest.mark.parametrize("predictions, references, match", [
    ({1: "a", 2: "b"}, {1: ["a"]}, r"no references: 2"),
    ({1: "a"}, {1: ["a"], "x": ["b"]}, r"references but no prediction: 'x'"),
    ({1: "a"}, {1: []}, r"references\[1\] is an empty list"),
    ({1: "a"}, {1: ["a", "   "]}, r"references\[1\]\[1\] is blank"),
    ({1: "a"}, {1: "a red square"}, r"references\[1\] must be a list"),
    ({1: "a"}, {1: ["a", None]}, r"references\[1\]\[1\] must be a str"),
    ({1: None}, {1: ["a"]}, r"predictions\[1\] must be a str"),
    ({}, {}, r"predictions is empty"),
])
def test_bad_inputs_are_refused_before_any_java_runs(monkeypatch, predictions, references, match):
    monkeypatch.setattr(caption, "ptb_tokenize", lambda *a: pytest.fail("tokeniser reached"))
    with pytest.raises(DataError, match=match):
        evaluate_captions(predictions, references)


def test_error_lists_a_few_ids_and_counts_the_rest():
    with pytest.raises(DataError, match=r"8 id\(s\) have a prediction but no references: 0, 1, 2, 3, 4 and 3 more"):
        caption_scores({i: "a" for i in range(8)}, {})


def test_unknown_metric_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"'SPICE'.*'Bleu', 'METEOR', 'ROUGE_L', 'CIDEr'"):
        caption_scores({1: "a"}, {1: ["a"]}, metrics=["SPICE"])
    with pytest.raises(ConfigError):
        caption_scores({1: "a"}, {1: ["a"]}, metrics=[])


@requires_cococap
@requires_java
def test_reference_that_is_only_punctuation_is_refused():
    with pytest.raises(DataError, match=r"references\[7\]\[0\] = '\.\.\.' is empty after PTB tokenisation"):
        caption_scores({7: "a red square"}, {7: ["...", "a red square"]}, metrics=["ROUGE_L"])


@requires_cococap
def test_missing_java_gives_a_clear_message(monkeypatch):
    monkeypatch.setattr(caption.shutil, "which", lambda name: None)
    with pytest.raises(JavaNotFoundError, match=r"Java runtime.*`java`.*PATH"):
        caption_scores({1: "a red square"}, {1: ["a red square"]})
    with pytest.raises(JavaNotFoundError):
        ptb_tokenize(["a red square"])


@requires_cococap
@requires_java
def test_meteor_process_that_dies_raises_instead_of_hanging(monkeypatch):
    import threading

    class DeadMeteor:  # pycocoevalcap's Meteor when the jar has exited: compute_score fails holding its lock
        instances: list = []

        def __init__(self):
            self.lock = threading.Lock()
            DeadMeteor.instances.append(self)

        def compute_score(self, gts, res):
            self.lock.acquire()
            return float(b"")

    real = caption._load_scorers
    monkeypatch.setattr(caption, "_load_scorers", lambda: {**real(), "METEOR": DeadMeteor})
    with pytest.raises(RuntimeError, match="METEOR 1.5 .* stopped answering"):
        caption_scores({1: "a red square"}, {1: ["a red square"]}, metrics=["METEOR"])
    assert not DeadMeteor.instances[0].lock.locked()  # so Meteor.__del__ can take it and end the process
