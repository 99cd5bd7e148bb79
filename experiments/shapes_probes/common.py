"""Shared pieces of the ShapesWorld probes: cell labels from scenes.json, batches, teacher-forced accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmkit.data.collate import collate
from vlmkit.data.conversations import ConversationDataset
from vlmkit.train.cell_labels import cell_labels as _cell_labels
from vlmkit.train.loop import forward_batch
from vlmkit.train.optim import lr_factor, set_lr

GRID = 8  # cells per side: the tiny-llava tower's 8x8 grid


def cell_labels(scene: dict, grid: int = GRID) -> torch.Tensor:
    """[2, grid, grid] long: colour and shape ids (1-based, 0 = nothing) of the object over each cell centre
    (the first two rows of vlmkit's ``cell_labels`` targets; the third, size, is not used here)."""
    return _cell_labels(scene, (grid, grid))[:2]


def scenes(data: Path) -> list[dict]:
    return json.loads((data / "scenes.json").read_text())


@torch.no_grad()
def answer_accuracy(model, ds: ConversationDataset, samples, pad_id: int, batch: int = 128):
    """Teacher-forced exact match: a question counts when every supervised token is the argmax."""
    model.eval()
    hit = n = 0
    per: dict[str, list[int]] = {}
    for st in range(0, len(ds), batch):
        b = collate([ds[i] for i in range(st, min(len(ds), st + batch))], pad_id)
        logits = forward_batch(model, b, labels=False).logits[:, :-1]
        target = b["labels"][:, 1:]
        ok = ((logits.argmax(-1) == target) | (target == -100)).all(1)
        hit += int(ok.sum())
        n += len(ok)
        for j, o in enumerate(ok.tolist()):
            t = samples[st + j].type
            per.setdefault(t, [0, 0])
            per[t][0] += o
            per[t][1] += 1
    model.train()
    return round(hit / n, 3), {k: round(v[0] / v[1], 2) for k, v in sorted(per.items())}


def train_vlm(model, opt, stage, ds, stream, pad_id, steps, evaluate, evals: int = 6):
    """The demo's inner loop (clip 1.0, warm-up + cosine) with ``evals`` accuracy checkpoints."""
    hist = []
    for s in range(steps):
        set_lr(opt, lr_factor(s, stage))
        b = collate([ds[i] for i in stream.next()], pad_id)
        loss = forward_batch(model, b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (s + 1) % max(1, steps // evals) == 0 or s + 1 == steps:
            hist.append((s + 1, round(float(loss.detach()), 3), evaluate()))
            print(*hist[-1], flush=True)
    return hist


def lecun_init_lm(lm: torch.nn.Module, depth: int) -> None:
    """Re-initialise the LM's linears with std 1/sqrt(fan_in); residual outputs (o_proj, down_proj) are
    further scaled by 1/sqrt(2 * depth). Embeddings keep their init."""
    for name, m in lm.named_modules():
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
            std = m.in_features**-0.5
            if name.endswith(("o_proj", "down_proj")):
                std /= (2 * depth) ** 0.5
            torch.nn.init.normal_(m.weight, std=std)
