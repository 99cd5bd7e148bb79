"""HallusionBench: yes/no extraction without a judge, correctness, and aAcc / fAcc / qAcc.

Reproduces the official metrics of tianyi-lab/HallusionBench (``utils.py``: ``assign_correctness``,
``get_eval_all``, ``get_eval_fig``, ``get_eval_pair_all``, ``get_eval_pair_easy`` / ``_hard``;
``evaluation.py`` prints them):

* ``aAcc`` (``get_eval_all``, "Acc per question"): questions right / questions.
* ``fAcc`` (``get_eval_fig``, "Acc per figure"): a figure, the group (category, subcategory, set_id,
  figure_id), is right when all its questions are; rows of category VS with figure_id 0 (the questions asked
  without an image) are left out, as the official code does.
* ``qAcc`` (``get_eval_pair_all``, "Acc per question pair"): a question, the group (category, subcategory,
  set_id, question_id), is right when it is right on every figure it is asked with (the original, the edited
  one and, for VS, without an image). ``qAcc_easy`` / ``qAcc_hard`` (``get_eval_pair_easy`` / ``_hard``) take
  only the rows with figure_id 0 / the others. The leaderboard ranks by qAcc: it is vlmkit's headline. All in
  percent.
* Correctness (``assign_correctness``): the judge's verdict is 1 (correct), 0 (incorrect) or 2 (unclear); a
  question is right on a verdict 1, and also on a verdict 2 when it is a VS question without an image (not
  knowing is right when there is nothing to see).

**Deviation: no GPT judge.** The official pipeline asks GPT-4 whether the answer agrees with
``gt_answer_details``. vlmkit reads the answer with VLMEvalKit's rule (``vlmeval/dataset/utils/yorn.py::
YOrN_Extraction``, its judge-free path): lower-case, VQA punctuation processing
(:func:`vlmkit.eval.metrics.vqa.vqa_process_punctuation`), split on whitespace; "yes" if the word ``yes`` is
there and ``no`` is not, "no" in the opposite case, else "unknown". The verdict is then 1 if the extracted
answer equals ``gt_answer`` (1 = yes, 0 = no), 0 if it is the other one, 2 if unknown, and
``assign_correctness`` applies (so an unknown answer to a VS question without an image counts as right, as an
"unclear" verdict does officially; VLMEvalKit's ``Hallusion_rating`` counts every unknown as wrong).
``n_unknown`` counts unknown answers. The numbers compare with judge-free (exact matching) runs of VLMEvalKit,
not with GPT-judged ones.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from vlmkit.errors import DataError
from vlmkit.eval.metrics.vqa import vqa_process_punctuation

HALLUSION_CATEGORIES: tuple[str, ...] = ("VD", "VS")


def extract_yes_no(text: str) -> str:
    """"yes", "no" or "unknown" by VLMEvalKit's ``YOrN_Extraction`` (see the module docstring)."""
    if not isinstance(text, str):
        raise DataError(f"HallusionBench prediction must be a string, got {type(text).__name__}: {text!r}")
    words = vqa_process_punctuation(text.lower()).split()
    if "yes" in words and "no" not in words:
        return "yes"
    if "no" in words and "yes" not in words:
        return "no"
    return "unknown"


@dataclass(frozen=True)
class HallusionResult:
    """One scored HallusionBench question: its group keys, the extracted answer and whether it counts as
    right."""

    category: str  # "VD" | "VS"
    subcategory: str
    set_id: str
    figure_id: str
    question_id: str
    prediction: str  # "yes" / "no" / "unknown"
    label: str  # "yes" / "no"

    @property
    def verdict(self) -> str:
        """The judge's verdict this stands in for: "1" correct, "0" incorrect, "2" unclear."""
        if self.prediction == "unknown":
            return "2"
        return "1" if self.prediction == self.label else "0"

    @property
    def correct(self) -> bool:
        """``assign_correctness``: verdict 1, or verdict 2 on a VS question asked without an image (figure 0).
        """
        if self.category == "VS" and self.figure_id == "0":
            return self.verdict in ("1", "2")
        return self.verdict == "1"


def score_hallusion(prediction: str, gt_answer: str, category: str, subcategory: str, set_id: str,
                    figure_id: str, question_id: str) -> HallusionResult:
    """Extract the answer of ``prediction`` and score it against ``gt_answer`` ("1" yes / "0" no)."""
    if str(gt_answer) not in ("0", "1"):
        raise DataError(f"HallusionBench gt_answer must be '0' (no) or '1' (yes), got {gt_answer!r}")
    if category not in HALLUSION_CATEGORIES:
        raise DataError(f"HallusionBench category must be 'VD' or 'VS', got {category!r}")
    return HallusionResult(category, subcategory, str(set_id), str(figure_id), str(question_id),
                           extract_yes_no(prediction), "yes" if str(gt_answer) == "1" else "no")


def _group_accuracy(results: list[HallusionResult], key) -> tuple[float, int]:
    groups: dict[tuple, list[bool]] = defaultdict(list)
    for r in results:
        groups[key(r)].append(r.correct)
    return (100.0 * sum(all(v) for v in groups.values()) / len(groups) if groups else 0.0), len(groups)


def _figure_key(r: HallusionResult) -> tuple:
    return (r.category, r.subcategory, r.set_id, r.figure_id)


def _question_key(r: HallusionResult) -> tuple:
    return (r.category, r.subcategory, r.set_id, r.question_id)


def _accuracies(results: list[HallusionResult]) -> dict[str, float]:
    """aAcc, fAcc (when there are figures), qAcc over ``results``."""
    out = {"aAcc": 100.0 * sum(r.correct for r in results) / len(results)}
    figures = [r for r in results if not (r.category == "VS" and r.figure_id == "0")]
    if figures:
        out["fAcc"] = _group_accuracy(figures, _figure_key)[0]
    out["qAcc"] = _group_accuracy(results, _question_key)[0]
    return out


def hallusion_metrics(results: Iterable[HallusionResult]) -> dict:
    """``aAcc``, ``fAcc``, ``qAcc`` (percent) over all questions and per category (``VD/aAcc``, ...),
    ``qAcc_easy`` / ``qAcc_hard``, the counts ``n_figures``, ``n_question_groups``, ``n_unknown``; and
    ``_per_sample``, one 0/100 per question group (mean = qAcc), for the bootstrap confidence interval of the
    headline."""
    results = list(results)
    if not results:
        raise DataError("hallusion_metrics needs at least one scored question, got none")
    out: dict = _accuracies(results)
    for category in HALLUSION_CATEGORIES:
        subset = [r for r in results if r.category == category]
        if subset:
            out |= {f"{category}/{k}": v for k, v in _accuracies(subset).items()}
    for name, subset in (("easy", [r for r in results if r.figure_id == "0"]),
                         ("hard", [r for r in results if r.figure_id != "0"])):
        if subset:
            out[f"qAcc_{name}"] = _group_accuracy(subset, _question_key)[0]
    groups: dict[tuple, list[bool]] = defaultdict(list)
    for r in results:
        groups[_question_key(r)].append(r.correct)
    figures = {_figure_key(r) for r in results if not (r.category == "VS" and r.figure_id == "0")}
    out |= {"n_figures": float(len(figures)), "n_question_groups": float(len(groups)),
            "n_unknown": float(sum(r.prediction == "unknown" for r in results))}
    out["_per_sample"] = [100.0 * all(v) for v in groups.values()]
    return out
