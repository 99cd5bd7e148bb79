"""ShapesWorld's files: the generated images written in the layouts real datasets use.

Each writer reads items, one per image: a dict of its index, split, file name, scene, captions and questions.
Every split gets the training files (LLaVA conversation JSON, multi-image questions, COCO captions, the
image-caption CSV); the evaluation splits (val, test) also get the benchmarks' layouts (VQAv2, GQA, POPE,
RefCOCO-style grounding, multiple choice, the ImageFolders); all images share one scene file with COCO-style
boxes. Writers that draw at random (multi-image samples, multiple-choice order, POPE negatives, single-object
images) have their own ``random.Random`` streams, so adding one leaves every other file unchanged.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections import Counter
from pathlib import Path

from vlmkit.data.shapes.language import CAPTIONS_PER_IMAGE, _multi_questions, _referable
from vlmkit.data.shapes.scenes import (BACKGROUNDS, COLORS, MAX_OBJECTS, SHAPES, SIZES, Scene, _place_one,
                                       render_scene)
from vlmkit.errors import DataError
from vlmkit.utils import atomic_write_json

GENERATOR = "vlmkit.data.shapes"
# bump whenever the same arguments would give different files (2: objects_{split}; 3: multi_{split}; 4: the
# benchmark layouts of vlmkit.eval.benchmarks in {task}_{split}/)
GENERATOR_VERSION = 4


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
