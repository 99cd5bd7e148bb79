"""MMMU, MMMU-Pro and MMStar from their Hugging Face parquet releases, scored by the official rules.

``mmmu`` -- MMMU/MMMU: one folder per subject under ``--data``
(``Accounting/validation-00000-of-00001.parquet``, ``dev-*``, ``test-*``; columns id, question, options (a
Python-literal list), explanation, image_1..image_7 (struct {bytes, path}, null when absent), img_type,
answer, topic_difficulty, question_type ("multiple-choice" | "open"), subfield). The prompt is lmms-eval's
(``tasks/mmmu/utils.py`` ``construct_prompt``, interleaved): ``{question}\\n{A. option ...}\\n\\nAnswer with
the option's letter from the given choices directly.``, or ``{question}\\n\\nAnswer the question using a
single word or phrase.`` for open questions; each ``<image N>`` of the question and the options becomes
vlmkit's ``<image>`` placeholder and brings ``image_N``, in order of appearance (a tag used twice brings its
image twice: N placeholders, N images). Images a row holds but its text never names go first, each with its
placeholder (lmms-eval drops them). Scored by MMMU's ``eval/eval_utils.py`` (:mod:`vlmkit.eval.metrics.mmmu`):
the random pick for unparsable letters is in the headline, and reported. ``--split validation`` is what papers
report; the test split has no answers ("?") and is refused.

``mmmu_pro`` / ``mmmu_pro_4`` / ``mmmu_pro_vision`` -- MMMU/MMMU_Pro's three settings, one task each:
``standard (10 options)/``, ``standard (4 options)/`` and ``vision/`` hold ``{split}-*.parquet`` (the release
has ``test`` only, with answers: ``--split test``). Standard rows as MMMU's (a ``subject`` column instead of
the folder); vision rows: id, image (the question photographed with its options), options, answer, subject.
Prompts of ``mmmu-pro/infer`` (``{question}\\n{options}\\n{instruction}``, "direct" instructions of
prompts.yaml), scored by ``mmmu-pro/evaluate.py`` (its "Answer:" rule first; overall accuracy, per subject).

``mmstar`` -- Lin-Chen/MMStar: ``mmstar.parquet`` (index, question with its options inline, image, answer
letter, category, l2_category, meta_info), any ``--split`` (the release has one, ``val``). The prompt is
lmms-eval's (the question, then "\\nAnswer with the option's letter from the given choices directly", no full
stop, as there); scored by its ``exact_match`` (``tasks/mmstar/utils.py``).

ShapesWorld writes ``mmmu_{split}/`` (subject folders Art: colours, Design: shapes, Math: counts, multiple
choice and open; the parquet named by ShapesWorld's split, ``val-00000-of-00001.parquet``, with answers, so
``--split val`` and ``--split test`` both read it), ``mmmu_pro_{split}/`` (the three settings, count questions
with the ten options 0-9) and ``mmstar_{split}/mmstar.parquet``.
"""

from __future__ import annotations

import ast
import io
import random
import re
from collections import defaultdict
from pathlib import Path

from vlmkit.errors import DataError
from vlmkit.eval.metrics.mmmu import MMMU_SEED, mmmu_metrics, mmstar_match, score_mmmu
from vlmkit.eval.readers import EmbeddedImage, EvalSample, benchmark_root
from vlmkit.eval.benchmarks.layouts import shapes_writer
from vlmkit.eval.registry import Task, register_task

MC_PROMPT = "Answer with the option's letter from the given choices directly."  # lmms-eval mmmu
OPEN_PROMPT = "Answer the question using a single word or phrase."
# mmmu-pro/prompts.yaml, "direct"
PRO_STANDARD_PROMPT = "Answer with the option letter from the given choices directly."
PRO_VISION_PROMPT = ("Answer with the option letter from the given choices directly. The last line of your "
                     "response should be of the following format: 'Answer: $LETTER' (without quotes) where "
                     "LETTER is one of options.")
MMSTAR_PROMPT = "\nAnswer with the option's letter from the given choices directly"  # lmms-eval, as written
PRO_SETTINGS = {"mmmu_pro": "standard (10 options)", "mmmu_pro_4": "standard (4 options)",
                "mmmu_pro_vision": "vision"}
N_IMAGES = 7
_TAG = re.compile(r"<image (\d+)>")
MAX_SHAPES_ROWS = 200


# ------------------------------------------------------------------------------------------ parquet reading
# ShapesWorld writes the parquet layouts only where pyarrow is installed (the eval extra; the demo needs none)
_SHAPES_HINT = ("; a ShapesWorld folder holds {task}_{split}/ only if pyarrow was installed when it was "
                "generated: pip install 'vlmkit[eval]' and generate it again")


def _have_pyarrow() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is in the eval extra
        raise DataError("reading the MMMU / MMMU-Pro / MMStar parquet files needs pyarrow: "
                        "pip install 'vlmkit[eval]'") from e
    return pa, pq


def _rows(path: Path, required: tuple[str, ...], limit: int | None):
    """(row number, row dict) of a parquet file, read in batches, at most ``limit`` rows; a missing column is
    refused naming the file."""
    _, pq = _pyarrow()
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    names = set(f.schema_arrow.names)
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; the file has "
                        f"{', '.join(sorted(names))}")
    i = 0
    for batch in f.iter_batches(batch_size=64):
        for row in batch.to_pylist():
            if limit is not None and i >= limit:
                return
            yield i, row
            i += 1


def _image(value, where: str, source: str) -> EmbeddedImage | None:
    """A parquet image cell (HF's struct {bytes, path}, or raw bytes) -> EmbeddedImage; None when absent."""
    if value is None:
        return None
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise DataError(f"{where}: the image holds no bytes (got {type(data).__name__}); the release embeds "
                        f"them")
    return EmbeddedImage(bytes(data), source)


def _text(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {value!r}")
    return value


def _options(row: dict, where: str) -> list[str]:
    raw = _text(row, "options", where)
    try:
        options = ast.literal_eval(raw)
    except (ValueError, SyntaxError) as e:
        raise DataError(f"{where}: field 'options' must be a Python-literal list of strings, "
                        f"got {raw!r}") from e
    if not isinstance(options, list) or len(options) > 26:
        raise DataError(f"{where}: field 'options' must be a list of at most 26 option texts, got {raw!r}")
    return [str(o) for o in options]


def _interleave(text: str, row: dict, where: str, source: str) -> tuple[str, list[EmbeddedImage]]:
    """``text`` with every ``<image N>`` replaced by ``<image>`` and the images in that order; images the row
    holds but the text never names go first."""
    images: list[EmbeddedImage] = []
    named: set[int] = set()

    def swap(match: re.Match) -> str:
        k = int(match.group(1))
        if not 1 <= k <= N_IMAGES:
            raise DataError(f"{where}: the text names <image {k}>, but MMMU rows hold "
                            f"image_1..image_{N_IMAGES}")
        image = _image(row.get(f"image_{k}"), f"{where} field 'image_{k}'", f"{source} image_{k}")
        if image is None:
            raise DataError(f"{where}: the text names <image {k}> but field 'image_{k}' is empty")
        images.append(image)
        named.add(k)
        return "<image>"

    text = _TAG.sub(swap, text)
    extra = [im for k in range(1, N_IMAGES + 1) if k not in named and
             (im := _image(row.get(f"image_{k}"), f"{where} field 'image_{k}'", f"{source} image_{k}"))]
    return "<image>\n" * len(extra) + text, extra + images


def _literal_list(text: str) -> list[str] | None:
    """``"['24/7', '3.429']"`` -> the list of strings; anything else None."""
    if not text.startswith("["):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    return None


def _answer(row: dict, qtype: str, options: list[str], where: str):
    """A multiple-choice answer is an option letter (or a Python-literal list of them: any one is right, as
    ``eval_multi_choice``); an open one a string, or a Python-literal list of accepted strings (as MMMU's
    answer_dict_val.json gives some)."""
    answer = _text(row, "answer", where).strip()
    if answer in ("?", ""):
        raise DataError(f"{where}: no answer ({answer!r}): this split's answers are not public (MMMU's test "
                        f"split); use --split validation (or dev)")
    listed = _literal_list(answer)
    if qtype != "multiple-choice":
        return listed or answer
    letters = [chr(65 + i) for i in range(len(options))]
    if not all(a in letters for a in listed or [answer]):
        raise DataError(f"{where}: field 'answer' must be one of the option letters "
                        f"{', '.join(letters)}, got {answer!r}")
    return listed or answer


# ---------------------------------------------------------------------------------------------------- MMMU
MMMU_COLUMNS = ("id", "question", "options", "answer", "question_type") + tuple(f"image_{k}"
                                                                                for k in range(1, 8))


def _mmmu_sample(row: dict, subject: str, where: str, source: str) -> EvalSample:
    qtype = _text(row, "question_type", where)
    if qtype not in ("multiple-choice", "open"):
        raise DataError(f"{where}: field 'question_type' must be 'multiple-choice' or 'open', got {qtype!r}")
    options = _options(row, where) if qtype == "multiple-choice" else []
    if qtype == "multiple-choice" and len(options) < 2:
        raise DataError(f"{where}: a multiple-choice question needs at least 2 options, got {options!r}")
    text = _text(row, "question", where)
    if options:
        text += "\n" + "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options))
    text, images = _interleave(text, row, where, source)
    answer = _answer(row, qtype, options, where)
    return EvalSample(str(row.get("id")), images, text, [answer] if isinstance(answer, str) else answer,
                      {"subject": subject, "question_type": qtype, "options": options, "answer": answer})


def read_mmmu(root: Path, split: str, limit: int | None) -> list[EvalSample]:
    """The subject folders' ``{split}-*.parquet`` (subjects in name order, rows in file order), at most
    ``limit`` questions in all."""
    root = benchmark_root(root, "mmmu", split)
    files = sorted(root.glob(f"*/{split}-*.parquet"))
    if not files:
        raise DataError(f"{root}: no <subject>/{split}-*.parquet files (MMMU/MMMU's layout, e.g. "
                        f"Accounting/validation-00000-of-00001.parquet); splits: dev, validation, test"
                        + _SHAPES_HINT.format(task="mmmu", split=split))
    return _read_files(files, MMMU_COLUMNS, limit, lambda row, path, where, rel: _mmmu_sample(
        row, path.parent.name, where, f"{path.parent.name}/{rel}"))


def _read_files(files: list[Path], columns: tuple[str, ...], limit: int | None, make) -> list[EvalSample]:
    """``make(row, path, "<path> row i", "<file name> row i")`` for the rows of ``files`` in order, at most
    ``limit`` in all (``--limit`` counts the task's questions, whichever files they are in)."""
    samples: list[EvalSample] = []
    for path in files:
        left = None if limit is None else limit - len(samples)
        if left == 0:
            break
        samples += [make(row, path, f"{path} row {i}", f"{path.name} row {i}")
                    for i, row in _rows(path, columns, left)]
    return samples


def _mmmu_prompt(sample: EvalSample) -> str:
    instruction = MC_PROMPT if sample.meta["question_type"] == "multiple-choice" else OPEN_PROMPT
    return f"{sample.question}\n\n{instruction}"


def _mmmu_score(prediction: str, sample: EvalSample, style: str = "mmmu") -> dict[str, float]:
    """Per sample, without the random pick (which depends on the order: see :func:`_mmmu_summary`): right when
    parsed, and whether the letter would be a random pick."""
    meta = sample.meta
    s = score_mmmu(prediction, meta["question_type"], meta["options"], meta["answer"], None, style)
    return {"correct_parsed": float(s.correct), "random_pick": float(s.random_pick)}


def _mmmu_summary(predictions: list[str], samples: list[EvalSample], style: str = "mmmu") -> dict:
    rng = random.Random(MMMU_SEED)  # one stream over the answers in reading order, as the official script's
    scores = [score_mmmu(p, s.meta["question_type"], s.meta["options"], s.meta["answer"], rng, style)
              for p, s in zip(predictions, samples)]
    out = mmmu_metrics([s.meta["subject"] for s in samples], scores)
    out["n_open"] = float(sum(s.meta["question_type"] == "open" for s in samples))
    out["_per_sample"] = [float(s.correct) for s in scores]
    return out


register_task(Task(
    "mmmu", "MMMU (multi-discipline college-level questions, interleaved images), MMMU's official scorer: "
    "accuracy incl. its random pick for unparsable letters (reported), per discipline and subject",
    "accuracy",
    "<subject>/{split}-*.parquet (MMMU/MMMU; --split validation)", read_mmmu, _mmmu_prompt, _mmmu_score,
    max_new_tokens=32, summarize=_mmmu_summary))


# ------------------------------------------------------------------------------------------------ MMMU-Pro
def _pro_reader(task: str):
    setting = PRO_SETTINGS[task]

    def read(root: Path, split: str, limit: int | None) -> list[EvalSample]:
        folder = benchmark_root(root, "mmmu_pro", split) / setting
        files = sorted(folder.glob(f"{split}-*.parquet"))
        if not files:
            raise DataError(f"{folder}: no {split}-*.parquet files (MMMU/MMMU_Pro's layout: '{setting}/"
                            f"test-00000-of-00001.parquet'; the release's split is test)"
                            + _SHAPES_HINT.format(task="mmmu_pro", split=split))
        return _read_files(files, _pro_columns(setting), limit, lambda row, path, where, rel: _pro_sample(
            row, setting, where, f"{setting}/{rel}"))

    return read


def _pro_columns(setting: str) -> tuple[str, ...]:
    if setting == "vision":
        return ("id", "image", "options", "answer", "subject")
    return ("id", "question", "options", "answer", "subject") + tuple(f"image_{k}" for k in range(1, 8))


def _pro_sample(row: dict, setting: str, where: str, source: str) -> EvalSample:
    subject = _text(row, "subject", where)
    if setting != "vision":
        return _mmmu_sample({**row, "question_type": "multiple-choice"}, subject, where, source)
    options = _options(row, where)
    image = _image(row.get("image"), f"{where} field 'image'", f"{source} image")
    if image is None:
        raise DataError(f"{where}: field 'image' is empty (the vision setting's question is the image)")
    answer = _answer(row, "multiple-choice", options, where)
    meta = {"subject": subject, "question_type": "multiple-choice", "options": options, "answer": answer}
    return EvalSample(str(row.get("id")), [image], "", [answer], meta)


def _pro_prompt(sample: EvalSample) -> str:
    return f"{sample.question}\n{PRO_STANDARD_PROMPT}" if sample.question else PRO_VISION_PROMPT


def _pro_summary(predictions: list[str], samples: list[EvalSample]) -> dict:
    return _mmmu_summary(predictions, samples, "mmmu_pro")


for _name, _what in (("mmmu_pro", "standard setting, 10 options"),
                     ("mmmu_pro_4", "standard setting, 4 options"),
                     ("mmmu_pro_vision", "vision setting: the question and options inside the image")):
    register_task(Task(
        _name, f"MMMU-Pro ({_what}), mmmu-pro/evaluate.py's scorer: accuracy incl. its random pick "
        "(reported), per subject", "accuracy",
        f"'{PRO_SETTINGS[_name]}/{{split}}-*.parquet' (MMMU/MMMU_Pro; --split test)", _pro_reader(_name), _pro_prompt,
        lambda p, s: _mmmu_score(p, s, "mmmu_pro"), max_new_tokens=64 if _name.endswith("vision") else 32,
        summarize=_pro_summary))


# -------------------------------------------------------------------------------------------------- MMStar
MMSTAR_COLUMNS = ("index", "question", "image", "answer", "category", "l2_category")
_OPTION_LETTER = re.compile(r"(?:^|[\s,])([A-Z]): ")


def read_mmstar(root: Path, split: str, limit: int | None) -> list[EvalSample]:
    """``mmstar.parquet`` (the release's one split, whatever ``split`` says), at most ``limit`` questions."""
    path = benchmark_root(root, "mmstar", split) / "mmstar.parquet"
    if not path.is_file():
        raise DataError(f"file not found: {path} (Lin-Chen/MMStar's mmstar.parquet)"
                        + _SHAPES_HINT.format(task="mmstar", split=split))
    samples = []
    for i, row in _rows(path, MMSTAR_COLUMNS, limit):
        where = f"{path} row {i}"
        question = _text(row, "question", where)
        options = question.split("Options:", 1)[-1] if "Options:" in question else ""
        letters = _OPTION_LETTER.findall(options) or list("ABCD")
        answer = _text(row, "answer", where).strip()
        if answer not in letters:
            raise DataError(f"{where}: field 'answer' must be one of the option letters "
                            f"{', '.join(letters)}, got {answer!r}")
        image = _image(row.get("image"), f"{where} field 'image'", f"mmstar.parquet row {i} image")
        if image is None:
            raise DataError(f"{where}: field 'image' is empty")
        samples.append(EvalSample(str(row.get("index")), [image], question, [answer],
                                  {"category": _text(row, "category", where),
                                   "l2_category": _text(row, "l2_category", where)}))
    return samples


def _mmstar_summary(predictions: list[str], samples: list[EvalSample]) -> dict:
    """Overall accuracy (VLMEvalKit's), lmms-eval's ``average`` (the mean of the l2-category accuracies), per
    category lmms-eval's score (the mean of its l2 categories' accuracies), per l2 category the accuracy."""
    scores = [mmstar_match(p, s.answers[0]) for p, s in zip(predictions, samples)]
    l2: dict[str, list[float]] = defaultdict(list)
    parent: dict[str, set[str]] = defaultdict(set)
    for score, s in zip(scores, samples):
        l2[s.meta["l2_category"]].append(score)
        parent[s.meta["category"]].add(s.meta["l2_category"])
    l2_acc = {k: sum(v) / len(v) for k, v in l2.items()}
    out = {"accuracy": sum(scores) / len(scores) if scores else 0.0,
           "average": sum(l2_acc.values()) / len(l2_acc) if l2_acc else 0.0}
    for category, members in sorted(parent.items()):
        out[f"accuracy/{category}"] = sum(l2_acc[m] for m in members) / len(members)
    out |= {f"l2/{k}": v for k, v in sorted(l2_acc.items())}
    out["_per_sample"] = scores
    return out


register_task(Task(
    "mmstar", "MMStar (vision-indispensable multiple choice), lmms-eval's exact letter match: accuracy, the "
    "l2-category average, per category and l2 category", "accuracy", "mmstar.parquet (Lin-Chen/MMStar)",
    read_mmstar, lambda s: s.question.strip().replace(" Please answer yes or no.", "") + MMSTAR_PROMPT,
    lambda p, s: {"accuracy": mmstar_match(p, s.answers[0])}, max_new_tokens=8, summarize=_mmstar_summary))


# ------------------------------------------------------------------------------------ ShapesWorld layouts
SHAPES_SUBJECTS = {"color": ("Art", "Colour"), "shape": ("Design", "Shape"), "count": ("Math", "Counting")}


def _image_struct(pa):
    return pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _write_parquet(path: Path, rows: list[dict], fields: list) -> None:
    pa, pq = _pyarrow()
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), path)


def _mmmu_fields(pa, last: tuple[str, ...]) -> list:
    head = [(name, pa.string()) for name in ("id", "question", "options", "explanation")]
    images = [(f"image_{k}", _image_struct(pa)) for k in range(1, N_IMAGES + 1)]
    return head + images + [(name, pa.string()) for name in last]


def _png(folder: Path, file_name: str) -> dict:
    return {"bytes": (folder / file_name).read_bytes(), "path": Path(file_name).name}


def _shapes_choice_rows(items: list) -> list[dict]:
    from vlmkit.data.shapes.formats import _choice_rows

    return _choice_rows(items)[:MAX_SHAPES_ROWS]


@shapes_writer
def write_mmmu_shapes(folder: Path, split: str, items: list) -> None:
    """``mmmu_{split}/{Art,Design,Math}/{split}-00000-of-00001.parquet``: ShapesWorld's colour, shape and
    count questions as MMMU rows (every second count question open, answered by the number), ``<image 1>`` in
    the question, answers included."""
    if not _have_pyarrow():  # the base install writes every other layout
        return
    pa, _ = _pyarrow()
    per_subject: dict[str, list[dict]] = defaultdict(list)
    for n, r in enumerate(_shapes_choice_rows(items)):
        subject, subfield = SHAPES_SUBJECTS[r["category"]]
        rows = per_subject[subject]
        is_open = r["category"] == "count" and n % 2 == 1
        rows.append({"id": f"{split}_{subject}_{len(rows) + 1}", "question": f"{r['question']} <image 1>",
                     "options": "[]" if is_open else repr(list(r["options"])), "explanation": "",
                     "image_1": _png(folder, r["image"]), "img_type": "['Diagrams']",
                     "answer": r["options"]["ABCD".index(r["answer"])] if is_open else r["answer"],
                     "topic_difficulty": "Easy", "question_type": "open" if is_open else "multiple-choice",
                     "subfield": subfield})
    fields = _mmmu_fields(pa, ("img_type", "answer", "topic_difficulty", "question_type", "subfield"))
    for subject, rows in per_subject.items():
        _write_parquet(folder / f"mmmu_{split}" / subject / f"{split}-00000-of-00001.parquet", rows, fields)


def _render_question(image_bytes: bytes, lines: list[str]) -> bytes:
    """MMMU-Pro's vision setting: the question and its options drawn under the image, as one PNG."""
    from PIL import Image, ImageDraw

    with Image.open(io.BytesIO(image_bytes)) as scene:
        scene = scene.convert("RGB")
    width = max(scene.width, 8 + 7 * max(len(line) for line in lines))
    canvas = Image.new("RGB", (width, scene.height + 14 * len(lines) + 8), "white")
    canvas.paste(scene, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((4, scene.height + 4 + 14 * k), line, fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def _pro_shapes_rows(folder: Path, split: str, items: list) -> list[tuple[dict, dict, dict]]:
    """(10-option row, 4-option row, vision row) per count question: options 0-9 in a random order, four of
    them for the 4-option setting."""
    out = []
    count_rows = [r for r in _shapes_choice_rows(items) if r["category"] == "count"]
    for n, r in enumerate(count_rows):
        rng = random.Random(f"mmmu_pro/{r['id']}")
        truth = r["options"]["ABCD".index(r["answer"])]
        ten = [str(k) for k in range(10)]
        rng.shuffle(ten)
        four = [truth] + rng.sample([o for o in ten if o != truth], 3)
        rng.shuffle(four)
        image = _png(folder, r["image"])
        base = {"id": f"{split}_Math_{n + 1}", "question": f"{r['question']} <image 1>", "explanation": "",
                "image_1": image, "img_type": "['Diagrams']", "topic_difficulty": "Easy", "subject": "Math"}
        lines = [r["question"]] + [f"{chr(65 + i)}. {o}" for i, o in enumerate(ten)]
        out.append(({**base, "options": repr(ten), "answer": chr(65 + ten.index(truth))},
                    {**base, "options": repr(four), "answer": chr(65 + four.index(truth))},
                    {"id": base["id"],
                     "image": {"bytes": _render_question(image["bytes"], lines), "path": None},
                     "options": repr(ten), "answer": chr(65 + ten.index(truth)), "subject": "Math"}))
    return out


@shapes_writer
def write_mmmu_pro_shapes(folder: Path, split: str, items: list) -> None:
    """``mmmu_pro_{split}/{standard (10 options),standard (4 options),vision}/``, each with
    ``{split}-00000-of-00001.parquet``: ShapesWorld's count questions in MMMU-Pro's three settings."""
    if not _have_pyarrow():  # the base install writes every other layout
        return
    pa, _ = _pyarrow()
    rows = _pro_shapes_rows(folder, split, items)
    standard = _mmmu_fields(pa, ("img_type", "answer", "topic_difficulty", "subject"))
    vision = [("id", pa.string()), ("image", _image_struct(pa)), ("options", pa.string()),
              ("answer", pa.string()), ("subject", pa.string())]
    root = folder / f"mmmu_pro_{split}"
    for k, (setting, fields) in enumerate(zip(PRO_SETTINGS.values(), (standard, standard, vision))):
        _write_parquet(root / setting / f"{split}-00000-of-00001.parquet", [r[k] for r in rows], fields)


MMSTAR_CATEGORIES = {"color": ("fine-grained perception", "recognition"),
                     "shape": ("fine-grained perception", "recognition"),
                     "count": ("fine-grained perception", "object counting")}


@shapes_writer
def write_mmstar_shapes(folder: Path, split: str, items: list) -> None:
    """``mmstar_{split}/mmstar.parquet``: the colour, shape and count questions with their four options inline
    ("Options: A: red, B: blue, ..."), as MMStar's rows."""
    if not _have_pyarrow():  # the base install writes every other layout
        return
    pa, _ = _pyarrow()
    rows = []
    for n, r in enumerate(_shapes_choice_rows(items)):
        category, l2 = MMSTAR_CATEGORIES[r["category"]]
        options = ", ".join(f"{chr(65 + i)}: {o}" for i, o in enumerate(r["options"]))
        rows.append({"index": n, "question": f"{r['question']}\nOptions: {options}",
                     "image": _png(folder, r["image"]), "answer": r["answer"], "category": category,
                     "l2_category": l2,
                     "meta_info": {"source": "ShapesWorld", "split": split, "image_path": r["image"]}})
    meta = pa.struct([("source", pa.string()), ("split", pa.string()), ("image_path", pa.string())])
    fields = [("index", pa.int64()), ("question", pa.string()), ("image", _image_struct(pa)),
              ("answer", pa.string()), ("category", pa.string()), ("l2_category", pa.string()),
              ("meta_info", meta)]
    _write_parquet(folder / f"mmstar_{split}" / "mmstar.parquet", rows, fields)
