"""Multiple-choice accuracy: option-letter extraction from free text, as the official scorers do it.

A model answers a multiple-choice question (ScienceQA, MMMU, MMBench, ...) in free text; the scorer must turn
that text into one option letter before comparing with the key. The three benchmarks use three different
extraction rules, and a model's score moves by points depending on which rule is applied, so each is
reproduced here by its own function (``style``):

``"mmmu"`` -- MMMU ``eval/eval_utils.py::parse_multi_choice_response`` (MMMU-Benchmark/MMMU; also vendored by
    lmms-eval ``tasks/mmmu/utils.py``). Candidate letters are searched in tiers, the first tier that finds any
    wins: (1) a bracketed letter ``"(B)"``; (2) a letter standing alone between spaces ``" B "``; (3) a letter
    followed by a full stop ``"B."`` (the tier lmms-eval and MMMU-Pro ``evaluate.py`` add); (4) only when the
    response is longer than 5 words, the text of an option (case-insensitive substring). When a tier finds
    several candidates, the one whose pattern occurs *last* in the response wins (ties: the earlier option).
    Before the search the response is stripped of the characters ``, . ! ? ; : '`` at both ends and padded
    with one space. Differences, all deliberate:
    * no answer found: the official code picks a *random* letter (``random.choice(all_choices)``, seed 42).
      Here the result is ``None`` (unparsable, counted wrong and reported), so scores are deterministic and a
      model gets no credit for unparsable text; expect MMMU numbers lower by about (unparsable rate / number
      of options) than the official ones.
    * tier (3) requires the letter to start a word (``" B."``) so that ``"DNA."`` does not read as option A;
      lmms-eval's tier matches the bare substring. Multiple tier-(3) candidates are ordered by their own
      pattern (the official code looks for ``" B "``, finds none and falls back to the first candidate).
``"mmbench"`` -- VLMEvalKit ``vlmeval/utils/matching_util.py::can_infer`` (open-compass/VLMEvalKit), the exact
    matching step of MMBench before (or instead of) the LLM judge. ``can_infer_option``: replace the
    characters ``. ( ) [ ] , : ; ! * # { }`` with spaces and split on whitespace; if exactly one option letter
    appears as a whole token, that is the answer (so ``"A cat"`` reads as A -- the "quantifier" caveat
    VLMEvalKit itself logs); a refusal phrase or a lone ``Z`` token means "none of the options". Otherwise
    ``can_infer_text``: if the prediction is at most twice as long as all option texts together and exactly
    one option's text is a (case-insensitive) substring of it, that option. Anything else is unparsable
    (VLMEvalKit's exact-matching policy then records ``Z``, i.e. wrong). "None of the options" is returned as
    ``None`` here as well. Later VLMEvalKit revisions experimented with a "letter among the last 5 tokens"
    window; that is not reproduced.
``"scienceqa"`` -- LLaVA ``llava/eval/eval_science_qa.py`` (haotian-liu/LLaVA): the prediction is exactly a
    letter; or starts with ``"B. "``; or contains exactly one match of the regex ``The answer is ([A-Z]).``
    (note the unescaped dot: one more character must follow the letter). A letter outside the question's
    options scores wrong there (``get_pred_idx`` returns -1); here it is ``None``.

Common to all styles: option letters are case-sensitive, exactly as in the official code -- a lower-case
``"a"`` is the English article, not option A, and is unparsable unless an option text matches.
Leading/trailing whitespace of the prediction is stripped first (the reference pipelines strip decoded text
before scoring). A prediction of ``None`` is unparsable. Unparsable predictions never raise; they are counted
wrong and reported as ``n_unparsable`` by the aggregates. Malformed *references* (bad option letters, an
answer that is not an option) raise ``ValueError`` naming the field.

MMBench CircularEval (MMBench paper, Sec. 3; OpenCompass ``get_circular_example``; VLMEvalKit circular MCQ
evaluation): a question with N options is asked N times, the option texts rotated one step each time
(``ABCD, BCDA, CDAB, DABC``: in pass k the letter at position i shows the original option i + k), and it
counts as correct only if all N passes are answered correctly. ``circular_rotations`` builds the passes,
``circular_accuracy`` scores them; the "vanilla" accuracy is the accuracy of pass 0 (the original order).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Union

__all__ = [
    "ChoiceResult",
    "ChoiceStyle",
    "CircularRotation",
    "Options",
    "choice_accuracy",
    "circular_accuracy",
    "circular_rotations",
    "extract_choice",
    "normalize_options",
    "parse_choice_mmbench",
    "parse_choice_mmmu",
    "parse_choice_scienceqa",
    "score_choice",
]

#: Options: a mapping letter -> option text (letters are single upper-case ASCII letters, kept in the given
#: order), or a sequence of option texts lettered A, B, C, ... in order.
Options = Union[Mapping[str, str], Sequence[str]]
ChoiceStyle = Literal["mmmu", "mmbench", "scienceqa"]

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def normalize_options(options: Options) -> dict[str, str]:
    """Validate ``options`` and return them as an ordered dict letter -> text.

    A sequence of texts is lettered A, B, C, ...; a mapping keeps its letters and order. Raises ``ValueError``
    if there are fewer than 2 or more than 26 options, or a letter is not a single upper-case ASCII letter,
    and ``TypeError`` if an option text is not a string.
    """
    if isinstance(options, str):
        raise TypeError("options: expected a mapping letter -> text or a list of option texts, got a string")
    if isinstance(options, Mapping):
        items = [(k, v) for k, v in options.items()]
    elif isinstance(options, Sequence):
        if len(options) > len(_LETTERS):
            raise ValueError(f"options: at most {len(_LETTERS)} options can be lettered A-Z, "
                             f"got {len(options)}")
        items = list(zip(_LETTERS, options))
    else:
        raise TypeError("options: expected a mapping letter -> text or a list of texts, "
                        f"got {type(options).__name__}")
    if len(items) < 2:
        raise ValueError(f"options: a multiple-choice question needs at least 2 options, got {len(items)}")
    result: dict[str, str] = {}
    for letter, text in items:
        if not (isinstance(letter, str) and len(letter) == 1 and letter in _LETTERS):
            raise ValueError(f"options: option letter {letter!r} is not a single upper-case letter A-Z")
        if not isinstance(text, str):
            raise TypeError(f"options: text of option {letter} must be a string, got {type(text).__name__}")
        result[letter] = text
    return result


def _prepare(prediction: object) -> str | None:
    if prediction is None:
        return None
    return (prediction if isinstance(prediction, str) else str(prediction)).strip()


# ----------------------------------------------------------------------------------------------------- MMMU
_MMMU_STRIP = (",", ".", "!", "?", ";", ":", "'")


def parse_choice_mmmu(prediction: str | None, options: Options) -> str | None:
    """Option letter in ``prediction`` by MMMU's ``parse_multi_choice_response`` (eval_utils.py), or None.

    Tiers "(B)" > " B " > " B." > option text (responses over 5 words only); several candidates in a tier: the
    last occurrence wins. Where MMMU picks a random letter, this returns None (see the module docstring).
    """
    opts = normalize_options(options)
    text = _prepare(prediction)
    if text is None:
        return None
    for char in _MMMU_STRIP:  # sequential, as in the official loop
        text = text.strip(char)
    response = f" {text} "

    for pattern in ("({})", " {} ", " {}."):
        found = {letter: response.rfind(pattern.format(letter)) for letter in opts}
        candidates = {letter: pos for letter, pos in found.items() if pos >= 0}
        if candidates:
            return _last(candidates)

    if len(response.split()) > 5:
        lowered = response.lower()
        candidates = {}
        for letter, option_text in opts.items():
            if option_text and option_text.lower() in lowered:
                candidates[letter] = lowered.rfind(option_text.lower())
        if candidates:
            return _last(candidates)
    return None


def _last(positions: dict[str, int]) -> str:
    """The letter whose match starts last; ties go to the earlier option (as numpy.argmax officially)."""
    best = max(positions.values())
    return next(letter for letter, pos in positions.items() if pos == best)


# -------------------------------------------------------------------------------------------------- MMBench
_MMBENCH_PUNCT = ".()[],:;!*#{}"
_MMBENCH_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)


def parse_choice_mmbench(prediction: str | None, options: Options) -> str | None:
    """Option letter in ``prediction`` by VLMEvalKit's ``can_infer`` (MMBench exact matching), or None.

    Exactly one option letter as a whole token (after replacing ``.()[],:;!*#{}`` by spaces) wins; else
    exactly one option text contained in the prediction (if it is at most twice as long as all option
    texts). Refusals and "Z" (none of the options) are None, as is anything ambiguous.
    """
    opts = normalize_options(options)
    text = _prepare(prediction)
    if text is None:
        return None
    if any(phrase in text for phrase in _MMBENCH_REFUSALS):
        return None  # VLMEvalKit: 'Z', "none of the options"
    spaced = text
    for char in _MMBENCH_PUNCT:
        spaced = spaced.replace(char, " ")
    tokens = spaced.split()
    present = [letter for letter in opts if letter in tokens]
    if len(present) == 1:
        return present[0]
    if not present and "Z" in tokens:
        return None  # VLMEvalKit: 'Z'; a lone Z never falls through to text matching
    # no letter, or several (ambiguous): VLMEvalKit falls through to text matching
    lowered = text.lower()
    if len(lowered) > 2 * sum(len(t) for t in opts.values()):
        return None
    matches = [letter for letter, option_text in opts.items() if option_text.lower() in lowered]
    return matches[0] if len(matches) == 1 else None


# ------------------------------------------------------------------------------------------------ ScienceQA
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_choice_scienceqa(prediction: str | None, options: Options) -> str | None:
    """Option letter in ``prediction`` by LLaVA's ScienceQA scorer (llava/eval/eval_science_qa.py), or None.

    The prediction is exactly a letter, or starts with "B. ", or contains exactly one "The answer is B"
    followed by any character; the letter must be one of the question's options.
    """
    opts = normalize_options(options)
    text = _prepare(prediction)
    if text is None:
        return None
    if text in opts:
        return text
    if len(text) >= 3 and text[0] in opts and text[1:3] == ". ":
        return text[0]
    found = _SQA_ANSWER_IS.findall(text)
    if len(found) == 1 and found[0] in opts:
        return found[0]
    return None


# ----------------------------------------------------------------------------------------------- dispatch
_PARSERS = {"mmmu": parse_choice_mmmu, "mmbench": parse_choice_mmbench, "scienceqa": parse_choice_scienceqa}


def extract_choice(prediction: str | None, options: Options, *, style: ChoiceStyle) -> str | None:
    """The option letter ``prediction`` chooses under the given benchmark's rule, or None if unparsable."""
    try:
        parser = _PARSERS[style]
    except KeyError:
        raise ValueError(f"style: unknown extraction style {style!r}; valid: {sorted(_PARSERS)}") from None
    return parser(prediction, options)


@dataclass(frozen=True)
class ChoiceResult:
    """One scored multiple-choice prediction: the extracted letter (None = unparsable) and the key."""

    predicted: str | None
    answer: str
    n_options: int

    @property
    def parsed(self) -> bool:
        return self.predicted is not None

    @property
    def correct(self) -> bool:
        return self.predicted is not None and self.predicted == self.answer

    @property
    def score(self) -> float:
        """1.0 if correct, else 0.0 (unparsable predictions score 0)."""
        return 1.0 if self.correct else 0.0


def score_choice(prediction: str | None, options: Options, answer: str, *,
                 style: ChoiceStyle) -> ChoiceResult:
    """Extract the chosen letter with ``style``'s rule and compare with ``answer`` (an option letter).

    Exact letter match, as MMMU ``eval_multi_choice``, VLMEvalKit and LLaVA ScienceQA do. Raises
    ``ValueError`` if ``answer`` is not one of the option letters.
    """
    opts = normalize_options(options)
    if answer not in opts:
        raise ValueError(f"answer: {answer!r} is not one of the option letters {list(opts)}")
    return ChoiceResult(predicted=extract_choice(prediction, opts, style=style), answer=answer,
                        n_options=len(opts))


def choice_accuracy(results: Iterable[ChoiceResult]) -> dict[str, float]:
    """Accuracy over scored predictions; unparsable ones count as wrong and are reported.

    Returns ``accuracy`` (correct / n, 0.0 when n == 0 as MMMU's ``evaluate``), ``n``, ``n_correct``,
    ``n_unparsable`` and ``unparsable_rate`` (n_unparsable / n, 0.0 when n == 0).
    """
    n = n_correct = n_unparsable = 0
    for result in results:
        n += 1
        n_correct += result.correct
        n_unparsable += not result.parsed
    return {"accuracy": n_correct / n if n else 0.0, "n": n, "n_correct": n_correct,
            "n_unparsable": n_unparsable, "unparsable_rate": n_unparsable / n if n else 0.0}


# --------------------------------------------------------------------------------------------- CircularEval
@dataclass(frozen=True)
class CircularRotation:
    """One CircularEval pass: the options as shown (letter -> text, original letters kept) and its key."""

    shift: int
    options: dict[str, str]
    answer: str


def circular_rotations(options: Options, answer: str) -> list[CircularRotation]:
    """The N passes of MMBench CircularEval for a question with N options, pass 0 being the original order.

    In pass k the letter at position i shows the text of original option i + k (mod N) -- ``ABCD, BCDA, CDAB,
    DABC`` -- so the key moves from position j to position j - k (mod N). Raises ``ValueError`` if
    ``answer`` is not an option letter.
    """
    opts = normalize_options(options)
    if answer not in opts:
        raise ValueError(f"answer: {answer!r} is not one of the option letters {list(opts)}")
    letters, texts = list(opts), list(opts.values())
    n, key = len(letters), letters.index(answer)
    return [CircularRotation(shift=k, options={letters[i]: texts[(i + k) % n] for i in range(n)},
                             answer=letters[(key - k) % n]) for k in range(n)]


def circular_accuracy(groups: Mapping[Hashable, Sequence[ChoiceResult]]) -> dict[str, float]:
    """MMBench CircularEval over questions, each mapped to its passes' results in rotation order.

    The passes are in ``circular_rotations`` order. A question is correct only if every one of its N passes is
    correct (an unparsable pass fails the question).
    Returns ``circular_accuracy``, ``vanilla_accuracy`` (pass 0 only), ``n`` (questions), ``n_correct``,
    ``n_passes`` and ``n_unparsable`` (passes). Raises ``ValueError`` if a question does not have exactly one
    result per option.
    """
    n = n_correct = n_vanilla = n_passes = n_unparsable = 0
    for question, passes in groups.items():
        if not passes or len(passes) != passes[0].n_options:
            expected = passes[0].n_options if passes else "one per option"
            raise ValueError(f"groups[{question!r}]: CircularEval needs one result per rotation "
                             f"({expected}), got {len(passes)}")
        n += 1
        n_correct += all(p.correct for p in passes)
        n_vanilla += passes[0].correct
        n_passes += len(passes)
        n_unparsable += sum(not p.parsed for p in passes)
    return {"circular_accuracy": n_correct / n if n else 0.0, "vanilla_accuracy": n_vanilla / n if n else 0.0,
            "n": n, "n_correct": n_correct, "n_passes": n_passes, "n_unparsable": n_unparsable}
