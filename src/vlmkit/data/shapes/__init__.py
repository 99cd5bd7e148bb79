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

import csv
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

from tqdm import tqdm

# Each concept lives in its own module; every name is also importable from here, private helpers included.
from vlmkit.data.shapes.language import (CAPTIONS_PER_IMAGE, MULTI_TYPES, ORDINALS, POSITION_MARGIN, QUADRANTS,
                                         QUESTION_TYPES, RELATION_MARGIN, _NUMBER_WORDS, _QUESTION_MAKERS, _article,
                                         _color_questions, _count, _count_questions, _exist_questions, _join,
                                         _left_to_right, _multi_questions, _phrase, _plural, _position_questions,
                                         _q, _referable, _relation_questions, _shape_questions, _unique_by,
                                         make_captions, make_questions, quadrant)
from vlmkit.data.shapes.scenes import (BACKGROUNDS, COLORS, MAX_OBJECTS, MAX_SIDE, MIN_SIDE, SHAPES, SIZES,
                                       _LAYOUT_TRIES, _OUTLINES, _PLACE_TRIES, Scene, ShapeObject, _apart,
                                       _check_canvas, _check_object_range, _place_objects, _place_one,
                                       render_scene, sample_scene)
from vlmkit.errors import ConfigError, DataError
from vlmkit.utils import atomic_directory, atomic_write_json

GENERATOR = "vlmkit.data.shapes"
# bump whenever the same arguments would give different files (2: objects_{split}; 3: multi_{split})
GENERATOR_VERSION = 3

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


def _scene_record(item: dict) -> dict:
    scene = item["scene"]
    return {
        "id": item["index"],
        "file_name": item["file_name"],
        "split": item["split"],
        "width": scene.width,
        "height": scene.height,
        "background": scene.background,
        "objects": [
            {
                "shape": o.shape,
                "color": o.color,
                "size": o.size,
                "bbox": o.bbox(scene.width, scene.height),
                "center": [o.cx, o.cy],
            }
            for o in scene.objects
        ],
    }


def _conversation_records(item: dict) -> list[dict]:
    return [
        {
            "id": f"{item['index']:06d}-{j}",
            "image": item["file_name"],
            "conversations": [
                {"from": "human", "value": "<image>\n" + q["question"]},
                {"from": "gpt", "value": q["answer"]},
            ],
            "type": q["type"],
        }
        for j, q in enumerate(item["questions"])
    ]


def _multi_records(items: list[dict], split: str, seed: int) -> list[dict]:
    """Samples of 2-3 images of ``split`` each (one per two images of the split), LLaVA format with an ``images``
    list, one record per question; the images are the split's own, so nothing new is rendered. A sample's
    images and questions depend only on (seed, split, sample index)."""
    if len(items) < 2:
        return []
    rows = []
    for m in range(len(items) // 2):
        rng = random.Random(f"shapesworld-multi:{seed}:{split}:{m}")
        chosen = rng.sample(items, rng.choice((2, 3)) if len(items) >= 3 else 2)
        placeholders = "".join(f"Image {i + 1}: <image>\n" for i in range(len(chosen)))
        for j, q in enumerate(_multi_questions([it["scene"] for it in chosen], rng)):
            rows.append({"id": f"multi-{split}-{m:06d}-{j}", "images": [it["file_name"] for it in chosen],
                         "conversations": [{"from": "human", "value": placeholders + q["question"]},
                                           {"from": "gpt", "value": q["answer"]}],
                         "type": q["type"]})
    return rows


def _coco_captions(items: list[dict], split: str) -> dict:
    info = {
        "description": f"ShapesWorld captions ({split})",
        "version": str(GENERATOR_VERSION),
        "contributor": GENERATOR,
    }
    images = [
        {
            "id": it["index"],
            "file_name": it["file_name"],
            "width": it["scene"].width,
            "height": it["scene"].height,
        }
        for it in items
    ]
    annotations = [
        {"id": it["index"] * CAPTIONS_PER_IMAGE + j, "image_id": it["index"], "caption": c}
        for it in items
        for j, c in enumerate(it["captions"])
    ]
    return {"info": info, "images": images, "annotations": annotations}


def _vqav2_files(items: list[dict], split: str) -> tuple[dict, dict]:
    """The split's questions in the official VQAv2 layout: a questions file and an annotations file, question ids
    ``image id * 100 + j``, the one ShapesWorld answer given by all ten annotators, and VQAv2's answer types."""
    info = {"description": f"ShapesWorld VQA ({split})", "version": str(GENERATOR_VERSION), "contributor": GENERATOR}
    questions, annotations = [], []
    for it in items:
        for j, q in enumerate(it["questions"]):
            qid = it["index"] * 100 + j
            questions.append({"image_id": it["index"], "question": q["question"], "question_id": qid})
            kind = "yes/no" if q["answer"] in ("yes", "no") else "number" if q["type"] == "count" else "other"
            annotations.append({
                "question_id": qid, "image_id": it["index"], "question_type": q["type"], "answer_type": kind,
                "multiple_choice_answer": q["answer"],
                "answers": [{"answer": q["answer"], "answer_confidence": "yes", "answer_id": k + 1}
                            for k in range(10)]})
    head = {"info": info, "task_type": "Open-Ended", "data_type": "shapesworld", "data_subtype": split}
    return {**head, "questions": questions}, {**head, "annotations": annotations}


def _grounding_rows(items: list[dict]) -> list[dict]:
    """Referring expressions with their boxes, RefCOCO-style: every object one phrase names uniquely ("the red
    circle", "the small star"), its COCO box ``[x, y, w, h]`` in pixels and the image size."""
    rows = []
    for it in items:
        scene = it["scene"]
        for obj, phrase in _referable(scene, (("shape",), ("color", "shape"), ("size", "shape"),
                                              ("size", "color", "shape"))):
            rows.append({"id": len(rows), "image": it["file_name"], "expression": f"the {phrase}",
                         "bbox": obj.bbox(scene.width, scene.height), "width": scene.width, "height": scene.height})
    return rows


def _gqa_questions(items: list[dict]) -> dict:
    """The questions in GQA's layout (question id -> imageId, question, answer, types); imageId is the image's
    file name without ``images/`` and ``.png``."""
    return {f"{it['index']:06d}-{j}": {"imageId": f"{it['index']:06d}", "question": q["question"],
                                       "answer": q["answer"], "types": {"structural": q["type"], "semantic": q["type"]}}
            for it in items for j, q in enumerate(it["questions"])}


def _write_image_folder(folder: Path, split: str, items: list[dict]) -> None:
    """The split's images as an ImageFolder for zero-shot classification (``imagefolder_{split}/<n>/``, the
    class being how many objects the image holds), with ``classes.json`` naming the question to ask."""
    root = folder / f"imagefolder_{split}"
    for it in items:
        target = root / str(len(it["scene"].objects)) / Path(it["file_name"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((folder / it["file_name"]).read_bytes())
    root.mkdir(exist_ok=True)
    (root / "classes.json").write_text(json.dumps({"prompt": "How many objects are there?"}) + "\n",
                                       encoding="utf-8")


# the ShapesWorld captions of a one-object scene, as prompt templates for zero-shot classification
OBJECT_TEMPLATES = ("one shape: a {}.", "Just one shape: a small {}.", "Just one shape: a large {}.")


def _write_object_folder(folder: Path, split: str, n_images: int, seed: int, width: int, height: int) -> None:
    """New single-object images of the split as an ImageFolder by colour and shape (``objects_{split}/red_circle/``,
    30 classes, about ``n_images`` in all, balanced), with ``classes.json`` naming each class ("red circle") and the
    prompt templates: zero-shot classification as CLIP's papers evaluate it, on held-out renders."""
    root = folder / f"objects_{split}"
    per_class = max(1, math.ceil(n_images / (len(COLORS) * len(SHAPES))))
    names = {}
    for color in COLORS:
        for shape in SHAPES:
            key = f"{color}_{shape}"
            names[key] = f"{color} {shape}"
            (root / key).mkdir(parents=True)
            for j in range(per_class):
                rng = random.Random(f"shapesworld-objects:{seed}:{split}:{key}:{j}")
                background = rng.choice(list(BACKGROUNDS))
                obj = _place_one(rng, shape, color, rng.choice(list(SIZES)), [], width, height, False) or \
                    _place_one(rng, shape, color, "small", [], width, height, False)
                if obj is None:
                    raise DataError(f"cannot fit one {shape} on a {width}x{height} canvas")
                render_scene(Scene(width, height, background, (obj,))).save(root / key / f"{j:04d}.png", format="PNG")
    atomic_write_json(root / "classes.json", {"classes": names, "templates": list(OBJECT_TEMPLATES),
                                              "prompt": "What colour and shape is the object?"})


CHOICE_VOCABULARY = {"color": tuple(COLORS), "shape": SHAPES, "count": tuple(str(k) for k in range(MAX_OBJECTS + 1))}


def _choice_rows(items: list[dict]) -> list[dict]:
    """The colour, shape and count questions as four-option multiple choice (ScienceQA / MMBench style): the
    answer and three other values of its kind, in an order drawn from their own random stream."""
    rows = []
    for it in items:
        for j, q in enumerate(it["questions"]):
            if q["type"] not in CHOICE_VOCABULARY:
                continue
            rng = random.Random(f"choice/{it['index']}/{j}")
            options = [q["answer"]] + rng.sample([v for v in CHOICE_VOCABULARY[q["type"]] if v != q["answer"]], 3)
            rng.shuffle(options)
            rows.append({"id": f"{it['index']:06d}-{j}", "image": it["file_name"], "question": q["question"],
                         "options": options, "answer": "ABCD"[options.index(q["answer"])], "category": q["type"]})
    return rows


POPE_CATEGORIES = ("random", "popular", "adversarial")
POPE_PER_IMAGE = 3  # yes and no probes each, per image (POPE asks 3 + 3)


def _pope_rows(items: list[dict]) -> dict[str, list[dict]]:
    """POPE-style object probes ("Is there a {colour} {shape} in the image?") per negative-sampling category,
    as POPE's JSONL rows: up to 3 objects present ("yes") and as many absent ones ("no") per image, the absent
    ones drawn at random, among the split's most frequent objects, or among objects sharing a colour or shape
    with one present (adversarial). Drawn from their own random stream, so the other files are unchanged."""
    counts = Counter((o.color, o.shape) for it in items for o in it["scene"].objects)
    popular = [pair for pair, _ in counts.most_common()] + [(c, s) for c in COLORS for s in SHAPES]
    out: dict[str, list[dict]] = {c: [] for c in POPE_CATEGORIES}
    for it in items:
        rng = random.Random(f"pope/{it['index']}")
        present = sorted({(o.color, o.shape) for o in it["scene"].objects})
        yes = rng.sample(present, min(POPE_PER_IMAGE, len(present)))
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        similar = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        pools = {"random": rng.sample(absent, len(yes)),
                 "popular": [pair for pair in dict.fromkeys(popular) if pair not in present][:len(yes)],
                 "adversarial": (rng.sample(similar, len(yes)) if len(similar) >= len(yes) else
                                 similar + rng.sample([a for a in absent if a not in similar], len(yes) - len(similar)))}
        for category, no in pools.items():
            for label, pairs in (("yes", yes), ("no", no)):
                for color, shape in pairs:
                    rows = out[category]
                    rows.append({"question_id": len(rows), "image": it["file_name"],
                                 "text": f"Is there a {color} {shape} in the image?", "label": label,
                                 "category": category})
    return out


def _write_rows(path: Path, rows: list) -> None:
    """A JSON list with one row per line: valid JSON that also diffs and greps well."""
    body = ",\n".join(json.dumps(row, ensure_ascii=False) for row in rows)
    path.write_text("[\n" + body + "\n]\n" if rows else "[]\n", encoding="utf-8")


def _write_split(folder: Path, split: str, items: list[dict], seed: int = 0) -> None:
    _write_rows(folder / f"{split}.json", [r for it in items for r in _conversation_records(it)])
    _write_rows(folder / f"multi_{split}.json", _multi_records(items, split, seed))
    (folder / f"captions_{split}.json").write_text(
        json.dumps(_coco_captions(items, split)) + "\n", encoding="utf-8"
    )
    with open(folder / f"pairs_{split}.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "caption"])
        writer.writerows([it["file_name"], c] for it in items for c in it["captions"])
    if split != "train":  # the evaluation layouts, for the splits evaluation reads
        _write_eval_layouts(folder, split, items)


def _write_eval_layouts(folder: Path, split: str, items: list[dict]) -> None:
    """The split again in the benchmarks' layouts: VQAv2, GQA, POPE, grounding, multiple choice, and its images
    as an ImageFolder (copied)."""
    questions, annotations = _vqav2_files(items, split)
    (folder / f"vqav2_{split}_questions.json").write_text(json.dumps(questions) + "\n", encoding="utf-8")
    (folder / f"vqav2_{split}_annotations.json").write_text(json.dumps(annotations) + "\n", encoding="utf-8")
    _write_rows(folder / f"grounding_{split}.json", _grounding_rows(items))
    _write_rows(folder / f"choice_{split}.json", _choice_rows(items))
    (folder / f"{split}_balanced_questions.json").write_text(json.dumps(_gqa_questions(items)) + "\n",
                                                             encoding="utf-8")
    _write_image_folder(folder, split, items)
    for category, rows in _pope_rows(items).items():
        (folder / f"pope_{split}_{category}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows),
                                                              encoding="utf-8")


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
    for split in SPLITS:
        _write_split(folder, split, [it for it in items if it["split"] == split], a["seed"])
        if split != "train":
            n_split = sum(it["split"] == split for it in items)
            _write_object_folder(folder, split, n_split, a["seed"], *a["size"])
    _write_rows(folder / "scenes.json", [_scene_record(it) for it in items])
    summary = _summarize(items)
    meta = {"generator": GENERATOR, "version": GENERATOR_VERSION, "arguments": arguments, **summary}
    atomic_write_json(folder / "meta.json", meta)
    return summary
