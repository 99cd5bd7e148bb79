"""The task registry: a task is a data reader + a prompt format + a per-sample score + an aggregate.

Tasks register here: the built-in ones in :mod:`vlmkit.eval.tasks`, the official benchmarks in
:mod:`vlmkit.eval.benchmarks` (importing :mod:`vlmkit.eval.tasks` registers them all).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlmkit.errors import ConfigError
from vlmkit.eval.readers import EvalSample


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    metric: str  # the headline metric: each sample's score of that name is what the confidence interval is of
    data: str  # the files it reads under the data folder ({split} filled in), for `vlmkit tasks`
    read: Callable[[Path, str, int | None], list[EvalSample]]  # (data folder, split, limit) -> samples
    prompt: Callable[[EvalSample], str]  # the question as asked (the model's chat template is applied after)
    score: Callable[[str, EvalSample], dict[str, float]]  # (prediction, sample) -> per-sample scores
    group_by: str = ""  # a meta key whose groups get their own headline score (e.g. question type)
    max_new_tokens: int = 16
    # (predictions, samples) -> metrics, for metrics that are not means of per-sample scores (POPE's F1, the
    # caption metrics); None: the mean of each per-sample score, and the headline per group. A "_per_sample"
    # entry (the headline per sample) is what the confidence interval is computed from, when score gives none
    summarize: Callable[[list[str], list[EvalSample]], dict[str, float]] | None = None
    # tasks that rank candidates instead of generating (zero-shot classification, retrieval): (pipeline,
    # samples, data folder, progress) -> (predictions, per-sample scores, metrics over the set); the runner skips
    # generation and ``score``
    evaluate: Callable | None = None
    # the samples that are scored together (the circular copies of one question, MME's two questions of one image,
    # HallusionBench's figure and question groups): a meta key, or sample -> the keys of the groups it is in. When
    # the model failed on a sample (an endpoint's failed request), every sample sharing a group with it is left
    # out of the metrics too, not only the failed one; "" = each sample on its own
    failure_unit: str | Callable[[EvalSample], tuple] = ""
    # (the model or endpoint) -> why the task cannot run on it, or "": asked for every task of a run right after
    # the model loads, before any task runs (so that a task the model cannot do never costs the others' results)
    refuse: Callable[[object], str] | None = None

    def units(self, sample: EvalSample) -> tuple:
        """The groups ``sample`` is scored in (see ``failure_unit``), as hashable keys."""
        if not self.failure_unit:
            return ()
        if callable(self.failure_unit):
            return tuple(self.failure_unit(sample))
        return ((self.failure_unit, sample.meta.get(self.failure_unit)),)


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} registered twice")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))} (see `vlmkit tasks`)")
    return TASKS[name]


def aggregate(task: Task, scores: list[dict[str, float]], samples: list[EvalSample],
              predictions: list[str]) -> dict[str, float]:
    """The task's own ``summarize``, or the mean of every per-sample score over the samples and the headline
    metric per ``group_by`` group."""
    if task.summarize is not None:
        return task.summarize(predictions, samples)
    out: dict[str, float] = {}
    for key in scores[0] if scores else ():
        out[key] = sum(s[key] for s in scores) / len(scores)
    if task.group_by:
        groups: dict[str, list[float]] = defaultdict(list)
        for s, sample in zip(scores, samples):
            groups[str(sample.meta.get(task.group_by))].append(s[task.metric])
        out |= {f"{task.metric}/{g}": sum(v) / len(v) for g, v in sorted(groups.items())}
    return out
