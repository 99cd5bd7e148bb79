"""Document and text-in-image benchmarks: TextVQA, ChartQA, DocVQA, InfographicVQA and OCRBench, read from their
official release files and scored by their official scripts (:mod:`vlmkit.eval.metrics.text` documents each
scorer and its quirks).

=========  ===============================================================  ==========================================
task       reads (under ``--data``, or ``{task}_{split}/`` of ShapesWorld)     scored as
=========  ===============================================================  ==========================================
textvqa    ``TextVQA_0.5.1_{split}.json`` ({"data": [{question_id, image_id,  mmf ``m4c_evaluators.py``
           question, answers (10), ...}]}), images ``train_images/{image_id}  TextVQAAccuracyEvaluator
           .jpg`` (``test_images/`` for the test split)
chartqa    ``{split}/{split}_human.json`` and ``{split}/{split}_augmented      pix2struct ``metrics.py``
           .json`` ([{imgname, query, label}]), images ``{split}/png/``, under  relaxed_correctness
           ``ChartQA Dataset/`` or the folder itself
docvqa     ``{split}_v1.0.json`` (or ``_withQT``; {"data": [{questionId,       RRC ``evaluate_method`` ANLS
           question, image: "documents/x.png", docId, answers}]}), in the
           folder or its ``{split}/``; images relative to the JSON
infovqa    ``infographicVQA_{split}_v1.0.json`` (2021 release; or              RRC ``evaluate_method`` ANLS
           ``infographicsVQA_{split}_v1.0[_withQT].json``), rows with
           ``image_local_name`` in ``infographicVQA_{split}_v1.0_images/`` (or
           ``infographicsvqa_images/``)
ocrbench   ``OCRBench/OCRBench.json`` (or ``OCRBench.json``,                   MultimodalOCR ``OCRBench/scripts/*.py``
           ``OCRBench/json_files/OCRBench.json``; [{dataset_name, id,
           image_path, question, answers (str or list), type}]), images under
           ``OCRBench_Images/``; one set, whatever the split
=========  ===============================================================  ==========================================

Prompts and answer lengths are lmms-eval's defaults (new tokens: ChartQA 16, InfographicVQA 32, DocVQA and
OCRBench 128; TextVQA 32, where lmms-eval sets none): the question then "\\nAnswer the question using a single
word or phrase." (TextVQA's question passes through ``str.capitalize()`` first, as lmms-eval's
``textvqa_doc_to_text`` does, which also lower-cases the rest of it); OCRBench's question alone. The OCR-token
variant of TextVQA's prompt is not provided.

``--limit N`` reads N questions; for ChartQA ⌈N/2⌉ from the human file and ⌊N/2⌋ from the augmented one (the
other file makes up a shortfall), and its headline is the mean of the two files' accuracies (of the one file
read when N is 1). The test splits of TextVQA, DocVQA and InfographicVQA ship without answers:
a file without them is refused (evaluate ``--split val``).

ShapesWorld writes each layout in ``{task}_{split}/`` (ChartQA's as the contents of ``ChartQA Dataset/``),
at most 200 questions each, from its own scenes: these are layout round trips (ShapesWorld's questions on colours,
shapes, counts, positions, not on text), and ChartQA's charts are tiny bar charts of the objects per colour.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from collections import Counter
from pathlib import Path

from vlmkit.data.shapes.scenes import COLORS
from vlmkit.errors import DataError
from vlmkit.eval.benchmarks.layouts import shapes_writer
from vlmkit.eval.metrics.text import (OCRBENCH_TYPES, anls, ocrbench_match, ocrbench_summary, relaxed_correctness,
                                      textvqa_accuracy)
from vlmkit.eval.readers import EvalSample, _field, _image, _load_json, _load_list, benchmark_root
from vlmkit.eval.registry import Task, register_task
from vlmkit.utils import atomic_write_json

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # lmms-eval's default post_prompt
MAX_SHAPES_ROWS = 200


def _find(root: Path, names: list[str], what: str) -> Path:
    for name in names:
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: no {what} found; looked for {', '.join(names)} (see `vlmkit tasks`)")


def _answers(row: dict, where: str, split: str) -> list[str]:
    if not isinstance(row, dict) or "answers" not in row:
        raise DataError(f"{where}: missing field 'answers' (the {split} split of this benchmark may ship without "
                        f"answers: evaluate --split val)")
    answers = row["answers"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{where}: field 'answers' must be a non-empty list of strings, got {answers!r}")
    return answers


def _data_rows(path: Path, limit: int | None) -> list:
    rows = _field(_load_json(path), "data", list, str(path))
    return rows[:limit] if limit else rows


# ------------------------------------------------------------------------------------------------ TextVQA

def read_textvqa(root: Path, split: str, limit: int | None = None) -> list[EvalSample]:
    """TextVQA's ``TextVQA_0.5.1_{split}.json`` -> samples with the 10 human answers."""
    root = benchmark_root(root, "textvqa", split)
    path = _find(root, [f"TextVQA_0.5.1_{split}.json"], "TextVQA annotations")
    image_dir = root / ("test_images" if split == "test" else "train_images")
    out = []
    for i, row in enumerate(_data_rows(path, limit)):
        where = f"{path} row {i}"
        qid, image_id = _field(row, "question_id", int, where), _field(row, "image_id", str, where)
        answers = _answers(row, where, split)
        if len(answers) != 10:
            raise DataError(f"{where}: field 'answers' must hold the 10 annotators' answers, got {len(answers)}")
        out.append(EvalSample(str(qid), [_image(image_dir, f"{image_id}.jpg", where)],
                              _field(row, "question", str, where), answers,
                              {"question_id": qid, "image_id": image_id}))
    return out


register_task(Task(
    "textvqa", "TextVQA: questions about text in photos, the official TextVQA accuracy (mmf m4c_evaluators)",
    "accuracy", "TextVQA_0.5.1_{split}.json + train_images/ (test_images/ for test)", read_textvqa,
    lambda s: s.question.capitalize() + SHORT_ANSWER,
    lambda p, s: {"accuracy": textvqa_accuracy(p, s.answers).score}, max_new_tokens=32))


# ------------------------------------------------------------------------------------------------ ChartQA

CHARTQA_SETS = ("human", "augmented")


def _chartqa_dir(root: Path, split: str) -> Path:
    for base in (root / split, root / "ChartQA Dataset" / split, root):
        if (base / f"{split}_human.json").is_file():
            return base
    raise DataError(f"{root}: no ChartQA {split}_human.json found in {split}/, 'ChartQA Dataset/{split}/' or the "
                    f"folder itself")


def _chartqa_rows(path: Path, kind: str, split: str) -> list[EvalSample]:
    rows = _load_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of {{imgname, query, label}}")
    out = []
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        label = _field(row, "label", (str, int, float), where)
        out.append(EvalSample(f"{kind}/{i}", [_image(path.parent / "png", _field(row, "imgname", str, where), where)],
                              _field(row, "query", str, where), [str(label)], {"set": kind}))
    return out


def read_chartqa(root: Path, split: str, limit: int | None = None) -> list[EvalSample]:
    """ChartQA's human and augmented question files of ``split``; ``limit`` N takes ⌈N/2⌉ human and ⌊N/2⌋
    augmented questions (either file making up the other's shortfall)."""
    folder = _chartqa_dir(benchmark_root(root, "chartqa", split), split)
    human, augmented = (_chartqa_rows(folder / f"{split}_{kind}.json", kind, split) for kind in CHARTQA_SETS)
    if not limit:
        return human + augmented
    n_human = min(len(human), max(math.ceil(limit / 2), limit - len(augmented)))
    return human[:n_human] + augmented[:limit - n_human]


def _chartqa_summary(predictions: list[str], samples: list[EvalSample]) -> dict:
    """Relaxed accuracy per file and their mean (what papers report), and the pooled mean."""
    correct = [float(relaxed_correctness(p, s.answers[0])) for p, s in zip(predictions, samples)]
    out: dict = {}
    for kind in CHARTQA_SETS:
        mine = [c for c, s in zip(correct, samples) if s.meta["set"] == kind]
        out[f"n_{kind}"] = float(len(mine))
        if mine:
            out[f"relaxed_{kind}"] = sum(mine) / len(mine)
    present = [out[f"relaxed_{k}"] for k in CHARTQA_SETS if f"relaxed_{k}" in out]
    out["relaxed_accuracy"] = sum(present) / len(present) if present else math.nan
    out["relaxed_overall"] = sum(correct) / len(correct) if correct else math.nan
    out["_per_sample"] = correct
    return out


register_task(Task(
    "chartqa", "ChartQA: questions about charts, relaxed accuracy (5% numeric tolerance), mean of the human and "
    "augmented sets", "relaxed_accuracy", "{split}/{split}_human.json + {split}/{split}_augmented.json + "
    "{split}/png/ (ChartQA Dataset/)", read_chartqa, lambda s: s.question + SHORT_ANSWER,
    lambda p, s: {"relaxed_accuracy": float(relaxed_correctness(p, s.answers[0]))}, max_new_tokens=16,
    summarize=_chartqa_summary))


# ------------------------------------------------------------------------------------------ DocVQA, InfoVQA

def read_docvqa(root: Path, split: str, limit: int | None = None) -> list[EvalSample]:
    """DocVQA's ``{split}_v1.0.json``: the ``image`` field ("documents/x.png") is relative to the JSON file."""
    root = benchmark_root(root, "docvqa", split)
    names = [f"{split}_v1.0_withQT.json", f"{split}_v1.0.json"]
    path = _find(root, names + [f"{split}/{n}" for n in names], "DocVQA annotations")
    out = []
    for i, row in enumerate(_data_rows(path, limit)):
        where = f"{path} row {i}"
        qid = _field(row, "questionId", int, where)
        answers = _answers(row, where, split)
        out.append(EvalSample(str(qid), [_image(path.parent, _field(row, "image", str, where), where)],
                              _field(row, "question", str, where), answers,
                              {"questionId": qid, "docId": row.get("docId"),
                               "question_types": row.get("question_types")}))
    return out


def read_infovqa(root: Path, split: str, limit: int | None = None) -> list[EvalSample]:
    """InfographicVQA's annotations JSON (either release's name) and its image folder."""
    root = benchmark_root(root, "infovqa", split)
    names = [f"infographicVQA_{split}_v1.0.json", f"infographicsVQA_{split}_v1.0_withQT.json",
             f"infographicsVQA_{split}_v1.0.json"]
    path = _find(root, names + [f"{split}/{n}" for n in names], "InfographicVQA annotations")
    dirs = [f"infographicVQA_{split}_v1.0_images", "infographicsvqa_images", "images"]
    image_dir = next((d for base in (path.parent, root) for d in (base / n for n in dirs) if d.is_dir()), None)
    if image_dir is None:
        raise DataError(f"{path.parent}: no InfographicVQA image folder; looked for {', '.join(dirs)}")
    out = []
    for i, row in enumerate(_data_rows(path, limit)):
        where = f"{path} row {i}"
        qid = _field(row, "questionId", int, where)
        answers = _answers(row, where, split)
        out.append(EvalSample(str(qid), [_image(image_dir, _field(row, "image_local_name", str, where), where)],
                              _field(row, "question", str, where), answers,
                              {"questionId": qid, "answer_type": row.get("answer_type")}))
    return out


def _anls_score(prediction: str, sample: EvalSample) -> dict[str, float]:
    return {"anls": anls(prediction, sample.answers)}


register_task(Task(
    "docvqa", "DocVQA: questions about document scans, ANLS (the RRC evaluation script)", "anls",
    "{split}_v1.0.json (or {split}/{split}_v1.0.json) + documents/", read_docvqa,
    lambda s: s.question + SHORT_ANSWER, _anls_score, max_new_tokens=128))
register_task(Task(
    "infovqa", "InfographicVQA: questions about infographics, ANLS (the RRC evaluation script)", "anls",
    "infographicVQA_{split}_v1.0.json + infographicVQA_{split}_v1.0_images/ (or infographicsVQA_*.json + "
    "infographicsvqa_images/)", read_infovqa, lambda s: s.question + SHORT_ANSWER, _anls_score, max_new_tokens=32))


# ------------------------------------------------------------------------------------------------ OCRBench

def read_ocrbench(root: Path, split: str, limit: int | None = None) -> list[EvalSample]:
    """OCRBench's one JSON list of 1000 rows; answers a string or a list of strings."""
    root = benchmark_root(root, "ocrbench", split)
    path = _find(root, ["OCRBench/OCRBench.json", "OCRBench.json", "OCRBench/json_files/OCRBench.json"],
                 "OCRBench.json")
    out = []
    for i, row in enumerate(_load_list(path, "OCRBench rows", limit)):
        where = f"{path} row {i}"
        answers = _field(row, "answers", (str, list), where)
        answers = [answers] if isinstance(answers, str) else answers
        if not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: field 'answers' must be a string or a non-empty list of strings")
        kind = _field(row, "type", str, where)
        if kind not in OCRBENCH_TYPES:
            raise DataError(f"{where}: field 'type' {kind!r} is not an OCRBench type ({', '.join(OCRBENCH_TYPES)})")
        name = _field(row, "dataset_name", str, where)
        out.append(EvalSample(str(i), [_image(root / "OCRBench_Images", _field(row, "image_path", str, where), where)],
                              _field(row, "question", str, where), answers,
                              {"dataset_name": name, "id": row.get("id"), "type": kind}))
    return out


def _ocrbench_score(prediction: str, sample: EvalSample) -> dict[str, float]:
    return {"accuracy": float(ocrbench_match(prediction, sample.answers, sample.meta["dataset_name"]))}


def _ocrbench_summary(predictions: list[str], samples: list[EvalSample]) -> dict:
    correct = [_ocrbench_score(p, s)["accuracy"] for p, s in zip(predictions, samples)]
    return {**ocrbench_summary([s.meta["type"] for s in samples], correct), "_per_sample": correct}


register_task(Task(
    "ocrbench", "OCRBench: 1000 OCR questions in five components, the official containment match; final score "
    "= number right (of 1000)", "accuracy", "OCRBench/OCRBench.json + OCRBench_Images/", read_ocrbench,
    lambda s: s.question.strip(), _ocrbench_score, max_new_tokens=128, summarize=_ocrbench_summary))


# -------------------------------------------------------------------------------------- ShapesWorld layouts

def _questions(items: list, types: tuple[str, ...] | None = None):
    """(item, question index, question) of the split, at most MAX_SHAPES_ROWS."""
    rows = [(it, j, q) for it in items for j, q in enumerate(it["questions"]) if types is None or q["type"] in types]
    return rows[:MAX_SHAPES_ROWS]


def _copy_image(folder: Path, item: dict, dst: Path, done: set) -> None:
    """The item's PNG at ``dst`` (once per writer, ``done`` holding the paths written): hard-linked (copied where
    links are refused), or re-encoded when ``dst`` names a JPEG."""
    if dst in done:
        return
    done.add(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    src = folder / item["file_name"]
    if dst.suffix.lower() in (".jpg", ".jpeg"):
        from PIL import Image

        with Image.open(src) as im:
            im.convert("RGB").save(dst, format="JPEG", quality=90)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@shapes_writer
def write_textvqa(folder: Path, split: str, items: list) -> None:
    out = folder / f"textvqa_{split}"
    image_dir = out / ("test_images" if split == "test" else "train_images")
    data = []
    done: set = set()
    for it, j, q in _questions(items):
        image_id = f"{it['index']:016x}"
        _copy_image(folder, it, image_dir / f"{image_id}.jpg", done)
        data.append({"question": q["question"], "image_id": image_id, "image_classes": [],
                     "flickr_original_url": "", "flickr_300k_url": "", "image_width": it["scene"].width,
                     "image_height": it["scene"].height, "answers": [q["answer"]] * 10,
                     "question_tokens": q["question"].rstrip("?").split(), "question_id": it["index"] * 100 + j,
                     "set_name": split})
    atomic_write_json(out / f"TextVQA_0.5.1_{split}.json", {"dataset_name": "textvqa", "dataset_type": split,
                                                             "dataset_version": "0.5.1", "data": data})


def _bar_chart(counts: Counter, path: Path) -> None:
    """A tiny bar chart (64x64 PNG) of object counts per colour, bars in their colour, no labels."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (64, 64), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    width = 56 // max(len(counts), 1)
    for k, (color, n) in enumerate(counts.items()):
        x = 4 + k * width
        draw.rectangle([x + 1, 60 - 8 * n, x + width - 2, 60], fill=COLORS[color])
    draw.line([(2, 60), (62, 60)], fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG")


@shapes_writer
def write_chartqa(folder: Path, split: str, items: list) -> None:
    """One chart per image (up to 100): a human question on one bar's value, an augmented one on their sum."""
    out = folder / f"chartqa_{split}" / split
    human, augmented = [], []
    for it in items[:MAX_SHAPES_ROWS // 2]:
        counts = Counter(o.color for o in it["scene"].objects)
        if not counts:
            continue
        name = f"shapes_{it['index']:06d}.png"
        _bar_chart(counts, out / "png" / name)
        color = random.Random(f"chartqa/{it['index']}").choice(sorted(counts))
        human.append({"imgname": name, "query": f"What is the value of the {color} bar?",
                      "label": str(counts[color])})
        augmented.append({"imgname": name, "query": "What is the sum of all the bars?",
                          "label": str(sum(counts.values()))})
    atomic_write_json(out / f"{split}_human.json", human, indent=None)
    atomic_write_json(out / f"{split}_augmented.json", augmented, indent=None)


DOC_TYPES = ("color", "shape", "count")


@shapes_writer
def write_docvqa(folder: Path, split: str, items: list) -> None:
    out = folder / f"docvqa_{split}"
    data = []
    done: set = set()
    for it, j, q in _questions(items, DOC_TYPES):
        image = f"documents/shapes{it['index']:06d}_p1.png"
        _copy_image(folder, it, out / image, done)
        data.append({"questionId": it["index"] * 100 + j, "question": q["question"], "question_types": [q["type"]],
                     "image": image, "docId": it["index"], "ucsf_document_id": f"shapes{it['index']:06d}",
                     "ucsf_document_page_no": "1", "answers": [q["answer"]], "data_split": split})
    atomic_write_json(out / f"{split}_v1.0.json", {"dataset_name": "docvqa", "dataset_version": "1.0",
                                                   "dataset_split": split, "data": data})


@shapes_writer
def write_infovqa(folder: Path, split: str, items: list) -> None:
    out = folder / f"infovqa_{split}"
    data = []
    done: set = set()
    for it, j, q in _questions(items, DOC_TYPES):
        name = f"{it['index']}.jpeg"
        _copy_image(folder, it, out / f"infographicVQA_{split}_v1.0_images" / name, done)
        data.append({"questionId": it["index"] * 100 + j, "question": q["question"], "image_local_name": name,
                     "image_url": "", "ocr_output_file": f"{it['index']}.json", "answers": [q["answer"]],
                     "data_split": split})
    atomic_write_json(out / f"infographicVQA_{split}_v1.0.json", {"dataset_name": "infographicVQA",
                                                                  "dataset_version": "1.0", "dataset_split": split,
                                                                  "data": data})


# ShapesWorld question type -> (an OCRBench source dataset, its OCRBench type); "position" rows take the
# HME100k branch of the scorer (spaces removed)
OCRBENCH_SHAPES = {"color": ("ESTVQA", "Scene Text-centric VQA"), "shape": ("docVQA", "Doc-oriented VQA"),
                   "count": ("SROIE", "Key Information Extraction"), "exist": ("IIIT5K", "Regular Text Recognition"),
                   "relation": ("ctw", "Irregular Text Recognition"),
                   "position": ("HME100k", "Handwritten Mathematical Expression Recognition")}


@shapes_writer
def write_ocrbench(folder: Path, split: str, items: list) -> None:
    out = folder / f"ocrbench_{split}"
    rows = []
    done: set = set()
    for it, j, q in _questions(items, tuple(OCRBENCH_SHAPES)):
        dataset, kind = OCRBENCH_SHAPES[q["type"]]
        path = f"ShapesWorld/{it['index']:06d}.png"
        _copy_image(folder, it, out / "OCRBench_Images" / path, done)
        rows.append({"dataset_name": dataset, "id": it["index"] * 100 + j, "image_path": path,
                     "question": q["question"], "answers": [q["answer"]] if j % 2 else q["answer"], "type": kind})
    atomic_write_json(out / "OCRBench" / "OCRBench.json", rows)
