"""Exact-match visual question answering over LLaVA-format records, per question type.

The full task registry (VQAv2 scoring, captions, POPE, grounding, ...) builds on this; ShapesWorld answers
are one or two words, so exact match after light normalisation is the right metric here.
"""

from __future__ import annotations

import re
from collections import defaultdict

from tqdm.auto import tqdm

from vlmkit.data.conversations import Sample


def normalize_answer(text: str) -> str:
    """Lower-case, trim, drop a trailing full stop and collapse spaces."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.rstrip(".").strip()


def evaluate_vqa(pipe, samples: list[Sample], batch_size: int = 64, max_new_tokens: int = 8,
                 progress: bool = True) -> dict:
    """Ask every single-turn sample's question; compare with its answer. Returns accuracy overall and per type."""
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    predictions = []
    bar = tqdm(total=len(samples), desc="eval", unit="q", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        reqs = [(s.images, _turn_text(s.conversations[0])) for s in chunk]
        answers = pipe.chat_batch(reqs, max_new_tokens=max_new_tokens)
        for s, pred in zip(chunk, answers):
            truth = _turn_text(s.conversations[1])
            ok = normalize_answer(pred) == normalize_answer(truth)
            for key in ("all", s.type or "untyped"):
                hits[key][0] += int(ok)
                hits[key][1] += 1
            predictions.append({"id": s.id, "type": s.type, "question": _turn_text(s.conversations[0]),
                                "prediction": pred, "answer": truth, "correct": ok})
        bar.update(len(chunk))
    bar.close()
    by_type = {k: v[0] / v[1] for k, v in sorted(hits.items()) if k != "all"}
    counts = {k: v[1] for k, v in sorted(hits.items()) if k != "all"}
    total = hits["all"]
    return {"vqa_accuracy": total[0] / max(total[1], 1), "n": total[1], "by_type": by_type,
            "count_by_type": counts, "predictions": predictions}


def _turn_text(turn: dict) -> str:
    return str(turn.get("value", turn.get("content", "")))
