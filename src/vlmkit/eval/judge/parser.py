"""The ShapesWorld scene parser: a small fully-convolutional CNN that reads a rendered (or generated)
ShapesWorld image and returns every object with its colour, shape, size and centre — the fixed detector of the
``shapes_t2i`` judge, as GenEval judges with a fixed object detector.

The image is read on a grid of 8x8-pixel cells (stride 8); every cell predicts whether an object's centre lies
in it (objectness), the object's colour, shape and size, and the centre's offset inside the cell. ShapesWorld
keeps objects apart, so no two centres share a cell. The network was trained on 64-pixel-high scenes (64x64,
96x64, 64x96); an image of another size is resized so that its shorter side is 64 pixels (and each side a
multiple of 8) and the centres are mapped back to its own pixels, since ShapesWorld's object sizes are
fractions of the shorter side.

The shipped weights (``shapes_parser.safetensors`` beside this module, how they were trained in
``shapes_parser.json``) are loaded by :func:`load_parser`; :mod:`vlmkit.eval.judge.train` regenerates them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlmkit.data.shapes.scenes import COLORS, SHAPES, SIZES, Scene
from vlmkit.errors import ConfigError

COLOR_NAMES = tuple(COLORS)
SIZE_NAMES = tuple(SIZES)
CELL = 8  # pixels per grid cell (the network's stride)
BASE_SIDE = 64  # the shorter side the network reads
BORDER = 1.5  # px: a centre this close to a cell's border is also the target of the cell beside it
# output channels per cell: objectness, colour logits, shape logits, size logits, centre offset (x, y)
_SLICES = {
    "obj": slice(0, 1),
    "color": slice(1, 1 + len(COLOR_NAMES)),
    "shape": slice(1 + len(COLOR_NAMES), 1 + len(COLOR_NAMES) + len(SHAPES)),
}
_SLICES["size"] = slice(_SLICES["shape"].stop, _SLICES["shape"].stop + len(SIZE_NAMES))
_SLICES["offset"] = slice(_SLICES["size"].stop, _SLICES["size"].stop + 2)
OUT_CHANNELS = _SLICES["offset"].stop
WEIGHTS = Path(__file__).with_name("shapes_parser.safetensors")
TRAINING_RECORD = Path(__file__).with_name("shapes_parser.json")


@dataclass(frozen=True)
class ParsedObject:
    """One object the parser found: its attributes, its centre in the image's pixels and its objectness."""

    color: str
    shape: str
    size: str
    cx: float
    cy: float
    score: float


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SceneParser(nn.Module):
    """[B, 3, H, W] images (0..1) -> [B, OUT_CHANNELS, H/8, W/8] per-cell predictions; H and W multiples of
    8."""

    def __init__(self, width: int = 64):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            _block(3, w // 4, 1),
            _block(w // 4, w // 2, 2),
            _block(w // 2, 3 * w // 4, 2),
            _block(3 * w // 4, w, 2),
            _block(w, w, 1),
            _block(w, w, 1),
            nn.Conv2d(w, OUT_CHANNELS, 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images - 0.5)


# ------------------------------------------------------------------------------------------- images, targets


def _network_size(width: int, height: int) -> tuple[int, int]:
    """The size the network reads an image of ``width`` x ``height`` at: shorter side 64, sides multiples of
    8."""
    scale = BASE_SIDE / min(width, height)
    return (max(CELL, round(width * scale / CELL) * CELL), max(CELL, round(height * scale / CELL) * CELL))


def image_tensor(image) -> tuple[torch.Tensor, tuple[float, float]]:
    """A PIL image -> ([3, h, w] float tensor at the network's size, (x, y) factors from its pixels back to
    the image's)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ConfigError(f"the scene parser reads PIL images, got {type(image).__name__}")
    image = image.convert("RGB")
    w, h = _network_size(*image.size)
    factors = (image.size[0] / w, image.size[1] / h)
    if (w, h) != image.size:
        image = image.resize((w, h), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), factors


def scene_targets(scene: Scene) -> dict[str, torch.Tensor]:
    """The per-cell targets of a scene rendered at the network's size: objectness [h, w], colour / shape /
    size class [h, w] (-1 where no centre lies) and the centre's offset from the cell's corner, in cells
    [2, h, w]. A centre within ``BORDER`` px of a cell's border is the target of the cell beside it too (which
    cell holds a centre on a border is not clear from the pixels; decoding merges the two)."""
    gh, gw = scene.height // CELL, scene.width // CELL
    obj = torch.zeros(gh, gw)
    classes = {k: torch.full((gh, gw), -1, dtype=torch.long) for k in ("color", "shape", "size")}
    offset = torch.zeros(2, gh, gw)
    for o in scene.objects:
        rows = range(max(0, int((o.cy - BORDER) // CELL)), min(gh - 1, int((o.cy + BORDER) // CELL)) + 1)
        cols = range(max(0, int((o.cx - BORDER) // CELL)), min(gw - 1, int((o.cx + BORDER) // CELL)) + 1)
        for i in rows:
            for j in cols:
                obj[i, j] = 1.0
                classes["color"][i, j] = COLOR_NAMES.index(o.color)
                classes["shape"][i, j] = SHAPES.index(o.shape)
                classes["size"][i, j] = SIZE_NAMES.index(o.size)
                offset[:, i, j] = torch.tensor([o.cx / CELL - j, o.cy / CELL - i])
    return {"obj": obj, **classes, "offset": offset}


def _offsets(logits: torch.Tensor) -> torch.Tensor:
    """Offset logits -> offsets in cells, in [-0.25, 1.25] (a centre up to BORDER px outside its cell)."""
    return torch.sigmoid(logits) * 1.5 - 0.25


def parser_loss(out: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Objectness BCE over every cell + cross-entropy of colour, shape and size and the offsets' L1 at the
    cells holding a centre (targets batched: [B, h, w], offset [B, 2, h, w])."""
    f = nn.functional
    loss = f.binary_cross_entropy_with_logits(out[:, _SLICES["obj"]].squeeze(1), targets["obj"])
    pos = targets["obj"] > 0.5
    if pos.any():
        for key in ("color", "shape", "size"):
            logits = out[:, _SLICES[key]].permute(0, 2, 3, 1)[pos]
            loss = loss + f.cross_entropy(logits, targets[key][pos])
        offsets = _offsets(out[:, _SLICES["offset"]]).permute(0, 2, 3, 1)[pos]
        loss = loss + 4.0 * f.l1_loss(offsets, targets["offset"].permute(0, 2, 3, 1)[pos])
    return loss


# ------------------------------------------------------------------------------------------- decoding


def decode(
    out: torch.Tensor,
    factors: tuple[float, float] = (1.0, 1.0),
    threshold: float = 0.5,
    min_distance: float = 4.0,
) -> list[ParsedObject]:
    """One image's per-cell predictions [C, h, w] -> its objects, centres in the image's pixels: the cells
    whose objectness passes ``threshold``; of two detections closer than ``min_distance`` network pixels (one
    centre near a cell border is the target of the cells on both sides) the surer is kept."""
    score = torch.sigmoid(out[_SLICES["obj"]][0])
    offsets = _offsets(out[_SLICES["offset"]])
    selected = score > threshold
    found = []
    for i, j in selected.nonzero().tolist():
        cx, cy = (j + float(offsets[0, i, j])) * CELL, (i + float(offsets[1, i, j])) * CELL
        found.append((float(score[i, j]), cx, cy, i, j))
    kept: list[tuple] = []
    for det in sorted(found, reverse=True):
        if all((det[1] - k[1]) ** 2 + (det[2] - k[2]) ** 2 >= min_distance**2 for k in kept):
            kept.append(det)
    objects = []
    for s, cx, cy, i, j in sorted(kept, key=lambda d: (d[1], d[2])):
        pick = {k: int(out[_SLICES[k], i, j].argmax()) for k in ("color", "shape", "size")}
        objects.append(
            ParsedObject(
                COLOR_NAMES[pick["color"]],
                SHAPES[pick["shape"]],
                SIZE_NAMES[pick["size"]],
                round(cx * factors[0], 2),
                round(cy * factors[1], 2),
                round(s, 4),
            )
        )
    return objects


def load_parser(path: str | Path | None = None) -> SceneParser:
    """The shipped parser (or the weights at ``path``), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else WEIGHTS
    if not path.is_file():
        raise ConfigError(
            f"{path}: scene parser weights not found; regenerate them with "
            f"`python -m vlmkit.eval.judge.train --out {path}`"
        )
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    width = int(state["net.0.0.weight"].shape[0]) * 4
    model = SceneParser(width)
    model.load_state_dict(state)
    return model.eval()


def training_record() -> dict:
    """How the shipped weights were trained (steps, seed, time, held-out accuracy), as train.py recorded
    it."""
    return json.loads(TRAINING_RECORD.read_text(encoding="utf-8")) if TRAINING_RECORD.is_file() else {}


_SHIPPED: SceneParser | None = None


@torch.no_grad()
def parse_images(
    images: list, model: SceneParser | None = None, batch_size: int = 64
) -> list[list[ParsedObject]]:
    """Every object in each PIL image (the shipped parser unless ``model`` is given). Images of one size are
    read in batches."""
    global _SHIPPED
    if model is None:
        _SHIPPED = _SHIPPED or load_parser()
        model = _SHIPPED
    prepared = [image_tensor(im) for im in images]
    results: list[list[ParsedObject] | None] = [None] * len(images)
    by_shape: dict[tuple, list[int]] = {}
    for n, (t, _) in enumerate(prepared):
        by_shape.setdefault(tuple(t.shape), []).append(n)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            out = model(torch.stack([prepared[n][0] for n in chunk]))
            for n, o in zip(chunk, out):
                results[n] = decode(o, prepared[n][1])
    return results  # type: ignore[return-value]


def parse_image(image, model: SceneParser | None = None) -> list[ParsedObject]:
    """Every object in one PIL image, left to right."""
    return parse_images([image], model)[0]


def agreement(reference: list[ParsedObject], other: list[ParsedObject], radius: float = 4.0) -> float:
    """The fraction of the ``reference`` scene's judged attributes (colour, shape and size of each object)
    that ``other`` reproduces: each reference object is matched to the nearest unmatched object of ``other``
    within ``radius`` px (none: its three attributes are lost). E.g. how a VQ reconstruction reads against its
    original: ``agreement(parse_image(original), parse_image(reconstruction))``. 1.0 when ``reference`` is
    empty and ``other`` too, else 0.0 for an empty reference."""
    if not reference:
        return float(not other)
    free, kept = list(other), 0
    for o in reference:
        near = [f for f in free if (f.cx - o.cx) ** 2 + (f.cy - o.cy) ** 2 <= radius**2]
        if near:
            best = min(near, key=lambda f: (f.cx - o.cx) ** 2 + (f.cy - o.cy) ** 2)
            free.remove(best)
            kept += sum(getattr(best, k) == getattr(o, k) for k in ("color", "shape", "size"))
    return kept / (3 * len(reference))
