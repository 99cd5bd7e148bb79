"""TextVQA, ChartQA, DocVQA, InfographicVQA and OCRBench: their scorers on hand-checked cases, their readers on
small files written in the official layouts (run end to end with canned answers), --limit, bad input, and the
ShapesWorld layouts read back with an oracle's answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.eval.canned import run_canned
from vlmkit.errors import DataError
from vlmkit.eval.metrics.text import (anls, ocrbench_match, ocrbench_summary, relaxed_correctness,
                                      textvqa_accuracy, textvqa_normalize_answer)
from vlmkit.eval.metrics.vqa import vqa_accuracy
from vlmkit.eval.tasks import get_task


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _by_image(canned: dict[str, str]):
    """A model answering from the name of the (one) image it is shown."""
    return lambda images, prompt: canned[Path(images[0]).name]


# ----------------------------------------------------------------------------------------------- scorers

def test_anls_hand_checked():
    assert anls("hello wrld", ["hello world"]) == pytest.approx(1 - 1 / 11)
    # the official denominator is the RAW length: three spaces make it 12, though the text normalises alike
    assert anls("hello   wrld", ["hello world"]) == pytest.approx(1 - 1 / 12)
    assert anls(" HELLO  World", ["hello world"]) == 1.0  # lower-cased, whitespace collapsed: distance 0
    assert anls("abcd", ["abxy"]) == 0.5  # 1 - 2/4: exactly the threshold is kept
    assert anls("abcde", ["abxyz"]) == 0.0  # 1 - 3/5 = 0.4 < 0.5 -> 0
    assert anls("Hello World", ["foo", "hello world"]) == 1.0  # the best answer counts
    assert anls(None, ["x"]) == 0.0
    with pytest.raises(DataError, match="answers"):
        anls("x", "x")


def test_relaxed_correctness_hand_checked():
    assert relaxed_correctness("12", "12.5")  # |12 - 12.5| / 12.5 = 0.04 <= 0.05
    assert not relaxed_correctness("11.8", "12.5")  # 0.7 / 12.5 = 0.056
    assert not relaxed_correctness("12%", "12.5")  # "12%" is 0.12
    assert relaxed_correctness("12.5%", "0.125")
    assert relaxed_correctness("Yes", "yes") and not relaxed_correctness("Yes.", "yes")
    assert relaxed_correctness("0", "0") and not relaxed_correctness("0.0", "0")  # a zero target: strings compared
    assert relaxed_correctness(" 12", "12")  # Python's float() accepts surrounding whitespace


def test_textvqa_processing_differs_from_vqav2():
    assert textvqa_normalize_answer("The Beatles?") == "beatles"
    assert textvqa_normalize_answer("1,000") == "1000"
    assert textvqa_normalize_answer("red,white") == "redwhite"  # commas deleted before the punctuation rule
    assert textvqa_normalize_answer("it's") == "it 's"
    # 3 of 10 annotators match "coca cola" ("Coca-Cola": the hyphen becomes a space):
    # 3 subsets score 2/3, 7 score 1 -> (2 + 7) / 10 = 0.9
    answers = ["coca cola"] * 3 + ["pepsi"] * 7
    assert textvqa_accuracy("Coca-Cola", answers).score == pytest.approx(0.9)
    # the annotations are processed too: "The Beatles" x4 matches "beatles" (VQAv2's scorer leaves them as is)
    answers = ["The Beatles"] * 4 + ["x"] * 6
    assert textvqa_accuracy("beatles", answers).score == 1.0
    assert vqa_accuracy("beatles", answers).score == 0.0
    with pytest.raises(DataError, match="exactly 10"):
        textvqa_accuracy("x", ["x"] * 9)


def test_ocrbench_match_and_summary():
    hme = "HME100k"
    assert ocrbench_match("O D \\bot A B", ["O D \\bot A B\n", "OD \\perp AB\n"], hme)  # spaces removed
    assert ocrbench_match("OD\\botAB", "O D \\bot A B\n", hme)
    assert not ocrbench_match("od \\bot ab", "O D \\bot A B\n", hme)  # case kept for HME100k
    assert ocrbench_match("The word is centre.", "CENTRE", "IIIT5K")  # lower-cased containment
    assert not ocrbench_match("AC ME", "ACME", "SROIE")
    out = ocrbench_summary(["Regular Text Recognition", "Artistic Text Recognition", "Doc-oriented VQA",
                            "Key Information Extraction"], [1, 1, 1, 0])
    assert out["final_score"] == 3 and out["score/Text Recognition"] == 2 and out["accuracy"] == 0.75
    assert out["score/Key Information Extraction"] == 0 and out["type/Artistic Text Recognition"] == 1


# ------------------------------------------------------------------------------- official layouts, end to end

def _textvqa(root: Path, answers2=None) -> None:
    rows = [{"question_id": 1, "image_id": "aa01", "question": "what does NASA say?",
             "answers": ["coca cola"] * 3 + ["pepsi"] * 7, "image_classes": ["Poster"]},
            {"question_id": 2, "image_id": "aa02", "question": "what brand?", "answers": answers2 or ["sony"] * 10}]
    _json(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "dataset_version": "0.5.1",
                                            "dataset_split": "val", "data": rows})
    for r in rows:
        _png(root / "train_images" / f"{r['image_id']}.jpg")


def test_textvqa_end_to_end(tmp_path):
    _textvqa(tmp_path)
    result, records = run_canned("textvqa", tmp_path, _by_image({"aa01.jpg": "Coca-Cola", "aa02.jpg": "Sony"}),
                                 split="val")
    # 0.9 (3 of 10 annotators) and 1.0 -> 0.95
    assert result["n"] == 2 and result["metrics"]["accuracy"] == pytest.approx(0.95)
    # lmms-eval's prompt: str.capitalize() (which lower-cases the rest) + the short-answer instruction
    assert records[0]["prompt"] == "What does nasa say?\nAnswer the question using a single word or phrase."


def _chartqa(root: Path, n_human: int = 2, n_augmented: int = 1) -> None:
    folder = root / "ChartQA Dataset" / "test"
    human = [{"imgname": "h0.png", "query": "Value of the bar?", "label": "12.5"},
             {"imgname": "h1.png", "query": "Share?", "label": "12.5"}]
    human += [{"imgname": "h0.png", "query": f"q{i}", "label": "1"} for i in range(n_human - 2)]
    augmented = [{"imgname": "a0.png", "query": "Is it so?", "label": "yes"}]
    augmented += [{"imgname": "a0.png", "query": f"q{i}", "label": "1"} for i in range(n_augmented - 1)]
    _json(folder / "test_human.json", human)
    _json(folder / "test_augmented.json", augmented)
    for name in ("h0.png", "h1.png", "a0.png"):
        _png(folder / "png" / name)


def test_chartqa_end_to_end(tmp_path):
    _chartqa(tmp_path)
    result, _ = run_canned("chartqa", tmp_path, _by_image({"h0.png": "12", "h1.png": "12%", "a0.png": "Yes"}))
    m = result["metrics"]
    # human: "12" vs 12.5 right (4%), "12%" vs 12.5 wrong (0.12) -> 0.5; augmented: "Yes" = "yes" -> 1.0
    assert m["relaxed_human"] == 0.5 and m["relaxed_augmented"] == 1.0
    assert m["relaxed_accuracy"] == 0.75  # (0.5 + 1.0) / 2, what papers report
    assert m["relaxed_overall"] == pytest.approx(2 / 3)  # pooled: 2 of 3
    assert result["n"] == 3


@pytest.mark.parametrize("limit, expected", [(1, (1, 0)), (4, (2, 2)), (7, (4, 3)), (100, (5, 3))])
def test_chartqa_limit_splits_between_the_files(tmp_path, limit, expected):
    _chartqa(tmp_path, n_human=5, n_augmented=3)
    samples = get_task("chartqa").read(tmp_path, "test", limit)
    kinds = [s.meta["set"] for s in samples]
    assert (kinds.count("human"), kinds.count("augmented")) == expected
    assert len(samples) == min(limit, 8)


def _docvqa(root: Path) -> None:
    rows = [{"questionId": 7, "question": "Who wrote it?", "image": "documents/d1.png", "docId": 1,
             "answers": ["hello world"], "question_types": ["handwritten"]},
            {"questionId": 8, "question": "What date?", "image": "documents/d2.png", "docId": 1,
             "answers": ["hello"]}]
    _json(root / "val" / "val_v1.0.json", {"dataset_name": "docvqa", "dataset_split": "val", "data": rows})
    for name in ("d1.png", "d2.png"):
        _png(root / "val" / "documents" / name)


def test_docvqa_end_to_end(tmp_path):
    _docvqa(tmp_path)
    result, _ = run_canned("docvqa", tmp_path, _by_image({"d1.png": "hello wrld", "d2.png": "xyz"}), split="val")
    # 1 - 1/11 and 0 ("xyz" vs "hello": 5 edits of 5) -> (10/11) / 2 = 5/11
    assert result["metrics"]["anls"] == pytest.approx(5 / 11)


def test_infovqa_end_to_end(tmp_path):
    rows = [{"questionId": 1, "question": "How many?", "image_local_name": "1.jpeg", "answers": ["12", "twelve"]},
            {"questionId": 2, "question": "Code?", "image_local_name": "2.jpeg", "answers": ["abxy"]}]
    _json(tmp_path / "infographicsVQA_val_v1.0_withQT.json", {"dataset_name": "infographicVQA", "data": rows})
    for name in ("1.jpeg", "2.jpeg"):
        _png(tmp_path / "infographicsvqa_images" / name)
    result, _ = run_canned("infovqa", tmp_path, _by_image({"1.jpeg": "Twelve", "2.jpeg": "abcd"}), split="val")
    # 1.0 and exactly 0.5 (2 edits of 4, kept) -> 0.75
    assert result["metrics"]["anls"] == pytest.approx(0.75)


def _ocrbench(root: Path) -> None:
    rows = [("IIIT5K", "Regular Text Recognition", "CENTRE"),
            ("HME100k", "Handwritten Mathematical Expression Recognition", ["O D \\bot A B\n", "OD \\perp AB\n"]),
            ("HME100k", "Handwritten Mathematical Expression Recognition", "x ^ { 2 }\n"),
            ("docVQA", "Doc-oriented VQA", ["1,000"]),
            ("SROIE", "Key Information Extraction", "ACME")]
    data = [{"dataset_name": d, "id": i, "image_path": f"{d}/{i}.png", "question": f"  question {i}?  ",
             "answers": a, "type": t} for i, (d, t, a) in enumerate(rows)]
    _json(root / "OCRBench" / "OCRBench.json", data)
    for row in data:
        _png(root / "OCRBench_Images" / row["image_path"])


def test_ocrbench_end_to_end(tmp_path):
    _ocrbench(tmp_path)
    canned = {"0.png": "centre", "1.png": "O D \\bot A B", "2.png": "X^{2}", "3.png": "It is 1,000.", "4.png": "AC ME"}
    result, records = run_canned("ocrbench", tmp_path, _by_image(canned))
    m = result["metrics"]
    # right: CENTRE (case-insensitive), the HME expression (spaces ignored), 1,000; wrong: X^{2} (HME keeps case),
    # "AC ME" -> final score 3 of 5: Text Recognition 1, HME 1, Doc-oriented 1, KIE 0
    assert m["final_score"] == 3 and m["accuracy"] == 0.6
    assert m["score/Text Recognition"] == 1 and m["score/Handwritten Mathematical Expression Recognition"] == 1
    assert m["score/Doc-oriented VQA"] == 1 and m["score/Key Information Extraction"] == 0
    assert records[0]["prompt"] == "question 0?"  # lmms-eval strips the question, adds nothing


# ------------------------------------------------------------------------------------------------ --limit

def test_limit_reads_exactly_n(tmp_path):
    _textvqa(tmp_path / "t")
    _docvqa(tmp_path / "d")
    _ocrbench(tmp_path / "o")
    assert len(get_task("textvqa").read(tmp_path / "t", "val", 1)) == 1
    assert len(get_task("docvqa").read(tmp_path / "d", "val", 1)) == 1
    assert len(get_task("ocrbench").read(tmp_path / "o", "test", 3)) == 3


# -------------------------------------------------------------------------------------------- bad input

def test_bad_input_names_file_row_and_field(tmp_path):
    _chartqa(tmp_path)
    path = tmp_path / "ChartQA Dataset" / "test" / "test_human.json"
    _json(path, [{"imgname": "h0.png", "query": "q", "label": "1"}, {"imgname": "h0.png", "label": "1"}])
    with pytest.raises(DataError, match=r"test_human\.json row 1: missing field 'query'"):
        get_task("chartqa").read(tmp_path, "test", None)

    _textvqa(tmp_path / "t", answers2=["sony"] * 9)
    with pytest.raises(DataError, match=r"TextVQA_0\.5\.1_val\.json row 1: field 'answers' must hold the 10"):
        get_task("textvqa").read(tmp_path / "t", "val", None)

    _ocrbench(tmp_path / "o")
    rows = json.loads((tmp_path / "o" / "OCRBench" / "OCRBench.json").read_text())
    rows[2]["type"] = "Maths"
    _json(tmp_path / "o" / "OCRBench" / "OCRBench.json", rows)
    with pytest.raises(DataError, match=r"OCRBench\.json row 2: field 'type' 'Maths'"):
        get_task("ocrbench").read(tmp_path / "o", "test", None)


def test_unanswered_split_and_missing_image_are_refused(tmp_path):
    _json(tmp_path / "test_v1.0.json", {"data": [{"questionId": 1, "question": "q", "image": "documents/x.png"}]})
    with pytest.raises(DataError, match=r"test_v1\.0\.json row 0: missing field 'answers'.*--split val"):
        get_task("docvqa").read(tmp_path, "test", None)
    _docvqa(tmp_path / "d")
    (tmp_path / "d" / "val" / "documents" / "d2.png").unlink()
    with pytest.raises(DataError, match=r"val_v1\.0\.json row 1: image not found"):
        get_task("docvqa").read(tmp_path / "d", "val", None)
    with pytest.raises(DataError, match="no InfographicVQA annotations found"):
        get_task("infovqa").read(tmp_path, "val", None)


# ----------------------------------------------------------------------------------------------- ShapesWorld

@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from vlmkit.data.shapes import generate_shapes

    out = tmp_path_factory.mktemp("shapes") / "s"
    generate_shapes(out, n=60, seed=0, size=32, progress=False)
    return out


@pytest.mark.parametrize("name, metric", [("textvqa", "accuracy"), ("chartqa", "relaxed_accuracy"),
                                          ("docvqa", "anls"), ("infovqa", "anls"), ("ocrbench", "accuracy")])
def test_shapes_layouts_round_trip_with_an_oracle(shapes, name, metric):
    task = get_task(name)
    samples = task.read(shapes, "test", None)
    assert samples
    oracle = {(str(s.images[0]), task.prompt(s)): s.answers[0] for s in samples}
    result, _ = run_canned(name, shapes, lambda images, prompt: oracle[(str(images[0]), prompt)])
    assert result["n"] == len(samples) and result["metrics"][metric] == 1.0
    if name == "ocrbench":
        assert result["metrics"]["final_score"] == len(samples)
