"""MMBench, SEED-Bench (image part) and MME-RealWorld, read from their official releases and scored by their
official rules (the scorers: :mod:`vlmkit.eval.metrics.mmbench`).

``mmbench`` -- the TSV VLMEvalKit distributes (``MMBench_DEV_EN.tsv``, ``MMBench_DEV_CN.tsv``,
    ``MMBench_DEV_EN_V11.tsv``, ...: columns index, question, hint, A, B, C, D, answer, category, l2-category,
    split, image, and source / comment in some releases). ``--split DEV_EN`` reads ``MMBench_DEV_EN.tsv``
    (``dev`` -> DEV_EN, ``test`` -> TEST_EN when no ``MMBench_TEST.tsv`` exists; a TEST file holds no answers and
    is refused). Cells are read as ``pandas.read_csv(sep="\\t")`` reads them in VLMEvalKit's ``load``: a cell
    in pandas' default NA set (empty, "nan", "None", "NA", ...) is missing, so an option column holding one is
    no option. Rows without an image are dropped and an ``image`` of at most 64 characters is the index of the
    row whose image it shares, as ``vlmeval/dataset/image_base.py::ImageBaseDataset.__init__`` resolves them.
    The prompt is VLMEvalKit's multiple-choice prompt of the LLaVA family (``vlmeval/vlm/llava/llava.py::
    build_prompt``, the same as LLaVA ``model_vqa_mmbench.py``): ``hint + "\\n"`` when there is a hint, the
    question, ``"\\nA. text"`` per option present, then "Answer with the option's letter from the given choices
    directly." (``请直接回答选项字母。`` when the text holds Chinese, VLMEvalKit's ``cn_string``). Scored by
    CircularEval over the rows' rotated copies (``index % 1e6``) with VLMEvalKit's ``can_infer`` exact matching;
    its LLM-judge fallback is not reproduced. ``--limit N``: N questions, each with all its copies.
``seedbench`` -- SEED-Bench v1 ``SEED-Bench.json`` (``{"question_type": {name: id}, "questions": [...]}``,
    AILab-CVC/SEED-Bench DATASET.md) with its images in ``SEED-Bench-image/{data_id}``; only ``data_type ==
    "image"`` questions (dimensions 1-9). The prompt and answer reading of lmms-eval ``tasks/seedbench/
    utils.py`` (``seed_doc_to_text``, ``seed_process_result``: the answer's first character); accuracy overall
    and per question type, as the official ``eval.py`` reports it (which ranks options by likelihood instead).
``mme_realworld`` -- ``MME_RealWorld.json`` (yfzhang114/MME-RealWorld; a list of ``{"Question_id", "Image"
    (path under the folder), "Text", "Answer choices": ["(A) ...", ...], "Ground truth": "A", "Task", "Subtask",
    "Category"}``), the prompt of its ``evaluation/model_vqa_mme_real_world.py`` (the README shows one more
    space before "\\nThe best answer is:") and the scoring of ``evaluation/eval_your_results.py``.
``mme_realworld_cn`` -- ``MME_RealWorld_CN.json`` beside it (the same layout and images, Chinese questions),
    asked with the Chinese prompt of lmms-eval ``tasks/mme_realworld/utils.py::mme_realworld_cn_doc_to_text``
    (VLMEvalKit's MME-RealWorld-CN prompt), scored as ``mme_realworld``.

ShapesWorld writes each layout from its colour / shape / count questions (4 options, ``formats._choice_rows``):
``mmbench_{split}/MMBench_{SPLIT}.tsv`` (so ``--split test`` reads it), up to 50 questions, each with its 4
rotated copies as rows ``index + k * 1e6`` whose image refers to the question's row;
``seedbench_{split}/SEED-Bench.json`` + ``SEED-Bench-image/``; ``mme_realworld_{split}/MME_RealWorld.json`` +
``images/`` (a fifth option "(E) None of the above." as MME-RealWorld's questions have; ``MME_RealWorld_CN.json``
holds the same, English, questions: a check of the layout, not of Chinese), up to 200 each.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import random
import re
import string
import sys
from pathlib import Path

from vlmkit.data.shapes.formats import _choice_rows
from vlmkit.errors import DataError
from vlmkit.eval.benchmarks.layouts import shapes_writer
from vlmkit.eval.metrics.choice import circular_rotations, score_choice
from vlmkit.eval.metrics.mmbench import (
    MMBENCH_COPY_STRIDE,
    mmbench_circular,
    mme_realworld_extract,
    mme_realworld_summary,
    seedbench_choice,
)
from vlmkit.eval.readers import EmbeddedImage, EvalSample, _field, _image, _load_json, _load_list, benchmark_root
from vlmkit.eval.registry import Task, register_task

# pandas' default NA strings (pandas/_libs/parsers.pyx STR_NA_VALUES): what VLMEvalKit's pd.read_csv reads as NaN
PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
MMBENCH_SPLITS = {"dev": "DEV_EN", "test": "TEST_EN", "dev_cn": "DEV_CN", "test_cn": "TEST_CN"}
MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                   "l2-category", "comment", "split")
MMBENCH_INSTRUCTION = "Answer with the option's letter from the given choices directly."
MMBENCH_INSTRUCTION_CN = "请直接回答选项字母。"
SHAPES_MMBENCH_QUESTIONS = 50  # x 4 rotations = 200 rows
SHAPES_ROWS = 200


# ------------------------------------------------------------------------------------------------- MMBench
def _na(cell: str | None) -> bool:
    return cell is None or cell in PANDAS_NA


def read_tsv(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """A TSV's header and its rows as (line number, {column: cell}); blank lines skipped, as pandas does."""
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are far over csv's 128 KiB default
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as f:  # a BOM is no part of the first column's name
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: empty, expected a header line of tab-separated column names")
        for cells in reader:
            if not cells:
                continue
            if len(cells) != len(header):
                raise DataError(f"{path} line {reader.line_num}: {len(cells)} cells, the header has {len(header)}")
            rows.append((reader.line_num, dict(zip(header, cells))))
    return header, rows


def mmbench_file(root: str | Path, split: str) -> Path:
    """The TSV ``--split`` names: ``MMBench_{SPLIT}.tsv`` (or ``{split}.tsv`` for a full name), else the
    split's alias (dev -> DEV_EN), under ``root/mmbench_{split}/`` (ShapesWorld) or ``root``."""
    base = benchmark_root(root, "mmbench", split)
    names = [f"{split.removesuffix('.tsv')}.tsv"] if split.startswith("MMBench") else []
    names.append(f"MMBench_{split.upper()}.tsv")
    if split.lower() in MMBENCH_SPLITS:
        names.append(f"MMBench_{MMBENCH_SPLITS[split.lower()]}.tsv")
    for name in names:
        if (base / name).is_file():
            return base / name
    raise DataError(f"{base}: none of {', '.join(names)} found; --split names VLMEvalKit's MMBench TSV "
                    f"(e.g. DEV_EN reads MMBench_DEV_EN.tsv, dev = DEV_EN)")


def _int_cell(row: dict, column: str, where: str) -> int:
    try:
        return int(row[column])
    except ValueError:
        raise DataError(f"{where}: column {column!r} must be an integer, got {row[column]!r}") from None


def _mmbench_rows(path: Path) -> tuple[list[tuple[str, int, dict]], dict[str, str], list[str]]:
    """(where, index, row) of the rows with an image, every row's image cell by index, the option columns."""
    header, rows = read_tsv(path)
    missing = [c for c in ("index", "question", "image") if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; VLMEvalKit's MMBench TSV has "
                        f"{', '.join(MMBENCH_COLUMNS)}")
    if "answer" not in header:
        raise DataError(f"{path}: no 'answer' column: this split (a TEST file) holds no answers, it is scored by "
                        f"the MMBench evaluation server; evaluate a DEV split (e.g. --split DEV_EN)")
    parsed, images = [], {}
    for line, row in rows:
        where = f"{path} line {line}"
        index = _int_cell(row, "index", where)
        if str(index) in images:
            raise DataError(f"{where}: index {index} appears twice")
        images[str(index)] = row["image"]
        if not _na(row["image"]):  # VLMEvalKit drops the rows without an image
            parsed.append((where, index, row))
    return parsed, images, [c for c in string.ascii_uppercase if c in header]


def _mmbench_image(path: Path, where: str, index: int, images: dict[str, str], cache: dict) -> EmbeddedImage:
    owner = str(index)
    if len(images[owner]) <= 64:  # the index of the row holding the image
        owner = images[owner]
        if owner not in images or len(images[owner]) <= 64:
            raise DataError(f"{where}: column 'image' {owner!r} is neither a base64 image nor the index of a row "
                            f"holding one")
    if owner not in cache:
        try:
            cache[owner] = EmbeddedImage(base64.b64decode(images[owner]), f"{path.name} index {owner}")
        except (binascii.Error, ValueError) as e:
            raise DataError(f"{path} index {owner}: column 'image' is not valid base64 ({e})") from e
    return cache[owner]


def read_mmbench(path: str | Path, limit: int | None = None) -> list[EvalSample]:
    """VLMEvalKit's MMBench TSV -> one sample per row (question and rotated copies alike), the images kept as
    base64-decoded bytes; ``limit``: the first ``limit`` questions (rows with index < 1e6) and their copies."""
    path = Path(path)
    parsed, images, letters = _mmbench_rows(path)
    if limit:
        keep = set([index for _, index, _ in parsed if index < MMBENCH_COPY_STRIDE][:limit])
        parsed = [p for p in parsed if p[1] % MMBENCH_COPY_STRIDE in keep]
    out, cache = [], {}
    for where, index, row in parsed:
        options = {c: row[c] for c in letters if not _na(row[c])}
        if len(options) < 2:
            raise DataError(f"{where}: {len(options)} option(s) in columns {', '.join(letters)}; need at least 2")
        if row["answer"] not in options:
            raise DataError(f"{where}: column 'answer' must be one of the row's option letters "
                            f"{', '.join(options)}, got {row['answer']!r}")
        meta = {"index": index, "options": options, "hint": None if _na(row.get("hint")) else row["hint"]}
        meta |= {k: row[k] for k in ("category", "l2-category", "split") if k in row}
        image = _mmbench_image(path, where, index, images, cache)
        out.append(EvalSample(str(index), [image], row["question"], [row["answer"]], meta))
    return out


def _mmbench(root: Path, split: str, limit: int | None) -> list[EvalSample]:
    return read_mmbench(mmbench_file(root, split), limit)


def mmbench_prompt(sample: EvalSample) -> str:
    """VLMEvalKit's (LLaVA family's) multiple-choice prompt: hint, question, "A. text" lines, the instruction."""
    text = sample.question if sample.meta["hint"] is None else f"{sample.meta['hint']}\n{sample.question}"
    text += "".join(f"\n{letter}. {option}" for letter, option in sample.meta["options"].items())
    chinese = re.search("[\u4e00-\u9fff]", text) is not None
    return f"{text}\n{MMBENCH_INSTRUCTION_CN if chinese else MMBENCH_INSTRUCTION}"


def _mmbench_score(prediction: str, sample: EvalSample) -> dict[str, float]:
    r = score_choice(prediction, sample.meta["options"], sample.answers[0], style="mmbench")
    return {"accuracy": r.score, "unparsable": float(not r.parsed)}


def _mmbench_summary(predictions: list[str], samples: list[EvalSample]) -> dict:
    passes = []
    for p, s in zip(predictions, samples):
        r = score_choice(p, s.meta["options"], s.answers[0], style="mmbench")
        passes.append((s.meta["index"], r.correct, r.parsed))
    own = [s for s in samples if s.meta["index"] < MMBENCH_COPY_STRIDE]
    return mmbench_circular(passes, {s.meta["index"]: s.meta.get("category") for s in own},
                            {s.meta["index"]: s.meta.get("l2-category") for s in own})


register_task(Task(
    "mmbench", "MMBench (VLMEvalKit TSV): CircularEval over the rotated copies, per category and l2-category, "
    "vanilla accuracy; VLMEvalKit's exact matching (no LLM judge)", "circular_accuracy",
    "MMBench_{SPLIT}.tsv (VLMEvalKit; --split DEV_EN, DEV_CN, DEV_EN_V11, ...; dev = DEV_EN)", _mmbench,
    mmbench_prompt, _mmbench_score, max_new_tokens=16, summarize=_mmbench_summary,
    failure_unit=lambda s: (("question", s.meta["index"] % MMBENCH_COPY_STRIDE),)))


@shapes_writer
def write_shapes_mmbench(folder: Path, split: str, items: list) -> None:
    """``mmbench_{split}/MMBench_{SPLIT}.tsv``: the choice questions with their rotated copies, as the DEV files."""
    out = folder / f"mmbench_{split}"
    out.mkdir(exist_ok=True)
    l2 = {"count": "finegrained_perception (cross-instance)"}
    with (out / f"MMBench_{split.upper()}.tsv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(MMBENCH_COLUMNS)
        for q, row in enumerate(_choice_rows(items)[:SHAPES_MMBENCH_QUESTIONS]):
            image = base64.b64encode((folder / row["image"]).read_bytes()).decode("ascii")
            for rot in circular_rotations(row["options"], row["answer"]):
                writer.writerow([q + rot.shift * MMBENCH_COPY_STRIDE, row["question"], "", *rot.options.values(),
                                 rot.answer, row["category"], image if rot.shift == 0 else str(q), "shapesworld",
                                 l2.get(row["category"], "finegrained_perception (instance-level)"), "", split])


# ----------------------------------------------------------------------------------------------- SEED-Bench
SEED_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SEED_TYPES = {"Scene Understanding": 1, "Instance Identity": 2, "Instance Attributes": 3, "Instance Location": 4,
              "Instances Counting": 5, "Spatial Relation": 6, "Instance Interaction": 7, "Visual Reasoning": 8,
              "Text Understanding": 9, "Action Recognition": 10, "Action Prediction": 11,
              "Procedure Understanding": 12}


def read_seedbench(path: str | Path, image_dir: str | Path, limit: int | None = None) -> list[EvalSample]:
    """SEED-Bench v1's JSON -> the image questions (``data_type == "image"``), the four choices in ``meta`` and
    the question type's name; images ``image_dir/{data_id}`` (``{data_id}.jpg`` if the bare name is absent)."""
    path, image_dir = Path(path), Path(image_dir)
    data = _load_json(path)
    types = _field(data, "question_type", dict, str(path))
    names = {v: k for k, v in types.items()}
    out = []
    for i, row in enumerate(_field(data, "questions", list, str(path))):
        where = f"{path} question {i}"
        if _field(row, "data_type", str, where) != "image":
            continue
        type_id = _field(row, "question_type_id", int, where)
        if type_id not in names:
            raise DataError(f"{where}: question_type_id {type_id} is not in the file's question_type")
        choices = {c.upper(): str(_field(row, f"choice_{c}", (str, int, float), where)) for c in "abcd"}
        answer = _field(row, "answer", str, where)
        if answer not in choices:
            raise DataError(f"{where}: field 'answer' must be A, B, C or D, got {answer!r}")
        data_id = _field(row, "data_id", str, where)
        if not (image_dir / data_id).is_file() and (image_dir / f"{data_id}.jpg").is_file():
            data_id += ".jpg"
        out.append(EvalSample(str(row.get("question_id", i)), [_image(image_dir, data_id, where)],
                              _field(row, "question", str, where), [answer],
                              {"options": choices, "question_type": names[type_id], "question_type_id": type_id}))
        if limit and len(out) >= limit:
            break
    return out


def _seedbench(root: Path, split: str, limit: int | None) -> list[EvalSample]:
    base = benchmark_root(root, "seedbench", split)
    return read_seedbench(base / "SEED-Bench.json", base / "SEED-Bench-image", limit)


def seedbench_prompt(sample: EvalSample) -> str:
    options = "\n".join(f"{k}. {v}" for k, v in sample.meta["options"].items())
    return f"{sample.question}\n{options}\n{SEED_INSTRUCTION}"


register_task(Task(
    "seedbench", "SEED-Bench v1 image questions (dimensions 1-9): accuracy overall and per question type, the "
    "answer's first character as lmms-eval reads it", "accuracy", "SEED-Bench.json and SEED-Bench-image/",
    _seedbench, seedbench_prompt, lambda p, s: {"accuracy": float(seedbench_choice(p) == s.answers[0])},
    group_by="question_type", max_new_tokens=16))


def _copy_images(folder: Path, out: Path, rows: list[dict], name) -> None:
    for row in rows:
        target = out / name(row)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((folder / row["image"]).read_bytes())


@shapes_writer
def write_shapes_seedbench(folder: Path, split: str, items: list) -> None:
    """``seedbench_{split}/SEED-Bench.json`` and ``SEED-Bench-image/``: colour -> Instance Attributes, shape ->
    Instance Identity, count -> Instances Counting."""
    out = folder / f"seedbench_{split}"
    out.mkdir(exist_ok=True)  # a split without images gets its empty layout
    rows = _choice_rows(items)[:SHAPES_ROWS]
    kinds = {"color": 3, "shape": 2, "count": 5}
    questions = [{"answer": r["answer"], **{f"choice_{c}": o for c, o in zip("abcd", r["options"])},
                  "data_id": f"{r['id']}.png", "data_type": "image", "question": r["question"],
                  "question_id": f"{split}_{k}", "question_type_id": kinds[r["category"]]} for k, r in enumerate(rows)]
    _copy_images(folder, out / "SEED-Bench-image", rows, lambda r: f"{r['id']}.png")
    (out / "SEED-Bench.json").write_text(json.dumps({"questions": questions, "question_type": SEED_TYPES}, indent=1),
                                         encoding="utf-8")


# -------------------------------------------------------------------------------------------- MME-RealWorld
MME_RW_INSTRUCTION = ("Select the best answer to the above multiple-choice question based on the image. Respond "
                      "with only the letter (A, B, C, D, or E) of the correct option.")
MME_RW_INSTRUCTION_CN = "根据图像选择上述多项选择题的最佳答案。只需回答正确选项的字母（A, B, C, D 或 E）。\n最佳答案为： "  # the trailing space as lmms-eval
MME_RW_FIELDS = ("Question_id", "Image", "Text", "Ground truth", "Task", "Subtask", "Category")


def read_mme_realworld(path: str | Path, image_dir: str | Path, limit: int | None = None) -> list[EvalSample]:
    """MME-RealWorld's JSON list -> samples with the answer choices, Task, Subtask and Category in ``meta``."""
    path, image_dir = Path(path), Path(image_dir)
    out = []
    for i, row in enumerate(_load_list(path, "MME-RealWorld questions", limit)):
        where = f"{path} row {i}"
        fields = {k: _field(row, k, str, where) for k in MME_RW_FIELDS}
        choices = _field(row, "Answer choices", list, where)
        if len(choices) < 2 or not all(isinstance(c, str) and re.match(r"\([A-Z]\)", c) for c in choices):
            raise DataError(f"{where}: field 'Answer choices' must be a list of '(A) text' strings, got {choices!r}")
        if fields["Ground truth"] not in [c[1] for c in choices]:
            raise DataError(f"{where}: field 'Ground truth' {fields['Ground truth']!r} is not a choice letter")
        meta = {"choices": choices, **{k: fields[k] for k in ("Task", "Subtask", "Category")}}
        out.append(EvalSample(fields["Question_id"], [_image(image_dir, fields["Image"], where)], fields["Text"],
                              [fields["Ground truth"]], meta))
    return out


def _mme_realworld(root: Path, split: str, limit: int | None) -> list[EvalSample]:
    base = benchmark_root(root, "mme_realworld", split)
    return read_mme_realworld(base / "MME_RealWorld.json", base, limit)


def _mme_realworld_cn(root: Path, split: str, limit: int | None) -> list[EvalSample]:
    base = benchmark_root(root, "mme_realworld", split)  # the CN file sits beside the English one
    return read_mme_realworld(base / "MME_RealWorld_CN.json", base, limit)


def mme_realworld_prompt(sample: EvalSample) -> str:
    """``model_vqa_mme_real_world.py``: the text, " The choices are listed below: \\n", a line per choice, the
    instruction and "\\nThe best answer is:"."""
    choices = "".join(f"{c}\n" for c in sample.meta["choices"])
    return f"{sample.question} The choices are listed below: \n{choices}{MME_RW_INSTRUCTION}\nThe best answer is:"


def mme_realworld_cn_prompt(sample: EvalSample) -> str:
    """lmms-eval's ``mme_realworld_cn_doc_to_text``: the text, " 选项如下所示:\\n", the choices joined by newlines,
    a newline and the Chinese instruction."""
    return f"{sample.question} 选项如下所示:\n" + "\n".join(sample.meta["choices"]) + f"\n{MME_RW_INSTRUCTION_CN}"


def _mme_rw_score(prediction: str, sample: EvalSample) -> dict[str, float]:
    return {"accuracy": float(mme_realworld_extract(prediction, sample.meta["choices"]) == sample.answers[0])}


def _mme_rw_summary(predictions: list[str], samples: list[EvalSample]) -> dict:
    rows = []
    for p, s in zip(predictions, samples):
        letter = mme_realworld_extract(p, s.meta["choices"])
        rows.append((s.meta["Task"], s.meta["Subtask"], s.meta["Category"], letter == s.answers[0], letter))
    return mme_realworld_summary(rows)


register_task(Task(
    "mme_realworld", "MME-RealWorld multiple choice (A-E): accuracy overall, per Task, Subtask and Category, the "
    "official letter extraction", "accuracy", "MME_RealWorld.json and its images (paths as in 'Image')",
    _mme_realworld, mme_realworld_prompt, _mme_rw_score, max_new_tokens=16, summarize=_mme_rw_summary))
register_task(Task(
    "mme_realworld_cn", "MME-RealWorld-CN (Chinese questions), asked and scored as mme_realworld", "accuracy",
    "MME_RealWorld_CN.json and its images", _mme_realworld_cn, mme_realworld_cn_prompt, _mme_rw_score,
    max_new_tokens=16, summarize=_mme_rw_summary))


@shapes_writer
def write_shapes_mme_realworld(folder: Path, split: str, items: list) -> None:
    """``mme_realworld_{split}/MME_RealWorld.json`` and ``images/``: Perception / Monitoring questions, their
    Category ``Shapes/attribute/{color,shape}`` (merged officially into ``shapes/attribute``) or
    ``Shapes/counting``."""
    out = folder / f"mme_realworld_{split}"
    out.mkdir(exist_ok=True)  # a split without images gets its empty layout
    rows = _choice_rows(items)[:SHAPES_ROWS]
    rng = random.Random(f"mme_realworld/{split}")  # which questions are Reasoning, so both Tasks appear
    questions = []
    for k, r in enumerate(rows):
        task = "Reasoning" if rng.random() < 0.25 else "Perception"
        category = "Shapes/counting" if r["category"] == "count" else f"Shapes/attribute/{r['category']}"
        choices = [f"({c}) {o}" for c, o in zip("ABCD", r["options"])] + ["(E) None of the above."]
        questions.append({"Question_id": f"{task.lower()}/monitoring/shapes/{k:04d}",
                          "Question Type": "Multiple Choice", "Image": r["image"], "Text": r["question"],
                          "Answer choices": choices, "Ground truth": r["answer"], "Task": task,
                          "Subtask": "Monitoring", "Category": category})
    _copy_images(folder, out, rows, lambda r: r["image"])
    for name in ("MME_RealWorld.json", "MME_RealWorld_CN.json"):
        (out / name).write_text(json.dumps(questions, indent=1), encoding="utf-8")
