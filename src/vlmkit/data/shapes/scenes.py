"""ShapesWorld's scenes: the vocabulary (shapes, colours, backgrounds, sizes), scene sampling and rendering.

A scene is a canvas size, a background and objects lying fully inside the canvas, kept apart (or, with
overlap, never hidden completely) so that every object is clearly visible. Sampling draws only from the
``random.Random`` it is given, so a scene depends only on that generator's state.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from vlmkit.errors import ConfigError, DataError

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
# Every object colour is >= 100 RGB units (Euclidean) away from every background.
BACKGROUNDS = {
    "white": (255, 255, 255),
    "light gray": (190, 190, 190),
    "dark gray": (60, 60, 60),
    "black": (0, 0, 0),
}
SIZES = {"small": 0.09, "large": 0.15}  # radius as a fraction of min(width, height)

MAX_OBJECTS = 6
MIN_SIDE, MAX_SIDE = 32, 1024

# Outlines in units of the radius r, y pointing down. Factors are chosen so the shapes have similar area.
_OUTLINES = {
    "square": ((-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)),
    "diamond": ((0.0, -1.12), (1.12, 0.0), (0.0, 1.12), (-1.12, 0.0)),
    "triangle": ((0.0, -1.05), (1.02, 0.8), (-1.02, 0.8)),
    "star": tuple(
        (
            (1.2 if k % 2 == 0 else 0.54) * math.cos(math.radians(-90 + 36 * k)),
            (1.2 if k % 2 == 0 else 0.54) * math.sin(math.radians(-90 + 36 * k)),
        )
        for k in range(10)
    ),
}
_PLACE_TRIES = 60  # positions tried per object before giving up on this layout
_LAYOUT_TRIES = 20  # layouts tried per object count before trying one object fewer


@dataclass(frozen=True)
class ShapeObject:
    """One object: centre (cx, cy) and nominal radius r in pixels; the drawn outline scales with r."""

    shape: str
    color: str
    size: str  # "small" | "large"
    cx: float
    cy: float
    r: float

    def outline(self) -> list[tuple[float, float]]:
        """Polygon vertices in pixels (for a circle: the two corners of its bounding box)."""
        unit = _OUTLINES.get(self.shape, ((-1.0, -1.0), (1.0, 1.0)))
        return [(self.cx + x * self.r, self.cy + y * self.r) for x, y in unit]

    def reach(self) -> float:
        """Largest distance from the centre to the outline, used to keep objects apart."""
        if self.shape == "circle":
            return self.r
        return max(math.hypot(x, y) for x, y in _OUTLINES[self.shape]) * self.r

    def bbox(self, width: float | None = None, height: float | None = None) -> list[float]:
        """COCO box ``[x, y, w, h]`` of the drawn shape, clipped to the canvas (at 0, and at width/height
        when given; objects lie inside the canvas by construction)."""
        xs, ys = zip(*self.outline())
        x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
        x1 = max(xs) if width is None else min(float(width), max(xs))
        y1 = max(ys) if height is None else min(float(height), max(ys))
        return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


@dataclass(frozen=True)
class Scene:
    """A canvas size, a background colour name and the objects in drawing order."""

    width: int
    height: int
    background: str
    objects: tuple[ShapeObject, ...]


# ----------------------------------------------------------------------------------------------- validation


def _check_canvas(width: int, height: int) -> None:
    for side in (width, height):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise ConfigError(
                f"--size sides must be between {MIN_SIDE} and {MAX_SIDE} px, got {width}x{height}"
            )


def _check_object_range(min_objects: int, max_objects: int) -> None:
    if not 1 <= min_objects <= MAX_OBJECTS:
        raise ConfigError(f"--min-objects must be between 1 and {MAX_OBJECTS}, got {min_objects}")
    if not min_objects <= max_objects <= MAX_OBJECTS:
        raise ConfigError(
            f"--max-objects must be between --min-objects ({min_objects}) and {MAX_OBJECTS}, "
            f"got {max_objects}"
        )



# --------------------------------------------------------------------------------------------- scenes


def sample_scene(
    rng: random.Random,
    width: int = 64,
    height: int = 64,
    min_objects: int = 1,
    max_objects: int = 6,
    allow_overlap: bool = False,
) -> Scene:
    """Sample a background and ``min_objects..max_objects`` objects lying fully inside the canvas.

    Without overlap, objects keep a gap of a few pixels (rejection sampling). A large object that does not
    fit is retried small; a layout that cannot fit is resampled, and after repeated failures one object
    fewer is used (never below ``min_objects``). With overlap, centres stay far enough apart that no
    object is hidden completely.
    """
    _check_canvas(width, height)
    _check_object_range(min_objects, max_objects)
    background = rng.choice(list(BACKGROUNDS))
    count = rng.randint(min_objects, max_objects)
    while True:
        for _ in range(_LAYOUT_TRIES):
            objects = _place_objects(rng, count, width, height, allow_overlap)
            if objects is not None:
                return Scene(width, height, background, tuple(objects))
        if count == min_objects:
            raise DataError(f"cannot fit {count} objects on a {width}x{height} canvas; lower --min-objects")
        count -= 1


def _place_objects(rng, count, width, height, allow_overlap) -> list[ShapeObject] | None:
    placed: list[ShapeObject] = []
    for _ in range(count):
        shape, color, size = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES))
        obj = _place_one(rng, shape, color, size, placed, width, height, allow_overlap)
        if obj is None and size == "large":
            obj = _place_one(rng, shape, color, "small", placed, width, height, allow_overlap)
        if obj is None:
            return None
        placed.append(obj)
    return placed


def _place_one(rng, shape, color, size, placed, width, height, allow_overlap) -> ShapeObject | None:
    r = round(SIZES[size] * min(width, height), 2)
    probe = ShapeObject(shape, color, size, 0.0, 0.0, r)
    xs, ys = zip(*probe.outline())
    gap = max(2.0, 0.04 * min(width, height))
    for _ in range(_PLACE_TRIES):
        # 1 px margin so anti-aliasing never touches the border.
        cx = round(rng.uniform(1 - min(xs), width - 1 - max(xs)), 2)
        cy = round(rng.uniform(1 - min(ys), height - 1 - max(ys)), 2)
        obj = ShapeObject(shape, color, size, cx, cy, r)
        if all(_apart(obj, other, gap, allow_overlap) for other in placed):
            return obj
    return None


def _apart(a: ShapeObject, b: ShapeObject, gap: float, allow_overlap: bool) -> bool:
    distance = math.hypot(a.cx - b.cx, a.cy - b.cy)
    if allow_overlap:
        return distance >= 0.6 * (a.reach() + b.reach())
    return distance >= a.reach() + b.reach() + gap


def render_scene(scene: Scene, supersample: int = 4) -> Image.Image:
    """Draw the scene as an RGB image, anti-aliased by drawing at ``supersample``x and box-downsampling."""
    if not isinstance(supersample, int) or supersample < 1:
        raise ConfigError(f"supersample must be an int >= 1, got {supersample!r}")
    s = supersample
    image = Image.new("RGB", (scene.width * s, scene.height * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        points = [(x * s, y * s) for x, y in obj.outline()]
        if obj.shape == "circle":
            draw.ellipse(points, fill=COLORS[obj.color])
        else:
            draw.polygon(points, fill=COLORS[obj.color])
    return image.reduce(s) if s > 1 else image
