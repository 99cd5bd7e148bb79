"""Vision pretraining on object annotations: the ``cell_labels`` stage objective (:class:`CellLabelsObjective`).

LLaVA starts from a vision tower that already sees (CLIP). From scratch, a tower learns to see far faster
from dense labels than through a language model's answers: trained only through the LM, the tiny towers'
gradient collapses once the LM has learned the text-only answer prior, and shapes are never learned in the
demo's budget (docs/design.md). This stage trains the tower alone, with temporary linear heads that predict,
for every cell of its token grid, the colour, shape and size of the object over the cell centre (or none),
taken from ShapesWorld's ``scenes.json`` (training split only), and with the stage's ``where: true`` each cell's
row and column as well (a model whose image states do not carry where they were computed, Fuyu's LM, must learn
them to answer where objects are; a tower with position embeddings has them). The heads are dropped after the
stage; a later stage can then freeze the tower and train connector + LM on it, as LLaVA does. A model without a
tower (Fuyu: patches -> one Linear -> the LM) pretrains what sees its images instead, the patch projection and the
LM read at the image positions (``Family.image_groups``, the model's ``image_tower()``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.data.shapes import COLORS, SHAPES, SIZES
from vlmkit.errors import ConfigError
from vlmkit.family import family_of
from vlmkit.objectives import Objective, StepResult, register
from vlmkit.presets import get_preset
from vlmkit.processing.image import load_image
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
    """Linear heads on the tower's tokens: colour, shape and size, each with a "none" class, and with ``grid`` the
    row and the column of the cell (the tokens in reading order).

    Size matters downstream: questions name an object by its size when another of the same shape or
    colour is in the scene ("what colour is the small circle?"). Where matters to a model whose states do not
    carry it (Fuyu's; recipes/tiny-fuyu.yaml): predicting the row and the column as classes taught tiny-fuyu where
    objects are (position questions 0.99), regressing them scaled to [-1, 1] did not as well (0.81)."""

    def __init__(self, width: int, grid: tuple[int, int] | None = None):
        super().__init__()
        self.color = nn.Linear(width, 1 + len(COLORS))
        self.shape = nn.Linear(width, 1 + len(SHAPES))
        self.size = nn.Linear(width, 1 + len(SIZES))
        self.grid = grid
        if grid:
            self.row, self.column = nn.Linear(width, grid[0]), nn.Linear(width, grid[1])

    def loss_and_hits(self, feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
        """feats [B, N, D], labels [B, 3, gh, gw] -> (loss, object cells with all three right, object cells, cells
        with row and column right: 0 without a grid)."""
        loss, right, where_hits = 0.0, True, 0
        for k, head in enumerate((self.color, self.shape, self.size)):
            target, logits = labels[:, k].flatten(1), head(feats)  # [B, N], [B, N, classes]
            loss = loss + F.cross_entropy(logits.flatten(0, 1), target.flatten())
            right = right & (logits.argmax(-1) == target)
        if self.grid:
            gh, gw = self.grid
            where = True
            for head, target in ((self.row, torch.arange(gh).repeat_interleave(gw)),
                                 (self.column, torch.arange(gw).repeat(gh))):
                logits = head(feats)  # [B, N, gh or gw]; cells in reading order
                loss = loss + F.cross_entropy(logits.flatten(0, 1), target.repeat(len(feats)))
                where = where & (logits.argmax(-1) == target)
            where_hits = int(where.sum())
        objects = labels[:, 0].flatten(1) > 0
        return loss, int(right[objects].sum()), int(objects.sum()), where_hits


def _pixels(processor, root: Path, scenes: list[dict]) -> torch.Tensor:
    return torch.stack([processor.transform(load_image(root / s["file_name"])) for s in scenes])


@torch.no_grad()
def _held_out_accuracy(encoder, heads, processor, root: Path, scenes: list[dict]) -> dict[str, float]:
    """val_cell_accuracy (object cells with colour, shape and size right) and, with where heads, val_where_accuracy
    (cells with row and column right)."""
    was_training = encoder.training
    encoder.eval()
    hits = total = where = 0
    for start in range(0, len(scenes), 64):
        chunk = scenes[start:start + 64]
        labels = torch.stack([cell_labels(s, encoder.grid) for s in chunk])
        _, h, n, w = heads.loss_and_hits(encoder(_pixels(processor, root, chunk)), labels)
        hits, total, where = hits + h, total + n, where + w
    encoder.train(was_training)
    out = {"val_cell_accuracy": hits / max(total, 1)}
    if heads.grid:
        out["val_where_accuracy"] = where / (len(scenes) * heads.grid[0] * heads.grid[1])
    return out


def check_trains(recipe, family) -> None:
    """Each cell_labels stage trains the module groups that see images (``Family.image_groups``), and only them."""
    want = list(family.image_groups)
    for i, st in enumerate(recipe.stages):
        if st.objective == "cell_labels" and sorted(st.train) != sorted(want):  # in any order
            raise ConfigError(f"stages[{i}]: the cell_labels objective trains what sees an image before the LM reads "
                              f"it, alone ({family.name}: {', '.join(want)}); set train: {want}, got {st.train}")


@register
class CellLabelsObjective(Objective):
    """what sees images, alone: colour, shape and size under each cell of its grid (ShapesWorld's scenes.json)"""

    name = "cell_labels"
    resumable = False  # short: an interrupted stage reruns whole
    distributed = False  # every rank runs it whole (the same seeded computation: the replicas stay equal)
    log_every = 10
    optimizers = ("adamw",)
    own_batch_size = True
    stage_options = ("where",)

    @classmethod
    def check_recipe(cls, recipe) -> None:
        """A from-scratch model's family is the preset's: its stages train what sees images alone."""
        if not recipe.init_from:
            check_trains(recipe, family_of(get_preset(recipe.preset).model))

    def start(self, stage, si: int, model) -> None:
        run = self.run
        check_trains(run.recipe, family_of(run.cfg))
        if run.info.strategy == "fsdp":
            from torch.distributed.fsdp import FSDPModule

            if isinstance(model, FSDPModule):
                raise ConfigError("a cell_labels stage after a sharded (FSDP) stage: put it first, or use DDP")
        self.root = Path(run.recipe.data.path or ".")
        by_split = read_scenes(self.root)
        self.scenes, self.held_out = by_split["train"], by_split.get("val", [])[:256]
        self.tower = model.image_tower()
        self.labels = [cell_labels(s, self.tower.grid) for s in self.scenes]
        self.heads = CellLabelHeads(self.tower.width, self.tower.grid if stage.where else None)
        self.batch_size = stage.batch_size or run.recipe.train.batch_size
        self.stream = BatchStream(len(self.scenes), self.batch_size, run.recipe.train.seed + si)
        self.hits = self.total = 0
        gh, gw = self.tower.grid
        run.log(f"  cell labels: {len(self.scenes)} training images, {gh}x{gw} cells"
                f"{' (and their rows and columns)' if stage.where else ''}, batch {self.batch_size}")

    def parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def step(self, net, model) -> StepResult:
        idx = self.stream.next()
        pixels = _pixels(self.run.processor, self.root, [self.scenes[i] for i in idx])
        loss, hits, total, _ = self.heads.loss_and_hits(self.tower(pixels),
                                                        torch.stack([self.labels[i] for i in idx]))
        loss.backward()
        self.hits, self.total = self.hits + hits, self.total + total
        return StepResult(float(loss.detach()), metrics={"batch_accuracy": hits / max(total, 1)})

    def row(self, result: StepResult) -> dict:
        """Training-batch accuracy over the last logging window: object cells with colour, shape and size right."""
        accuracy, self.hits, self.total = self.hits / max(self.total, 1), 0, 0
        return {"cell_accuracy": accuracy, "elapsed": self.run.elapsed}

    def postfix(self, result: StepResult) -> dict:
        return {"cell_acc": f"{result.metrics['batch_accuracy']:.2f}"}

    def validation_due(self, step: int, last: bool) -> bool:
        return last

    def validate(self, model, last: bool) -> dict[str, float]:
        if not self.held_out:
            return {}
        out = _held_out_accuracy(self.tower, self.heads, self.run.processor, self.root, self.held_out)
        where = (f"; rows and columns of all cells: {out['val_where_accuracy']:.3f}"
                 if "val_where_accuracy" in out else "")
        self.run.log(f"  cell accuracy on {len(self.held_out)} validation images: {out['val_cell_accuracy']:.3f} "
                     f"(object cells: colour, shape and size right){where}")
        return out
