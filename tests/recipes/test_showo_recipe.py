"""tiny-showo end to end on a small ShapesWorld with text-to-image pairs: the recipe's understanding stage and its
unified stage (mask-predict on the pairs) through vlmkit.train.loop.train lower the image loss by a stated margin;
the checkpoint draws through Pipeline.generate_image (seeded, with a step count), serves through the images API to
the official ``openai`` client and chats there, reads images, and ``shapes_t2i`` / ``shapes_vqa`` run on it; a
resumed run equals an uninterrupted one (the masks are drawn per sample and step from the run's seed)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vlmkit
from vlmkit.data.shapes import generate_shapes
from vlmkit.errors import ConfigError
from vlmkit.eval.judge.pairs import write_t2i_pairs
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe, override_recipe

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "a red circle left of a blue square"
TINY = ["data.val_samples=16", "train.log_every=1", "train.eval_every=1000", "train.save_every=1000",
        "data.group_turns=4", "train.batch_size=16", "stages.0.steps=4", "stages.1.lr=3e-3",
        "stages.1.cond_dropout=0.3"]


def quiet(fn, *args, **kw):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures come before the function-scoped single_thread
    try:
        return fn(*args, **kw, progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """60 ShapesWorld scenes at 64 px with 240 text-to-image training pairs and 16 held-out ones, and a VQ
    tokenizer trained for a few steps on them (as tests/recipes/test_unified_recipes.py's)."""
    out = tmp_path_factory.mktemp("data") / "shapes"
    generate_shapes(out, n=60, seed=3, size=64, progress=False)
    write_t2i_pairs(out, 240, seed=3)
    write_t2i_pairs(out, 16, seed=3, split="val")
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
    openai = pytest.importorskip("openai", reason="the API test uses the official openai client (test extra)")
    pytest.importorskip("fastapi", reason="the API test needs the serve extra")
    from PIL import Image
    from starlette.testclient import TestClient

    from vlmkit.serve.api import create_app
    from vlmkit.serve.engine import Engine

    res, _ = trained
    engine = Engine(vlmkit.load(res.checkpoint), max_new_tokens=8)
    engine.start()
    try:
        with TestClient(create_app(engine, api_key="k", request_timeout=60)) as http:
            client = openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=http, max_retries=0)
            out = client.images.generate(model="tiny-showo", prompt=PROMPT, n=2, response_format="b64_json",
                                         extra_body={"seed": 3, "steps": 4, "cfg_scale": 2.0})
            want = vlmkit.load(res.checkpoint).generate_image(PROMPT, n=2, seed=3, steps=4, cfg_scale=2.0)
            for got, ref in zip(out.data, want):
                image = Image.open(io.BytesIO(base64.b64decode(got.b64_json))).convert("RGB")
                assert image.size == (64, 64) and np.array_equal(np.asarray(image), np.asarray(ref))
            with pytest.raises(openai.BadRequestError, match="steps must be in 0..256"):
                client.images.generate(prompt=PROMPT, extra_body={"steps": 300})
            answer = client.chat.completions.create(model="tiny-showo", max_tokens=4, temperature=0,
                                                    messages=[{"role": "user", "content": "what colour"}])
            assert answer.choices[0].finish_reason in ("stop", "length")
    finally:
        engine.stop()


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
