"""A pipeline stand-in that answers from a function, to score a task's reader and metric on hand-made answers:
``run_canned("mmbench", folder, answer)`` runs the task exactly as ``vlmkit eval`` does (its reader, prompt,
per-sample score and summary) with ``answer(images, prompt) -> str`` as the model."""

from __future__ import annotations

from pathlib import Path

from vlmkit.eval import runner
from vlmkit.eval.tasks import get_task


class CannedPipe:
    can_generate, can_embed, can_score = True, False, False

    def __init__(self, answer):
        self.answer, self.asked, self.last_errors = answer, [], []

    def chat_batch(self, requests, max_new_tokens: int = 16, **gen):
        self.asked += requests
        return [self.answer(images, prompt) for images, prompt in requests]


def run_canned(task: str, data, answer, split: str = "test", limit: int | None = None) -> tuple[dict, list[dict]]:
    """(the task's result as results.json holds it, the per-sample records of predictions_<task>.jsonl)."""
    return runner.run_task(CannedPipe(answer), get_task(task), Path(data), split, limit, batch_size=8,
                           progress=False)
