"""The benchmarks people report, read from their official release layouts and scored by their official rules.

Each module registers its tasks (:func:`vlmkit.eval.registry.register_task`) and a ShapesWorld writer
(:func:`shapes_writer`) that writes the same layout from ShapesWorld's scenes, so every task also runs on
``vlmkit data shapes`` output: ShapesWorld puts a benchmark's files in ``{task}_{split}/`` under its folder
(:func:`vlmkit.eval.readers.benchmark_root`), a downloaded benchmark is read from ``--data`` itself.

Import rules (tests/unit/test_architecture.py forbids import cycles, lazy ones included): a benchmark module
imports :mod:`vlmkit.eval.registry` (never :mod:`vlmkit.eval.tasks`, which imports this package) and, for its
ShapesWorld writer, :mod:`vlmkit.data.shapes.formats` / ``.scenes`` (never the package ``vlmkit.data.shapes``,
which calls :func:`write_shapes_layouts`).
"""

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


# the modules register their tasks and writers on import (after the names above, which they import)
from vlmkit.eval.benchmarks import docs, mmbench, mme, mmmu  # noqa: E402,F401
