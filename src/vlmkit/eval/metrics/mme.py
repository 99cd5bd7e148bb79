"""MME: yes/no parsing and the per-subtask acc / acc+ / score, perception and cognition totals.

Reproduces the official scorer, ``eval_tool/calculation.py`` of the MME release (class ``calculate_metrics``:
``parse_pred_ans`` and ``process_result``; LLaVA ships it unchanged under
``playground/data/eval/MME/eval_tool``):

* Parsing (:func:`parse_mme_answer`, ``style="official"``): the prediction is lower-cased (nothing else: no
  strip, no punctuation removal); if it is exactly ``yes`` or ``no`` that is the answer; otherwise its first
  four characters are searched, ``yes`` first, then ``no``; anything else is ``other`` (always wrong).
  Consequences kept on purpose: ``"Yes, there is"`` -> yes; ``"No."`` -> no; ``"Not sure"`` and ``"None"`` ->
  no (``no`` is in ``"not "`` / ``"none"``); ``"know"`` -> no; ``"The answer is yes"`` -> other; ``"y"`` ->
  other. lmms-eval's ``tasks/mme/utils.py::parse_pred_ans`` (``style="lmms_eval"``) first strips, lower-cases
  and deletes every ``.``, and reads a lone ``y`` / ``n`` as yes / no; otherwise the same. vlmkit's runner
  strips answers before scoring, so the two differ only on ``.`` inside the first four characters and lone
  ``y``/``n``.
* Scores, per subtask (``process_result``): ``acc`` = questions right / questions; ``acc+`` = images with both
  of their questions right / images; subtask score = ``(acc + acc+) * 100``. vlmkit reports ``acc`` and
  ``acc_plus`` in percent, so ``score = acc + acc_plus`` (max 200). ``perception`` sums the scores of the 10
  perception subtasks (max 2000), ``cognition`` those of the 4 cognition subtasks (max 800), ``total`` both
  (max 2800): the official tool prints the two sums; the total is what papers quote as "MME total".
* The official tool pairs the lines of a results file two by two (one image, two questions) and asserts two
  per image; vlmkit groups by (subtask, image) instead, which is the same on the official files (two lines per
  image, consecutive). An image with one question only (a ``--limit`` cutting a pair) counts in acc+ when that
  question is right. Totals cover the subtasks present (all 14 in the official release).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from vlmkit.errors import DataError

MME_PERCEPTION: tuple[str, ...] = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                                   "landmark", "artwork", "OCR")
MME_COGNITION: tuple[str, ...] = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                                  "code_reasoning")
MME_SUBTASKS: tuple[str, ...] = MME_PERCEPTION + MME_COGNITION


def parse_mme_answer(text: str, style: str = "official") -> str:
    """"yes", "no" or "other", as MME's ``calculation.py::parse_pred_ans`` reads a prediction (``style=
    "official"``) or as lmms-eval's ``parse_pred_ans`` does (``style="lmms_eval"``); see the module docstring.
    """
    if not isinstance(text, str):
        raise DataError(f"MME prediction must be a string, got {type(text).__name__}: {text!r}")
    if style not in ("official", "lmms_eval"):
        raise ValueError(f"style must be 'official' or 'lmms_eval', got {style!r}")
    pred = text.lower()
    if style == "lmms_eval":
        pred = pred.strip().replace(".", "")
        if len(pred) == 1:
            return {"y": "yes", "n": "no"}.get(pred, "other")
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def normalize_mme_label(label: str) -> str:
    """The ground truth as the official tool compares it: lower-cased, and it must be yes or no."""
    value = label.lower() if isinstance(label, str) else None
    if value not in ("yes", "no"):
        raise DataError(f"MME answer must be 'Yes' or 'No', got {label!r}")
    return value


@dataclass(frozen=True)
class MMEResult:
    """One scored MME question: its subtask, its image (the acc+ group), the parsed prediction and the label.
    """

    subtask: str
    image: str
    prediction: str  # "yes" / "no" / "other"
    label: str  # "yes" / "no"

    @property
    def correct(self) -> bool:
        return self.prediction == self.label


def score_mme(prediction: str, label: str, subtask: str, image: str, style: str = "official") -> MMEResult:
    """Parse ``prediction`` (:func:`parse_mme_answer`) and compare it with ``label``."""
    if subtask not in MME_SUBTASKS:
        raise DataError(f"unknown MME subtask {subtask!r}; MME has {', '.join(MME_SUBTASKS)}")
    return MMEResult(subtask, image, parse_mme_answer(prediction, style), normalize_mme_label(label))


def _subtask_scores(results: list[MMEResult]) -> tuple[dict[str, float], dict[str, list[bool]]]:
    by_image: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        by_image[r.image].append(r.correct)
    acc = 100.0 * sum(r.correct for r in results) / len(results)
    acc_plus = 100.0 * sum(all(v) for v in by_image.values()) / len(by_image)
    n_other = float(sum(r.prediction == "other" for r in results))
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "n_other": n_other}, by_image


def mme_metrics(results: Iterable[MMEResult]) -> dict:
    """MME's numbers over scored questions: ``<subtask>/acc``, ``<subtask>/acc_plus`` (percent),
    ``<subtask>/score`` (their sum), ``<subtask>/n_other``, ``perception``, ``cognition``, ``total`` (sums of
    subtask scores over the subtasks present), ``n_other``, ``n_images``; and ``_per_sample``: one value per
    image whose mean is ``total`` (its contribution ``100 * (right / questions of its subtask + both right /
    images of its subtask)`` times the number of images), for the bootstrap confidence interval of the total.
    """
    results = list(results)
    if not results:
        raise DataError("mme_metrics needs at least one scored question, got none")
    by_subtask: dict[str, list[MMEResult]] = defaultdict(list)
    for r in results:
        by_subtask[r.subtask].append(r)
    out: dict = {"perception": 0.0, "cognition": 0.0}
    contributions: list[float] = []
    for subtask in (s for s in MME_SUBTASKS if s in by_subtask):
        rows = by_subtask[subtask]
        scores, by_image = _subtask_scores(rows)
        out |= {f"{subtask}/{k}": v for k, v in scores.items()}
        out["perception" if subtask in MME_PERCEPTION else "cognition"] += scores["score"]
        contributions += [100.0 * (sum(v) / len(rows) + all(v) / len(by_image)) for v in by_image.values()]
    out["total"] = out["perception"] + out["cognition"]
    out["n_other"] = float(sum(r.prediction == "other" for r in results))
    out["n_images"] = float(len(contributions))
    out["n_subtasks"] = float(len(by_subtask))
    out["_per_sample"] = [c * len(contributions) for c in contributions]
    return out
