"""POPE (Polling-based Object Probing Evaluation): yes/no parsing and accuracy / precision / recall / F1 / yes-ratio.

Reproduces the official scorer, ``evaluate.py`` of RUCAIBox/POPE (copied unchanged into LLaVA as
``llava/eval/eval_pope.py::eval_pope``, which also splits the questions by their ``category``):

* Parsing (:func:`parse_pope_answer`): if the answer contains a ``.``, only the text before the first ``.`` is
  kept ("the first sentence"); commas are deleted; the text is split on single spaces (``str.split(' ')``,
  not on any whitespace); the answer is **no** if one of those words is exactly ``No``, ``no`` or ``not``,
  and **yes** otherwise. Consequences, all kept on purpose because they move the published numbers:
  an empty answer is "yes"; ``NO``, ``Not`` and ``isn't`` are not negative words; ``No!`` and ``No\\n``
  are not the word ``No`` (only ``.`` ends a sentence, only a space separates words); ``Yes. There is no
  dog.`` is "yes" (the second sentence is ignored). LLaVA strips the generated text before scoring; callers
  should do the same.
* Metrics: positive class = "yes". ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``,
  ``f1 = 2PR / (P + R)``, ``accuracy = (TP + TN) / N``, ``yes_ratio`` = share of answers parsed as yes.
  Where the official script divides by zero (e.g. no "yes" answer at all) this module returns 0.0.
* Splits: POPE has three question sets (random / popular / adversarial) that are reported separately; when the
  samples carry a split, :func:`pope_metrics` reports each one under ``"<split>/<metric>"`` and the unweighted
  mean over splits under ``"split_mean/<metric>"`` (LLaVA-1.5 style papers quote that mean F1); the
  unprefixed keys pool all samples.

POPE never has an unparsable prediction (everything without a negative word is "yes"); as a diagnostic,
``n_implicit_yes`` counts answers turned into "yes" although their first sentence has no word "yes".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vlmkit.errors import DataError

#: The official scorer's negative words, matched exactly (case-sensitive) against space-separated words.
NEGATIVE_WORDS: frozenset[str] = frozenset({"No", "no", "not"})
METRIC_NAMES: tuple[str, ...] = ("accuracy", "precision", "recall", "f1", "yes_ratio")


@dataclass(frozen=True)
class PopeResult:
    """One scored POPE question."""

    prediction: str  # "yes" or "no", as parsed from the model's text
    label: str  # "yes" or "no"
    split: str | None  # "random" / "popular" / "adversarial", or None
    implicit_yes: bool  # parsed as "yes" without the word "yes" in the first sentence (diagnostic)

    @property
    def correct(self) -> bool:
        return self.prediction == self.label

    @property
    def score(self) -> float:
        """1.0 when the parsed answer equals the label, else 0.0."""
        return float(self.correct)


def _first_sentence_words(text: str) -> list[str]:
    if "." in text:
        text = text.split(".")[0]
    return text.replace(",", "").split(" ")


def parse_pope_answer(text: str) -> str:
    """Map a model answer to "yes"/"no" exactly like POPE's ``evaluate.py`` (first sentence, No/no/not -> "no")."""
    if not isinstance(text, str):
        raise DataError(f"POPE prediction must be a string, got {type(text).__name__}: {text!r}")
    words = _first_sentence_words(text)
    return "no" if any(w in NEGATIVE_WORDS for w in words) else "yes"


def normalize_pope_label(label: str) -> str:
    """Return "yes" or "no" for a ground-truth label (case and surrounding spaces ignored); raise otherwise."""
    value = label.strip().lower() if isinstance(label, str) else None
    if value not in ("yes", "no"):
        raise DataError(f"POPE field 'label' must be 'yes' or 'no', got {label!r}")
    return value


def score_pope(prediction: str, label: str, split: str | None = None) -> PopeResult:
    """Score one POPE question: parse ``prediction`` (see :func:`parse_pope_answer`) and compare with ``label``."""
    parsed = parse_pope_answer(prediction)
    has_yes_word = any(w.strip("!?;:'\"").lower() == "yes" for w in _first_sentence_words(prediction))
    return PopeResult(prediction=parsed, label=normalize_pope_label(label), split=split,
                      implicit_yes=parsed == "yes" and not has_yes_word)


def _confusion_metrics(results: list[PopeResult]) -> dict[str, float]:
    tp = sum(r.prediction == "yes" and r.label == "yes" for r in results)
    fp = sum(r.prediction == "yes" and r.label == "no" for r in results)
    tn = sum(r.prediction == "no" and r.label == "no" for r in results)
    fn = sum(r.prediction == "no" and r.label == "yes" for r in results)
    n = len(results)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "n": float(n), "tp": float(tp), "fp": float(fp), "tn": float(tn),
            "fn": float(fn), "n_implicit_yes": float(sum(r.implicit_yes for r in results))}


def pope_metrics(results: Iterable[PopeResult]) -> dict[str, float]:
    """Aggregate scored questions into POPE's numbers (see the module docstring for the keys).

    Returns the pooled ``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio``, the counts ``n``, ``tp``,
    ``fp``, ``tn``, ``fn``, ``n_implicit_yes``; and, if any result has a split, the same per split as
    ``"<split>/<key>"`` plus ``"split_mean/<metric>"`` (unweighted mean over splits of the five metrics).
    Results without a split count only in the pooled keys.
    """
    results = list(results)
    if not results:
        raise DataError("pope_metrics needs at least one scored question, got none")
    out = _confusion_metrics(results)
    splits = sorted({r.split for r in results if r.split is not None})
    per_split = {s: _confusion_metrics([r for r in results if r.split == s]) for s in splits}
    for split, metrics in per_split.items():
        out.update({f"{split}/{key}": value for key, value in metrics.items()})
    if per_split:
        for name in METRIC_NAMES:
            out[f"split_mean/{name}"] = sum(m[name] for m in per_split.values()) / len(per_split)
    return out
