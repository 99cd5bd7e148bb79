"""MME and HallusionBench: yes/no benchmarks scored per image pair (MME's acc+) and per figure / question
group (HallusionBench's fAcc / qAcc), read from their official releases; ShapesWorld writes both layouts.

* ``mme`` reads ``MME_Benchmark_release_version/`` (``--data`` may be that folder or its parent): one folder
  per subtask; a subtask holds ``<name>.jpg|png`` and ``<name>.txt`` side by side, or ``images/`` and
  ``questions_answers_YN/`` (how LLaVA's ``playground/data/eval/MME/convert_answer_to_mme.py::get_gt`` and the
  official tool read it); each txt has two lines ``question<TAB>Yes|No`` about its image. The question is
  asked as the release writes it, ending in "Please answer yes or no." (LLaVA-1.5's question file and
  lmms-eval replace that sentence by "Answer the question using a single word or phrase."; LLaVA's
  ``convert_answer_to_mme.py`` maps them back; vlmkit's ``--post-prompt`` appends, it does not replace).
  Scored by :mod:`vlmkit.eval.metrics.mme` (the official ``eval_tool/calculation.py``); headline ``total`` =
  perception + cognition score.
* ``hallusionbench`` reads tianyi-lab/HallusionBench's ``HallusionBench.json`` (a list of ``{"category":
  "VD"|"VS", "subcategory", "visual_input": "0"|"1"|"2", "set_id", "figure_id", "question_id", "question",
  "gt_answer": "0"|"1", "gt_answer_details", "filename": "./hallusion_bench/..png"}``; no ``filename`` (or
  null) when ``visual_input`` is "0": the question is asked without an image) and the images relative to the
  JSON's folder. The question is asked as written (``--post-prompt " Please answer yes or no."`` asks for a
  short answer). Scored by :mod:`vlmkit.eval.metrics.hallusion` (official ``utils.py``, VLMEvalKit's
  judge-free yes/no extraction); headline ``qAcc``.

``--limit N`` reads exactly N questions: MME takes images round-robin over the subtasks (each image's two
questions together, so N even keeps every pair; an odd N leaves the last image with one question),
HallusionBench the first N rows of the JSON (its groups are consecutive, so a limit cuts at most one
figure/question group).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

from vlmkit.data.shapes.language import _referable
from vlmkit.data.shapes.scenes import BACKGROUNDS, COLORS, render_scene
from vlmkit.errors import DataError
from vlmkit.eval.metrics.hallusion import hallusion_metrics, score_hallusion
from vlmkit.eval.metrics.mme import MME_PERCEPTION, MME_SUBTASKS, mme_metrics, parse_mme_answer, score_mme
from vlmkit.eval.readers import EvalSample, _field, _image, _load_list, benchmark_root
from vlmkit.eval.benchmarks.layouts import shapes_writer
from vlmkit.eval.registry import Task, register_task

MME_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
MME_RELEASE_FOLDERS = ("", "MME_Benchmark_release_version", "MME_Benchmark_release_version/MME_Benchmark",
                       "MME_Benchmark")


# ------------------------------------------------------------------------------------------------ MME


def mme_folder(root: str | Path, split: str = "test") -> Path:
    """The folder holding MME's subtask folders: ``root/mme_{split}`` (ShapesWorld), else ``root`` itself or
    the release folder under it (``MME_Benchmark_release_version[/MME_Benchmark]``)."""
    base = benchmark_root(root, "mme", split)
    for sub in MME_RELEASE_FOLDERS:
        folder = base / sub if sub else base
        if any((folder / s).is_dir() for s in MME_SUBTASKS):
            return folder
    raise DataError(f"{base}: no MME subtask folder found ({', '.join(MME_SUBTASKS)}); point --data at "
                    f"MME_Benchmark_release_version (or its parent)")


def _mme_questions(txt: Path) -> list[tuple[str, str]]:
    """The (question, answer) lines of one subtask txt, checked: ``question<TAB>Yes|No``, two per image."""
    pairs = []
    for i, line in enumerate(txt.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        parts = line.strip().split("\t")  # get_gt: line.strip().split('\t')
        if len(parts) != 2:
            raise DataError(f"{txt} line {i + 1}: expected 'question<TAB>Yes|No', got {line!r}")
        if parts[1].strip().lower() not in ("yes", "no"):
            raise DataError(f"{txt} line {i + 1}: the answer must be Yes or No, got {parts[1]!r}")
        pairs.append((parts[0], parts[1].strip()))
    if len(pairs) != 2:
        raise DataError(f"{txt}: MME asks two questions per image (one Yes, one No), found {len(pairs)}")
    return pairs


def _mme_subtask(folder: Path, subtask: str) -> list[list[EvalSample]]:
    """One subtask's images, each as the list of its (two) questions."""
    if (folder / "images").is_dir():
        image_dir, qa_dir = folder / "images", folder / "questions_answers_YN"
        if not qa_dir.is_dir():
            raise DataError(f"{folder}: has images/ but no questions_answers_YN/ folder")
    else:
        image_dir = qa_dir = folder
    txts = sorted(qa_dir.glob("*.txt"))
    if not txts:
        raise DataError(f"{qa_dir}: no question files (<image name>.txt) for MME subtask {subtask!r}")
    out = []
    for txt in txts:
        image = next((image_dir / f"{txt.stem}{ext}" for ext in MME_IMAGE_SUFFIXES
                      if (image_dir / f"{txt.stem}{ext}").is_file()), None)
        if image is None:
            raise DataError(f"{txt}: its image {txt.stem}.jpg / .png is not in {image_dir}")
        kind = "perception" if subtask in MME_PERCEPTION else "cognition"
        out.append([EvalSample(f"{subtask}/{image.name}/{k}", [image], question, [answer.lower()],
                               {"subtask": subtask, "image": image.name, "kind": kind})
                    for k, (question, answer) in enumerate(_mme_questions(txt))])
    return out


def read_mme(root: str | Path, split: str = "test", limit: int | None = None) -> list[EvalSample]:
    """MME's questions, images taken round-robin over the subtasks present (so ``limit`` samples each), the
    two questions of an image consecutive; exactly ``limit`` questions when given."""
    folder = mme_folder(root, split)
    per_subtask = [_mme_subtask(folder / s, s) for s in MME_SUBTASKS if (folder / s).is_dir()]
    out: list[EvalSample] = []
    for i in range(max(len(images) for images in per_subtask)):
        for images in per_subtask:
            if i < len(images):
                out += images[i]
    return out[:limit] if limit else out


def _mme_score(prediction: str, sample: EvalSample) -> dict[str, float]:
    parsed = parse_mme_answer(prediction)
    return {"accuracy": float(parsed == sample.answers[0]), "other": float(parsed == "other")}


def _mme_summary(predictions: list[str], samples: list[EvalSample]) -> dict:
    return mme_metrics(score_mme(p, s.answers[0], s.meta["subtask"], s.meta["image"])
                       for p, s in zip(predictions, samples))


register_task(Task(
    "mme", "MME yes/no perception (10 subtasks) and cognition (4): per subtask acc + acc+ (both questions of "
    "an image right), official calculation.py; headline total = perception + cognition score (max 2800)",
    "total", "MME_Benchmark_release_version/<subtask>/ (<name>.jpg + <name>.txt, or images/ + "
    "questions_answers_YN/), or mme_{split}/ (ShapesWorld)", read_mme, lambda s: s.question, _mme_score,
    max_new_tokens=16, summarize=_mme_summary,
    failure_unit=lambda s: (("image", s.meta["subtask"], s.meta["image"]),)))


# ------------------------------------------------------------------------------------------- HallusionBench


def _str_field(row: dict, name: str, where: str, allowed: tuple[str, ...] = ()) -> str:
    """A field the release holds as a string ("0", "VD", ...); ints are accepted (the official code str()s
    them)."""
    value = str(_field(row, name, (str, int), where))
    if allowed and value not in allowed:
        raise DataError(f"{where}: field {name!r} must be one of {', '.join(allowed)}, got {row[name]!r}")
    return value


def _hallusion_sample(row: dict, root: Path, where: str) -> EvalSample:
    category = _str_field(row, "category", where, ("VD", "VS"))
    visual_input = _str_field(row, "visual_input", where, ("0", "1", "2"))
    keys = {k: _str_field(row, k, where) for k in ("subcategory", "set_id", "figure_id", "question_id")}
    gt = _str_field(row, "gt_answer", where, ("0", "1"))
    images = []
    if visual_input != "0":
        name = row.get("filename")
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: field 'filename' must name the image (visual_input is "
                            f"{visual_input}), got {name!r}")
        images = [_image(root, name, where)]
    sample_id = "_".join([category, *keys.values()])  # category_subcategory_set_figure_question
    return EvalSample(sample_id, images, _field(row, "question", str, where), ["yes" if gt == "1" else "no"],
                      {"category": category, **keys, "visual_input": visual_input, "gt_answer": gt})


def read_hallusionbench(root: str | Path, split: str = "test", limit: int | None = None) -> list[EvalSample]:
    """HallusionBench.json's questions (the first ``limit``), images resolved against the JSON's folder."""
    base = benchmark_root(root, "hallusionbench", split)
    path = base / "HallusionBench.json"
    out, seen = [], {}
    for i, row in enumerate(_load_list(path, "questions", limit)):
        sample = _hallusion_sample(row, base, f"{path} row {i}")
        if sample.id in seen:  # get_eval_all asserts each (category, subcategory, set, figure, question) once
            raise DataError(f"{path} row {i}: question {sample.id} (category_subcategory_set_figure_question)"
                            f" already at row {seen[sample.id]}")
        seen[sample.id] = i
        out.append(sample)
    return out


def _hallusion_result(prediction: str, s: EvalSample):
    m = s.meta
    return score_hallusion(prediction, m["gt_answer"], m["category"], m["subcategory"], m["set_id"],
                           m["figure_id"], m["question_id"])


def _hallusion_summary(predictions: list[str], samples: list[EvalSample]) -> dict:
    return hallusion_metrics(_hallusion_result(p, s) for p, s in zip(predictions, samples))


def _hallusion_score(prediction: str, sample: EvalSample) -> dict[str, float]:
    r = _hallusion_result(prediction, sample)
    return {"correct": float(r.correct), "unknown": float(r.prediction == "unknown")}


def _hallusion_groups(sample: EvalSample) -> tuple:
    """The figure group and the question group a question is scored in (fAcc, qAcc)."""
    m = sample.meta
    return (("figure", m["category"], m["subcategory"], m["set_id"], m["figure_id"]),
            ("question", m["category"], m["subcategory"], m["set_id"], m["question_id"]))


register_task(Task(
    "hallusionbench", "HallusionBench yes/no on original, edited and no images: aAcc, fAcc (figure), qAcc "
    "(question across figures, headline), official utils.py with VLMEvalKit's judge-free yes/no extraction",
    "qAcc", "HallusionBench.json and hallusion_bench/ images (or hallusionbench_{split}/)",
    read_hallusionbench, lambda s: s.question, _hallusion_score, max_new_tokens=32,
    summarize=_hallusion_summary, failure_unit=_hallusion_groups))


# --------------------------------------------------------------------------------------- ShapesWorld layouts

MME_SHAPES_IMAGES = 20  # images per subtask, two questions each: 5 subtasks x 40 = 200 questions at most
YES_NO = " Please answer yes or no."
POSITION_MARGIN = 0.1  # position questions: the object's centre >= this fraction of the width off centre


def _mme_shapes_pairs(scene, rng: random.Random) -> dict[str, tuple[str, str]]:
    """(Yes question, No question) per subtask the scene can answer, MME style."""
    out = {}
    pairs = {(o.color, o.shape) for o in scene.objects}
    obj = rng.choice(scene.objects)
    absent = sorted((c, s) for c in COLORS for s in {o.shape for o in scene.objects} if (c, s) not in pairs)
    if absent:
        c, s = rng.choice(absent)
        out["existence"] = (f"Is there a {obj.color} {obj.shape} in this image?",
                            f"Is there a {c} {s} in this image?")
    n = len(scene.objects)
    wrong = rng.choice([k for k in (n - 1, n + 1) if k >= 1])
    out["count"] = (f"Is the number of objects in this image {n}?",
                    f"Is the number of objects in this image {wrong}?")
    sided = [(o, ref) for o, ref in _referable(scene, (("color", "shape"),))
             if abs(o.cx - scene.width / 2) >= POSITION_MARGIN * scene.width]
    if sided:
        o, ref = rng.choice(sided)
        side, other = ("left", "right") if o.cx < scene.width / 2 else ("right", "left")
        out["position"] = (f"Is the {ref} on the {side} side of this image?",
                           f"Is the {ref} on the {other} side of this image?")
    named = _referable(scene, (("shape",), ("size", "shape")))
    if named:
        o, ref = rng.choice(named)
        other = rng.choice([c for c in COLORS if c != o.color])
        out["color"] = (f"Is the {ref} {o.color}?", f"Is the {ref} {other}?")
    bg = rng.choice([b for b in BACKGROUNDS if b != scene.background])
    out["scene"] = (f"Is the background of this image {scene.background}?",
                    f"Is the background of this image {bg}?")
    return out


@shapes_writer
def write_mme_shapes(folder: Path, split: str, items: list) -> None:
    """``mme_{split}/``: existence, count, position, color (image and txt side by side, as the release has
    them) and scene (``images/`` + ``questions_answers_YN/``, as the release has it), each image with a Yes
    and a No question ending in "Please answer yes or no.", at most MME_SHAPES_IMAGES images per subtask."""
    out = Path(folder) / f"mme_{split}"
    written: dict[str, int] = {}
    for item in items:
        rng = random.Random(f"mme/{split}/{item['index']}")
        for subtask, (yes, no) in _mme_shapes_pairs(item["scene"], rng).items():
            if written.get(subtask, 0) >= MME_SHAPES_IMAGES:
                continue
            written[subtask] = written.get(subtask, 0) + 1
            sub = out / subtask
            image_dir, qa_dir = ((sub / "images", sub / "questions_answers_YN") if subtask == "scene"
                                 else (sub, sub))
            image_dir.mkdir(parents=True, exist_ok=True)
            qa_dir.mkdir(parents=True, exist_ok=True)
            name = f"{item['index']:06d}"
            shutil.copyfile(Path(folder) / item["file_name"], image_dir / f"{name}.png")
            (qa_dir / f"{name}.txt").write_text(f"{yes}{YES_NO}\tYes\n{no}{YES_NO}\tNo\n", encoding="utf-8")


HALLUSION_VD_SETS, HALLUSION_VS_SETS = 30, 20  # 4 questions each: 200 at most
CORNERS = {"triangle": 3, "square": 4, "diamond": 4}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def _hallusion_row(category, subcategory, set_id, figure_id, question_id, question, answer, details, image,
                   visual_input, note):
    row = {"category": category, "subcategory": subcategory, "visual_input": visual_input,
           "set_id": str(set_id), "figure_id": str(figure_id), "sample_note": note,
           "question_id": str(question_id), "question": question, "gt_answer_details": details,
           "gt_answer": "1" if answer else "0"}
    if image is not None:  # the release leaves filename out of the questions asked without an image
        row["filename"] = f"./hallusion_bench/{category}/{subcategory}/{image}"
    return row


def _hallusion_vd_set(folder: Path, out: Path, item: dict, set_id: int, rng: random.Random) -> list[dict]:
    """Visual dependent: the same two questions on the image (figure 0) and on an edit of it (figure 1, one
    object recoloured), so the answers flip."""
    scene = item["scene"]
    pairs = [(o.color, o.shape) for o in scene.objects]
    unique = [o for o in scene.objects if pairs.count((o.color, o.shape)) == 1]
    choices = [(o, c) for o in unique for c in COLORS if (c, o.shape) not in pairs]
    if not choices:
        return []
    obj, new = rng.choice(choices)
    edited = replace(scene, objects=tuple(replace(o, color=new) if o is obj else o for o in scene.objects))
    images = out / "hallusion_bench" / "VD" / "shapes"
    images.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / item["file_name"], images / f"{set_id}_0.png")
    render_scene(edited).save(images / f"{set_id}_1.png", format="PNG")
    rows = []
    for figure, present in ((0, obj.color), (1, new)):
        for qid, color in enumerate((obj.color, new)):
            rows.append(_hallusion_row(
                "VD", "shapes", set_id, figure, qid, f"Is there a {color} {obj.shape} in the image?",
                color == present, f"There is a {present} {obj.shape}.", f"{set_id}_{figure}.png", "1",
                "recolor"))
    return rows


def _hallusion_vs_set(folder: Path, out: Path, item: dict, set_id: int, rng: random.Random) -> list[dict]:
    """Visual supplement: two questions on a shape's corners asked without an image (figure 0, visual_input
    "0") and with an image showing that shape (figure 1): the answers do not depend on the image."""
    shapes = sorted({o.shape for o in item["scene"].objects} & set(CORNERS))
    if not shapes:
        return []
    shape = rng.choice(shapes)
    k = CORNERS[shape]
    wrong = rng.choice([n for n in NUMBER_WORDS if n != k])
    images = out / "hallusion_bench" / "VS" / "geometry"
    images.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / item["file_name"], images / f"{set_id}_1.png")
    rows = []
    for figure, image, visual_input in ((0, None, "0"), (1, f"{set_id}_1.png", "1")):
        for qid, n in enumerate((k, wrong)):
            rows.append(_hallusion_row(
                "VS", "geometry", set_id, figure, qid, f"Does a {shape} have {NUMBER_WORDS[n]} corners?",
                n == k, f"A {shape} has {NUMBER_WORDS[k]} corners.", image, visual_input, "corners"))
    return rows


@shapes_writer
def write_hallusionbench_shapes(folder: Path, split: str, items: list) -> None:
    """``hallusionbench_{split}/``: HallusionBench.json and
    hallusion_bench/{VD,VS}/<subcategory>/{set}_{figure}.png, at most HALLUSION_VD_SETS visual-dependent and
    HALLUSION_VS_SETS visual-supplement sets."""
    folder, out = Path(folder), Path(folder) / f"hallusionbench_{split}"
    rows: list[dict] = []
    for category, make, cap in (("VD", _hallusion_vd_set, HALLUSION_VD_SETS),
                                ("VS", _hallusion_vs_set, HALLUSION_VS_SETS)):
        n_sets = 0
        for item in items:
            if n_sets >= cap:
                break
            set_rows = make(folder, out, item, n_sets, random.Random(f"hallusionbench/{split}/{category}/"
                                                                      f"{item['index']}"))
            n_sets += bool(set_rows)
            rows += set_rows
    if rows:
        out.mkdir(parents=True, exist_ok=True)
        (out / "HallusionBench.json").write_text(json.dumps(rows), encoding="utf-8")
