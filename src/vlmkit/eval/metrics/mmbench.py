"""The official scorers of MMBench (CircularEval over the release's rotated copies), SEED-Bench (image part) and
MME-RealWorld, reproduced with their quirks.

``mmbench_circular`` -- VLMEvalKit ``vlmeval/dataset/utils/multiple_choice.py::mcq_circular_eval`` with the
    ``exact_matching`` judge (open-compass/VLMEvalKit; lmms-eval ``tasks/mmbench/mmbench_evals.py::eval_result``
    groups the same way). The circular copies of a question are the rows whose ``index % 1e6`` is the
    question's index (the DEV TSVs hold the rotated copies as rows ``index + k * 1e6``); only questions whose
    own row (``index < 1e6``) is present are scored, and a question is right only if every copy's prediction
    is matched to its key by ``can_infer`` (:func:`vlmkit.eval.metrics.choice.parse_choice_mmbench`).
    VLMEvalKit then asks an LLM judge (ChatGPT) about copies ``can_infer`` cannot read; vlmkit does not (that is
    VLMEvalKit's ``exact_matching`` policy: an unreadable copy fails its question). ``vanilla_accuracy`` is the
    question's own row alone, scored by the same ``can_infer`` (VLMEvalKit's non-circular ``mcq_vanilla_eval``
    would read only predictions shorter than 10 characters under exact matching; not applied). Accuracy per
    ``category`` and ``l2-category`` as ``report_acc``: the mean of the questions' circular hits.
``seedbench_choice`` -- lmms-eval ``tasks/seedbench/utils.py::seed_process_result``: the stripped answer's first
    character is the prediction (``"The answer is A"`` reads as ``"T"``, wrong), compared with the key. The
    official SEED-Bench ``eval.py`` ranks the four options by likelihood instead (not a generation metric).
``mme_realworld_extract`` -- MME-RealWorld ``evaluation/eval_your_results.py::extract_characters_regex``
    (yfzhang114/MME-RealWorld; lmms-eval ``tasks/mme_realworld/utils.py`` copies it, but passes the bare
    letters ``"(A)".."(E)"`` as choices where the official script passes the question's answer choices):
    answer prefixes are removed (two of them glued together by missing commas, as officially), a response of
    more than 10 words without any of A-E is unanswered, else the FIRST capital A-E anywhere wins (so
    ``"Based on ..."`` reads as B), else the answer choice containing the (lower-cased) response -- an empty
    response is contained in every choice and reads as the first, A. Compared with ``Ground truth`` exactly.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

__all__ = [
    "MMBENCH_COPY_STRIDE",
    "mmbench_circular",
    "mme_realworld_category",
    "mme_realworld_extract",
    "mme_realworld_summary",
    "seedbench_choice",
]

MMBENCH_COPY_STRIDE = 1_000_000  # a copy's index is the question's index + k * 1e6


def mmbench_circular(passes: Sequence[tuple[int, bool, bool]], category: dict[int, str] | None = None,
                     l2_category: dict[int, str] | None = None) -> dict:
    """CircularEval over ``passes`` = (row index, correct, parsed) for every row asked. Returns the circular
    accuracy over the questions (rows with index < 1e6 and their copies ``index % 1e6``), the vanilla accuracy
    of their own rows, counts, ``_per_sample`` (each question's hit, in the order their rows were given) and
    ``circular_accuracy/{category}``, ``circular_accuracy_l2/{l2-category}`` for the categories given (keyed
    by question index)."""
    groups: dict[int, list[bool]] = defaultdict(list)
    own: dict[int, bool] = {}
    unparsed = 0
    for index, correct, parsed in passes:
        groups[index % MMBENCH_COPY_STRIDE].append(correct)
        unparsed += not parsed
        if index < MMBENCH_COPY_STRIDE:
            own[index] = correct
    hits = {q: float(all(groups[q])) for q in own}  # copies without their question's row are not scored
    n = len(hits)
    out: dict = {"circular_accuracy": sum(hits.values()) / n if n else 0.0,
                 "vanilla_accuracy": sum(own.values()) / n if n else 0.0, "n_questions": float(n),
                 "n_passes": float(sum(len(groups[q]) for q in own)), "n_unparsable": float(unparsed)}
    for prefix, names in (("circular_accuracy", category), ("circular_accuracy_l2", l2_category)):
        by: dict[str, list[float]] = defaultdict(list)
        for q, hit in hits.items():
            if names is not None:
                by[str(names.get(q))].append(hit)
        out |= {f"{prefix}/{name}": sum(v) / len(v) for name, v in sorted(by.items())}
    out["_per_sample"] = list(hits.values())
    return out


def seedbench_choice(prediction: str | None) -> str:
    """lmms-eval's SEED-Bench reading of an answer: stripped, its first character if longer than one."""
    pred = (prediction or "").strip()
    return pred[0] if len(pred) > 1 else pred


# the official list, two pairs glued by missing commas ("The best option is" "The correct option is")
_MME_RW_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                    "The best option isThe correct option is", "Best answer:Best option:")


def mme_realworld_extract(response: str | None, choices: Sequence[str]) -> str:
    """The option letter MME-RealWorld's ``extract_characters_regex`` reads in ``response`` ("" if none);
    ``choices`` are the question's answer choices ("(A) text", ...)."""
    s = (response if isinstance(response, str) else "").strip()
    for prefix in _MME_RW_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCDE]", s):
        return ""
    match = re.search(r"[ABCDE]", s)
    if match is None:
        for choice in choices:
            if s.lower() in choice.lower():
                return choice[1]
        return ""
    return match[0]


def mme_realworld_category(category: str) -> str:
    """The official grouping key of a Category: lower-cased, ``x/..attribute..`` merged into ``x/attribute``."""
    category = category.lower()
    return category.split("/")[0] + "/attribute" if "attribute" in category else category


def mme_realworld_summary(rows: Sequence[tuple[str, str, str, bool, str]]) -> dict:
    """MME-RealWorld's accuracies from (Task, Subtask, Category, correct, extracted letter) per question: overall
    (all questions), per Task (``accuracy/{Task}``), per Task and Subtask (``accuracy/{Task}/{Subtask}``) and
    per official category key (``category_accuracy/{Task}/{Subtask}/{category}``), and ``n_E``, the
    answers read as E (the official script prints them per Subtask)."""
    out: dict = {"accuracy": sum(r[3] for r in rows) / len(rows) if rows else 0.0,
                 "n_E": float(sum(r[4] == "E" for r in rows))}
    groups: dict[str, list[bool]] = defaultdict(list)
    for task, subtask, category, correct, _ in rows:
        groups[f"accuracy/{task}"].append(correct)
        groups[f"accuracy/{task}/{subtask}"].append(correct)
        groups[f"category_accuracy/{task}/{subtask}/{mme_realworld_category(category)}"].append(correct)
    out |= {key: sum(v) / len(v) for key, v in sorted(groups.items())}
    out["_per_sample"] = [float(r[3]) for r in rows]
    return out
