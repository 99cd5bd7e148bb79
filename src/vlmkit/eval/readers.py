"""Readers for the benchmarks' official file layouts -> :class:`EvalSample` lists the evaluation tasks score.

Each reader checks what it reads and names the file, the row and the missing or malformed field; image paths
are resolved against an image folder and checked to exist before any model runs. So far: VQAv2 (questions +
annotations JSON), POPE (JSONL), COCO captions (annotations JSON) and RefCOCO-style referring expressions (a JSON
list of ``{"image", "expression", "bbox": [x, y, w, h], "width", "height"}``: the official RefCOCO release is
a pickle, which vlmkit never loads) and multiple choice (a JSON list of ``{"question", "options", "answer"}``, as
ScienceQA and MMMU give them); also GQA's questions JSON and ScienceQA's own ``problems.json``. ShapesWorld writes
the VQAv2, POPE, COCO captions, grounding and multiple-choice layouts (``vlmkit data shapes``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vlmkit.errors import DataError

# where the VQAv2 layout's image ids point: COCO's file names, and ShapesWorld's
COCO_IMAGE_PATTERN = "COCO_{data_subtype}_{image_id:012d}.jpg"
SHAPES_IMAGE_PATTERN = "images/{image_id:06d}.png"


@dataclass
class EvalSample:
    """One question (or probe, or caption target) of a benchmark: its images, the question text without image
    placeholders, the reference answers, and what the metric needs besides (answer types, split, ...)."""

    id: str
    images: list[Path]
    question: str
    answers: list[str]
    meta: dict = field(default_factory=dict)


class EmbeddedImage:
    """An image held inside a benchmark file (MMBench's base64 TSV column, MMMU's parquet struct): its encoded
    bytes and where they came from. Readers keep the bytes, not decoded pixels, so a large benchmark fits in
    memory; :meth:`open` decodes it when the batch that needs it is asked. ``str()`` names the source (the file
    and the row), which is what the predictions file records."""

    __slots__ = ("data", "source")

    def __init__(self, data: bytes, source: str):
        self.data, self.source = data, source

    def open(self):
        """The decoded PIL image (RGB unless it is L/RGBA); a corrupt image is refused naming its source."""
        import io

        from PIL import Image

        try:
            with Image.open(io.BytesIO(self.data)) as im:
                im.load()
                return im.copy()
        except (OSError, ValueError) as e:
            raise DataError(f"{self.source}: the embedded image cannot be decoded ({e})") from e

    def __str__(self) -> str:
        return self.source

    __repr__ = __str__


def load_media(image):
    """What a model is given for one of a sample's images: a path as it is, an :class:`EmbeddedImage` decoded."""
    return image.open() if isinstance(image, EmbeddedImage) else image


def benchmark_root(root: str | Path, task: str, split: str) -> Path:
    """Where a benchmark's official files are: ``root/{task}_{split}/`` when that folder exists (ShapesWorld
    writes each benchmark's exact layout there, one folder per split), else ``root`` itself (the folder a user
    downloaded the benchmark into)."""
    root = Path(root)
    sub = root / f"{task}_{split}"
    return sub if sub.is_dir() else root


def limit_across(groups: list[list], limit: int | None) -> list:
    """A task's samples from several files (POPE's three negative samplings, ChartQA's two sets) with ``--limit``
    meaning samples per task: ``limit`` in all, shared out as evenly as the groups allow (one from each in turn),
    each group's samples kept in order and the groups in order."""
    if not limit:
        return [s for g in groups for s in g]
    take, n = [0] * len(groups), 0
    while n < limit and any(t < len(g) for t, g in zip(take, groups)):
        for i, g in enumerate(groups):
            if n < limit and take[i] < len(g):
                take[i] += 1
                n += 1
    return [s for g, t in zip(groups, take) for s in g[:t]]


def _load_json(path: Path):
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e


def _load_list(path: Path, what: str, limit: int | None) -> list:
    """A JSON file holding a list of rows (at most ``limit``); anything else is refused naming the file."""
    rows = _load_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of {what}")
    return rows[:limit] if limit else rows


def _field(row: dict, name: str, kind, where: str):
    if not isinstance(row, dict) or name not in row:
        raise DataError(f"{where}: missing field {name!r}")
    value = row[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise DataError(f"{where}: field {name!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _image(image_dir: Path, name: str, where: str) -> Path:
    path = image_dir / name
    if not path.is_file():
        raise DataError(f"{where}: image not found: {path}")
    return path


def read_vqav2(questions: str | Path, annotations: str | Path | None, image_dir: str | Path,
               image_pattern: str = COCO_IMAGE_PATTERN, limit: int | None = None) -> list[EvalSample]:
    """VQAv2's questions file (``{"questions": [{"question_id", "image_id", "question"}]}``, its
    ``data_subtype`` naming the COCO split) and annotations file (``{"annotations": [{"question_id",
    "answers": [{"answer"}, ...], "answer_type", "question_type", "multiple_choice_answer"}]}``) -> samples
    whose ``answers`` are the ten annotators' answers (what VQA accuracy scores against). Without annotations
    (a test-dev split) the answers are empty. ``image_pattern`` formats an image id (and ``data_subtype``) into
    a file name under ``image_dir``."""
    questions, image_dir = Path(questions), Path(image_dir)
    qdata = _load_json(questions)
    rows = _field(qdata, "questions", list, str(questions))
    subtype = qdata.get("data_subtype", "")
    by_id: dict[int, dict] = {}
    if annotations is not None:
        annotations = Path(annotations)
        for i, ann in enumerate(_field(_load_json(annotations), "annotations", list, str(annotations))):
            where = f"{annotations} annotation {i}"
            answers = _field(ann, "answers", list, where)
            if not answers or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
                raise DataError(f"{where}: field 'answers' must be a non-empty list of {{'answer': str}}")
            by_id[_field(ann, "question_id", int, where)] = ann
    out = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        where = f"{questions} question {i}"
        qid, image_id = _field(row, "question_id", int, where), _field(row, "image_id", int, where)
        text = _field(row, "question", str, where)
        try:
            name = image_pattern.format(image_id=image_id, data_subtype=subtype)
        except (KeyError, ValueError, IndexError) as e:
            raise DataError(f"image_pattern {image_pattern!r}: {e}; it may use {{image_id}} and {{data_subtype}}")
        meta: dict = {"question_id": qid, "image_id": image_id}
        answers: list[str] = []
        if annotations is not None:
            if qid not in by_id:
                raise DataError(f"{where}: question_id {qid} has no annotation in {annotations}")
            ann = by_id[qid]
            answers = [a["answer"] for a in ann["answers"]]
            meta |= {k: ann[k] for k in ("answer_type", "question_type", "multiple_choice_answer") if k in ann}
        out.append(EvalSample(str(qid), [_image(image_dir, name, where)], text, answers, meta))
    return out


def read_pope(path: str | Path, image_dir: str | Path, category: str | None = None,
              limit: int | None = None) -> list[EvalSample]:
    """POPE's JSONL (one ``{"question_id", "image", "text", "label": "yes" | "no"}`` per line) -> samples with
    the label as the one answer and the negative-sampling ``category`` (random / popular / adversarial) in
    ``meta``: the row's own ``category`` field, else the ``category`` argument, else the file name's last
    ``_part`` when it names one (POPE ships ``coco_pope_adversarial.json`` and the like)."""
    path, image_dir = Path(path), Path(image_dir)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    stem = path.stem.rsplit("_", 1)[-1]
    default = category or (stem if stem in ("random", "popular", "adversarial") else None)
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        where = f"{path} line {i + 1}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from e
        label = _field(row, "label", str, where).strip().lower()
        if label not in ("yes", "no"):
            raise DataError(f"{where}: field 'label' must be 'yes' or 'no', got {row['label']!r}")
        qid = row.get("question_id", i)
        meta = {"question_id": qid, "category": row.get("category", default)}
        out.append(EvalSample(str(qid), [_image(image_dir, _field(row, "image", str, where), where)],
                              _field(row, "text", str, where), [label], meta))
        if limit and len(out) >= limit:
            break
    return out


def read_coco_captions(path: str | Path, image_dir: str | Path, limit: int | None = None) -> list[EvalSample]:
    """COCO captions annotations (``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``)
    -> one sample per image with all its captions as the references (images without captions are skipped)."""
    path, image_dir = Path(path), Path(image_dir)
    data = _load_json(path)
    images = {}
    for i, im in enumerate(_field(data, "images", list, str(path))):
        where = f"{path} image {i}"
        images[_field(im, "id", int, where)] = _field(im, "file_name", str, where)
    captions: dict[int, list[str]] = {}
    for i, ann in enumerate(_field(data, "annotations", list, str(path))):
        where = f"{path} annotation {i}"
        image_id = _field(ann, "image_id", int, where)
        if image_id not in images:
            raise DataError(f"{where}: image_id {image_id} is not in the file's images")
        captions.setdefault(image_id, []).append(_field(ann, "caption", str, where))
    out = []
    for image_id, refs in captions.items():
        where = f"{path} image_id {image_id}"
        out.append(EvalSample(str(image_id), [_image(image_dir, images[image_id], where)], "", refs,
                              {"image_id": image_id}))
        if limit and len(out) >= limit:
            break
    return out


def read_grounding(path: str | Path, image_dir: str | Path, limit: int | None = None) -> list[EvalSample]:
    """RefCOCO-style rows ``{"image", "expression", "bbox": [x, y, w, h] (pixels), "width", "height"}`` -> samples
    whose question is the expression and whose ``meta`` holds the box (x1, y1, x2, y2) and the image size."""
    path, image_dir = Path(path), Path(image_dir)
    out = []
    for i, row in enumerate(_load_list(path, "referring expressions", limit)):
        where = f"{path} row {i}"
        box = _field(row, "bbox", list, where)
        if len(box) != 4 or not all(isinstance(v, (int, float)) for v in box) or box[2] <= 0 or box[3] <= 0:
            raise DataError(f"{where}: field 'bbox' must be [x, y, width, height] with a positive size, got {box!r}")
        width, height = _field(row, "width", (int, float), where), _field(row, "height", (int, float), where)
        x, y, w, h = (float(v) for v in box)
        out.append(EvalSample(str(row.get("id", i)), [_image(image_dir, _field(row, "image", str, where), where)],
                              _field(row, "expression", str, where), [],
                              {"box": [x, y, x + w, y + h], "width": width, "height": height}))
    return out


def read_multiple_choice(path: str | Path, image_dir: str | Path, limit: int | None = None) -> list[EvalSample]:
    """Rows ``{"id", "image" (or "images": [...]), "question", "options": [text, ...] or {"A": text, ...},
    "answer": a letter, or the option's index}`` (ScienceQA / MMMU style) -> samples whose ``answers`` is the
    correct letter and whose ``meta`` holds the options (letter -> text) and the row's ``category``."""
    path, image_dir = Path(path), Path(image_dir)
    out = []
    for i, row in enumerate(_load_list(path, "questions", limit)):
        where = f"{path} row {i}"
        options = _field(row, "options", (list, dict), where)
        if isinstance(options, list):
            options = {chr(65 + k): v for k, v in enumerate(options)}
        if not 2 <= len(options) <= 26 or not all(isinstance(v, str) for v in options.values()):
            raise DataError(f"{where}: field 'options' must hold 2 to 26 option texts, got {row['options']!r}")
        answer = row.get("answer")
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
            answer = chr(65 + answer)
        if answer not in options:
            raise DataError(f"{where}: field 'answer' must be one of the option letters {', '.join(options)} (or an "
                            f"index), got {answer!r}")
        names = row.get("images") or ([row["image"]] if "image" in row else [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{where}: field 'image' / 'images' must name image files, got {names!r}")
        out.append(EvalSample(str(row.get("id", i)), [_image(image_dir, n, where) for n in names],
                              _field(row, "question", str, where), [answer],
                              {"options": options, "category": row.get("category")}))
    return out


def read_gqa(path: str | Path, image_dir: str | Path, limit: int | None = None) -> list[EvalSample]:
    """GQA's questions JSON (``{question_id: {"imageId", "question", "answer", "types": {"structural",
    "semantic", "detailed"}, ...}}``, e.g. ``testdev_balanced_questions.json``; images ``{imageId}.jpg``, or
    ``.png`` as ShapesWorld writes them) -> samples with the one gold answer and the question types in ``meta``."""
    path, image_dir = Path(path), Path(image_dir)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected GQA's object of question id -> question")
    out = []
    for qid, row in data.items():
        where = f"{path} question {qid}"
        image_id = _field(row, "imageId", str, where)
        name = next((f"{image_id}{ext}" for ext in (".jpg", ".png") if (image_dir / f"{image_id}{ext}").is_file()),
                    f"{image_id}.jpg")
        image = _image(image_dir, name, where)
        types = row.get("types") if isinstance(row.get("types"), dict) else {}
        out.append(EvalSample(str(qid), [image], _field(row, "question", str, where),
                              [_field(row, "answer", str, where)],
                              {f"{k}_type": v for k, v in types.items() if k in ("structural", "semantic")}))
        if limit and len(out) >= limit:
            break
    return out


def read_scienceqa(problems: str | Path, image_root: str | Path, split: str = "test",
                   limit: int | None = None) -> list[EvalSample]:
    """ScienceQA's ``problems.json`` (``{pid: {"question", "choices", "answer": index, "hint", "image",
    "split", "subject", ...}}``) -> the split's multiple-choice samples: images ``{image_root}/{split}/{pid}/
    {image}`` when a problem has one, the context (hint) before the question as LLaVA's ScienceQA prompt puts
    it, the answer as a letter."""
    problems, image_root = Path(problems), Path(image_root)
    data = _load_json(problems)
    if not isinstance(data, dict):
        raise DataError(f"{problems}: expected ScienceQA's object of problem id -> problem")
    out = []
    for pid, row in data.items():
        if row.get("split") != split:
            continue
        where = f"{problems} problem {pid}"
        choices = _field(row, "choices", list, where)
        answer = _field(row, "answer", int, where)
        if not 0 <= answer < len(choices) or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: field 'answer' {answer} must index the {len(choices)} text choices")
        images = [_image(image_root / split / str(pid), row["image"], where)] if row.get("image") else []
        hint = row.get("hint") or ""
        question = f"Context: {hint}\n{row['question']}" if hint else _field(row, "question", str, where)
        out.append(EvalSample(str(pid), images, question, [chr(65 + answer)],
                              {"options": {chr(65 + k): c for k, c in enumerate(choices)},
                               "category": row.get("subject")}))
        if limit and len(out) >= limit:
            break
    return out


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_image_folder(root: str | Path, limit: int | None = None) -> tuple[list[EvalSample], list[str], str]:
    """An ImageFolder (``root/<class>/<image>``, torchvision's layout) -> (samples with their class as the answer
    and its index in ``meta["label"]``, the class names in sorted order, the question to ask). The class names
    are the folder names unless ``root/classes.json`` (``{"classes": {folder: name}, "prompt": question}``)
    names them; the question defaults to "What is in the image?". A class folder without images is an error (a
    class no sample can have). Dual encoders read the prompt templates of classes.json with
    :func:`read_class_templates`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if len(folders) < 2:
        raise DataError(f"{root}: an ImageFolder needs at least two class folders, found {len(folders)}")
    meta = _load_json(root / "classes.json") if (root / "classes.json").is_file() else {}
    names = meta.get("classes") or {}
    classes = [str(names.get(f.name, f.name)) for f in folders]
    question = str(meta.get("prompt") or "What is in the image?")
    per_class = [sorted(p for p in f.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) for f in folders]
    empty = [f.name for f, files in zip(folders, per_class) if not files]
    if empty:
        raise DataError(f"{root}: class folder {empty[0]!r} has no images ({len(empty)} empty in all: "
                        f"{', '.join(empty[:5])}); images are files ending in {', '.join(IMAGE_SUFFIXES)}. "
                        f"Remove empty folders or add their images")
    out = []
    for i in range(max(len(files) for files in per_class)):  # interleaved, so --limit samples every class
        for label, files in enumerate(per_class):
            if i < len(files):
                out.append(EvalSample(f"{folders[label].name}/{files[i].name}", [files[i]], question,
                                      [classes[label]], {"label": label}))
    return (out[:limit] if limit else out), classes, question


DEFAULT_TEMPLATES = ("a photo of a {}.",)


def read_class_templates(root: str | Path) -> list[str]:
    """The prompt templates of an ImageFolder for a dual encoder's zero-shot classification: ``templates`` of
    ``root/classes.json`` (each with one ``{}`` for the class name; several are ensembled), else CLIP's
    "a photo of a {}."."""
    path = Path(root) / "classes.json"
    meta = _load_json(path) if path.is_file() else {}
    templates = meta.get("templates") or list(DEFAULT_TEMPLATES)
    if not isinstance(templates, list) or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
        raise DataError(f"{path}: 'templates' must be a list of strings with one {{}} each (where the class name "
                        f"goes), got {templates!r}")
    return templates
