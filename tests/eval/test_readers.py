"""Readers of the official layouts: hand-written VQAv2 and POPE files read into samples; ShapesWorld's own files
in those layouts read back to its questions; malformed files get errors naming the file, row and field."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmkit.data.conversations import read_conversations
from vlmkit.data.shapes import generate_shapes
from vlmkit.errors import DataError
from vlmkit.eval.readers import (SHAPES_IMAGE_PATTERN, read_coco_captions, read_gqa, read_grounding,
                                 read_multiple_choice, read_pope, read_scienceqa, read_vqav2)


@pytest.fixture
def coco(tmp_path):
    """Two COCO-named images and VQAv2 files for three questions, as the official release lays them out."""
    for image_id in (42, 7):
        Image.new("RGB", (8, 8)).save(tmp_path / f"COCO_val2014_{image_id:012d}.jpg")
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What color is the cat?", "question_id": 420},
        {"image_id": 42, "question": "How many cats?", "question_id": 421},
        {"image_id": 7, "question": "Is it raining?", "question_id": 70}]}
    answers = lambda *a: [{"answer": x, "answer_confidence": "yes", "answer_id": k + 1} for k, x in enumerate(a)]
    annotations = {"annotations": [
        {"question_id": 420, "image_id": 42, "answer_type": "other", "question_type": "what color is the",
         "multiple_choice_answer": "black", "answers": answers(*["black"] * 7, *["gray"] * 3)},
        {"question_id": 421, "image_id": 42, "answer_type": "number", "question_type": "how many",
         "multiple_choice_answer": "2", "answers": answers(*["2"] * 9, "two")},
        {"question_id": 70, "image_id": 7, "answer_type": "yes/no", "question_type": "is it",
         "multiple_choice_answer": "no", "answers": answers(*["no"] * 10)}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    return tmp_path


def test_vqav2_files_read_into_samples(coco):
    samples = read_vqav2(coco / "q.json", coco / "a.json", coco)
    assert [s.id for s in samples] == ["420", "421", "70"]
    assert samples[0].images == [coco / "COCO_val2014_000000000042.jpg"]
    assert samples[1].question == "How many cats?" and samples[1].answers == ["2"] * 9 + ["two"]
    assert samples[2].meta == {"question_id": 70, "image_id": 7, "answer_type": "yes/no", "question_type": "is it",
                               "multiple_choice_answer": "no"}
    assert [s.answers for s in read_vqav2(coco / "q.json", None, coco, limit=2)] == [[], []]  # test-dev


@pytest.mark.parametrize("edit, match", [
    (lambda q, a: q["questions"][1].pop("image_id"), r"q.json question 1: missing field 'image_id'"),
    (lambda q, a: a["annotations"].pop(), r"q.json question 2: question_id 70 has no annotation in .*a.json"),
    (lambda q, a: a["annotations"][0].update(answers=[]), r"a.json annotation 0: field 'answers' must be a "
                                                           r"non-empty list"),
    (lambda q, a: q["questions"][0].update(image_id=5), r"q.json question 0: image not found: .*000000000005.jpg"),
])
def test_malformed_vqav2_files_are_named(coco, edit, match):
    q, a = json.loads((coco / "q.json").read_text()), json.loads((coco / "a.json").read_text())
    edit(q, a)
    (coco / "q.json").write_text(json.dumps(q))
    (coco / "a.json").write_text(json.dumps(a))
    with pytest.raises(DataError, match=match):
        read_vqav2(coco / "q.json", coco / "a.json", coco)


def test_pope_jsonl_reads_with_its_category(coco):
    path = coco / "coco_pope_adversarial.json"  # POPE's own file names carry the category
    path.write_text('{"question_id": 1, "image": "COCO_val2014_000000000042.jpg", "text": "Is there a dog in the '
                    'image?", "label": "no"}\n\n{"question_id": 2, "image": "COCO_val2014_000000000007.jpg", '
                    '"text": "Is there a car in the image?", "label": "Yes"}\n')
    samples = read_pope(path, coco)
    assert [(s.id, s.answers, s.meta["category"]) for s in samples] == [("1", ["no"], "adversarial"),
                                                                       ("2", ["yes"], "adversarial")]
    path.write_text('{"question_id": 1, "image": "COCO_val2014_000000000042.jpg", "text": "Dog?", "label": "maybe"}\n')
    with pytest.raises(DataError, match=r"coco_pope_adversarial.json line 1: field 'label' must be 'yes' or 'no'"):
        read_pope(path, coco)


def test_shapesworld_writes_vqav2_and_pope_files_that_read_back(tmp_path):
    data = tmp_path / "shapes"
    generate_shapes(data, n=20, seed=4, size=48, progress=False)
    vqa = read_vqav2(data / "vqav2_test_questions.json", data / "vqav2_test_annotations.json", data,
                     image_pattern=SHAPES_IMAGE_PATTERN)
    llava = read_conversations(data / "test.json")
    assert len(vqa) == len(llava) > 0
    for s, ref in zip(vqa, llava):  # the same questions, images and answers as the LLaVA-format file
        assert s.images == ref.images
        assert s.question == ref.conversations[0]["value"].replace("<image>\n", "")
        assert s.answers == [ref.conversations[1]["value"]] * 10
        assert s.meta["question_type"] == ref.type
    for category in ("random", "popular", "adversarial"):
        pope = read_pope(data / f"pope_test_{category}.jsonl", data)
        labels = [s.answers[0] for s in pope]
        assert labels.count("yes") == labels.count("no") > 0 and {s.meta["category"] for s in pope} == {category}
        scenes = {r["file_name"]: r for r in json.loads((data / "scenes.json").read_text())}
        for s in pope:  # every "yes" probe names an object in the image, every "no" one an absent object
            scene = scenes[str(s.images[0].relative_to(data))]
            present = {f"{o['color']} {o['shape']}" for o in scene["objects"]}
            named = s.question.removeprefix("Is there a ").removesuffix(" in the image?")
            assert (named in present) == (s.answers == ["yes"])


def test_coco_captions_and_grounding_files_read(coco):
    (coco / "captions.json").write_text(json.dumps({
        "images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"},
                   {"id": 7, "file_name": "COCO_val2014_000000000007.jpg"}],
        "annotations": [{"id": 1, "image_id": 42, "caption": "a cat."}, {"id": 2, "image_id": 42, "caption": "cat"},
                        {"id": 3, "image_id": 7, "caption": "rain"}]}))
    caps = read_coco_captions(coco / "captions.json", coco)
    assert [(s.id, s.answers) for s in caps] == [("42", ["a cat.", "cat"]), ("7", ["rain"])]
    (coco / "ref.json").write_text(json.dumps([{"image": "COCO_val2014_000000000042.jpg", "expression": "the cat",
                                                "bbox": [1, 2, 3, 4], "width": 8, "height": 8}]))
    [ref] = read_grounding(coco / "ref.json", coco)
    assert ref.question == "the cat" and ref.meta == {"box": [1.0, 2.0, 4.0, 6.0], "width": 8, "height": 8}
    (coco / "ref.json").write_text(json.dumps([{"image": "COCO_val2014_000000000042.jpg", "expression": "x",
                                                "bbox": [1, 2, 0, 4], "width": 8, "height": 8}]))
    with pytest.raises(DataError, match=r"ref.json row 0: field 'bbox' must be \[x, y, width, height\] with a "
                                        r"positive size"):
        read_grounding(coco / "ref.json", coco)


def test_shapesworld_grounding_rows_name_one_object_each(tmp_path):
    data = tmp_path / "shapes"
    generate_shapes(data, n=20, seed=4, size=48, progress=False)
    rows = read_grounding(data / "grounding_test.json", data)
    scenes = {r["file_name"]: r for r in json.loads((data / "scenes.json").read_text())}
    assert rows
    for s in rows:  # the expression names exactly one object of the image, and the box is that object's
        objects = scenes[str(s.images[0].relative_to(data))]["objects"]
        words = s.question.removeprefix("the ").split()
        match = [o for o in objects if all(w in (o["size"], o["color"], o["shape"]) for w in words)]
        assert len(match) == 1
        x, y, w, h = match[0]["bbox"]
        assert s.meta["box"] == [x, y, x + w, y + h]


def test_multiple_choice_rows_read_and_shapesworld_options_hold_the_answer(coco, tmp_path):
    (coco / "mc.json").write_text(json.dumps([
        {"id": "q1", "image": "COCO_val2014_000000000042.jpg", "question": "Which?", "options": ["cat", "dog"],
         "answer": 1, "category": "animals"},
        {"id": "q2", "images": [], "question": "2+2?", "options": {"A": "3", "B": "4", "C": "5"}, "answer": "B"}]))
    q1, q2 = read_multiple_choice(coco / "mc.json", coco)
    assert (q1.answers, q1.meta) == (["B"], {"options": {"A": "cat", "B": "dog"}, "category": "animals"})
    assert q2.images == [] and q2.meta["options"]["B"] == "4"
    (coco / "mc.json").write_text(json.dumps([{"question": "?", "options": ["a", "b"], "answer": "C"}]))
    with pytest.raises(DataError, match=r"mc.json row 0: field 'answer' must be one of the option letters A, B"):
        read_multiple_choice(coco / "mc.json", coco)
    data = tmp_path / "shapes"
    generate_shapes(data, n=20, seed=4, size=48, progress=False)
    rows = read_multiple_choice(data / "choice_test.json", data)
    llava = {r.id: r for r in read_conversations(data / "test.json")}
    assert rows and {r.meta["category"] for r in rows} <= {"color", "shape", "count"}
    for r in rows:  # four distinct options, the letter points at the LLaVA file's answer
        options = r.meta["options"]
        assert len(set(options.values())) == 4
        assert options[r.answers[0]] == llava[r.id].conversations[1]["value"]


def test_gqa_and_scienceqa_official_layouts_read(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "n161313.jpg")
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps({"201307251": {
        "imageId": "n161313", "question": "Is it overcast?", "answer": "no",
        "types": {"structural": "verify", "semantic": "attr", "detailed": "weather"}}}))
    [q] = read_gqa(tmp_path / "testdev_balanced_questions.json", tmp_path / "images")
    assert (q.id, q.question, q.answers, q.meta) == ("201307251", "Is it overcast?", ["no"],
                                                     {"structural_type": "verify", "semantic_type": "attr"})
    (tmp_path / "images" / "test" / "7").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "test" / "7" / "image.png")
    (tmp_path / "problems.json").write_text(json.dumps({
        "7": {"question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1, "hint": "Look.",
              "image": "image.png", "split": "test", "subject": "natural science"},
        "8": {"question": "2+2?", "choices": ["4", "5"], "answer": 0, "hint": "", "image": None, "split": "train"}}))
    [p] = read_scienceqa(tmp_path / "problems.json", tmp_path / "images", "test")
    assert (p.question, p.answers, p.images) == ("Context: Look.\nWhich is a mammal?", ["B"],
                                                 [tmp_path / "images" / "test" / "7" / "image.png"])
    assert p.meta == {"options": {"A": "frog", "B": "whale"}, "category": "natural science"}
