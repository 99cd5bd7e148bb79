"""MMMU, MMMU-Pro and MMStar: small files in the official parquet layouts, scored through the task as
`vlmkit eval` runs it, against hand-checked scores; the official parsers' tricky cases; bad input;
ShapesWorld's oracle."""

from __future__ import annotations

import io
import random

import pytest
from canned import run_canned
from PIL import Image

from vlmkit.errors import DataError
from vlmkit.eval.metrics.mmmu import (
    eval_open,
    mmstar_match,
    parse_mmmu_choice,
    parse_open_response,
    score_mmmu,
)
from vlmkit.eval.tasks import get_task

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

OPTS = ["red", "blue", "green", "yellow"]


def _png(color: str = "red") -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": f"{color}.png"}


IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
MMMU_FIELDS = ([(n, pa.string()) for n in ("id", "question", "options", "explanation")]
               + [(f"image_{k}", IMAGE) for k in range(1, 8)]
               + [(n, pa.string())
                  for n in ("img_type", "answer", "topic_difficulty", "question_type", "subfield")])


def _mmmu_row(qid: str, question: str, answer: str, options=OPTS, qtype="multiple-choice", **images) -> dict:
    row = {"id": qid, "question": question, "options": repr(list(options)), "explanation": "",
           "img_type": "[]", "answer": answer, "topic_difficulty": "Easy", "question_type": qtype,
           "subfield": "x"}
    row |= {f"image_{k}": None for k in range(1, 8)}
    return row | {"image_1": _png()} | images


def _write(path, rows, fields=MMMU_FIELDS, drop=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [f for f in fields if f[0] not in drop]
    rows = [{k: v for k, v in r.items() if k not in drop} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), path)


def _answer_by_key(answers: dict[str, str]):
    """The model: the prediction whose key (a word unique to the question) the prompt holds; it also checks
    that the prompt has one <image> per image given."""
    def answer(images, prompt):
        assert prompt.count("<image>") in (0, len(images))
        return next(a for k, a in answers.items() if k in prompt)
    return answer


# ------------------------------------------------------------------------------------ the official parsers
def test_mmmu_choice_parsing_tricky_cases():
    rng = random.Random(42)
    assert parse_mmmu_choice("(B)", OPTS, rng) == ("B", False)
    # "." stripped at the end, then " B " is found
    assert parse_mmmu_choice("The answer is B.", OPTS, rng) == ("B", False)
    # several brackets: the last one wins
    assert parse_mmmu_choice("(A) or rather (C)", OPTS, rng) == ("C", False)
    # more than 5 words, no letter: the option text
    assert parse_mmmu_choice("I think that the colour is green here", OPTS, rng) == ("C", False)
    # 5 words or fewer: no text match, so a random pick (Random(42): A, A, C, B, ... for four options)
    assert parse_mmmu_choice("it is green", OPTS, rng) == ("A", True)
    # "B. blue" has no " B " (MMMU has no "B." tier): random, the stream's second draw
    assert parse_mmmu_choice("B. blue", OPTS, rng) == ("A", True)
    # MMMU-Pro's evaluate.py: the "B." tier, and the "Answer:" rule first
    assert parse_mmmu_choice("B. blue", OPTS, None, "mmmu_pro") == ("B", False)
    assert parse_mmmu_choice("Let me see (A)... Answer: D", OPTS, None, "mmmu_pro") == ("D", False)
    # ...and its "B " tier with no space before: "USA" reads as A, as officially
    assert parse_mmmu_choice("USA is it", OPTS, None, "mmmu_pro") == ("A", False)
    assert parse_mmmu_choice("USA is it", OPTS, None, "mmmu") == (None, True)


def test_mmmu_open_parsing():
    assert eval_open("3", parse_open_response("3.0"))  # both 3.0 as floats
    assert eval_open("3", parse_open_response("The answer is 3"))
    assert eval_open("1000", parse_open_response("so it is 1,000"))
    assert not eval_open("3", parse_open_response("4"))
    assert not eval_open("3", parse_open_response("three"))
    assert eval_open(["24/7", "3.43"], parse_open_response("3.429"))  # rounded to 2 decimals: 3.43
    assert eval_open("Paris", parse_open_response("The capital is Paris."))
    assert not score_mmmu("3", "open", [], "4", random.Random(0)).random_pick


def test_mmstar_exact_match_rule():
    assert [mmstar_match(p, "B") for p in ("B", "(B)", "Option B", "The answer is B", "b) blue", "Because",
                                          "the answer is (B)", "", "A", "Answer: B")] == \
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]


# ------------------------------------------------------------------------------------------------ MMMU
def _mmmu_folder(root):
    _write(root / "Accounting" / "validation-00000-of-00001.parquet", [
        _mmmu_row("validation_Accounting_1", "acc1 <image 1>", "B"),
        _mmmu_row("validation_Accounting_2", "acc2 <image 1>", "C"),
        _mmmu_row("validation_Accounting_3", "acc3 <image 1>", "A")])
    _write(root / "Art" / "validation-00000-of-00001.parquet", [
        _mmmu_row("validation_Art_1", "art1: in <image 2> but not in <image 1>?", "D",
                  ["a red circle", "a blue square", "a green star", "a yellow triangle"],
                  image_2=_png("blue")),
        _mmmu_row("validation_Art_2", "art2 <image 1>", "B")])
    _write(root / "Math" / "validation-00000-of-00001.parquet", [
        _mmmu_row("validation_Math_1", "math1 <image 1>", "3", [], "open"),
        _mmmu_row("validation_Math_2", "math2 <image 1>", "12", [], "open"),
        _mmmu_row("validation_Math_3", "math3 <image 1>", "C")])
    _write(root / "Accounting" / "test-00000-of-00001.parquet",
           [_mmmu_row("test_Accounting_1", "t <image 1>", "?")])


def test_mmmu_end_to_end_random_picks_and_disciplines(tmp_path):
    _mmmu_folder(tmp_path)
    answers = {"acc1": "(B)",                   # right
               "acc2": "The answer is B.",      # B, wrong
               "acc3": "I am not sure",         # random pick 1 (Random(42)): A, right
               "art1": "Looking at both images I see a yellow triangle",  # option text, D, right
               "art2": "no idea",               # random pick 2: A, wrong
               "math1": "3.0",                  # open, 3.0 == 3, right
               "math2": "The total is 13",      # open, wrong
               "math3": "hmm"}                  # random pick 3: C, right
    result, records = run_canned("mmmu", tmp_path, _answer_by_key(answers), split="validation")
    m = result["metrics"]
    assert result["n"] == 8
    # right: acc1, acc3 (random), art1, math1, math3 (random) = 5 of 8; without the random picks: 3 of 8
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["accuracy_without_random"] == pytest.approx(3 / 8)
    assert m["n_random_picks"] == 3 and m["n_open"] == 2
    # disciplines: Business (Accounting) 2/3, Art and Design (Art) 1/2, Science (Math) 2/3
    assert m["accuracy/Business"] == pytest.approx(2 / 3)
    assert m["accuracy/Art and Design"] == pytest.approx(1 / 2)
    assert m["accuracy/Science"] == pytest.approx(2 / 3)
    assert m["subject/Art"] == pytest.approx(1 / 2)
    art1 = next(r for r in records if r["id"] == "validation_Art_1")
    # the images in order of appearance: <image 2> first
    assert art1["images"] == ["Art/validation-00000-of-00001.parquet row 0 image_2",
                              "Art/validation-00000-of-00001.parquet row 0 image_1"]
    assert art1["prompt"] == ("art1: in <image> but not in <image>?\nA. a red circle\nB. a blue square\n"
                              "C. a green star\nD. a yellow triangle\n\n"
                              "Answer with the option's letter from the given choices directly.")
    math1 = next(r for r in records if r["id"] == "validation_Math_1")
    assert math1["prompt"] == "math1 <image>\n\nAnswer the question using a single word or phrase."


def test_mmmu_limit_is_exact_across_subject_files(tmp_path):
    _mmmu_folder(tmp_path)
    task = get_task("mmmu")
    for limit in (1, 3, 4, 7, 8):
        assert len(task.read(tmp_path, "validation", limit)) == limit
    ids = [s.id for s in task.read(tmp_path, "validation", 4)]
    assert ids == ["validation_Accounting_1", "validation_Accounting_2", "validation_Accounting_3",
                   "validation_Art_1"]
    result, _ = run_canned("mmmu", tmp_path, lambda im, p: "A", split="validation", limit=5)
    assert result["n"] == 5


def test_mmmu_bad_input(tmp_path):
    task = get_task("mmmu")
    _mmmu_folder(tmp_path)
    with pytest.raises(DataError, match="--split validation"):
        task.read(tmp_path, "test", None)
    with pytest.raises(DataError, match="no <subject>/dev-"):
        task.read(tmp_path, "dev", None)
    bad = tmp_path / "bad"
    path = bad / "Art" / "validation-0.parquet"
    _write(path, [_mmmu_row("v_Art_1", "q <image 1>", "A")], drop=("question_type",))
    with pytest.raises(DataError, match="validation-0.parquet: missing column.*'question_type'"):
        task.read(bad, "validation", None)
    _write(bad / "Art" / "validation-0.parquet", [_mmmu_row("v_Art_1", "q <image 1>", "A"),
                                                  _mmmu_row("v_Art_2", "q <image 1>", "E")])
    with pytest.raises(DataError, match=r"validation-0.parquet row 1: field 'answer' must be one .* got 'E'"):
        task.read(bad, "validation", None)
    _write(path, [_mmmu_row("v_Art_1", "compare <image 1> and <image 2>", "A")])
    with pytest.raises(DataError, match=r"row 0: the text names <image 2> but field 'image_2' is empty"):
        task.read(bad, "validation", None)
    _write(path, [_mmmu_row("v_Art_1", "q <image 1>", "A") | {"options": "[oops"}])
    with pytest.raises(DataError, match="field 'options'"):
        task.read(bad, "validation", None)


def test_mmmu_answer_lists(tmp_path):
    _write(tmp_path / "Art" / "validation-0.parquet", [
        _mmmu_row("v_Art_1", "q1 <image 1>", "['A', 'C']"),
        _mmmu_row("v_Art_2", "q2 <image 1>", "['24/7', '3.429']", [], "open")])
    answers = {"q1": "(C)", "q2": "3.43"}  # C is one of the accepted letters; 3.43 == round(3.429, 2)
    result, _ = run_canned("mmmu", tmp_path, _answer_by_key(answers), split="validation")
    assert result["metrics"]["accuracy"] == 1.0


def test_unnamed_images_go_first_and_repeated_tags_repeat(tmp_path):
    _write(tmp_path / "Art" / "validation-0.parquet", [
        _mmmu_row("v_Art_1", "no tag here", "A", image_2=_png("blue")),
        _mmmu_row("v_Art_2", "<image 1> vs <image 1>", "A")])
    a, b = get_task("mmmu").read(tmp_path, "validation", None)
    assert a.question.startswith("<image>\n<image>\nno tag here") and len(a.images) == 2
    assert b.question.startswith("<image> vs <image>") and len(b.images) == 2


# ------------------------------------------------------------------------------------------------ MMMU-Pro
PRO_FIELDS = [f for f in MMMU_FIELDS if f[0] not in ("question_type", "subfield")] + [("subject",
                                                                                       pa.string())]
VISION_FIELDS = [("id", pa.string()), ("image", IMAGE), ("options", pa.string()), ("answer", pa.string()),
                 ("subject", pa.string())]


def test_mmmu_pro_standard_and_vision(tmp_path):
    ten = [str(k) for k in range(10)]
    rows = []
    for i, (answer, subject) in enumerate((("B", "Art"), ("J", "Art"), ("C", "Math"))):
        r = _mmmu_row(f"pro{i}", f"pro{i} <image 1>", answer, ten)
        r = {k: v for k, v in r.items() if k not in ("question_type", "subfield")}
        rows.append(r | {"subject": subject})
    _write(tmp_path / "standard (10 options)" / "test-00000-of-00001.parquet", rows, PRO_FIELDS)
    answers = {"pro0": "B. 1",                      # the "B." tier (not in MMMU's parser): right
               "pro1": "Answer: J",                 # the "Answer:" rule: right
               "pro2": "?"}                         # random, Random(42) over 10 letters: B, wrong
    result, records = run_canned("mmmu_pro", tmp_path, _answer_by_key(answers), split="test")
    m = result["metrics"]
    # 2 of 3 right; Art 2/2 (Art and Design), Math 0/1 (Science)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["n_random_picks"] == 1
    assert m["accuracy/Art and Design"] == 1.0 and m["accuracy/Science"] == 0.0
    assert records[0]["prompt"].endswith("I. 8\nJ. 9\nAnswer with the option letter from the given choices "
                                         "directly.")

    vision = [{"id": f"v{i}", "image": _png(c), "options": repr(OPTS), "answer": a, "subject": "Art"}
              for i, (c, a) in enumerate((("red", "A"), ("blue", "B")))]
    _write(tmp_path / "vision" / "test-00000-of-00001.parquet", vision, VISION_FIELDS)

    def by_colour(images, prompt):
        assert len(images) == 1 and "'Answer: $LETTER'" in prompt
        return "The image asks for the colour. Answer: A" if images[0].getpixel((0, 0))[0] > 200 else "(C)"
    result, _ = run_canned("mmmu_pro_vision", tmp_path, by_colour, split="test")
    assert result["metrics"]["accuracy"] == pytest.approx(1 / 2)  # v0 right, v1 answered C (key B)
    with pytest.raises(DataError, match="no test-"):
        get_task("mmmu_pro_4").read(tmp_path, "test", None)


# -------------------------------------------------------------------------------------------------- MMStar
MMSTAR_FIELDS = [("index", pa.int64()), ("question", pa.string()), ("image", IMAGE), ("answer", pa.string()),
                 ("category", pa.string()), ("l2_category", pa.string()),
                 ("meta_info", pa.struct([("source", pa.string())]))]


def _mmstar_row(i, answer, category, l2):
    return {"index": i, "question": f"q{i}: what?\nOptions: A: red, B: blue, C: green, D: yellow",
            "image": _png(), "answer": answer, "category": category, "l2_category": l2,
            "meta_info": {"source": "x"}}


def test_mmstar_end_to_end(tmp_path):
    rows = [_mmstar_row(0, "B", "math", "geometry"), _mmstar_row(1, "A", "math", "geometry"),
            _mmstar_row(2, "C", "math", "statistical reasoning"),
            _mmstar_row(3, "D", "coarse perception", "x")]
    _write(tmp_path / "mmstar.parquet", rows, MMSTAR_FIELDS)
    answers = {"q0": "(B) blue", "q1": "the answer is (A)", "q2": "Option C", "q3": "Definitely"}
    result, records = run_canned("mmstar", tmp_path, _answer_by_key(answers), split="val")
    m = result["metrics"]
    # right: q0 "(B", q2 "option c", q3 "d" from "Definitely"; wrong: q1 (the 15th char is "(") -> 3 of 4
    assert m["accuracy"] == pytest.approx(3 / 4)
    # l2: geometry 1/2, statistical reasoning 1, x 1; math = mean(1/2, 1) = 3/4; average = (1/2 + 1 + 1) / 3
    assert m["accuracy/math"] == pytest.approx(3 / 4) and m["accuracy/coarse perception"] == 1.0
    assert m["average"] == pytest.approx(2.5 / 3)
    assert records[0]["prompt"] == ("q0: what?\nOptions: A: red, B: blue, C: green, D: yellow\n"
                                    "Answer with the option's letter from the given choices directly")
    assert len(get_task("mmstar").read(tmp_path, "val", 2)) == 2
    _write(tmp_path / "mmstar.parquet", rows + [_mmstar_row(4, "E", "math", "geometry")], MMSTAR_FIELDS)
    with pytest.raises(DataError, match="row 4: field 'answer' must be one of the option letters A, B, C, D"):
        get_task("mmstar").read(tmp_path, "val", None)


# --------------------------------------------------------------------------------------------- ShapesWorld
def test_shapesworld_oracle_is_perfect(tmp_path):
    from vlmkit.data.shapes import generate_shapes

    generate_shapes(tmp_path / "s", n=60, seed=0, size=32, progress=False)
    for task in ("mmmu", "mmmu_pro", "mmmu_pro_4", "mmmu_pro_vision", "mmstar"):
        for split in ("val", "test"):
            samples = get_task(task).read(tmp_path / "s", split, None)
            assert samples, (task, split)
            key = {(get_task(task).prompt(s), s.images[0].open().tobytes()): s.answers[0] for s in samples}
            assert len(key) == len(samples)

            def oracle(images, prompt, key=key):
                return key[(prompt, images[0].tobytes())]
            result, _ = run_canned(task, tmp_path / "s", oracle, split=split)
            assert result["metrics"]["accuracy"] == 1.0, (task, split, result["metrics"])
            assert result["metrics"].get("n_random_picks", 0) == 0



def test_missing_pyarrow_names_the_eval_extra(tmp_path, monkeypatch):
    import sys

    _write(tmp_path / "mmstar.parquet", [_mmstar_row(0, "A", "math", "geometry")], MMSTAR_FIELDS)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"needs pyarrow: pip install 'vlmkit\[eval\]'"):
        get_task("mmstar").read(tmp_path, "val", None)


def test_without_pyarrow_shapesworld_is_written_without_the_parquet_layouts(tmp_path, monkeypatch):
    """`vlmkit demo` and `vlmkit data shapes` run on the base install (no pyarrow): the parquet layouts are left
    out, the others written, and the tasks say why their folder is missing."""
    import sys

    from vlmkit.data.shapes import generate_shapes

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    generate_shapes(tmp_path / "s", n=40, seed=0, size=32, progress=False)
    assert (tmp_path / "s" / "mme_test").is_dir()
    assert not any((tmp_path / "s" / f"{t}_test").exists() for t in ("mmmu", "mmmu_pro", "mmstar"))
    for task in ("mmmu", "mmmu_pro", "mmstar"):
        with pytest.raises(DataError, match=rf"holds {task}_test/ only if pyarrow was installed"):
            get_task(task).read(tmp_path / "s", "test", None)
