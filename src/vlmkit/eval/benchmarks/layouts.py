"""The registry of ShapesWorld writers: each benchmark module registers the function that writes its official layout
from ShapesWorld's scenes, and ``generate_shapes`` calls them all for every evaluation split. A leaf module, so
that the benchmark modules import it without an import cycle through the package."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

ShapesWriter = Callable[[Path, str, list], None]  # (ShapesWorld folder, split, the split's items)
SHAPES_WRITERS: list[ShapesWriter] = []


def shapes_writer(fn: ShapesWriter) -> ShapesWriter:
    """Register ``fn(folder, split, items)``: writes a benchmark's layout for an evaluation split of ShapesWorld
    (items as :mod:`vlmkit.data.shapes.formats` describes them)."""
    SHAPES_WRITERS.append(fn)
    return fn


def write_shapes_layouts(folder: Path, split: str, items: list) -> None:
    """Every registered benchmark layout for one evaluation split of a ShapesWorld folder."""
    for write in SHAPES_WRITERS:
        write(folder, split, items)
