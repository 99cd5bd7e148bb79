"""Training behaviour: the loss goes down, resume equals an uninterrupted run, checkpoints round-trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import vlmkit
from vlmkit.data.shapes import generate_shapes
from vlmkit.errors import ConfigError, DataError
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe

TINY = [
    "model.vision.image_size=[32, 32]", "model.vision.patch_size=8", "model.vision.width=32",
    "model.vision.depth=1", "model.vision.heads=2", "model.vision.mlp_dim=64",
    "model.lm.width=64", "model.lm.depth=2", "model.lm.heads=4", "model.lm.kv_heads=2", "model.lm.mlp_dim=128",
    "train.batch_size=8", "train.log_every=1", "train.eval_every=1000", "data.val_samples=16",
]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    generate_shapes(out, n=60, seed=1, size=32, progress=False)
    return out


def recipe(shapes, *extra):
    return load_recipe("tiny-llava", [f"data.path={shapes}", *TINY, *extra])


def losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_loss_goes_down(shapes, tmp_path):
    r = recipe(shapes, "stages.0.steps=40", "stages.0.lr=3e-3", "stages.1.steps=5")
    res = train(r, tmp_path / "run", progress=False, log=lambda m: None)
    ls = losses(tmp_path / "run")
    assert len(ls) == 45
    first, last = sum(ls[:3]) / 3, sum(ls[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert res.val_loss is not None and res.val_loss < first


@pytest.mark.parametrize("stem", [[], ["model.vision.stem=conv", "model.vision.stem_norm=batch"]],
                         ids=["patch", "batchnorm-conv"])
def test_stage_freezing_keeps_vision_fixed(shapes, tmp_path, stem):
    # with a BatchNorm stem the frozen tower must also keep its running statistics (eval mode), including
    # across the periodic validation (eval_every=2), which switches the model to eval and back
    r = recipe(shapes, "stages.0.steps=3", "stages.1.steps=4", "train.save_every=3", "train.eval_every=2", *stem)
    train(r, tmp_path / "run", progress=False, log=lambda m: None, stop_at_step=3)
    after_stage0 = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    train(r, tmp_path / "run", resume=True, progress=False, log=lambda m: None)
    final = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    vision = [k for k in final if k.startswith("encoder.")]
    lm = [k for k in final if k.startswith("lm.layers.")]
    assert vision and all(torch.equal(after_stage0[k], final[k]) for k in vision)  # frozen in stage 2
    assert any(not torch.equal(after_stage0[k], final[k]) for k in lm)  # trained in stage 2


@pytest.mark.parametrize("stop, saved", [(5, 3), (10, 9)])  # mid-stage 1 and mid-stage 2
def test_resume_equals_uninterrupted(shapes, tmp_path, stop, saved):
    r = recipe(shapes, "stages.0.steps=7", "stages.1.steps=4", "train.save_every=3")
    train(r, tmp_path / "full", progress=False, log=lambda m: None)
    # interrupted after step `stop`; the last checkpoint is at step `saved`, so resume replays the rest
    train(r, tmp_path / "cut", progress=False, log=lambda m: None, stop_at_step=stop)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert state["global_step"] == saved
    train(r, tmp_path / "cut", resume=True, progress=False, log=lambda m: None)
    a = load_file(tmp_path / "full" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")


def test_checkpoint_loads_into_pipeline(shapes, tmp_path):
    r = recipe(shapes, "stages.0.steps=2", "stages.1.steps=1")
    res = train(r, tmp_path / "run", progress=False, log=lambda m: None)
    pipe = vlmkit.load(res.checkpoint)
    image = shapes / "images" / "000000.png"
    answer = pipe.chat(image, "How many objects are there?", max_new_tokens=4)
    assert isinstance(answer, str)
    lp = pipe.score([image], "<image>\nHow many objects are there?", " 3")
    assert lp and all(x <= 0 for x in lp)


def test_bad_rows_fail_or_are_skipped(shapes, tmp_path):
    rows = json.loads((shapes / "train.json").read_text())
    rows[3]["conversations"][0]["value"] = "<image>\n<image>\nWhat is this?"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows))
    r = recipe(shapes, f"data.train={bad}", f"data.image_root={shapes}", "stages.0.steps=1", "stages.1.steps=1")
    with pytest.raises(DataError, match=r"placeholder count 2 != images 1 in row 3 of .*bad.json"):
        train(r, tmp_path / "run", progress=False, log=lambda m: None)
    messages = []
    r = recipe(shapes, f"data.train={bad}", f"data.image_root={shapes}", "stages.0.steps=1", "stages.1.steps=1",
               "data.skip_bad_samples=true")
    train(r, tmp_path / "run", progress=False, log=messages.append)
    assert any("skipped 1 of" in m for m in messages)


def test_unknown_set_key_is_refused(shapes):
    with pytest.raises(ConfigError, match="train.bogus"):
        recipe(shapes, "train.bogus=1")
    with pytest.raises(ConfigError, match="lm.bogus"):
        r = recipe(shapes, "model.lm.bogus=3")
        train(r, "/nonexistent-never-written", progress=False, log=lambda m: None)
