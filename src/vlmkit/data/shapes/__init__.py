"""ShapesWorld: a deterministic generator of synthetic visual-QA scenes, vlmkit's built-in dataset.

No dataset can be downloaded on the machines vlmkit is developed on, so every recipe is proven on these
rendered scenes of coloured shapes. The generator is written by hand (PIL + stdlib) because the data must be
*clean*: every question has exactly one correct answer that is clearly visible in the image, every
referring expression ("the red circle") names exactly one object, and yes/no answers are balanced.

Output formats are the ones real datasets use, so real data plugs in unchanged:
LLaVA conversation JSON (one record per question; ``multi_{split}.json``: questions about 2-3 images of a split at
once, "In the second image, ...", "Which image has more circles?"), COCO captions, image-caption CSV and a scene file with
COCO-style boxes; and, for the evaluation splits (val, test), the benchmarks' layouts the evaluation tasks read:
the questions in VQAv2's layout (questions + annotations JSON) and GQA's, POPE-style object probes (JSONL,
random / popular / adversarial negatives), RefCOCO-style referring expressions with boxes, four-option
multiple-choice questions, the images as an ImageFolder by object count, and an ImageFolder of new single-object
images by colour and shape (zero-shot classification for dual encoders). Same arguments give byte-identical
files: every image has its own ``random.Random`` seeded from (seed, index), JSON keys keep insertion order and
PNGs carry no metadata.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from pathlib import Path

from tqdm import tqdm

# One module per concept: scenes (vocabulary, sampling, rendering), language (captions and questions,
# multi-image ones included) and formats (the files); this one checks the arguments and drives the generation.
# The public names of the three stay importable from here (``__all__``), and the generation looks its helpers
# up here, so patching ``vlmkit.data.shapes.render_scene`` still reaches it.
from vlmkit.data.shapes.formats import (CHOICE_VOCABULARY, GENERATOR, GENERATOR_VERSION, OBJECT_TEMPLATES,
                                        POPE_CATEGORIES, POPE_PER_IMAGE, _scene_record, _write_object_folder,
                                        _write_rows, _write_split)
from vlmkit.data.shapes.language import (CAPTIONS_PER_IMAGE, MULTI_TYPES, ORDINALS, POSITION_MARGIN,
                                         QUADRANTS, QUESTION_TYPES, RELATION_MARGIN, make_captions,
                                         make_questions, quadrant)
from vlmkit.data.shapes.scenes import (BACKGROUNDS, COLORS, MAX_OBJECTS, MAX_SIDE, MIN_SIDE, SHAPES, SIZES,
                                       Scene, ShapeObject, _check_canvas, _check_object_range, render_scene,
                                       sample_scene)
from vlmkit.errors import ConfigError, DataError
from vlmkit.utils import atomic_directory, atomic_write_json

SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------------------------- validation


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``--size``: ``"64"`` -> (64, 64), ``"96x64"`` -> (96, 64) (width x height)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(text))
    if not match:
        raise ConfigError(f"--size must be N or WxH in pixels (e.g. 64 or 96x64), got {text!r}")
    width = int(match.group(1))
    return width, int(match.group(2) or width)


def _resolve_size(size) -> tuple[int, int]:
    if isinstance(size, str):
        size = parse_size(size)
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size)):
        raise ConfigError(f"--size must be an int or a (width, height) pair of ints, got {size!r}")
    _check_canvas(*size)
    return int(size[0]), int(size[1])



def _check_splits(splits) -> tuple[float, float, float]:
    splits = tuple(splits) if isinstance(splits, (tuple, list)) else (splits,)
    if len(splits) != 3 or any(not isinstance(f, (int, float)) or f < 0 for f in splits):
        raise ConfigError(f"--splits must be three non-negative fractions (train, val, test), got {splits!r}")
    if abs(sum(splits) - 1.0) > 1e-6:
        raise ConfigError(f"--splits must sum to 1, got {splits!r} (sum {sum(splits):g})")
    return tuple(float(f) for f in splits)


def split_ranges(n: int, splits: tuple[float, float, float]) -> dict[str, range]:
    """Contiguous index ranges per split: first train, then val, then test. Every split with a non-zero
    fraction gets at least one image when n allows; largest remainders round the rest."""
    raw = [n * f for f in splits]
    counts = [math.floor(x) for x in raw]
    by_remainder = sorted(range(3), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    if n >= sum(f > 0 for f in splits):
        for i in range(3):
            if splits[i] > 0 and counts[i] == 0:
                counts[max(range(3), key=lambda j: counts[j])] -= 1
                counts[i] = 1
    starts = [0, counts[0], counts[0] + counts[1]]
    return {name: range(s, s + c) for name, s, c in zip(SPLITS, starts, counts)}


# ------------------------------------------------------------------------------------------- dataset


def image_rng(seed: int, index: int) -> random.Random:
    """The RNG of one image: depends only on (seed, index), so output never depends on generation order."""
    return random.Random(f"shapesworld:{seed}:{index}")


def _make_item(index, split, seed, width, height, min_objects, max_objects, allow_overlap) -> dict:
    rng = image_rng(seed, index)
    scene = sample_scene(rng, width, height, min_objects, max_objects, allow_overlap)
    return {
        "index": index,
        "split": split,
        "file_name": f"images/{index:06d}.png",
        "scene": scene,
        "captions": make_captions(scene, rng, CAPTIONS_PER_IMAGE),
        "questions": make_questions(scene, rng),
    }


def _summarize(items: list[dict]) -> dict:
    questions = [q for it in items for q in it["questions"]]
    yes_no = {}
    for qtype in ("exist", "relation"):
        answers = Counter(q["answer"] for q in questions if q["type"] == qtype)
        total = answers["yes"] + answers["no"]
        yes_no[qtype] = {
            "yes": answers["yes"],
            "no": answers["no"],
            "yes_fraction": round(answers["yes"] / total, 4) if total else None,
        }
    return {
        "images": {s: sum(it["split"] == s for it in items) for s in SPLITS},
        "questions": {s: sum(len(it["questions"]) for it in items if it["split"] == s) for s in SPLITS},
        "captions": {s: sum(len(it["captions"]) for it in items if it["split"] == s) for s in SPLITS},
        "question_types": {t: sum(q["type"] == t for q in questions) for t in QUESTION_TYPES},
        "yes_no": yes_no,
    }


def generate_shapes(
    out,
    n: int = 1000,
    seed: int = 0,
    size: int | tuple[int, int] = 64,
    min_objects: int = 1,
    max_objects: int = 6,
    allow_overlap: bool = False,
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1),
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write a ShapesWorld dataset to ``out`` (see the module docstring) and return its summary.

    Everything is written into a hidden sibling folder that replaces ``out`` in one rename at the end;
    ``meta.json`` is written last.
    """
    width, height = _resolve_size(size)
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"--n must be an int >= 1, got {n!r}")
    if not isinstance(seed, int):
        raise ConfigError(f"--seed must be an int, got {seed!r}")
    _check_object_range(min_objects, max_objects)
    splits = _check_splits(splits)
    out = Path(out)
    if out.exists() and not overwrite:
        raise _exists_error(out)
    arguments = {
        "n": n,
        "seed": seed,
        "size": [width, height],
        "min_objects": min_objects,
        "max_objects": max_objects,
        "allow_overlap": allow_overlap,
        "splits": list(splits),
    }
    try:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            summary = _generate_into(Path(tmp), arguments, progress)
    except FileExistsError as e:  # another process created `out` while we were generating
        raise _exists_error(out) from e
    return {"out": str(out), **summary}


def _exists_error(out: Path) -> DataError:
    return DataError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) or choose another folder")


def _generate_into(folder: Path, arguments: dict, progress: bool) -> dict:
    (folder / "images").mkdir()
    a = arguments
    items = []
    with tqdm(total=a["n"], desc="ShapesWorld", unit="img", disable=not progress) as bar:
        for split, indices in split_ranges(a["n"], tuple(a["splits"])).items():
            for index in indices:
                item = _make_item(
                    index,
                    split,
                    a["seed"],
                    *a["size"],
                    a["min_objects"],
                    a["max_objects"],
                    a["allow_overlap"],
                )
                render_scene(item["scene"]).save(folder / item["file_name"], format="PNG")
                items.append(item)
                bar.update(1)
    from vlmkit.eval.benchmarks import write_shapes_layouts  # MMMU, MMBench, MME, ... in {task}_{split}/

    for split in SPLITS:
        _write_split(folder, split, [it for it in items if it["split"] == split], a["seed"])
        if split != "train":
            write_shapes_layouts(folder, split, [it for it in items if it["split"] == split])
            n_split = sum(it["split"] == split for it in items)
            _write_object_folder(folder, split, n_split, a["seed"], *a["size"])
    _write_rows(folder / "scenes.json", [_scene_record(it) for it in items])
    summary = _summarize(items)
    meta = {"generator": GENERATOR, "version": GENERATOR_VERSION, "arguments": arguments, **summary}
    atomic_write_json(folder / "meta.json", meta)
    return summary


__all__ = ["BACKGROUNDS", "CAPTIONS_PER_IMAGE", "CHOICE_VOCABULARY", "COLORS", "GENERATOR", "GENERATOR_VERSION",
           "MAX_OBJECTS", "MAX_SIDE", "MIN_SIDE", "MULTI_TYPES", "OBJECT_TEMPLATES", "ORDINALS", "POPE_CATEGORIES",
           "POPE_PER_IMAGE", "POSITION_MARGIN", "QUADRANTS", "QUESTION_TYPES", "RELATION_MARGIN", "SHAPES", "SIZES",
           "SPLITS", "Scene", "ShapeObject", "generate_shapes", "image_rng", "make_captions", "make_questions",
           "parse_size", "quadrant", "render_scene", "sample_scene", "split_ranges"]
