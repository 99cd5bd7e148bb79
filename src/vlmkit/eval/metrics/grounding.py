"""Referring-expression grounding (RefCOCO / RefCOCO+ / RefCOCOg): box parsing, IoU and accuracy at IoU >= 0.5.

Reference: Qwen-VL's ``eval_mm/evaluate_grounding.py`` (the scorer behind the RefCOCO numbers of Qwen-VL and
the models that copied it). It takes the first ``(x1,y1),(x2,y2)`` pair in the answer, divides by **999** (the
model writes integer coordinates in [0, 1000)), multiplies x by the image width and y by the height, computes
the IoU with the ground-truth pixel box (torchvision-style ``box_iou``: continuous coordinates, no ``+1``) and
counts a hit when ``iou >= 0.5``; an answer it cannot parse becomes the box (0, 0, 0, 0), i.e. a miss.

This module does the same, and also reads the other common answer forms:

* ``qwen``: ``<box>(x1,y1),(x2,y2)</box>`` - also without the tags (the official prompt ends with ``<box>`` so
  the model only writes the pairs) and with spaces around numbers; coordinates are in Qwen's 0-1000 grid and
  are converted with ``value / qwen_scale * size`` (``qwen_scale`` = 999 as in the official scorer).
* ``normalized``: four numbers in brackets or parentheses, ``[x1, y1, x2, y2]`` / ``(x1, y1, x2, y2)``, all
  ``<= 1``: fractions of the width / height (so ``[0, 0, 1, 1]`` is the whole image).
* ``pixel``: the same four-number forms with any value ``> 1``: pixel coordinates, used as they are.

Text around the box is ignored. If the answer holds several boxes, **the first one (leftmost in the text)
wins**, as in the official scorer. No clipping to the image and no reordering of corners: a box with
``x2 <= x1`` or ``y2 <= y1`` is degenerate and has IoU 0 with anything. Unparsable answers are misses and
are counted in ``n_unparsed``, never an exception.

RefCOCO annotations store COCO ``[x, y, w, h]`` boxes; convert them with :func:`xywh_to_xyxy` first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from vlmkit.errors import DataError

Box = tuple[float, float, float, float]
BoxForm = Literal["qwen", "normalized", "pixel"]

#: Qwen-VL's official scorer divides its 0-1000 grid coordinates by 999 (``evaluate_grounding.py``).
QWEN_SCALE = 999.0
#: RefCOCO convention: a prediction is correct when IoU >= 0.5.
IOU_THRESHOLD = 0.5

_NUM = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))"
_QWEN_RE = re.compile(rf"(?:<box>\s*)?\(\s*{_NUM}\s*,\s*{_NUM}\s*\)\s*,\s*\(\s*{_NUM}\s*,\s*{_NUM}\s*\)")
_FOUR_RE = re.compile(rf"[\[(]\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*[\])]")


@dataclass(frozen=True)
class ParsedBox:
    """A box read from model text, already converted to pixel coordinates (x1, y1, x2, y2)."""

    box: Box
    form: BoxForm
    span: tuple[int, int]  # where in the text the box was found


@dataclass(frozen=True)
class GroundingResult:
    """One scored grounding sample; ``box`` is None when the prediction could not be parsed."""

    box: Box | None
    form: BoxForm | None
    iou: float
    correct: bool

    @property
    def parsed(self) -> bool:
        return self.box is not None

    @property
    def score(self) -> float:
        """1.0 for a hit (IoU at or above the threshold), else 0.0."""
        return float(self.correct)


def _check_size(width: float, height: float) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise DataError(f"image {name} must be a positive number of pixels, got {value!r}")


def _check_box(box: Sequence[float], field: str) -> Box:
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise DataError(f"{field} must be 4 numbers (x1, y1, x2, y2), got {box!r}") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise DataError(f"{field} must be 4 finite numbers (x1, y1, x2, y2), got {box!r}")
    return values  # type: ignore[return-value]


def xywh_to_xyxy(box: Sequence[float]) -> Box:
    """Convert a COCO/RefCOCO ``[x, y, width, height]`` box to ``(x1, y1, x2, y2)``."""
    x, y, w, h = _check_box(box, "xywh box")
    return (x, y, x + w, y + h)


def parse_box(text: str, width: float, height: float, qwen_scale: float = QWEN_SCALE) -> ParsedBox | None:
    """Read the first box in ``text`` (any form in the module docstring) and return it in pixels, or None.

    ``width``/``height`` are the original image's size in pixels; ``qwen_scale`` is the divisor of the Qwen
    grid (999 in Qwen-VL's scorer; pass 1000 to map the grid's full range [0, 1000] onto the image instead).
    """
    _check_size(width, height)
    if not (isinstance(qwen_scale, (int, float)) and qwen_scale > 0):
        raise DataError(f"qwen_scale must be a positive number, got {qwen_scale!r}")
    if not isinstance(text, str):
        return None
    found = [(m, kind) for m, kind in ((_QWEN_RE.search(text), "qwen"), (_FOUR_RE.search(text), "four")) if m]
    if not found:
        return None
    match, kind = min(found, key=lambda pair: pair[0].start())  # the leftmost box wins
    x1, y1, x2, y2 = (float(g) for g in match.groups())
    form: BoxForm
    if kind == "qwen":
        form, sx, sy = "qwen", width / qwen_scale, height / qwen_scale
    elif max(x1, y1, x2, y2) <= 1.0:
        form, sx, sy = "normalized", float(width), float(height)
    else:
        form, sx, sy = "pixel", 1.0, 1.0
    return ParsedBox(box=(x1 * sx, y1 * sy, x2 * sx, y2 * sy), form=form, span=match.span())


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0.0 if either is degenerate (zero/negative area)."""
    ax1, ay1, ax2, ay2 = _check_box(box_a, "box_a")
    bx1, by1, bx2, by2 = _check_box(box_b, "box_b")
    if ax2 <= ax1 or ay2 <= ay1 or bx2 <= bx1 or by2 <= by1:
        return 0.0
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union


def score_grounding(prediction: str, target_box: Sequence[float], width: float, height: float,
                    threshold: float = IOU_THRESHOLD, qwen_scale: float = QWEN_SCALE) -> GroundingResult:
    """Parse ``prediction``, compare with ``target_box`` (pixels, x1 y1 x2 y2); correct when IoU >= ``threshold``."""
    target = _check_box(target_box, "target_box")
    parsed = parse_box(prediction, width, height, qwen_scale=qwen_scale)
    if parsed is None:
        return GroundingResult(box=None, form=None, iou=0.0, correct=False)
    iou = box_iou(parsed.box, target)
    return GroundingResult(box=parsed.box, form=parsed.form, iou=iou, correct=iou >= threshold)


def grounding_metrics(results: Iterable[GroundingResult]) -> dict[str, float]:
    """Aggregate: ``accuracy`` (share of hits, unparsed = miss), ``mean_iou`` (unparsed = 0), ``n``,
    ``n_unparsed`` and ``unparsed_rate``."""
    results = list(results)
    if not results:
        raise DataError("grounding_metrics needs at least one scored sample, got none")
    n = len(results)
    n_unparsed = sum(not r.parsed for r in results)
    return {"accuracy": sum(r.correct for r in results) / n, "mean_iou": sum(r.iou for r in results) / n,
            "n": float(n), "n_unparsed": float(n_unparsed), "unparsed_rate": n_unparsed / n}
