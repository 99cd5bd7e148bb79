"""The benchmarks people report, read from their official release layouts and scored by their official rules.

Each module registers its tasks (:func:`vlmkit.eval.registry.register_task`) and a ShapesWorld writer
(:func:`vlmkit.eval.benchmarks.layouts.shapes_writer`) that writes the same layout from ShapesWorld's scenes, so
every task also runs on ``vlmkit data shapes`` output: ShapesWorld puts a benchmark's files in ``{task}_{split}/`` under its folder
(:func:`vlmkit.eval.readers.benchmark_root`), a downloaded benchmark is read from ``--data`` itself.

Import rules (tests/unit/test_architecture.py forbids import cycles, lazy ones included): a benchmark module
imports :mod:`vlmkit.eval.registry` (never :mod:`vlmkit.eval.tasks`, which imports this package),
:mod:`vlmkit.eval.benchmarks.layouts` (never this package, which imports it) and, for its ShapesWorld writer,
:mod:`vlmkit.data.shapes.formats` / ``.scenes`` (never the package ``vlmkit.data.shapes``, which calls
:func:`write_shapes_layouts`).
"""

from __future__ import annotations

from vlmkit.eval.benchmarks.layouts import SHAPES_WRITERS, shapes_writer, write_shapes_layouts  # noqa: F401

# the modules register their tasks (vlmkit.eval.registry) and ShapesWorld writers (.layouts) on import
from vlmkit.eval.benchmarks import docs, mmbench, mme, mmmu  # noqa: E402,F401
from vlmkit.eval.judge import task as _shapes_t2i  # noqa: E402,F401  (shapes_t2i: GenEval on ShapesWorld)
