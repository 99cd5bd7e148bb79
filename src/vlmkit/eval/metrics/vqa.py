"""Open-ended VQA answer scoring: VQAv2 accuracy, plain exact match and GQA accuracy.

VQAv2 accuracy reproduces the official VQA API scorer, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``
(GT-Vision-Lab/VQA, class ``VQAEval``: ``evaluate``, ``processPunctuation``, ``processDigitArticle``,
``setAccuracy``), including its quirks, because published numbers were produced with them:

* The prediction has ``\\n``/``\\t`` replaced by spaces and is stripped, then goes through
  ``processPunctuation`` and ``processDigitArticle`` (lower-case, number words ``none``/``zero``..``ten``
  -> digits, articles ``a``/``an``/``the`` dropped, apostrophe-less contractions restored: ``dont`` ->
  ``don't``).
* The human answers are NOT lower-cased, digit-mapped or article-stripped (VQAv2 annotations are already
  normalised); they only go through ``processPunctuation``, and only when the answers are not all identical.
* ``processPunctuation``: if the text contains a comma between two digits (``10,000``) every punctuation
  mark of the list is deleted; otherwise a mark next to a space is deleted and any other occurrence becomes
  a space (``black/white`` -> ``black white``). Apostrophes and colons are kept (``it's`` stays ``it's``).
  Then every ``.`` not followed by a digit is deleted (``yes.`` -> ``yes``, ``2.5`` kept). The official
  period regex ``(?!<=\\d)(\\.)(?!\\d)`` contains a mistyped look-behind that never fires, and
  ``re.UNICODE`` is passed where ``sub`` expects ``count``, so at most 32 periods are deleted; both are
  reproduced.
* Accuracy of one question: for each of the n human answers, ``min(1, #matching among the other n-1 / 3)``,
  averaged over the n leave-one-out subsets. With 10 answers of which k match: k=1 -> 0.3, 2 -> 0.6,
  3 -> 0.9, 4+ -> 1.0.
* Aggregates (``setAccuracy``): overall mean, and the mean per ``answer_type`` and per ``question_type``.
  The official script reports percentages rounded to 2 decimals; these functions return unrounded
  fractions in [0, 1] (``round(100 * x, 2)`` gives the official figure).

Exact match (:func:`exact_match`) is this library's plain metric: both sides lower-cased, trimmed, internal
whitespace collapsed and trailing full stops removed, then compared for equality.

GQA accuracy (:func:`gqa_accuracy`): the official GQA ``eval.py`` (gqadataset.org) scores
``predicted == gold`` with no normalisation at all; the numbers papers report come from pipelines that
clean the prediction first. ``convention`` selects which one is reproduced (see :func:`gqa_accuracy`).

Unparsable predictions (``None``, not a string, or empty after normalisation) score 0 and are flagged
``parsed=False`` in the :class:`AnswerScore`; they never raise. (The only departure from ``vqaEval.py``:
it would compare an empty prediction with the answers and credit it against empty answers, which VQA
annotations never contain.) Bad references (the ground truth) raise :class:`vlmkit.errors.DataError`
naming the argument.
"""

from __future__ import annotations

import math
import re
import string
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from vlmkit.errors import ConfigError, DataError

# --- official VQA normalisation tables (vqaEval.py, VQAEval.__init__) -------------------------------------

#: ``VQAEval.manualMap``: number words replaced by digits (applied to the prediction, word by word).
VQA_NUMBER_WORDS: Mapping[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

#: ``VQAEval.articles``: words dropped from the prediction.
VQA_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

#: ``VQAEval.punct``: the characters ``processPunctuation`` removes (note: no ``'``, ``:`` or ``.``).
VQA_PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)

# ``VQAEval.contractions``: a word matching a key (after lower-casing) is replaced by the value. Kept as
# the official table has it, including its oddities: the capitalised keys ("Im", "Ive", ...) can never
# match because the text is lower-cased first, and "somebody'd" maps to "somebodyd".
_CONTRACTION_PAIRS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd
howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've
it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't|mightnt've mightn't've
mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've|neednt needn't|notve not've
oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't
shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't|shouldnt've shouldn't've
shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've|somebody'dve somebody'd've
somebodyll somebody'll|somebodys somebody's|someoned someone'd|someoned've someone'd've
someone'dve someone'd've|someonell someone'll|someones someone's|somethingd something'd
somethingd've something'd've|something'dve something'd've|somethingll something'll|thats that's|thered there'd
thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd|theyd've they'd've
they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've
we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're|whats what's|whatve what've
whens when's|whered where'd|wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've
wholl who'll|whos who's|whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've
wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll
yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've|you'dve you'd've
youll you'll|youre you're|youve you've
"""
#: ``VQAEval.contractions``: apostrophe-less spellings -> the spelling used in the VQA annotations.
VQA_CONTRACTIONS: Mapping[str, str] = dict(
    pair.split(" ") for line in _CONTRACTION_PAIRS.strip().splitlines()
    for pair in line.split("|")
)

_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")  # VQAEval.commaStrip
# VQAEval.periodStrip is "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a look-ahead for the literal "<=" + digit,
# which can never match in front of a ".", so the pattern is exactly "a period not followed by a digit".
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)  # the official call passes re.UNICODE (32) as sub()'s ``count``


@dataclass(frozen=True)
class AnswerScore:
    """The score of one prediction.

    ``score`` is in [0, 1]; ``prediction`` is the normalised prediction that was compared (``""`` if the
    prediction was unusable); ``parsed`` is False when the prediction was ``None``, not a string, or empty
    after normalisation (such predictions always score 0). ``float(result)`` gives ``score``.
    """

    score: float
    prediction: str
    parsed: bool

    def __float__(self) -> float:
        return self.score


# --- VQAv2 --------------------------------------------------------------------------------------------

def vqa_process_punctuation(text: str) -> str:
    """``VQAEval.processPunctuation``: delete or space out punctuation, then periods not before a digit.

    ``"yes."`` -> ``"yes"``; ``"10,000"`` -> ``"10000"``; ``"black/white"`` -> ``"black white"``;
    ``"red, white"`` -> ``"red white"``; ``"2.5"`` -> ``"2.5"``; ``"it's"`` -> ``"it's"``.
    """
    # Both tests look at the input text, not at the partly processed one, as the official code does.
    delete_everywhere = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in VQA_PUNCTUATION:
        if delete_everywhere or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def vqa_process_digit_article(text: str) -> str:
    """``VQAEval.processDigitArticle``: lower-case, split on whitespace, number words -> digits, drop
    articles, restore contractions, join with single spaces. ``"Two Dogs"`` -> ``"2 dogs"``;
    ``"a dog"`` -> ``"dog"``;
    ``"dont know"`` -> ``"don't know"``."""
    words = []
    for word in text.lower().split():
        word = VQA_NUMBER_WORDS.get(word, word)
        if word not in VQA_ARTICLES:
            words.append(word)
    return " ".join(VQA_CONTRACTIONS.get(word, word) for word in words)


def vqa_normalize_answer(text: str) -> str:
    """The full normalisation ``VQAEval.evaluate`` applies to a prediction (``\\n``/``\\t`` -> space, strip,
    :func:`vqa_process_punctuation`, :func:`vqa_process_digit_article`)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


def vqa_accuracy(prediction: object, references: Sequence[str]) -> AnswerScore:
    """VQAv2 accuracy of one question, as ``VQAEval.evaluate`` computes it.

    ``references`` are the human answers of the question (10 in VQAv2, VizWiz and TextVQA), raw from the
    annotation file (``answers[i]["answer"]``). Each answer is left out in turn; the prediction scores
    ``min(1, matches among the others / 3)`` for that subset, and the question's accuracy is the mean over the
    subsets. Answers are told apart by position (the official code by their dicts, whose ``answer_id``
    differ).
    """
    refs = _check_references(references)
    if not isinstance(prediction, str):
        return AnswerScore(0.0, "", False)
    pred = vqa_normalize_answer(prediction)
    if not pred:
        return AnswerScore(0.0, "", False)
    if len(set(refs)) > 1:
        refs = [vqa_process_punctuation(ref) for ref in refs]
    matches = [ref == pred for ref in refs]
    n_match = sum(matches)
    per_subset = [min(1.0, float(n_match - int(own)) / 3) for own in matches]
    return AnswerScore(float(sum(per_subset)) / len(per_subset), pred, True)


def vqa_aggregate(scores: Sequence[AnswerScore | float], answer_types: Sequence[str] | None = None,
                  question_types: Sequence[str] | None = None) -> dict[str, float]:
    """``VQAEval.setAccuracy`` as fractions: overall, per answer type and per question type.

    Returns ``{"accuracy", "n", "n_unparsed", "answer_type/<type>"..., "question_type/<type>"...}``
    (``accuracy`` is NaN when there are no scores). Multiply by 100 and round to 2 decimals for the official
    percentages. ``answer_types``/``question_types``, when given, hold one label per score (the annotation's
    ``answer_type`` such as ``"yes/no"``, ``"number"``, ``"other"``, and ``question_type`` such as
    ``"what color is the"``).
    """
    return aggregate_accuracy(scores, {"answer_type": answer_types, "question_type": question_types})


# --- exact match and GQA ------------------------------------------------------------------------------

def normalize_exact_match(text: str) -> str:
    """This library's light normalisation: lower-case, trim, collapse whitespace, strip trailing full stops.

    ``"  The  Dog. "`` -> ``"the dog"``. Nothing else changes (no article or number-word handling).
    """
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


def exact_match(prediction: object, references: str | Sequence[str]) -> AnswerScore:
    """1.0 if the prediction equals any reference after :func:`normalize_exact_match` on both sides."""
    refs = [references] if isinstance(references, str) else _check_references(references)
    if not isinstance(prediction, str) or not normalize_exact_match(prediction):
        return AnswerScore(0.0, "", False)
    pred = normalize_exact_match(prediction)
    return AnswerScore(float(any(pred == normalize_exact_match(ref) for ref in refs)), pred, True)


GQAConvention = Literal["llava", "official", "lmms_eval"]
_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


def gqa_accuracy(prediction: object, answer: str, *, convention: GQAConvention = "llava") -> AnswerScore:
    """GQA accuracy of one question: 1.0 if the prediction equals the gold ``answer``, else 0.0.

    The official GQA ``eval.py`` scores ``predicted == gold`` on the strings as given. What is done to the
    model output before that depends on the pipeline, chosen by ``convention``:

    * ``"llava"`` (default; the numbers LLaVA-family papers report): the output is stripped (LLaVA's
      ``model_vqa_loader.py``), then ``scripts/convert_gqa_for_eval.py`` applies ``.rstrip('.').lower()``; the
      gold answer is used as is.
    * ``"official"``: no change at all, ``prediction == answer`` (``"Yes"`` does not match ``"yes"``).
    * ``"lmms_eval"``: lmms-eval's ``gqa`` task, ``exact_match`` with ``ignore_case`` and
      ``ignore_punctuation``: both sides lower-cased and every ``string.punctuation`` character deleted;
      whitespace is not trimmed.
    """
    if not isinstance(answer, str):
        raise DataError(f"answer: expected the gold answer as a string, got {type(answer).__name__}")
    if not isinstance(prediction, str):
        return AnswerScore(0.0, "", False)
    gold = answer
    if convention == "llava":
        pred = prediction.strip().rstrip(".").lower()
    elif convention == "official":
        pred = prediction
    elif convention == "lmms_eval":
        pred = prediction.lower().translate(_PUNCTUATION_TABLE)
        gold = answer.lower().translate(_PUNCTUATION_TABLE)
    else:
        raise ConfigError(f"convention: unknown GQA convention {convention!r}; valid: 'llava', 'official', "
                          "'lmms_eval'")
    if not pred.strip():
        return AnswerScore(0.0, "", False)
    return AnswerScore(float(pred == gold), pred, True)


# --- aggregation --------------------------------------------------------------------------------------

def aggregate_accuracy(scores: Sequence[AnswerScore | float],
                       groups: Mapping[str, Sequence[str] | None] | None = None) -> dict[str, float]:
    """Mean score overall and per group label, as flat named floats.

    ``groups`` maps a grouping name (e.g. ``"answer_type"``) to one label per score (``None`` skips that
    grouping). Returns ``{"accuracy": mean, "n": count, "n_unparsed": count, "<name>/<label>": mean, ...}``;
    ``accuracy`` is NaN when ``scores`` is empty. Used for GQA as the official ``eval.py`` reports it, e.g.
    ``{"structural": ...}`` or binary/open (``structural == "query"`` is open).
    """
    values = [_as_float(s, i) for i, s in enumerate(scores)]
    n = len(values)
    result: dict[str, float] = {
        "accuracy": math.fsum(values) / n if n else math.nan,
        "n": float(n),
        "n_unparsed": float(sum(1 for s in scores if isinstance(s, AnswerScore) and not s.parsed)),
    }
    for name, labels in (groups or {}).items():
        if labels is None:
            continue
        if isinstance(labels, str) or len(labels) != n:
            got = "a string" if isinstance(labels, str) else f"{len(labels)} labels"
            raise DataError(f"{name}: expected one label per score ({n}), got {got}")
        by_label: dict[str, list[float]] = defaultdict(list)
        for label, value in zip(labels, values):
            by_label[str(label)].append(value)
        for label in sorted(by_label):
            result[f"{name}/{label}"] = math.fsum(by_label[label]) / len(by_label[label])
    return result


def _as_float(score: AnswerScore | float, index: int) -> float:
    value = score.score if isinstance(score, AnswerScore) else score
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise DataError(f"scores[{index}]: expected an AnswerScore or a number in [0, 1], got {score!r}")
    return float(value)


def _check_references(references: Sequence[str]) -> list[str]:
    if isinstance(references, str):
        raise DataError("references: expected a list of answers, got a single string; wrap it in a list")
    refs = list(references)
    if not refs:
        raise DataError("references: expected at least one reference answer, got none")
    for i, ref in enumerate(refs):
        if not isinstance(ref, str):
            raise DataError(f"references[{i}]: expected a string answer, got {type(ref).__name__}")
    return refs
