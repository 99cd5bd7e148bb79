"""ShapesWorld: determinism, annotations checked against pixels, answers recomputed from scenes, formats."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmkit.eval.tasks import TASKS

from vlmkit.data import shapes as sw
from vlmkit.data.conversations import read_conversations
from vlmkit.data.shapes.language import _multi_questions
from vlmkit.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------------------------------------ helpers


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def load_records(out: Path) -> list[dict]:
    return [r for split in SPLITS for r in json.loads((out / f"{split}.json").read_text())]


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected component labels of a boolean mask (flood fill; no scipy on these machines)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    height, width = mask.shape
    count = 0
    for y, x in zip(*np.nonzero(mask)):
        if labels[y, x]:
            continue
        count += 1
        labels[y, x] = count
        stack = [(y, x)]
        while stack:
            cy, cx = stack.pop()
            for ny in (cy - 1, cy, cy + 1):
                for nx in (cx - 1, cx, cx + 1):
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = count
                        stack.append((ny, nx))
    return labels, count


def foreground(pixels: np.ndarray, background: str) -> np.ndarray:
    """Pixels more than half-way from the background to the closest object colour."""
    bg = np.array(sw.BACKGROUNDS[background], dtype=float)
    closest = min(np.linalg.norm(np.subtract(c, bg)) for c in sw.COLORS.values())
    return np.linalg.norm(pixels.astype(float) - bg, axis=-1) > closest / 2


def parse_ref(text: str) -> dict[str, str]:
    """Attributes named in a phrase: "the large red circles" -> size, color, shape."""
    attrs = {}
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in sw.SIZES:
            attrs["size"] = word
        elif word in sw.COLORS:
            attrs["color"] = word
        elif word in sw.SHAPES or (word.endswith("s") and word[:-1] in sw.SHAPES):
            attrs["shape"] = word.removesuffix("s") if word not in sw.SHAPES else word
    return attrs


def matching(objects: list[dict], attrs: dict[str, str]) -> list[dict]:
    return [o for o in objects if all(o[k] == v for k, v in attrs.items())]


def the_one(objects: list[dict], phrase: str) -> dict:
    found = matching(objects, parse_ref(phrase))
    assert len(found) == 1, f"referring expression {phrase!r} matches {len(found)} objects"
    return found[0]


def oracle_answer(question: str, qtype: str, scene: dict) -> str:
    """Recompute an answer from scenes.json alone, independently of the generator's code paths."""
    objects, width, height = scene["objects"], scene["width"], scene["height"]
    if qtype in ("color", "shape"):
        obj = the_one(objects, question)
        assert qtype not in parse_ref(question), "question gives its own answer away"
        return obj[qtype]
    if qtype == "count":
        return str(len(matching(objects, parse_ref(question))))
    if qtype == "exist":
        attrs = parse_ref(question)
        assert set(attrs) == {"color", "shape"}
        return "yes" if matching(objects, attrs) else "no"
    if qtype == "position":
        cx, cy = the_one(objects, question)["center"]
        assert abs(cx - width / 2) >= 0.08 * width - 1e-6 and abs(cy - height / 2) >= 0.08 * height - 1e-6
        return f"{'top' if cy < height / 2 else 'bottom'} {'left' if cx < width / 2 else 'right'}"
    assert qtype == "relation"
    first, side, second = re.split(r" (?:to the |on the )?(left|right)(?: side)? of ", question)
    a, b = the_one(objects, first), the_one(objects, second)
    assert abs(a["center"][0] - b["center"][0]) >= 0.15 * width - 1e-6
    a_is_left = a["center"][0] < b["center"][0]
    return "yes" if a_is_left == (side == "left") else "no"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes") / "data"
    summary = sw.generate_shapes(out, n=60, seed=3, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def scenes(dataset) -> dict[int, dict]:
    return {s["id"]: s for s in json.loads((dataset[0] / "scenes.json").read_text())}


# ------------------------------------------------------------------------------------------- determinism


def test_same_arguments_give_byte_identical_files(tmp_path):
    args = {"n": 24, "seed": 5, "size": 48, "progress": False}
    sw.generate_shapes(tmp_path / "a", **args)
    sw.generate_shapes(tmp_path / "b", **args)
    a, b = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    # images; per split 4 (questions, multi-image questions, captions, pairs); scenes, meta; val and test also in the evaluation layouts (VQAv2 2, POPE 3, grounding,
    # choice, GQA) and as ImageFolders (their images and classes.json)
    eval_images = sum(f.startswith(("imagefolder_val/", "imagefolder_test/")) and f.endswith(".png") for f in a)
    assert eval_images == sum(json.loads((tmp_path / "a" / "meta.json").read_text())["images"][s] for s in ("val", "test"))
    # and new single-object renders by colour and shape (30 classes, at least one image each, classes.json)
    object_images = sum(f.startswith(("objects_val/", "objects_test/")) and f.endswith(".png") for f in a)
    assert object_images == 2 * 30
    # and the official benchmarks' layouts, each in its own {task}_{split}/ folder (vlmkit.eval.benchmarks)
    folders = {f.split("/")[0] for f in a if "/" in f and f.split("/")[0].rpartition("_")[0] in TASKS}
    benchmark_files = sum(f.split("/")[0] in folders for f in a)
    assert {"mme_val", "mme_test", "docvqa_val", "docvqa_test", "hallusionbench_test"} <= folders
    assert len(a) == 24 + 3 * 4 + 2 + 2 * (2 + 3 + 3) + eval_images + 2 + object_images + 2 + benchmark_files
    assert a == b

    sw.generate_shapes(tmp_path / "c", **{**args, "seed": 6})
    c = file_hashes(tmp_path / "c")
    assert c["scenes.json"] != a["scenes.json"]
    assert sum(c[f] != a[f] for f in a if f.startswith("images/")) >= 20


def test_image_depends_only_on_seed_and_index(tmp_path):
    sw.generate_shapes(tmp_path / "small", n=6, seed=1, size=48, progress=False)
    sw.generate_shapes(tmp_path / "big", n=20, seed=1, size=48, splits=(0.5, 0.25, 0.25), progress=False)
    small, big = file_hashes(tmp_path / "small"), file_hashes(tmp_path / "big")
    assert all(small[f] == big[f] for f in small if f.startswith("images/"))


def test_no_global_random_state_used():
    state = random.getstate()
    np_state = np.random.get_state()[1].copy()
    sw.make_questions(sw.sample_scene(random.Random(0)), random.Random(1))
    assert random.getstate() == state and (np.random.get_state()[1] == np_state).all()


# --------------------------------------------------------------------------------- annotations vs pixels


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (32, 40)])
def test_drawn_objects_match_scene(size):
    width, height = size
    for index in range(25):
        scene = sw.sample_scene(sw.image_rng(11, index), width, height)
        pixels = np.asarray(sw.render_scene(scene))
        assert pixels.shape == (height, width, 3)
        labels, count = label_components(foreground(pixels, scene.background))
        assert count == len(scene.objects), f"scene {index}: {count} blobs for {len(scene.objects)} objects"
        # Every object's centre lies in its own blob, so blobs and objects correspond one to one.
        centre_labels = {int(labels[int(o.cy), int(o.cx)]) for o in scene.objects}
        assert centre_labels == set(range(1, count + 1))


def test_centre_pixel_has_object_colour(dataset, scenes):
    out, _ = dataset
    checked = 0
    for scene in scenes.values():
        pixels = np.asarray(Image.open(out / scene["file_name"]).convert("RGB"))
        for obj in scene["objects"]:
            if obj["shape"] in ("circle", "square", "diamond"):
                cx, cy = obj["center"]
                pixel = pixels[int(cy), int(cx)].astype(float)
                assert np.linalg.norm(pixel - sw.COLORS[obj["color"]]) < 12, (scene["id"], obj)
                checked += 1
    assert checked > 50


def test_bboxes_inside_image_and_around_centre(scenes):
    for scene in scenes.values():
        for obj in scene["objects"]:
            x, y, w, h = obj["bbox"]
            assert 0 <= x and 0 <= y and x + w <= scene["width"] and y + h <= scene["height"]
            cx, cy = obj["center"]
            assert x < cx < x + w and y < cy < y + h
            assert obj["size"] in sw.SIZES and obj["shape"] in sw.SHAPES and obj["color"] in sw.COLORS


def test_render_is_anti_aliased_and_area_true():
    circle = sw.ShapeObject("circle", "red", "large", 32.3, 31.7, 9.6)
    scene = sw.Scene(64, 64, "white", (circle,))
    sharp = np.asarray(sw.render_scene(scene, supersample=1)).reshape(-1, 3)
    smooth = np.asarray(sw.render_scene(scene)).reshape(-1, 3).astype(float)
    assert len(np.unique(sharp, axis=0)) == 2
    assert len(np.unique(smooth, axis=0)) > 10
    # Green drops from 255 (white) to 40 (red) in proportion to the area the circle covers.
    coverage = (255 - smooth[:, 1]).sum() / (255 - 40) / (64 * 64)
    assert coverage == pytest.approx(np.pi * 9.6**2 / 64**2, rel=0.03)


def test_large_objects_are_clearly_larger():
    small = sw.ShapeObject("circle", "red", "small", 32, 32, sw.SIZES["small"] * 64)
    large = sw.ShapeObject("circle", "red", "large", 32, 32, sw.SIZES["large"] * 64)
    assert large.bbox()[2] / small.bbox()[2] >= 1.5


# ------------------------------------------------------------------------------------------- questions


def test_answers_recomputed_from_scenes(dataset, scenes):
    records = load_records(dataset[0])
    assert len(records) == sum(dataset[1]["questions"].values())
    for record in records:
        scene = scenes[int(record["image"][len("images/") : -len(".png")])]
        question = record["conversations"][0]["value"].removeprefix("<image>\n")
        answer = record["conversations"][1]["value"]
        assert oracle_answer(question, record["type"], scene) == answer, (record["id"], question)


def multi_oracle(question: str, qtype: str, scenes: list[dict]) -> str:
    """The answer to a multi-image question, recomputed from the scene records."""
    ordinals = ("first", "second", "third")
    objects = [sc["objects"] for sc in scenes]
    if qtype == "multi_compare":
        shape = next(s for s in sw.SHAPES if f"more {s}" in question)
        counts = [sum(o["shape"] == shape for o in objs) for objs in objects]
        assert counts.count(max(counts)) == 1
        return ordinals[counts.index(max(counts))]
    if qtype == "multi_attribute":
        k = next(i for i, o in enumerate(ordinals) if question.startswith(f"In the {o} image"))
        phrase = question.split("what color is the ")[1].rstrip("?").split()
        found = [o for o in objects[k] if o["shape"] == phrase[-1] and (len(phrase) == 1 or o["size"] == phrase[0])]
        assert len(found) == 1
        return found[0]["color"]
    if qtype == "multi_total":
        color = question.split("How many ")[1].split()[0]
        return str(sum(o["color"] == color for objs in objects for o in objs))
    if qtype == "multi_all":
        shape = question.removeprefix("Does every image contain a ").rstrip("?")
        return "yes" if all(any(o["shape"] == shape for o in objs) for objs in objects) else "no"
    assert qtype == "multi_which"
    color, shape = question.removeprefix("Which image shows a ").split("?")[0].split()
    having = [i for i, objs in enumerate(objects) if any(o["color"] == color and o["shape"] == shape for o in objs)]
    assert len(having) == 1
    return ordinals[having[0]]


def test_multi_image_questions_are_answered_by_their_scenes_and_balanced(dataset, scenes):
    rows = [r for split in ("train", "val", "test") for r in json.loads((dataset[0] / f"multi_{split}.json").read_text())]
    assert {r["type"] for r in rows} == set(sw.MULTI_TYPES)
    for r in rows:
        ids = [int(f[len("images/"):-len(".png")]) for f in r["images"]]
        assert 2 <= len(ids) <= 3 and len(set(ids)) == len(ids)
        assert len({scenes[i]["split"] for i in ids}) == 1  # a sample's images come from one split
        human = r["conversations"][0]["value"]
        assert human.count("<image>") == len(ids)
        question = human.split("\n")[-1]
        assert multi_oracle(question, r["type"], [scenes[i] for i in ids]) == r["conversations"][1]["value"], r
    yes = [r["conversations"][1]["value"] for r in rows if r["type"] == "multi_all"]
    assert 0.3 <= yes.count("yes") / len(yes) <= 0.7
    samples = read_conversations(dataset[0] / "multi_val.json")  # the reader takes them as they are
    assert samples and all(len(s.images) >= 2 for s in samples)


def test_multi_image_questions_when_every_shape_is_in_every_image():
    """Found by a 20,000-image run: with every shape in every image there is no "no" to ask about."""
    objects = tuple(sw.ShapeObject(shape, "red" if i % 2 else "blue", "small", 10 + 9 * i, 20, 4)
                    for i, shape in enumerate(sw.SHAPES))
    scene = sw.Scene(64, 64, "white", objects)
    for seed in range(20):
        qs = _multi_questions([scene, scene], random.Random(seed))
        assert qs and "multi_all" not in {q["type"] for q in qs}


def test_question_mix_and_answer_vocabulary(dataset):
    records = load_records(dataset[0])
    by_type = {
        t: [r["conversations"][1]["value"] for r in records if r["type"] == t] for t in sw.QUESTION_TYPES
    }
    assert all(by_type.values()), "every question type present"
    for qtype in ("exist", "relation"):
        assert set(by_type[qtype]) == {"yes", "no"}
        assert 0.4 <= by_type[qtype].count("yes") / len(by_type[qtype]) <= 0.6
    assert set(by_type["color"]) <= set(sw.COLORS) and set(by_type["shape"]) <= set(sw.SHAPES)
    assert set(by_type["position"]) <= set(sw.QUADRANTS)
    assert set(by_type["count"]) <= {str(i) for i in range(7)}
    assert by_type["count"].count("0") / len(by_type["count"]) < 0.3
    for record in records:
        answer = record["conversations"][1]["value"]
        assert answer == answer.lower().strip() and 1 <= len(answer.split()) <= 2


def test_questions_per_image_are_distinct_and_plenty(dataset):
    records = load_records(dataset[0])
    per_image: dict[str, list[str]] = {}
    for r in records:
        per_image.setdefault(r["image"], []).append(r["conversations"][0]["value"])
    assert len(per_image) == 60
    assert all(len(qs) == len(set(qs)) for qs in per_image.values())
    assert all(5 <= len(qs) <= 9 for qs in per_image.values())


def test_half_of_exist_negatives_are_hard(dataset, scenes):
    hard = total = 0
    for r in load_records(dataset[0]):
        if r["type"] == "exist" and r["conversations"][1]["value"] == "no":
            attrs = parse_ref(r["conversations"][0]["value"])
            objects = scenes[int(r["id"][:6])]["objects"]
            hard += any(o["color"] == attrs["color"] or o["shape"] == attrs["shape"] for o in objects)
            total += 1
    assert 0.3 <= hard / total <= 0.8


# --------------------------------------------------------------------------------------------- formats


def test_splits_disjoint_and_files_parse(dataset):
    out, summary = dataset
    images_per_split = {}
    for split in SPLITS:
        records = json.loads((out / f"{split}.json").read_text())
        ids = [r["id"] for r in records]
        assert len(ids) == len(set(ids))
        for r in records:
            human, gpt = r["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
            assert "<image>" not in gpt["value"]
            assert (out / r["image"]).is_file()
        images_per_split[split] = {r["image"] for r in records}
        assert len(images_per_split[split]) == summary["images"][split]
    assert summary["images"] == {"train": 48, "val": 6, "test": 6}
    train, val, test = images_per_split.values()
    assert not (train & val or train & test or val & test)
    assert len(list((out / "images").iterdir())) == 60


def test_captions_coco_and_csv(dataset):
    out, _ = dataset
    annotation_ids = []
    for split in SPLITS:
        coco = json.loads((out / f"captions_{split}.json").read_text())
        image_ids = {im["id"] for im in coco["images"]}
        assert all((out / im["file_name"]).is_file() and im["width"] == 64 for im in coco["images"])
        assert all(a["image_id"] in image_ids and a["caption"] for a in coco["annotations"])
        annotation_ids += [a["id"] for a in coco["annotations"]]
        with open(out / f"pairs_{split}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [(r["image"], r["caption"]) for r in rows] == [
            (f"images/{a['image_id']:06d}.png", a["caption"]) for a in coco["annotations"]
        ]
    assert len(annotation_ids) == len(set(annotation_ids)) == 60 * 3


def test_captions_describe_every_object():
    for index in range(20):
        rng = sw.image_rng(2, index)
        scene = sw.sample_scene(rng)
        captions = sw.make_captions(scene, rng, k=5)
        assert len(set(captions)) == 5
        for caption in captions:
            for obj in scene.objects:
                assert f"{obj.color} {obj.shape}" in caption


def test_meta_written_with_arguments_and_counts(dataset):
    out, summary = dataset
    meta = json.loads((out / "meta.json").read_text())
    assert meta["generator"] == sw.GENERATOR and meta["arguments"]["n"] == 60
    assert meta["question_types"] == summary["question_types"]
    assert sum(meta["question_types"].values()) == sum(meta["questions"].values())


def test_non_square_size(tmp_path):
    sw.generate_shapes(tmp_path / "d", n=6, size="96x64", progress=False)
    scenes = json.loads((tmp_path / "d" / "scenes.json").read_text())
    assert all((s["width"], s["height"]) == (96, 64) for s in scenes)
    assert Image.open(tmp_path / "d" / "images" / "000000.png").size == (96, 64)


def test_zero_fraction_split_is_written_empty(tmp_path):
    summary = sw.generate_shapes(tmp_path / "d", n=5, size=32, splits=(1.0, 0.0, 0.0), progress=False)
    assert summary["images"] == {"train": 5, "val": 0, "test": 0}
    assert json.loads((tmp_path / "d" / "val.json").read_text()) == []


@pytest.mark.parametrize(
    "n, splits, expected",
    [
        (10, (0.8, 0.1, 0.1), (8, 1, 1)),
        (3, (0.8, 0.1, 0.1), (1, 1, 1)),
        (1, (0.8, 0.1, 0.1), (1, 0, 0)),
        (1000, (0.8, 0.1, 0.1), (800, 100, 100)),
        (7, (0.5, 0.5, 0.0), (4, 3, 0)),
    ],
)
def test_split_ranges(n, splits, expected):
    ranges = sw.split_ranges(n, splits)
    assert tuple(len(r) for r in ranges.values()) == expected
    assert [i for r in ranges.values() for i in r] == list(range(n))


# -------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"n": 0}, "--n"),
        ({"size": 16}, "--size"),
        ({"size": "64y64"}, "--size"),
        ({"size": (64, 20)}, "--size"),
        ({"min_objects": 0}, "--min-objects"),
        ({"min_objects": 4, "max_objects": 3}, "--max-objects"),
        ({"max_objects": 9}, "--max-objects"),
        ({"splits": (0.8, 0.3, 0.1)}, "--splits"),
        ({"splits": (1.2, -0.1, -0.1)}, "--splits"),
        ({"splits": 0.8}, "--splits"),
    ],
)
def test_bad_arguments_name_the_option(tmp_path, kwargs, option):
    with pytest.raises(ConfigError, match=re.escape(option)):
        sw.generate_shapes(tmp_path / "d", progress=False, **kwargs)
    assert not (tmp_path / "d").exists()


def test_existing_folder_needs_overwrite(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(DataError, match="already exists.*--overwrite"):
        sw.generate_shapes(out, n=2, size=32, progress=False)
    assert (out / "mine.txt").read_text() == "keep"
    sw.generate_shapes(out, n=2, size=32, overwrite=True, progress=False)
    assert not (out / "mine.txt").exists() and (out / "meta.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_crash_leaves_no_dataset(tmp_path, monkeypatch):
    calls = []

    def failing_render(scene, supersample=4):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return Image.new("RGB", (scene.width, scene.height))

    monkeypatch.setattr(sw, "render_scene", failing_render)
    with pytest.raises(RuntimeError, match="disk full"):
        sw.generate_shapes(tmp_path / "d", n=10, size=32, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, size", [("64", (64, 64)), ("96x64", (96, 64)), (" 40X48 ", (40, 48))])
def test_parse_size(text, size):
    assert sw.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "x64", "64x", "64x64x3", "-64", "big"])
def test_parse_size_rejects_bad_text(text):
    with pytest.raises(ConfigError, match="--size.*96x64"):
        sw.parse_size(text)


def test_object_folder_holds_one_object_of_its_class_per_image(tmp_path):
    sw.generate_shapes(tmp_path / "d", n=200, seed=3, size=64, progress=False)
    root = tmp_path / "d" / "objects_test"
    meta = json.loads((root / "classes.json").read_text())
    assert len(meta["classes"]) == 30 and meta["classes"]["orange_star"] == "orange star"
    assert all(t.count("{}") == 1 for t in meta["templates"])
    per_class = {p.name: sorted(p.glob("*.png")) for p in root.iterdir() if p.is_dir()}
    assert set(per_class) == set(meta["classes"]) and {len(v) for v in per_class.values()} == {1}  # 20 test images
    for key, files in per_class.items():
        rgb = sw.COLORS[key.split("_")[0]]
        pixels = set(map(tuple, np.asarray(Image.open(files[0]).convert("RGB")).reshape(-1, 3).tolist()))
        assert rgb in pixels  # the class's colour is drawn ...
        others = [c for name, c in sw.COLORS.items() if name != key.split("_")[0]]
        assert not any(c in pixels for c in others)  # ... and no other object colour
