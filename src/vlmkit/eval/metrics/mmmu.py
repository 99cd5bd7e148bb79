"""MMMU and MMMU-Pro accuracy, and MMStar's letter matching, as their official scorers compute them.

MMMU -- MMMU-Benchmark/MMMU ``eval/eval_utils.py`` (``parse_multi_choice_response``, ``parse_open_response``,
``extract_numbers``, ``normalize_str``, ``eval_multi_choice``, ``eval_open``, ``evaluate``), with
``calculate_ins_level_acc`` and ``DOMAIN_CAT2SUB_CAT`` (as lmms-eval ``tasks/mmmu/utils.py`` vendors them) for
the per-discipline accuracy. Multiple choice, in tiers, the first tier with any candidate wins: (1) ``"(B)"``;
(2) ``" B "`` (the response is first stripped of ``, . ! ? ; : '`` at both ends, one character class after the
other, and padded with a space each side); (3) only for a response of more than 5 words, an option's text
(case-insensitive substring); several candidates: the one found last in the response (ties: the earlier
option, numpy.argmax); (4) nothing found: a RANDOM letter (``random.choice(all_choices)`` after
``random.seed(42)`` at import, one stream for the whole run). Open questions: the response's key sub-responses
(the text after the last "could be", "so", "is", "thus", "therefore", "final", "answer", "result" of each
line, "=" in the last), the numbers in them, each normalised (numbers to floats rounded to 2 decimals, text
lower-case); right if a normalised gold number equals a predicted number or a gold string is a substring of a
predicted string (a one-letter gold answer must appear with a space beside it).

MMMU-Pro -- MMMU-Benchmark/MMMU ``mmmu-pro/evaluate.py`` (``parse_multi_choice_response``): first, if the
response holds "Answer:", the letters (A, B, ...) contained in the text after its last occurrence: exactly one
wins; else the tiers of MMMU with tier (2) the letter followed by a space (``"B "``, no space before: "USA is"
reads as A, as officially), a tier ``"B."`` after it, then option texts, then a random letter. Several
candidates of the letter tiers are ordered by the position of ``" B "`` (for ``"B."`` candidates that is
usually -1 for all: the first one wins), as officially. ``evaluate.py`` never seeds ``random``; vlmkit uses
seed 42 as MMMU does.

The random pick, deterministic here: :class:`random.Random` seeded 42 (what ``random.seed(42)`` gives the
global stream), one draw per unparsable multiple-choice answer in the order the answers are scored (vlmkit:
the order the samples are read). That is the official stream when the official script sees the answers in the
same order. The headline accuracy includes the random picks, as the official numbers do; ``n_random_picks``
and ``accuracy_without_random`` (random picks counted wrong) report how much of it is luck.

MMStar -- lmms-eval ``tasks/mmstar/utils.py`` ``exact_match`` (from MMStar's own code): the answer letter,
lower case, equals the prediction's first character (lower-cased, stripped), or the second after "(", or the
8th after "option ", or the 15th after "the answer is "; anything else (an empty answer too) is wrong. So
"Because..." reads as B, exactly as officially.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["DOMAIN_SUBJECTS", "MMMU_SEED", "MMMUScore", "eval_open", "extract_numbers", "mmmu_metrics",
           "mmstar_match", "normalize_str", "parse_mmmu_choice", "parse_open_response", "score_mmmu"]

MMMU_SEED = 42  # eval_utils.py: random.seed(42) at import

# the six disciplines and their subjects (MMMU's DOMAIN_CAT2SUB_CAT, the subject folders of the release)
DOMAIN_SUBJECTS: dict[str, tuple[str, ...]] = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine",
                            "Diagnostics_and_Laboratory_Medicine", "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}

Style = Literal["mmmu", "mmmu_pro"]
_STRIP = (",", ".", "!", "?", ";", ":", "'")


def _letters(options: Sequence[str]) -> dict[str, str]:
    return {chr(65 + i): str(text) for i, text in enumerate(options)}


def _argmax_first(candidates: list[str], positions: list[int]) -> str:
    best = max(positions)
    return candidates[positions.index(best)]


def parse_mmmu_choice(response: str, options: Sequence[str], rng: random.Random | None,
                      style: Style = "mmmu") -> tuple[str | None, bool]:
    """(the letter the official parser picks, whether it was a random pick). ``options`` are the option texts
    (lettered A, B, ...); ``rng`` draws the random pick (None: no pick, the letter is None)."""
    index2ans = _letters(options)
    choices = list(index2ans)
    response = "" if response is None else str(response)
    if style == "mmmu_pro":
        at = response.rfind("Answer:")
        if at != -1:
            tail = response[at + len("Answer:"):].strip()
            found = [c for c in choices if c in tail]
            if len(found) == 1:
                return found[0], False
    for char in _STRIP:
        response = response.strip(char)
    response = f" {response} "
    tiers = ("({})", " {} ") if style == "mmmu" else ("({})", "{} ", "{}.")
    candidates: list[str] = []
    for tier, pattern in enumerate(tiers):
        candidates = [c for c in choices if pattern.format(c) in response]
        if candidates:
            break
    index_ans = True
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, text in index2ans.items() if text.lower() in response.lower()]
        index_ans = False
    if not candidates:
        return (rng.choice(choices) if rng is not None else None), True
    if len(candidates) == 1:
        return candidates[0], False
    if not index_ans:
        positions = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    elif tier == 0:
        positions = [response.rfind(f"({c})") for c in candidates]
    else:
        positions = [response.rfind(f" {c} ") for c in candidates]
    return _argmax_first(candidates, positions), False


def extract_numbers(string: str) -> list[str]:
    """Every number in ``string`` (MMMU's three patterns, in their order: with thousands commas, scientific,
    plain)."""
    commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", string)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", string)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", string)
    return commas + scientific + simple


def _is_number(string: str) -> bool:
    try:
        float(string.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(string: str) -> list:
    """MMMU's normalisation: a number -> [float rounded to 2 decimals]; text -> [lower case], a one-character
    text -> [" x", "x "] (so it only matches as a word)."""
    string = string.strip()
    if _is_number(string):
        return [round(float(string.replace(",", "")), 2)]
    string = string.lower()
    return [" " + string, string + " "] if len(string) == 1 else [string]


_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def _key_subresponses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    subs = re.split(r"\.\s(?=[A-Z])|\n", response)  # lower-cased already: only newlines split, as officially
    keys = []
    for index, sub in enumerate(subs):
        indicators = _INDICATORS + (("=",) if index == len(subs) - 1 else ())
        shortest = None
        for indicator in indicators:
            if indicator in sub:
                tail = sub.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _STRIP:
            keys.append(shortest)
    return keys or [response]


def parse_open_response(response: str) -> list:
    """The normalised candidate answers of an open question's response (MMMU ``parse_open_response``)."""
    keys = _key_subresponses("" if response is None else str(response))
    preds = list(keys)
    for key in keys:
        preds += extract_numbers(key)
    out = []
    for p in preds:
        out += normalize_str(p)
    return list(dict.fromkeys(out))


def eval_open(gold: str | Sequence[str], preds: list) -> bool:
    """MMMU ``eval_open``: a predicted number equal to a normalised gold number, or a normalised gold string
    inside a predicted string."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    norm = [n for g in golds for n in normalize_str(g)]
    for pred in preds:
        if isinstance(pred, str):
            if any(isinstance(n, str) and n in pred for n in norm):
                return True
        elif pred in norm:
            return True
    return False


@dataclass(frozen=True)
class MMMUScore:
    """One scored MMMU answer: right (random picks included), and whether the letter was a random pick."""

    correct: bool
    random_pick: bool
    predicted: str | None  # the letter (multiple choice), None for an open question


def score_mmmu(response: str, question_type: str, options: Sequence[str], answer: str | Sequence[str],
               rng: random.Random | None, style: Style = "mmmu") -> MMMUScore:
    """Score one answer as MMMU's ``evaluate`` does (``question_type`` "multiple-choice" or "open"); a
    multiple-choice ``answer`` is a letter (or a list of letters), an open one a string or a list of accepted
    strings."""
    if question_type == "multiple-choice":
        letter, picked = parse_mmmu_choice(response, options, rng, style)
        golds = [answer] if isinstance(answer, str) else list(answer)
        return MMMUScore(letter is not None and letter in golds, picked, letter)
    return MMMUScore(eval_open(answer, parse_open_response(response)), False, None)


def mmmu_metrics(subjects: Iterable[str], scores: Iterable[MMMUScore]) -> dict:
    """Overall accuracy (random picks included), per discipline (the instance-level accuracy over its subjects
    present, ``calculate_ins_level_acc``) and per subject; ``n_random_picks`` and ``accuracy_without_random``.
    Subjects outside the six disciplines count in the overall accuracy only, as officially."""
    per_subject: dict[str, list[MMMUScore]] = defaultdict(list)
    for subject, score in zip(subjects, scores):
        per_subject[subject].append(score)
    every = [s for group in per_subject.values() for s in group]
    n = len(every)
    picks = sum(s.random_pick for s in every)
    out = {"accuracy": sum(s.correct for s in every) / n if n else 0.0,
           "accuracy_without_random": sum(s.correct and not s.random_pick for s in every) / n if n else 0.0,
           "n_random_picks": float(picks), "random_pick_rate": picks / n if n else 0.0}
    for domain, members in DOMAIN_SUBJECTS.items():
        group = [s for m in members for s in per_subject.get(m, [])]
        if group:
            out[f"accuracy/{domain}"] = sum(s.correct for s in group) / len(group)
    for subject, group in sorted(per_subject.items()):
        out[f"subject/{subject}"] = sum(s.correct for s in group) / len(group)
    return out


def mmstar_match(prediction: str, answer: str) -> float:
    """MMStar's ``exact_match`` (lmms-eval ``tasks/mmstar/utils.py``): 1.0 or 0.0."""
    gold = answer.lower().strip().replace("\n", " ")
    pred = ("" if prediction is None else str(prediction)).lower().strip().replace("\n", " ")
    try:
        if gold == pred[0]:
            return 1.0
        if pred[0] == "(" and gold == pred[1]:
            return 1.0
        if pred[0:7] == "option " and gold == pred[7]:
            return 1.0
        if pred[0:14] == "the answer is " and gold == pred[14]:
            return 1.0
    except IndexError:
        return 0.0
    return 0.0
