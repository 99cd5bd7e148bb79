"""Vision pretraining on object annotations: the ``cell_labels`` stage objective.

LLaVA starts from a vision tower that already sees (CLIP). From scratch, a tower learns to see far faster
from dense labels than through a language model's answers: trained only through the LM, the tiny towers'
gradient collapses once the LM has learned the text-only answer prior, and shapes are never learned in the
demo's budget (docs/design.md). This stage trains the tower alone, with temporary linear heads that predict,
for every cell of its token grid, the colour, shape and size of the object over the cell centre (or none),
taken from ShapesWorld's ``scenes.json`` (training split only). The heads are dropped after the stage;
a later stage can then freeze the tower and train connector + LM on it, as LLaVA does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.data.shapes import COLORS, SHAPES, SIZES
from vlmkit.errors import ConfigError
from vlmkit.processing.image import load_image
from vlmkit.train.optim import lr_factor, set_lr
from vlmkit.train.stream import BatchStream


def cell_labels(scene: dict, grid: tuple[int, int]) -> torch.Tensor:
    """[3, gh, gw] long: 1-based colour, shape and size ids of the object over each cell centre, 0 for none.

    "Over" means within half the larger bbox side of the object's centre (a disk that approximates every
    ShapesWorld outline); where objects overlap, the nearest centre wins.
    """
    gh, gw = grid
    out = torch.zeros(3, gh, gw, dtype=torch.long)
    colors, shapes, sizes = list(COLORS), list(SHAPES), list(SIZES)
    for gy in range(gh):
        for gx in range(gw):
            cx, cy = (gx + 0.5) * scene["width"] / gw, (gy + 0.5) * scene["height"] / gh
            best = None
            for o in scene["objects"]:
                d = ((o["center"][0] - cx) ** 2 + (o["center"][1] - cy) ** 2) ** 0.5
                if d < max(o["bbox"][2], o["bbox"][3]) / 2 and (best is None or d < best[0]):
                    best = (d, o)
            if best:
                out[0, gy, gx] = 1 + colors.index(best[1]["color"])
                out[1, gy, gx] = 1 + shapes.index(best[1]["shape"])
                out[2, gy, gx] = 1 + sizes.index(best[1]["size"])
    return out


def read_scenes(root: Path) -> dict[str, list[dict]]:
    """scenes.json grouped by split; refuses a folder without one, or without training scenes."""
    path = root / "scenes.json"
    if not path.exists():
        raise ConfigError(f"the cell_labels objective needs ShapesWorld's object annotations, {path}, which does "
                          f"not exist; point data.path at a folder written by `vlmkit data shapes`, or drop the "
                          f"cell_labels stage from the recipe")
    by_split: dict[str, list[dict]] = {}
    for s in json.loads(path.read_text()):
        by_split.setdefault(s.get("split", ""), []).append(s)
    if not by_split.get("train"):
        raise ConfigError(f"{path} has no scenes in the 'train' split")
    return by_split


class CellLabelHeads(nn.Module):
    """Linear heads on the tower's tokens: colour, shape and size, each with a "none" class.

    Size matters downstream: questions name an object by its size when another of the same shape or
    colour is in the scene ("what colour is the small circle?")."""

    def __init__(self, width: int):
        super().__init__()
        self.color = nn.Linear(width, 1 + len(COLORS))
        self.shape = nn.Linear(width, 1 + len(SHAPES))
        self.size = nn.Linear(width, 1 + len(SIZES))

    def loss_and_hits(self, feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """feats [B, N, D], labels [B, 3, gh, gw] -> (loss, object cells with all three right, object cells)."""
        loss, right = 0.0, True
        for k, head in enumerate((self.color, self.shape, self.size)):
            target, logits = labels[:, k].flatten(1), head(feats)  # [B, N], [B, N, classes]
            loss = loss + F.cross_entropy(logits.flatten(0, 1), target.flatten())
            right = right & (logits.argmax(-1) == target)
        objects = labels[:, 0].flatten(1) > 0
        return loss, int(right[objects].sum()), int(objects.sum())


def run_cell_label_stage(encoder, processor, stage, batch_size: int, root: Path, seed: int,
                         metrics, pbar, step: int, max_grad_norm: float, log,
                         stop_at_step: int | None = None) -> tuple[int, float]:
    """Train the image tower ``encoder`` (a vision-language model's, or a dual encoder's) for ``stage.steps``
    steps (or until global step ``stop_at_step``, as an interruption would); return (global step, seconds
    spent)."""
    by_split = read_scenes(root)
    scenes, held_out = by_split["train"], by_split.get("val", [])[:256]
    grid = encoder.grid
    labels = [cell_labels(s, grid) for s in scenes]
    heads = CellLabelHeads(encoder.width)
    params = [p for p in encoder.parameters() if p.requires_grad] + list(heads.parameters())
    # as make_optimizer: no weight decay on norms and biases
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": stage.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([dict(g, lr=stage.lr, base_lr=stage.lr) for g in groups], betas=tuple(stage.betas))
    stream = BatchStream(len(scenes), batch_size, seed)
    log(f"  cell labels: {len(scenes)} training images, {grid[0]}x{grid[1]} cells, batch {batch_size}")
    elapsed, hits, total = 0.0, 0, 0
    for s in range(stage.steps):
        t0 = time.perf_counter()
        set_lr(opt, lr_factor(s, stage))
        idx = stream.next()
        pixels = _pixels(processor, root, [scenes[i] for i in idx])
        loss, h, n = heads.loss_and_hits(encoder(pixels), torch.stack([labels[i] for i in idx]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed += time.perf_counter() - t0
        step += 1
        hits, total = hits + h, total + n
        pbar.update(1)
        pbar.set_postfix(stage=stage.name, loss=f"{float(loss.detach()):.3f}", cell_acc=f"{h / max(n, 1):.2f}")
        if (s + 1) % 10 == 0 or s == stage.steps - 1:
            # training-batch accuracy over the last logging window: object cells with colour, shape and size right
            metrics.write(step=step, stage=stage.name, loss=float(loss.detach()), lr=opt.param_groups[0]["lr"],
                          cell_accuracy=hits / max(total, 1), elapsed=elapsed)
            hits, total = 0, 0
        if stop_at_step is not None and step >= stop_at_step:
            return step, elapsed
    if held_out:
        acc = _held_out_accuracy(encoder, heads, processor, root, held_out)
        metrics.write(step=step, stage=stage.name, val_cell_accuracy=acc)
        log(f"  cell accuracy on {len(held_out)} validation images: {acc:.3f} (object cells: colour, shape and size right)")
    return step, elapsed


def _pixels(processor, root: Path, scenes: list[dict]) -> torch.Tensor:
    return torch.stack([processor.transform(load_image(root / s["file_name"])) for s in scenes])


@torch.no_grad()
def _held_out_accuracy(encoder, heads, processor, root: Path, scenes: list[dict]) -> float:
    was_training = encoder.training
    encoder.eval()
    hits = total = 0
    for start in range(0, len(scenes), 64):
        chunk = scenes[start:start + 64]
        labels = torch.stack([cell_labels(s, encoder.grid) for s in chunk])
        _, h, n = heads.loss_and_hits(encoder(_pixels(processor, root, chunk)), labels)
        hits, total = hits + h, total + n
    encoder.train(was_training)
    return hits / max(total, 1)
