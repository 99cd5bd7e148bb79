"""Scorers of the text-in-image benchmarks: TextVQA accuracy, ANLS (DocVQA, InfographicVQA), ChartQA's relaxed
accuracy and OCRBench's containment match, each reproducing its official script, quirks included.

* **TextVQA accuracy** (:func:`textvqa_accuracy`): facebookresearch/mmf ``mmf/utils/m4c_evaluators.py``,
  ``TextVQAAccuracyEvaluator`` with ``EvalAIAnswerProcessor`` (LLaVA's ``m4c_evaluator.py`` and lmms-eval's
  ``tasks/textvqa/utils.py`` are the same code). The leave-one-out accuracy equals VQAv2's
  (:func:`vlmkit.eval.metrics.vqa.vqa_accuracy`: 3 matching annotators of the other 9 give full credit, averaged
  over the 10 subsets), but the answer processing differs, so VQAv2's function is NOT reused as is:

  - ``word_tokenize`` runs first: lower-case, delete every ``,`` and ``?``, ``'s`` -> `` 's`` (``"it's"`` ->
    ``"it 's"``), strip. With the commas gone, the "comma between digits" branch of the punctuation rule never
    fires (``"1,000"`` -> ``"1000"`` by deletion; ``"red,white"`` -> ``"redwhite"``, where VQAv2 gives
    ``"red white"``);
  - the human answers go through the SAME full processing as the prediction (VQAv2 only removes their
    punctuation, and only when the answers differ), so ``"The Beatles"`` as an annotation matches ``"beatles"``;
  - the rest (punctuation rule with its period-regex quirks, number words, articles, contractions) is VQAv2's,
    and :func:`vqa_process_punctuation` / :func:`vqa_process_digit_article` are reused for it;
  - exactly 10 answers per question (the official evaluator asserts it); an empty prediction is compared like
    any other (it matches only answers that process to ``""``, e.g. ``"a"``) and flagged ``parsed=False``.

* **ANLS** (:func:`anls`): the RRC evaluation script of DocVQA / InfographicVQA (rrc.cvc.uab.es, Task 1 and 3
  "evaluate_method"; copied into Qwen-VL ``eval_mm/infographicsvqa_eval.py`` and lmms-eval
  ``lmms_eval/api/metrics.py::anls``). For each answer: both strings become ``" ".join(s.strip().lower().split())``,
  the Levenshtein distance of those is divided by ``max(len(answer.upper()), len(prediction.upper()))`` — the
  lengths of the RAW strings, a quirk kept (against ``"hello world"``, ``"hello wrld"`` scores 1 - 1/11 but
  ``"hello   wrld"`` with three spaces 1 - 1/12, though both normalise alike); the question scores ``1 - min(distance ratio)`` over the answers, set to 0
  when below the threshold 0.5 (exactly 0.5 is kept). The benchmark score is the mean over questions.

* **Relaxed accuracy** (:func:`relaxed_correctness`): google-research/pix2struct ``pix2struct/metrics.py``
  ``relaxed_correctness`` (also lmms-eval ``tasks/chartqa/utils.py``, Qwen-VL ``evaluate_vqa.py``). Both strings
  go through ``float()`` (Python's: surrounding whitespace, ``1e3``, ``1_000`` accepted); a string ending in
  ``%`` is ``float(text.rstrip("%")) / 100`` (so ``"12%"`` is 0.12 and does NOT match a target ``"12"``). If
  the prediction is a number and the target a NON-ZERO number, correct when ``|p - t| / |t| <= 0.05``;
  otherwise (a word, or a target of 0) the lower-cased strings must be equal (``"0.0"`` does not match ``"0"``).

* **OCRBench** (:func:`ocrbench_match`, :func:`ocrbench_summary`): Yuliang-Liu/MultimodalOCR
  ``OCRBench/scripts/*.py`` (e.g. ``qwenvl.py``; VLMEvalKit ``vlmeval/dataset/utils/ocrbench.py`` agrees). A row
  of ``dataset_name == "HME100k"``: each answer and the prediction lose every space and newline (after
  ``strip``), case kept, and the answer must be a substring of the prediction; any other row: both lower-cased,
  stripped, newlines -> spaces, answer a substring of the prediction. Any answer of a list suffices. The
  official score is the NUMBER of correct rows per ``type``, the six recognition types summed to "Text
  Recognition", and the five components summed to the final score (out of 1000 on the full benchmark).
  Deviation of lmms-eval (not reproduced): it lower-cases the prediction before the HME100k branch, so an
  expression with capitals (``"O D \\bot A B"``) can never match there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from vlmkit.errors import DataError
from vlmkit.eval.metrics.vqa import AnswerScore, vqa_process_digit_article, vqa_process_punctuation

# --- TextVQA --------------------------------------------------------------------------------------------

TEXTVQA_N_ANSWERS = 10


def textvqa_normalize_answer(text: str) -> str:
    """``EvalAIAnswerProcessor.__call__``: ``word_tokenize`` (lower-case, drop ``,`` and ``?``, ``'s`` ->
    `` 's``, strip), ``\\n``/``\\t`` -> space and strip, then VQAv2's punctuation and digit/article/contraction
    steps. ``"The Beatles?"`` -> ``"beatles"``; ``"1,000"`` -> ``"1000"``; ``"it's"`` -> ``"it 's"``."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


def textvqa_accuracy(prediction: object, answers: Sequence[str]) -> AnswerScore:
    """TextVQA accuracy of one question, as ``TextVQAAccuracyEvaluator.eval_pred_list`` scores it: the
    prediction and the 10 human answers processed alike (:func:`textvqa_normalize_answer`), then the mean over
    the 10 answers left out in turn of ``min(1, matches among the other 9 / 3)``."""
    refs = _check_answers(answers, "answers")
    if len(refs) != TEXTVQA_N_ANSWERS:
        raise DataError(f"answers: TextVQA scores against exactly {TEXTVQA_N_ANSWERS} human answers, got {len(refs)}")
    if not isinstance(prediction, str):
        return AnswerScore(0.0, "", False)
    pred = textvqa_normalize_answer(prediction)
    matches = [textvqa_normalize_answer(ref) == pred for ref in refs]
    n_match = sum(matches)
    per_subset = [min(1.0, float(n_match - int(own)) / 3) for own in matches]
    return AnswerScore(sum(per_subset) / len(per_subset), pred, bool(pred))


# --- ANLS -----------------------------------------------------------------------------------------------

ANLS_THRESHOLD = 0.5


def levenshtein_distance(s1: str, s2: str) -> int:
    """The edit distance (insertions, deletions, substitutions of one character each), as the RRC script's."""
    if len(s1) > len(s2):
        s1, s2 = s2, s1
    distances = list(range(len(s1) + 1))
    for i2, c2 in enumerate(s2):
        row = [i2 + 1]
        for i1, c1 in enumerate(s1):
            row.append(distances[i1] if c1 == c2 else 1 + min(distances[i1], distances[i1 + 1], row[-1]))
        distances = row
    return distances[-1]


def _anls_normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: object, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """The ANLS of one question (RRC ``evaluate_method``): ``1 - min over answers of distance / max raw
    length``, 0 below ``threshold``. ``anls("hello wrld", ["hello world"])`` = 1 - 1/11; a prediction that is
    not a string scores 0."""
    refs = _check_answers(answers, "answers")
    if not isinstance(prediction, str):
        return 0.0
    det = _anls_normalize(prediction)
    values = []
    for answer in refs:
        length = max(len(answer.upper()), len(prediction.upper()))
        dist = levenshtein_distance(_anls_normalize(answer), det)
        values.append(0.0 if length == 0 else dist / length)
    score = 1 - min(values)
    return 0.0 if score < threshold else score


# --- ChartQA relaxed accuracy ---------------------------------------------------------------------------

def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: object, target: str, max_relative_change: float = 0.05) -> bool:
    """pix2struct's ``relaxed_correctness(target, prediction)`` (arguments here in vlmkit's order): numbers
    within ``max_relative_change`` of a non-zero target, else case-insensitive string equality.
    ``("12", "12.5")`` -> True (4%); ``("12%", "12.5")`` -> False (0.12); ``("Yes", "yes")`` -> True."""
    if not isinstance(target, str):
        raise DataError(f"target: expected the gold answer as a string, got {type(target).__name__}")
    if not isinstance(prediction, str):
        return False
    prediction_float, target_float = _to_float(prediction), _to_float(target)
    if prediction_float is not None and target_float:
        return abs(prediction_float - target_float) / abs(target_float) <= max_relative_change
    return prediction.lower() == target.lower()


# --- OCRBench -------------------------------------------------------------------------------------------

OCRBENCH_RECOGNITION = ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                        "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition")
# the five components of the final score (the official print-out), the first being the six recognition types
OCRBENCH_COMPONENTS = ("Text Recognition", "Scene Text-centric VQA", "Doc-oriented VQA",
                       "Key Information Extraction", "Handwritten Mathematical Expression Recognition")
OCRBENCH_TYPES = OCRBENCH_RECOGNITION + OCRBENCH_COMPONENTS[1:]


def ocrbench_match(prediction: object, answers: str | Sequence[str], dataset_name: str) -> bool:
    """The official OCRBench check of one row: is (any of) the answer(s) contained in the prediction, after
    removing spaces and newlines (``dataset_name == "HME100k"``, case-sensitive) or lower-casing (the rest)?"""
    refs = [answers] if isinstance(answers, str) else _check_answers(answers, "answers")
    if not isinstance(prediction, str):
        return False
    if dataset_name == "HME100k":
        pred = prediction.strip().replace("\n", " ").replace(" ", "")
        return any(a.strip().replace("\n", " ").replace(" ", "") in pred for a in refs)
    pred = prediction.lower().strip().replace("\n", " ")
    return any(a.lower().strip().replace("\n", " ") in pred for a in refs)


def ocrbench_summary(types: Sequence[str], correct: Sequence[bool | float]) -> dict[str, float]:
    """The official tally: ``final_score`` (correct rows, out of 1000 on the full benchmark), the number correct
    per component (``"Text Recognition"`` = the six recognition types) and per type, and ``accuracy`` =
    final score / rows (lmms-eval's ``Final_score / 1000`` on the full set)."""
    if len(types) != len(correct):
        raise DataError(f"types: expected one type per score ({len(correct)}), got {len(types)}")
    per_type = {t: 0.0 for t in OCRBENCH_TYPES}
    for i, (kind, ok) in enumerate(zip(types, correct)):
        if kind not in per_type:
            raise DataError(f"types[{i}]: unknown OCRBench type {kind!r}; expected one of {', '.join(OCRBENCH_TYPES)}")
        per_type[kind] += float(ok)
    out = {"Text Recognition": sum(per_type[t] for t in OCRBENCH_RECOGNITION)}
    out |= {c: per_type[c] for c in OCRBENCH_COMPONENTS[1:]}
    final = sum(out.values())
    return {"final_score": final, "accuracy": final / len(types) if types else math.nan,
            **{f"score/{c}": v for c, v in out.items()},
            **{f"type/{t}": v for t, v in per_type.items() if t in OCRBENCH_RECOGNITION}}


def _check_answers(answers: Sequence[str], name: str) -> list[str]:
    if isinstance(answers, str):
        raise DataError(f"{name}: expected a list of answers, got a single string; wrap it in a list")
    refs = list(answers)
    if not refs:
        raise DataError(f"{name}: expected at least one reference answer, got none")
    for i, ref in enumerate(refs):
        if not isinstance(ref, str):
            raise DataError(f"{name}[{i}]: expected a string answer, got {type(ref).__name__}")
    return refs
