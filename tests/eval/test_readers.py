"""Readers of the official layouts: hand-written VQAv2 and POPE files read into samples; ShapesWorld's own files
in those layouts read back to its questions; malformed files get errors naming the file, row and field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vlmkit.data.conversations import read_conversations
from vlmkit.data.shapes import generate_shapes
from vlmkit.errors import DataError
from vlmkit.eval.readers import (SHAPES_IMAGE_PATTERN, read_coco_captions, read_gqa, read_grounding,
                                 read_image_folder, read_multiple_choice, read_pope, read_scienceqa, read_vqav2)


SAMPLES = Path(__file__).parent / "data" / "official"  # hand-written files in each benchmark's official layout
Q, A = "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"


@pytest.fixture
def coco(tmp_path):
    """A copy of the sample files (two COCO-named images, VQAv2 / POPE / captions / grounding / multiple choice /
    GQA / ScienceQA files), which the error tests edit."""
    shutil.copytree(SAMPLES, tmp_path / "official")
    return tmp_path / "official"


def test_vqav2_files_read_into_samples(coco):
    samples = read_vqav2(coco / Q, coco / A, coco)
    assert [s.id for s in samples] == ["420", "421", "70"]
    assert samples[0].images == [coco / "COCO_val2014_000000000042.jpg"]
    assert samples[1].question == "How many cats?" and samples[1].answers == ["2"] * 9 + ["two"]
    assert samples[2].meta == {"question_id": 70, "image_id": 7, "answer_type": "yes/no", "question_type": "is it",
                               "multiple_choice_answer": "no"}
    assert [s.answers for s in read_vqav2(coco / Q, None, coco, limit=2)] == [[], []]  # test-dev


@pytest.mark.parametrize("edit, match", [
    (lambda q, a: q["questions"][1].pop("image_id"), r"questions.json question 1: missing field 'image_id'"),
    (lambda q, a: a["annotations"].pop(), r"questions.json question 2: question_id 70 has no annotation in .*annotations.json"),
    (lambda q, a: a["annotations"][0].update(answers=[]),
     r"annotations.json annotation 0: field 'answers' must be a non-empty list"),
    (lambda q, a: q["questions"][0].update(image_id=5),
     r"questions.json question 0: image not found: .*000000000005.jpg"),
])
def test_malformed_vqav2_files_are_named(coco, edit, match):
    q, a = json.loads((coco / Q).read_text()), json.loads((coco / A).read_text())
    edit(q, a)
    (coco / Q).write_text(json.dumps(q))
    (coco / A).write_text(json.dumps(a))
    with pytest.raises(DataError, match=match):
        read_vqav2(coco / Q, coco / A, coco)


def test_pope_jsonl_reads_with_its_category(coco):
    path = coco / "coco_pope_adversarial.json"  # POPE's own file names carry the category
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
    caps = read_coco_captions(coco / "captions_val2014.json", coco)
    assert [(s.id, s.answers) for s in caps] == [("42", ["a cat.", "cat"]), ("7", ["rain"])]
    [ref] = read_grounding(coco / "grounding_val2014.json", coco)
    assert ref.question == "the cat" and ref.meta == {"box": [1.0, 2.0, 4.0, 6.0], "width": 8, "height": 8}
    (coco / "grounding_val2014.json").write_text(json.dumps([{"image": "COCO_val2014_000000000042.jpg",
                                                             "expression": "x", "bbox": [1, 2, 0, 4], "width": 8,
                                                             "height": 8}]))
    with pytest.raises(DataError, match=r"grounding_val2014.json row 0: field 'bbox' must be \[x, y, width, height\] with a "
                                        r"positive size"):
        read_grounding(coco / "grounding_val2014.json", coco)


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
    q1, q2 = read_multiple_choice(coco / "choice_val2014.json", coco)
    assert (q1.answers, q1.meta) == (["B"], {"options": {"A": "cat", "B": "dog"}, "category": "animals"})
    assert q2.images == [] and q2.meta["options"]["B"] == "4"
    (coco / "choice_val2014.json").write_text(json.dumps([{"question": "?", "options": ["a", "b"], "answer": "C"}]))
    with pytest.raises(DataError, match=r"choice_val2014.json row 0: field 'answer' must be one of the option "
                                        r"letters A, B"):
        read_multiple_choice(coco / "choice_val2014.json", coco)
    data = tmp_path / "shapes"
    generate_shapes(data, n=20, seed=4, size=48, progress=False)
    rows = read_multiple_choice(data / "choice_test.json", data)
    llava = {r.id: r for r in read_conversations(data / "test.json")}
    assert rows and {r.meta["category"] for r in rows} <= {"color", "shape", "count"}
    for r in rows:  # four distinct options, the letter points at the LLaVA file's answer
        options = r.meta["options"]
        assert len(set(options.values())) == 4
        assert options[r.answers[0]] == llava[r.id].conversations[1]["value"]


def test_gqa_and_scienceqa_official_layouts_read(coco):
    [q] = read_gqa(coco / "testdev_balanced_questions.json", coco / "images")
    assert (q.id, q.question, q.answers, q.meta) == ("201307251", "Is it overcast?", ["no"],
                                                     {"structural_type": "verify", "semantic_type": "attr"})
    [p] = read_scienceqa(coco / "problems.json", coco / "images", "test")
    assert (p.question, p.answers, p.images) == ("Context: Look.\nWhich is a mammal?", ["B"],
                                                 [coco / "images" / "test" / "7" / "image.png"])
    assert p.meta == {"options": {"A": "frog", "B": "whale"}, "category": "natural science"}


def test_image_folder_reads_classes_interleaved_with_their_names(coco):
    samples, classes, question = read_image_folder(coco / "imagefolder")
    assert classes == ["a cat", "a dog"] and question == "Which animal is it?"
    assert [(s.id, s.answers, s.meta["label"]) for s in samples] == [
        ("cat/0.png", ["a cat"], 0), ("dog/0.png", ["a dog"], 1), ("cat/1.png", ["a cat"], 0)]
    assert [s.id for s in read_image_folder(coco / "imagefolder", limit=2)[0]] == ["cat/0.png", "dog/0.png"]
    (coco / "imagefolder" / "classes.json").unlink()
    assert read_image_folder(coco / "imagefolder")[1:] == (["cat", "dog"], "What is in the image?")
    with pytest.raises(DataError, match=r"needs at least two class folders, found 0"):
        read_image_folder(coco / "images" / "test" / "7")
