"""MMBench (VLMEvalKit TSV, CircularEval), SEED-Bench (v1 JSON, image part) and MME-RealWorld read from files
written in their official layouts, scored on hand-made answers against hand-checked numbers; and each task on a
small ShapesWorld with an oracle answering right (a perfect score: its writer and reader agree)."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.eval.canned import run_canned
from vlmkit.errors import DataError
from vlmkit.eval.metrics.mmbench import mme_realworld_extract, seedbench_choice

INSTR = "Answer with the option's letter from the given choices directly."
COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
           "comment", "split"]


def png_b64(color: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path: Path, rows: list[dict], columns=COLUMNS) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([r.get(c, "") for c in columns])
    return path


def row(index, question, options, answer, image, category, l2, hint=""):
    r = {"index": index, "question": question, "hint": hint, "answer": answer, "category": category,
         "image": image, "source": "test", "l2-category": l2, "comment": "", "split": "dev"}
    return r | dict(zip("ABCD", options))


M = 1_000_000


def mmbench_rows() -> list[dict]:
    """Q0 4 options (4 copies), Q1 2 options and a hint (C, D empty), Q2 3 options (D 'nan': pandas NaN) with
    Q1's image by reference, Q3 4 options; the copies rotate the options as the official DEV files do."""
    red, blue, green = png_b64("red"), png_b64("blue"), png_b64("green")
    q0 = ["cat", "dog", "cow", "pig"]  # key A = cat; rotation k shows option i + k
    rows = [row(0, "Which animal?", q0, "A", red, "cat_a", "L_x")]
    rows += [row(k * M, "Which animal?", q0[k:] + q0[:k], "ABCD"[-k], "0", "cat_a", "L_x") for k in (1, 2, 3)]
    rows += [row(1, "Which side?", ["left", "right", "", ""], "B", blue, "cat_a", "L_y", hint="Look closely."),
             row(M + 1, "Which side?", ["right", "left", "", ""], "A", "1", "cat_a", "L_y", hint="Look closely.")]
    q2 = ["one", "two", "three"]  # key C = three
    rows += [row(k * M + 2, "How many?", q2[k:] + q2[:k] + ["nan"], "CBA"[k], blue if k == 0 else "1", "cat_b",
                 "L_y") for k in range(3)]
    rows[-3]["image"] = "1"  # Q2's own row shares Q1's image too
    q3 = ["sun", "moon", "star", "sky"]  # key B = moon
    rows += [row(k * M + 3, "What shines at night?", q3[k:] + q3[:k], "BADC"[k], green if k == 0 else "3",
                 "cat_a", "L_y") for k in range(4)]
    return rows


RIGHT = {"Which animal?": "cat", "Which side?": "right", "How many?": "three", "What shines at night?": "moon"}
# (question, first option shown) answered wrong: Q0's last rotation, Q2's own row
WRONG = {("Which animal?", "pig"), ("How many?", "one")}


def options_of(prompt: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z])\. (.*)$", prompt, flags=re.M))


def mmbench_answer(images, prompt):
    options = options_of(prompt)
    question = next(q for q in RIGHT if q in prompt)
    right = next(k for k, v in options.items() if v == RIGHT[question])
    if (question, options["A"]) in WRONG:
        return next(k for k in options if k != right)
    return f"({right})" if question == "What shines at night?" else right  # "(B)" reads as B (can_infer)


def test_mmbench_circular_hand_checked(tmp_path):
    write_tsv(tmp_path / "MMBench_DEV_EN.tsv", mmbench_rows())
    result, records = run_canned("mmbench", tmp_path, mmbench_answer, split="DEV_EN")
    m = result["metrics"]
    # circular: Q0 0 (3 of 4 rotations right), Q1 1, Q2 0 (own row wrong), Q3 1 -> 2/4; vanilla (own rows):
    # Q0 1, Q1 1, Q2 0, Q3 1 -> 3/4; passes 4 + 2 + 3 + 4 = 13
    assert m["circular_accuracy"] == 0.5 and m["vanilla_accuracy"] == 0.75
    assert (m["n_questions"], m["n_passes"], m["n_unparsable"], result["n"]) == (4, 13, 0, 13)
    # category cat_a: Q0 0, Q1 1, Q3 1 -> 2/3; cat_b: Q2 0; l2 L_x: Q0 0; L_y: Q1 1, Q2 0, Q3 1 -> 2/3
    assert m["circular_accuracy/cat_a"] == pytest.approx(2 / 3) and m["circular_accuracy/cat_b"] == 0.0
    assert m["circular_accuracy_l2/L_x"] == 0.0 and m["circular_accuracy_l2/L_y"] == pytest.approx(2 / 3)
    assert result["ci95"]["circular_accuracy"][0] <= 0.5 <= result["ci95"]["circular_accuracy"][1]
    by_id = {r["id"]: r for r in records}
    # the hint line first, the two options present (C, D empty), the instruction
    assert by_id["1"]["prompt"] == f"Look closely.\nWhich side?\nA. left\nB. right\n{INSTR}"
    assert by_id["2"]["prompt"] == f"How many?\nA. one\nB. two\nC. three\n{INSTR}"  # D 'nan' is no option
    # images by reference: Q1's copy and all Q2 rows decode Q1's image; Q0's copies Q0's
    assert by_id[str(M + 1)]["images"] == ["MMBench_DEV_EN.tsv index 1"]
    assert {by_id[str(k * M + 2)]["images"][0] for k in range(3)} == {"MMBench_DEV_EN.tsv index 1"}
    assert by_id[str(3 * M)]["images"] == ["MMBench_DEV_EN.tsv index 0"]


def test_mmbench_image_reference_decodes_the_shared_image(tmp_path):
    write_tsv(tmp_path / "MMBench_DEV_EN.tsv", mmbench_rows())
    seen = {}

    def answer(images, prompt):
        seen.setdefault(prompt.split("\n")[0], set()).add(images[0].getpixel((0, 0)))
        return "A"

    run_canned("mmbench", tmp_path, answer, split="dev")  # dev -> MMBench_DEV_EN.tsv
    assert seen["How many?"] == {(0, 0, 255)} and seen["Which animal?"] == {(255, 0, 0)}


def test_mmbench_limit_counts_questions_with_all_their_copies(tmp_path):
    write_tsv(tmp_path / "MMBench_DEV_EN.tsv", mmbench_rows())
    result, records = run_canned("mmbench", tmp_path, mmbench_answer, split="DEV_EN", limit=2)
    # Q0 (4 rows) and Q1 (2 rows): circular Q0 0, Q1 1 -> 1/2
    assert result["n"] == 6 and result["metrics"]["n_questions"] == 2
    assert result["metrics"]["circular_accuracy"] == 0.5
    assert {r["id"] for r in records} == {"0", str(M), str(2 * M), str(3 * M), "1", str(M + 1)}


def test_mmbench_chinese_instruction_and_refusal(tmp_path):
    rows = [row(0, "图中是什么？", ["猫", "狗", "", ""], "A", png_b64("red"), "c", "l"),
            row(M, "图中是什么？", ["狗", "猫", "", ""], "B", "0", "c", "l")]
    write_tsv(tmp_path / "MMBench_DEV_CN.tsv", rows)
    result, records = run_canned("mmbench", tmp_path, lambda i, p: "Cannot determine the answer", split="DEV_CN")
    assert records[0]["prompt"] == "图中是什么？\nA. 猫\nB. 狗\n请直接回答选项字母。"
    assert result["metrics"]["circular_accuracy"] == 0.0 and result["metrics"]["n_unparsable"] == 2


def test_mmbench_bad_input_named(tmp_path):
    rows = mmbench_rows()
    with pytest.raises(DataError, match=r"MMBench_TEST_EN.tsv: no 'answer' column"):
        cols = [c for c in COLUMNS if c != "answer"]
        write_tsv(tmp_path / "MMBench_TEST_EN.tsv", rows, cols)
        run_canned("mmbench", tmp_path, mmbench_answer, split="test")
    bad = [dict(r) for r in rows]
    bad[4]["index"] = "x1"
    write_tsv(tmp_path / "MMBench_DEV_EN.tsv", bad)
    with pytest.raises(DataError, match=r"MMBench_DEV_EN.tsv line 6: column 'index' must be an integer"):
        run_canned("mmbench", tmp_path, mmbench_answer, split="DEV_EN")
    bad = [dict(r) for r in rows]
    bad[1]["image"] = "77"
    write_tsv(tmp_path / "MMBench_DEV_EN.tsv", bad)
    with pytest.raises(DataError, match=r"line 3: column 'image' '77' is neither"):
        run_canned("mmbench", tmp_path, mmbench_answer, split="DEV_EN")
    bad = [dict(r) for r in rows]
    bad[4]["answer"] = "C"  # Q1 has options A, B only
    write_tsv(tmp_path / "MMBench_DEV_EN.tsv", bad)
    with pytest.raises(DataError, match=r"line 6: column 'answer' must be one of the row's option letters A, B"):
        run_canned("mmbench", tmp_path, mmbench_answer, split="DEV_EN")
    with pytest.raises(DataError, match=r"MMBench_DEV_CN.tsv"):
        run_canned("mmbench", tmp_path, mmbench_answer, split="DEV_CN")


# --------------------------------------------------------------------------------------------------- SEED
def write_seed(root: Path) -> None:
    (root / "SEED-Bench-image").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "c"):
        Image.new("RGB", (8, 8), "red").save(root / "SEED-Bench-image" / name, format="PNG")
    q = [("1", "a.jpg", "What is shown?", ("cat", "dog", "cow", "pig"), "A", 1, "image"),
         ("2", "b.jpg", "Where?", ("up", "down", "left", "right"), "B", 1, "image"),
         ("v9", "x.webm", "What happens?", ("a", "b", "c", "d"), "A", 10, "video"),
         ("3", "c", "How many?", ("1", "2", "3", "4"), "C", 5, "image")]
    questions = [{"question_id": i, "data_id": d, "question": t, **dict(zip(["choice_a", "choice_b", "choice_c",
                  "choice_d"], c)), "answer": a, "question_type_id": k, "data_type": dt} for i, d, t, c, a, k, dt in q]
    types = {"Scene Understanding": 1, "Instances Counting": 5, "Action Recognition": 10}
    (root / "SEED-Bench.json").write_text(json.dumps({"question_type": types, "questions": questions}))


def test_seedbench_hand_checked(tmp_path):
    write_seed(tmp_path)
    answers = {"What is shown?": "A", "Where?": "The answer is B", "How many?": " C. three"}
    result, records = run_canned("seedbench", tmp_path, lambda i, p: answers[p.split("\n")[0]])
    # q1 "A" right; q2 read as "T" (first character), wrong; q3 stripped -> "C" right; the video row skipped
    # -> 2/3; Scene Understanding 1/2, Instances Counting 1/1
    m = result["metrics"]
    assert result["n"] == 3 and m["accuracy"] == pytest.approx(2 / 3)
    assert m["accuracy/Scene Understanding"] == 0.5 and m["accuracy/Instances Counting"] == 1.0
    assert records[0]["prompt"] == f"What is shown?\nA. cat\nB. dog\nC. cow\nD. pig\n{INSTR}"
    assert records[2]["images"][0].endswith("SEED-Bench-image/c")
    result, _ = run_canned("seedbench", tmp_path, lambda i, p: "A", limit=2)
    assert result["n"] == 2


def test_seedbench_bad_input_named(tmp_path):
    write_seed(tmp_path)
    data = json.loads((tmp_path / "SEED-Bench.json").read_text())
    data["questions"][3]["question_type_id"] = 7
    (tmp_path / "SEED-Bench.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"SEED-Bench.json question 3: question_type_id 7 is not in"):
        run_canned("seedbench", tmp_path, lambda i, p: "A")
    data["questions"][3]["question_type_id"] = 5
    data["questions"][1]["data_id"] = "missing.jpg"
    (tmp_path / "SEED-Bench.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"question 1: image not found"):
        run_canned("seedbench", tmp_path, lambda i, p: "A")


def test_seedbench_reading():
    assert [seedbench_choice(p) for p in ("B", " B ", "B. blue", "(B)", "", None)] == ["B", "B", "B", "(", "", ""]


# ------------------------------------------------------------------------------------------ MME-RealWorld
def write_mme_rw(root: Path) -> None:
    (root / "imgs").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(root / "imgs" / "x.png")
    nums = ["(A) 458", "(B) 456", "(C) 455", "(D) 457", "(E) The image does not feature the number."]
    q = [("p/m/0", "Perception", "Monitoring", "Vehicle/attribute/color", "B"),
         ("p/m/1", "Perception", "Monitoring", "Vehicle/attribute/orientation", "A"),
         ("p/d/2", "Perception", "Diagram and Table", "diagram", "C"),
         ("r/r/3", "Reasoning", "Remote Sensing", "position", "D"),
         ("r/r/4", "Reasoning", "Remote Sensing", "position", "E")]
    rows = [{"Question_id": i, "Image": "imgs/x.png", "Text": f"Question {k}?", "Answer choices": nums,
             "Ground truth": gt, "Task": t, "Subtask": s, "Category": c} for k, (i, t, s, c, gt) in enumerate(q)]
    (root / "MME_RealWorld.json").write_text(json.dumps(rows))


MME_ANSWERS = {"Question 0?": "B", "Question 1?": "", "Question 2?": "Based on the image, (C)",
               "Question 3?": "The best answer is 457",
               "Question 4?": "the image shows nothing of that kind at all, so none of them can be right here"}


def test_mme_realworld_hand_checked(tmp_path):
    write_mme_rw(tmp_path)
    result, records = run_canned("mme_realworld", tmp_path, lambda i, p: MME_ANSWERS[p.split(" The choices")[0]])
    # 0 "B" right; 1 "" is contained in every choice -> A, right; 2 first capital A-E is the B of "Based", wrong;
    # 3 prefix removed, " 457" in "(D) 457" -> D right; 4 over 10 words without A-E -> "", wrong: 3/5
    m = result["metrics"]
    assert m["accuracy"] == 0.6 and m["n_E"] == 0
    assert m["accuracy/Perception"] == pytest.approx(2 / 3) and m["accuracy/Reasoning"] == 0.5
    assert m["accuracy/Perception/Monitoring"] == 1.0 and m["accuracy/Perception/Diagram and Table"] == 0.0
    assert m["category_accuracy/Perception/Monitoring/vehicle/attribute"] == 1.0  # the two attribute rows merged
    assert m["category_accuracy/Reasoning/Remote Sensing/position"] == 0.5
    assert records[0]["prompt"] == ("Question 0? The choices are listed below: \n(A) 458\n(B) 456\n(C) 455\n(D) 457\n"
                                    "(E) The image does not feature the number.\nSelect the best answer to the above "
                                    "multiple-choice question based on the image. Respond with only the letter (A, B, "
                                    "C, D, or E) of the correct option.\nThe best answer is:")
    result, _ = run_canned("mme_realworld", tmp_path, lambda i, p: "E", limit=2)
    assert result["n"] == 2 and result["metrics"]["n_E"] == 2


def test_mme_realworld_extraction_quirks():
    choices = ["(A) red", "(B) blue"]
    assert mme_realworld_extract("The answer is (A)", choices) == "A"
    # "Best option:" is no prefix officially (glued to "Best answer:" by a missing comma): the B of "Best" wins
    assert mme_realworld_extract("Best option: A", choices) == "B"
    assert mme_realworld_extract("blue", choices) == "B" and mme_realworld_extract("green", choices) == ""


def test_mme_realworld_bad_input_named(tmp_path):
    write_mme_rw(tmp_path)
    rows = json.loads((tmp_path / "MME_RealWorld.json").read_text())
    rows[2]["Ground truth"] = "F"
    (tmp_path / "MME_RealWorld.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"MME_RealWorld.json row 2: field 'Ground truth' 'F' is not a choice"):
        run_canned("mme_realworld", tmp_path, lambda i, p: "A")
    del rows[2]["Task"]
    rows[2]["Ground truth"] = "A"
    (tmp_path / "MME_RealWorld.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"row 2: missing field 'Task'"):
        run_canned("mme_realworld", tmp_path, lambda i, p: "A")


# ------------------------------------------------------------------------------------------------ ShapesWorld
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from vlmkit.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("shapes") / "s"
    generate_shapes(root, n=60, seed=0, size=32, progress=False)
    truth = {}
    for r in json.loads((root / "test.json").read_text()):
        key = (Image.open(root / r["image"]).convert("RGB").tobytes(), r["conversations"][0]["value"][8:])
        truth[key] = r["conversations"][1]["value"]
    return root, truth


def oracle(truth, question_of, pattern):
    def answer(images, prompt):
        im = images[0] if isinstance(images[0], Image.Image) else Image.open(images[0])
        right = truth[(im.convert("RGB").tobytes(), question_of(prompt))]
        return next(k for k, v in re.findall(pattern, prompt, flags=re.M) if v == right)
    return answer


@pytest.mark.parametrize("task,question_of,pattern", [
    ("mmbench", lambda p: p.split("\n")[0], r"^([A-Z])\. (.*)$"),
    ("seedbench", lambda p: p.split("\n")[0], r"^([A-Z])\. (.*)$"),
    ("mme_realworld", lambda p: p.split(" The choices are listed below")[0], r"^\(([A-Z])\) (.*)$"),
    ("mme_realworld_cn", lambda p: p.split(" 选项如下所示")[0], r"^\(([A-Z])\) (.*)$")])
def test_shapesworld_oracle_scores_perfectly(shapes, task, question_of, pattern):
    root, truth = shapes
    result, records = run_canned(task, root, oracle(truth, question_of, pattern), split="test")
    assert result["metrics"][result["metric"]] == 1.0 and result["n"] > 0
    if task == "mmbench":  # every question with its 4 rotated copies
        assert result["n"] == 4 * result["metrics"]["n_questions"] and result["metrics"]["vanilla_accuracy"] == 1.0


def test_mme_realworld_cn_prompt_and_score(tmp_path):
    write_mme_rw(tmp_path)
    rows = json.loads((tmp_path / "MME_RealWorld.json").read_text())[:2]
    rows[0]["Text"] = "图中的数字是多少？"
    (tmp_path / "MME_RealWorld_CN.json").write_text(json.dumps(rows, ensure_ascii=False))
    result, records = run_canned("mme_realworld_cn", tmp_path, lambda i, p: "答案是B")
    # row 0 (key B) read as B, right; row 1 (key A) read as B, wrong -> 1/2
    assert result["metrics"]["accuracy"] == 0.5
    assert records[0]["prompt"] == ("图中的数字是多少？ 选项如下所示:\n(A) 458\n(B) 456\n(C) 455\n(D) 457\n(E) The image does "
                                    "not feature the number.\n根据图像选择上述多项选择题的最佳答案。只需回答正确选项的字母（A, B, C, "
                                    "D 或 E）。\n最佳答案为： ")
