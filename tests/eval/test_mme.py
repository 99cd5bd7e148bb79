"""MME and HallusionBench: their official layouts written by hand, scored through the task as `vlmkit eval`
runs it, against hand-checked numbers; the answer parsers' edge cases; --limit; bad input; ShapesWorld's
layouts with an oracle."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.eval.canned import run_canned
from vlmkit.errors import DataError
from vlmkit.eval.benchmarks.mme import read_hallusionbench, read_mme
from vlmkit.eval.metrics.hallusion import extract_yes_no, hallusion_metrics, score_hallusion
from vlmkit.eval.metrics.mme import mme_metrics, parse_mme_answer, score_mme

Q = " Please answer yes or no."


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "white").save(path)


def _mme_image(folder, name, yes_q, no_q, split_layout=False, ext=".jpg"):
    """One MME image and its txt: side by side, or in images/ + questions_answers_YN/."""
    image_dir, qa_dir = ((folder / "images", folder / "questions_answers_YN") if split_layout
                         else (folder, folder))
    _png(image_dir / f"{name}{ext}")
    qa_dir.mkdir(parents=True, exist_ok=True)
    (qa_dir / f"{name}.txt").write_text(f"{yes_q}{Q}\tYes\n{no_q}{Q}\tNo\n", encoding="utf-8")


@pytest.fixture
def mme_release(tmp_path):
    """MME_Benchmark_release_version/ with existence (2 images, side by side), scene (1 image, images/ +
    questions_answers_YN/) and code_reasoning (1 image, .png side by side)."""
    root = tmp_path / "MME_Benchmark_release_version"
    _mme_image(root / "existence", "000000000001", "Is there a dog in this image?",
               "Is there a cat in this image?")
    _mme_image(root / "existence", "000000000002", "Is there a car in this image?",
               "Is there a bus in this image?")
    _mme_image(root / "scene", "Places365_val_00000001", "Is this picture taken in a beach?",
               "Is this picture taken in a forest?", split_layout=True)
    _mme_image(root / "code_reasoning", "0001", "Does the code print 5?", "Does the code print 6?",
               ext=".png")
    (tmp_path / "eval_tool").mkdir()  # the release's other folders are not subtasks
    return tmp_path


MME_ANSWERS = {  # question -> the model's answer
    "Is there a dog in this image?": "Yes",  # right
    "Is there a cat in this image?": "No",  # right: image 1 both right
    "Is there a car in this image?": "No",  # wrong
    "Is there a bus in this image?": "No.",  # right
    "Is this picture taken in a beach?": "yes, it is",  # right
    "Is this picture taken in a forest?": "Not at all",  # "not " holds "no": right
    "Does the code print 5?": "The answer is yes",  # "the " has neither: other, wrong
    "Does the code print 6?": "none",  # "none" holds "no": right
}


def _mme_answer(images, prompt):
    return MME_ANSWERS[prompt.removesuffix(Q)]


def test_mme_scores_match_the_hand_computed_official_numbers(mme_release):
    result, records = run_canned("mme", mme_release, _mme_answer)
    m = result["metrics"]
    assert result["n"] == 8 and result["metric"] == "total"
    # existence: 3 of 4 right -> acc 75; image 1 both right, image 2 not -> acc+ 1/2 = 50; score 125
    assert (m["existence/acc"], m["existence/acc_plus"], m["existence/score"]) == (75.0, 50.0, 125.0)
    # scene: 2 of 2 -> 100 + 100 = 200 (read from images/ + questions_answers_YN/)
    assert m["scene/score"] == 200.0
    # code_reasoning: 1 of 2 -> 50, its image not both right -> 0; one "other"
    assert (m["code_reasoning/acc"], m["code_reasoning/acc_plus"]) == (50.0, 0.0)
    assert m["code_reasoning/score"] == 50.0
    assert m["code_reasoning/n_other"] == 1.0 and m["n_other"] == 1.0
    # perception = 125 + 200, cognition = 50, total 375
    assert (m["perception"], m["cognition"], m["total"]) == (325.0, 50.0, 375.0)
    assert m["n_images"] == 4.0 and m["n_subtasks"] == 3.0
    lo, hi = result["ci95"]["total"]
    assert lo <= 375.0 <= hi
    assert {r["prompt"] for r in records} == {q + Q for q in MME_ANSWERS}  # asked as written
    # --data may also be the release folder itself
    assert len(read_mme(mme_release / "MME_Benchmark_release_version")) == 8


def test_mme_per_sample_values_average_to_the_total():
    results = [score_mme("yes", "Yes", "existence", "a"), score_mme("yes", "No", "existence", "a"),
               score_mme("no", "No", "count", "b"), score_mme("no", "No", "count", "b"),
               score_mme("no", "Yes", "count", "c"), score_mme("no", "No", "count", "c")]
    m = mme_metrics(results)
    # existence 50 + 0; count 3/4 + 1/2 -> 75 + 50
    assert m["total"] == 175.0 and m["existence/score"] == 50.0 and m["count/score"] == 125.0
    assert sum(m["_per_sample"]) / len(m["_per_sample"]) == pytest.approx(175.0)


@pytest.mark.parametrize("text, official, lmms_eval", [
    ("Yes", "yes", "yes"), ("no", "no", "no"), ("No.", "no", "no"), ("yes, there is a dog", "yes", "yes"),
    ("Not sure", "no", "no"),  # "not " holds "no"
    ("None of them", "no", "no"), ("know", "no", "no"),  # the first four characters hold "no"
    ("I don't know", "other", "other"), ("The answer is yes", "other", "other"), ("", "other", "other"),
    ("y", "other", "yes"), ("N", "other", "no"),  # lmms-eval reads a lone y / n
    ("ye.s", "other", "yes"),  # lmms-eval deletes every "."
    ("nyes", "yes", "yes"),  # "yes" is looked for before "no"
    (" no", "no", "no"),
])
def test_mme_parser_edge_cases(text, official, lmms_eval):
    assert parse_mme_answer(text) == official
    assert parse_mme_answer(text, style="lmms_eval") == lmms_eval


def test_mme_limit_is_exact_and_takes_images_round_robin(mme_release):
    samples = read_mme(mme_release, limit=3)
    # round robin over subtasks in the official order: existence image 1 (2 questions), then scene
    assert [s.id for s in samples] == ["existence/000000000001.jpg/0", "existence/000000000001.jpg/1",
                                      "scene/Places365_val_00000001.jpg/0"]
    for limit in (1, 5, 8):
        result, _ = run_canned("mme", mme_release, _mme_answer, limit=limit)
        assert result["n"] == limit
    # 5: existence image 1 (both right: 200), scene (both right: 200), code_reasoning question 0 (other: 0)
    result, _ = run_canned("mme", mme_release, _mme_answer, limit=5)
    assert result["metrics"]["total"] == 400.0 and result["metrics"]["cognition"] == 0.0


def test_mme_bad_input_names_file_and_line(mme_release):
    txt = mme_release / "MME_Benchmark_release_version" / "existence" / "000000000002.txt"
    txt.write_text("Is there a car in this image? Yes\nIs there a bus?\tNo\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"000000000002\.txt line 1: expected 'question<TAB>Yes\|No'"):
        read_mme(mme_release)
    txt.write_text("Is there a car?\tMaybe\nIs there a bus?\tNo\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"000000000002\.txt line 1: the answer must be Yes or No, got 'Ma"):
        read_mme(mme_release)
    txt.write_text("Is there a car?\tYes\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"000000000002\.txt: MME asks two questions per image.*found 1"):
        read_mme(mme_release)
    txt.write_text("Is there a car?\tYes\nIs there a bus?\tNo\n", encoding="utf-8")
    (txt.parent / "000000000002.jpg").unlink()
    with pytest.raises(DataError, match=r"000000000002\.txt: its image 000000000002\.jpg / \.png is not in"):
        read_mme(mme_release)
    with pytest.raises(DataError, match="no MME subtask folder found"):
        read_mme(mme_release / "eval_tool")


# ------------------------------------------------------------------------------------------- HallusionBench


def _hb_row(category, set_id, figure_id, question_id, question, gt, visual_input="1", image=True):
    row = {"category": category, "subcategory": "chart" if category == "VS" else "illusion",
           "visual_input": visual_input, "set_id": str(set_id), "figure_id": str(figure_id),
           "sample_note": "x",
           "question_id": str(question_id), "question": question, "gt_answer_details": "details",
           "gt_answer": gt}
    if image:
        row["filename"] = f"./hallusion_bench/{category}/{row['subcategory']}/{set_id}_{figure_id}.png"
    return row


HB_ROWS = [  # (row, the model's answer, counted right?)
    (_hb_row("VD", 0, 0, 0, "VD q0 on the original?", "1"), "Yes", True),
    (_hb_row("VD", 0, 0, 1, "VD q1 on the original?", "0"), "No", True),
    (_hb_row("VD", 0, 1, 0, "VD q0 on the edit?", "0"), "Yes, it is", False),
    (_hb_row("VD", 0, 1, 1, "VD q1 on the edit?", "1"), "I am not sure", False),  # unknown on VD: wrong
    # unknown on a VS question without an image: right
    (_hb_row("VS", 0, 0, 0, "VS q0 without image?", "1", "0", image=False), "I cannot tell.", True),
    (_hb_row("VS", 0, 0, 1, "VS q1 without image?", "0", "0", image=False), "yes", False),
    (_hb_row("VS", 0, 1, 0, "VS q0 with the chart?", "1"), "Yes.", True),
    (_hb_row("VS", 0, 1, 1, "VS q1 with the chart?", "0"), "No, it does not", True),
]


@pytest.fixture
def hallusion_release(tmp_path):
    rows = [r for r, _, _ in HB_ROWS]
    for r in rows:
        if "filename" in r:
            _png(tmp_path / r["filename"])
    (tmp_path / "HallusionBench.json").write_text(json.dumps(rows), encoding="utf-8")
    return tmp_path


def _hb_answer(images, prompt):
    return next(a for r, a, _ in HB_ROWS if r["question"] == prompt)


def test_hallusionbench_scores_match_the_hand_computed_official_numbers(hallusion_release):
    result, records = run_canned("hallusionbench", hallusion_release, _hb_answer)
    m = result["metrics"]
    assert result["n"] == 8 and result["metric"] == "qAcc"
    assert [r["correct"] for r in records] == [float(c) for _, _, c in HB_ROWS]
    # aAcc: 5 of 8 right
    assert m["aAcc"] == 62.5
    # fAcc: figures VD/0/0 (both right), VD/0/1 (no), VS/0/1 (both right); VS figure 0 is left out -> 2/3
    assert m["fAcc"] == pytest.approx(200 / 3)
    # qAcc: VD q0 (right, wrong), VD q1 (right, wrong), VS q0 (right, right), VS q1 (wrong, right) -> 1/4
    assert m["qAcc"] == 25.0
    # easy = figure 0 rows: VD q0, VD q1, VS q0 right, VS q1 wrong -> 3/4
    # hard = the others: VD q0, q1 wrong, VS q0, q1 right -> 2/4
    assert (m["qAcc_easy"], m["qAcc_hard"]) == (75.0, 50.0)
    assert (m["VD/aAcc"], m["VD/fAcc"], m["VD/qAcc"]) == (50.0, 50.0, 0.0)
    assert (m["VS/aAcc"], m["VS/fAcc"], m["VS/qAcc"]) == (75.0, 100.0, 50.0)
    assert (m["n_unknown"], m["n_figures"], m["n_question_groups"]) == (2.0, 3.0, 4.0)
    by_prompt = {r["prompt"]: r for r in records}
    assert by_prompt["VS q0 without image?"]["images"] == []  # asked without an image
    assert by_prompt["VD q0 on the edit?"]["images"][0].endswith("hallusion_bench/VD/illusion/0_1.png")


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("No.", "no"), ("NO!", "no"), ("Yes, the circles are equal.", "yes"),
    ("yes and no", "unknown"), ("No, yes", "unknown"), ("Yes/No", "unknown"),  # "/" becomes a space
    ("Not really", "unknown"), ("Nope", "unknown"), ("It is not.", "unknown"), ("", "unknown"),
    ("The answer: yes", "yes"), ("yes-", "yes"),
])
def test_hallusionbench_yes_no_extraction(text, expected):
    assert extract_yes_no(text) == expected


def test_hallusionbench_unknown_counts_right_only_without_an_image():
    unknown = "I cannot say"
    assert score_hallusion(unknown, "1", "VS", "chart", "0", "0", "0").correct
    assert not score_hallusion(unknown, "1", "VS", "chart", "0", "1", "0").correct
    assert not score_hallusion(unknown, "1", "VD", "illusion", "0", "0", "0").correct  # VD: an image
    assert not score_hallusion("no", "1", "VS", "chart", "0", "0", "0").correct
    m = hallusion_metrics([score_hallusion("yes", "1", "VS", "chart", "0", "0", "0")])
    assert "fAcc" not in m and m["qAcc"] == 100.0  # no figure at all: fAcc is not reported


def test_hallusionbench_limit_is_exact(hallusion_release):
    for limit in (1, 3, 5):
        result, _ = run_canned("hallusionbench", hallusion_release, _hb_answer, limit=limit)
        assert result["n"] == limit
    # 3: VD figure 0 both right, figure 1 q0 wrong -> aAcc 2/3, qAcc (q0 wrong, q1 right) 1/2
    result, _ = run_canned("hallusionbench", hallusion_release, _hb_answer, limit=3)
    assert result["metrics"]["aAcc"] == pytest.approx(200 / 3) and result["metrics"]["qAcc"] == 50.0


@pytest.mark.parametrize("field, value, message", [
    ("gt_answer", "2", r"row 1: field 'gt_answer' must be one of 0, 1, got '2'"),
    ("category", "VX", r"row 1: field 'category' must be one of VD, VS"),
    ("filename", None, r"row 1: field 'filename' must name the image \(visual_input is 1\)"),
    ("filename", "./hallusion_bench/VD/illusion/9_9.png", r"row 1: image not found"),
    ("question", 3, r"row 1: field 'question' must be str"),
    ("question_id", "0", r"row 1: question VD_illusion_0_0_0 .* already at row 0"),
])
def test_hallusionbench_bad_input_names_file_row_and_field(hallusion_release, field, value, message):
    rows = json.loads((hallusion_release / "HallusionBench.json").read_text())
    rows[1][field] = value
    (hallusion_release / "HallusionBench.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"HallusionBench\.json " + message):
        read_hallusionbench(hallusion_release)


def test_hallusionbench_missing_field_and_file(hallusion_release):
    rows = json.loads((hallusion_release / "HallusionBench.json").read_text())
    del rows[2]["figure_id"]
    (hallusion_release / "HallusionBench.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"HallusionBench\.json row 2: missing field 'figure_id'"):
        read_hallusionbench(hallusion_release)
    with pytest.raises(DataError, match=r"file not found: .*HallusionBench\.json"):
        read_hallusionbench(hallusion_release / "nowhere")


# ------------------------------------------------------------------------------------------------ ShapesWorld


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from vlmkit.data.shapes import generate_shapes

    folder = tmp_path_factory.mktemp("shapes") / "s"
    generate_shapes(folder, n=60, seed=0, size=32, progress=False)
    return folder


def _oracle(samples):
    truth = {(tuple(str(i) for i in s.images), s.question): s.answers[0] for s in samples}
    return lambda images, prompt: {"yes": "Yes", "no": "No"}[truth[(tuple(str(i) for i in images), prompt)]]


@pytest.mark.parametrize("split", ["val", "test"])
def test_shapes_mme_oracle_scores_perfectly(shapes, split):
    samples = read_mme(shapes, split)
    assert 0 < len(samples) <= 200 and len(samples) % 2 == 0
    subtasks = {s.meta["subtask"] for s in samples}
    assert {"existence", "count", "color", "scene"} <= subtasks
    assert (shapes / f"mme_{split}" / "scene" / "questions_answers_YN").is_dir()
    result, _ = run_canned("mme", shapes, _oracle(samples), split=split)
    m = result["metrics"]
    assert all(m[f"{t}/score"] == 200.0 for t in subtasks)
    assert m["total"] == m["perception"] == 200.0 * len(subtasks) and m["n_other"] == 0.0
    assert [s.answers[0] for s in samples[:2]] == ["yes", "no"]


@pytest.mark.parametrize("split", ["val", "test"])
def test_shapes_hallusionbench_oracle_scores_perfectly(shapes, split):
    samples = read_hallusionbench(shapes, split)
    assert 0 < len(samples) <= 200
    assert any(not s.images for s in samples) and {s.meta["category"] for s in samples} == {"VD", "VS"}
    result, _ = run_canned("hallusionbench", shapes, _oracle(samples), split=split)
    m = result["metrics"]
    assert m["aAcc"] == m["fAcc"] == m["qAcc"] == 100.0 and m["n_unknown"] == 0.0
    # the edit flips the answers: each VD question is asked on two figures with different answers
    vd = {}
    for s in samples:
        if s.meta["category"] == "VD":
            vd.setdefault((s.meta["set_id"], s.meta["question_id"]), set()).add(s.answers[0])
    assert vd and all(v == {"yes", "no"} for v in vd.values())
