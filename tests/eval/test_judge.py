"""The judge of generated ShapesWorld scenes (shapes_t2i): the shipped parser's accuracy on fresh renders,
that training it learns, the checker's rules, the prompts file, the task end to end with an oracle and a wrong
image generator, the refusal of a model that does not generate images, and the runner's grid artefact."""

from __future__ import annotations

import json
import random

import pytest
import torch

from vlmkit.data.shapes.scenes import Scene, ShapeObject, render_scene, sample_scene
from vlmkit.errors import ConfigError, DataError
from vlmkit.eval.judge import parser as P
from vlmkit.eval.judge.specs import PROMPT_TYPES, check, make_prompts, render_spec, spec_scene
from vlmkit.eval.judge.train import heldout_accuracy, render_batch, train_parser


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The parser is a small network: one thread is the fastest (and shares the 2 CI cores best)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_shipped_parser_reads_fresh_heldout_scenes():
    """Scenes the parser never saw (a seed of its own), 64x64 and 96x64: attributes and counts >= 0.98."""
    acc = heldout_accuracy(P.load_parser(), n=300, seed=987)
    for key in ("found_accuracy", "color_accuracy", "shape_accuracy", "size_accuracy", "count_accuracy"):
        assert acc[key] >= 0.98, (key, acc)
    assert acc["mean_center_error_px"] < 1.5, acc
    assert P.WEIGHTS.stat().st_size < 1_000_000
    assert P.training_record()["heldout"]["count_accuracy"] >= 0.98


def test_the_parser_reads_other_canvas_sizes_in_their_own_pixels():
    scene = sample_scene(random.Random("big"), 128, 96, 3, 3)
    found = P.parse_image(render_scene(scene))
    assert len(found) == 3
    for o in sorted(scene.objects, key=lambda o: o.cx):
        f = min(found, key=lambda f: (f.cx - o.cx) ** 2 + (f.cy - o.cy) ** 2)
        assert (f.color, f.shape) == (o.color, o.shape) and abs(f.cx - o.cx) < 3 and abs(f.cy - o.cy) < 3
    with pytest.raises(ConfigError, match="PIL images"):
        P.parse_image("not an image")


def test_agreement_of_a_degraded_render_with_its_original():
    """What the VQ tokenizer's bar reads: the parse of a reconstruction against the parse of the original."""
    from PIL import ImageFilter

    scene = sample_scene(random.Random("agree"), 64, 64, 4, 4)
    original = P.parse_image(render_scene(scene))
    assert P.agreement(original, original) == 1.0
    assert (
        P.agreement(original, P.parse_image(render_scene(scene).filter(ImageFilter.GaussianBlur(0.8)))) == 1.0
    )
    recoloured = [
        P.ParsedObject("red" if o.color != "red" else "blue", o.shape, o.size, o.cx, o.cy, 1.0)
        for o in original
    ]
    assert P.agreement(original, recoloured) == pytest.approx(2 / 3)
    assert P.agreement(original, original[1:]) == pytest.approx(3 / 4)
    assert P.agreement(original, []) == 0.0 and P.agreement([], []) == 1.0


def test_a_few_training_steps_reduce_the_parser_loss():
    images, targets, _ = render_batch(random.Random("fixed"), 32, 64, 64, augment=False)
    model = P.SceneParser(32)
    torch.manual_seed(0)

    def loss():
        with torch.no_grad():
            return float(P.parser_loss(model.eval()(images), targets))

    before = loss()
    train_parser(steps=40, batch_size=16, lr=1e-2, seed=3, progress=False, model=model, warmup=5)
    assert loss() < 0.7 * before



def test_training_is_deterministic_given_its_arguments():
    a, losses_a = train_parser(steps=3, batch_size=8, seed=5, width=16, progress=False)
    b, losses_b = train_parser(steps=3, batch_size=8, seed=5, width=16, progress=False)
    c, _ = train_parser(steps=3, batch_size=8, seed=6, width=16, progress=False)
    assert losses_a == losses_b
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.state_dict()["net.0.0.weight"], c.state_dict()["net.0.0.weight"])

# ---------------------------------------------------------------------------------------------- the checker


def _scene(*objects, width=64, height=64) -> Scene:
    return Scene(
        width, height, "white", tuple(ShapeObject(s, c, "small", x, y, 5.76) for c, s, x, y in objects)
    )


def _judge(spec, scene):
    image = render_scene(scene)
    return check(spec, P.parse_image(image), *image.size)


RED_CIRCLE_LEFT_OF_BLUE_SQUARE = {
    "objects": [
        {"color": "red", "shape": "circle", "count": 1},
        {"color": "blue", "shape": "square", "count": 1},
    ],
    "exact": False,
    "relation": [0, "left of", 1],
}


def test_the_checker_rules_on_parsed_scenes():
    spec = RED_CIRCLE_LEFT_OF_BLUE_SQUARE
    assert _judge(spec, _scene(("red", "circle", 15, 30), ("blue", "square", 48, 34))) == (True, "")
    # extra objects are allowed (as in GenEval)
    assert _judge(
        spec, _scene(("red", "circle", 12, 12), ("blue", "square", 48, 14), ("yellow", "star", 30, 48))
    )[0]
    ok, why = _judge(spec, _scene(("green", "circle", 15, 30), ("blue", "square", 48, 34)))  # wrong colour
    assert not ok and "red circle" in why
    ok, why = _judge(spec, _scene(("red", "circle", 48, 30), ("blue", "square", 15, 34)))  # wrong relation
    assert not ok and "is not left of" in why
    ok, _ = _judge(spec, _scene(("red", "circle", 30, 30), ("blue", "square", 36, 10)))  # within the margin
    assert not ok
    above = dict(spec, relation=[0, "above", 1])
    assert _judge(above, _scene(("red", "circle", 30, 12), ("blue", "square", 34, 48)))[0]
    assert not _judge(
        dict(spec, relation=[0, "below", 1]), _scene(("red", "circle", 30, 12), ("blue", "square", 34, 48))
    )[0]
    # swapped colour binding: a blue circle and a red square is not a red circle and a blue square
    binding = dict(spec, relation=None)
    assert _judge(binding, _scene(("red", "circle", 15, 30), ("blue", "square", 48, 34)))[0]
    ok, why = _judge(binding, _scene(("blue", "circle", 15, 30), ("red", "square", 48, 34)))
    assert not ok and "found 0" in why


def test_counting_is_exact():
    spec = {"objects": [{"color": "green", "shape": "triangle", "count": 3}], "exact": True, "relation": None}
    three = [("green", "triangle", 12, 12), ("green", "triangle", 50, 12), ("green", "triangle", 12, 50)]
    assert _judge(spec, _scene(*three))[0]
    assert _judge(spec, _scene(*three, ("red", "triangle", 50, 50)))[0]  # another colour is another object
    ok, why = _judge(spec, _scene(*three, ("green", "triangle", 50, 50)))
    assert not ok and "exactly 3 green triangles, found 4" in why
    assert not _judge(spec, _scene(*three[:2]))[0]


# ---------------------------------------------------------------------------------------------- the prompts


def test_prompts_are_fixed_per_split_and_the_oracle_satisfies_every_spec():
    rows = make_prompts("test")
    assert rows == make_prompts("test") and rows != make_prompts("val")
    assert {r["type"] for r in rows} == set(PROMPT_TYPES) and len({r["prompt"] for r in rows}) == len(rows)
    for r in rows:
        scene = spec_scene(r["spec"], seed=7)
        assert check(r["spec"], scene.objects, scene.width, scene.height)[0], r
    binding = [r["spec"]["objects"] for r in rows if r["type"] == "color_binding"]
    assert all(a["color"] != b["color"] and a["shape"] != b["shape"] for a, b in binding)


def test_shapesworld_writes_the_t2i_file_deterministically(tmp_path):
    from vlmkit.data.shapes import generate_shapes
    from vlmkit.eval.judge.task import read_t2i

    for name in ("a", "b"):
        generate_shapes(tmp_path / name, n=12, seed=0, size=32, progress=False)
    for split in ("val", "test"):
        a, b = (tmp_path / name / f"shapes_t2i_{split}" / f"t2i_{split}.json" for name in ("a", "b"))
        assert a.read_bytes() == b.read_bytes()
        rows = json.loads(a.read_text())
        assert rows == make_prompts(split) and set(rows[0]) == {"id", "prompt", "type", "spec"}
    assert not list((tmp_path / "a").glob("shapes_t2i_train*"))
    assert len(read_t2i(tmp_path / "a", "val", 7)) == 7  # the task finds them there


def test_a_malformed_prompts_file_is_named_with_its_row_and_field(tmp_path):
    from vlmkit.eval.judge.task import read_t2i

    rows = make_prompts("test")[:3]
    rows[2]["spec"]["objects"][0]["color"] = "pink"
    (tmp_path / "t2i_test.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"t2i_test.json: row 2: field 'spec.objects'"):
        read_t2i(tmp_path, "test", None)
    with pytest.raises(DataError, match="t2i_val.json: not found"):
        read_t2i(tmp_path, "val", None)


# ---------------------------------------------------------------------------------------------- the task


class ImageGenerator:
    """A stand-in for a Pipeline that reads and generates images: ``draw(prompt, seed) -> PIL image``."""

    can_generate, can_embed, can_score, can_generate_images = True, False, True, True

    def __init__(self, draw):
        self.draw, self.calls = draw, 0

    def generate_image(self, prompt, n=1, seed=0, **kw):
        self.calls += 1
        return [self.draw(prompt, seed + k) for k in range(n)]


@pytest.fixture(scope="module")
def t2i_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    rows = make_prompts("test")
    (root / "t2i_test.json").write_text(json.dumps(rows))
    return root, {r["prompt"]: r["spec"] for r in rows}


def test_shapes_t2i_end_to_end_oracle_and_wrong_generator(t2i_data, tmp_path):
    from vlmkit.eval.runner import run_task, save_grid, write_report
    from vlmkit.eval.tasks import get_task

    root, specs = t2i_data
    task = get_task("shapes_t2i")
    oracle = ImageGenerator(
        lambda prompt, seed: render_spec(specs[prompt], seed, *((96, 64) if seed % 2 else (64, 64)))
    )
    result, records = run_task(oracle, task, root, "test", None, 8, progress=False)
    assert result["n"] == len(specs) and oracle.calls == len(specs)
    for ptype in PROMPT_TYPES:
        assert result["metrics"][f"accuracy/{ptype}"] >= 0.95, result["metrics"]
    assert result["ci95"]["accuracy"][0] > 0.9 and records[0]["prediction"].startswith("correct")

    wrong = ImageGenerator(lambda prompt, seed: render_scene(sample_scene(random.Random(seed), 64, 64)))
    bad, _ = run_task(wrong, task, root, "test", 50, 8, progress=False)
    assert bad["metrics"]["accuracy"] < 0.3, bad["metrics"]

    # the grid: saved beside the results, named in results.json, shown in the report
    out = tmp_path / "results.json"
    save_grid(result, out, "shapes_t2i")
    assert result["grid"] == "results_shapes_t2i_grid.png" and (tmp_path / result["grid"]).is_file()
    json.dumps(result)  # nothing left that is not JSON
    report = {
        "model": {"path": "oracle", "fingerprint": "0" * 16},
        "config": {"split": "test"},
        "seed": 0,
        "wall_seconds": 1.0,
        "tasks": {"shapes_t2i": result},
    }
    write_report(report, tmp_path / "results.md")
    assert "![shapes_t2i samples](results_shapes_t2i_grid.png)" in (tmp_path / "results.md").read_text()


def test_a_model_that_does_not_generate_images_is_refused_before_anything_runs(t2i_data):
    from vlmkit.eval.runner import run_task
    from vlmkit.eval.tasks import get_task
    from vlmkit.family import Capabilities

    reader = ImageGenerator(lambda prompt, seed: pytest.fail("no image may be asked for"))
    reader.can_generate_images = False
    with pytest.raises(ConfigError, match="does not generate images"):
        run_task(reader, get_task("shapes_t2i"), t2i_data[0], "test", 5, 8, progress=False)
    assert reader.calls == 0
    assert Capabilities().generate_images is False  # families generate images only when they say so
