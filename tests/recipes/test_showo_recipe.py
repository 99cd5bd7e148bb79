"""tiny-showo end to end on a small ShapesWorld with text-to-image pairs: the recipe's understanding stage and its
unified stage (mask-predict on the pairs) through vlmkit.train.loop.train lower the image loss by a stated margin;
the checkpoint draws through Pipeline.generate_image (seeded, with a step count), serves through the images API to
the official ``openai`` client and chats there, reads images, and ``shapes_t2i`` / ``shapes_vqa`` run on it; a
resumed run equals an uninterrupted one (the masks are drawn per sample and step from the run's seed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_api_images_equal_pipelines, images_api, quiet, t2i_shapes
from safetensors.torch import load_file

import vlmkit
from vlmkit.errors import ConfigError
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe, override_recipe

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "a red circle left of a blue square"
TINY = ["data.val_samples=16", "train.log_every=1", "train.eval_every=1000", "train.save_every=1000",
        "data.group_turns=4", "train.batch_size=16", "stages.0.steps=4", "stages.1.lr=3e-3",
        "stages.1.cond_dropout=0.3"]



@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """60 ShapesWorld scenes at 64 px with 240 text-to-image training pairs and 16 held-out ones, and a VQ
    tokenizer trained for a few steps on them (as tests/recipes/test_unified_recipes.py's)."""
    out = tmp_path_factory.mktemp("data") / "shapes"
    t2i_shapes(out, n=60, pairs=240)
    vq = quiet(train, override_recipe(load_recipe("tiny-vq"), [
        f"data.path={out}", "stages.0.steps=12", "train.batch_size=16", "train.eval_every=1000",
        "train.save_every=1000", "data.val_samples=8", "model.recon_loss=l1"]), out.parent / "vq")
    return out, vq.checkpoint


def recipe(shapes, *extra):
    data, vq = shapes
    return override_recipe(load_recipe("tiny-showo"), [f"data.path={data}", f"model.gen.vq_from={vq}", *TINY, *extra])


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "tiny-showo"
    return quiet(train, recipe(shapes, "stages.1.steps=24"), run), run


def test_the_image_loss_falls(trained):
    """Mask-predict's loss at the masked codes starts near chance (ln 512 = 6.2) and falls by 2 nats within 24
    steps (ShapesWorld's codes are mostly background): the mean of the first two steps against the last eight
    (each step's share of masked codes is drawn, so single steps are noisy), and the held-out loss at the end."""
    _, run = trained
    steps = [r for r in rows(run) if r.get("stage") == "unified" and "image_loss" in r]
    assert len(steps) == 24
    first = sum(r["image_loss"] for r in steps[:2]) / 2
    last = sum(r["image_loss"] for r in steps[-8:]) / 8
    assert first > 3.5 and last < first - 2.0, (first, last)
    assert steps[-1]["text_loss"] < steps[0]["text_loss"], (steps[0], steps[-1])
    val = [r for r in rows(run) if "val_image_loss" in r]
    assert val and val[-1]["val_image_loss"] < first - 2.0


def test_checkpoint_draws_seeded_images_and_reads_them(trained, shapes):
    res, _ = trained
    pipe = vlmkit.load(res.checkpoint)
    assert pipe.can_generate_images and pipe.can_generate and pipe.has_image_codes
    images = pipe.generate_image(PROMPT, n=2, seed=0, steps=4)
    assert [im.size for im in images] == [(64, 64)] * 2
    again = pipe.generate_image(PROMPT, n=2, seed=0, steps=4)
    assert [np.asarray(a).tobytes() for a in images] == [np.asarray(b).tobytes() for b in again]
    assert isinstance(pipe.chat(images[0], "What colour is the circle?"), str)
    vq = vlmkit.load(shapes[1])
    some = sorted((shapes[0] / "t2i_train").glob("*.png"))[:3]
    codes = pipe.encode_codes(some)
    assert torch.equal(codes, vq.encode_codes(some))  # its VQ tokenizer is the checkpoint's


def test_it_serves_through_the_images_api_and_chats(trained):
    res, _ = trained
    with images_api(res.checkpoint) as (openai, client):
        assert_api_images_equal_pipelines(client, "tiny-showo", res.checkpoint, PROMPT, seed=3, steps=4,
                                          cfg_scale=2.0)
        with pytest.raises(openai.BadRequestError, match="steps must be in 0..256"):
            client.images.generate(prompt=PROMPT, extra_body={"steps": 300})
        answer = client.chat.completions.create(model="tiny-showo", max_tokens=4, temperature=0,
                                                messages=[{"role": "user", "content": "what colour"}])
        assert answer.choices[0].finish_reason in ("stop", "length")


def test_the_judge_and_vqa_run_on_it(trained, shapes, tmp_path):
    from vlmkit.eval.runner import run_eval

    res, _ = trained
    out = run_eval(res.checkpoint, ["shapes_t2i", "shapes_vqa"], shapes[0], tmp_path / "results.json", limit=2,
                   progress=False)
    t2i, vqa = out["tasks"]["shapes_t2i"], out["tasks"]["shapes_vqa"]
    assert t2i["n"] == 2 and 0.0 <= t2i["metrics"]["accuracy"] <= 1.0
    assert vqa["n"] == 2 and "exact_match" in vqa["metrics"]


def test_resume_equals_uninterrupted(shapes, tmp_path):
    r = recipe(shapes, "stages.1.steps=3", "train.save_every=2", "stages.0.steps=1")
    quiet(train, r, tmp_path / "full")
    quiet(train, r, tmp_path / "cut", stop_at_step=3)
    quiet(train, r, tmp_path / "cut", resume=True)
    a = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refusals_name_what_to_change(shapes, tmp_path):
    with pytest.raises(ConfigError, match="model.gen.vq_from"):
        quiet(train, recipe(shapes, f"model.gen.vq_from={tmp_path / 'nowhere'}"), tmp_path / "a")
    with pytest.raises(ConfigError, match="model.foo"):
        quiet(train, recipe(shapes, "model.foo=1"), tmp_path / "b")
    with pytest.raises(ConfigError, match="objective cell_labels|cell_labels"):
        quiet(train, recipe(shapes, "stages.0.objective=cell_labels"), tmp_path / "c")
