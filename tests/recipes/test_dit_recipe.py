"""tiny-dit (the latent-diffusion baseline) end to end on a small ShapesWorld with text-to-image pairs: a VAE and a
CLIP trained for a few steps here, then the recipe's diffusion stage through vlmkit.train.loop.train lowers the flow
loss by a stated margin; the checkpoint draws through Pipeline.generate_image (seeded, with a step count) and
refuses to chat, serves through the images API to the official ``openai`` client (chat refused there too), and
``shapes_t2i`` runs on it; a resumed run equals an uninterrupted one; a text_from or vae_from of the wrong kind is
refused naming the option."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_api_images_equal_pipelines, images_api, quiet, t2i_shapes
from safetensors.torch import load_file

import vlmkit
from vlmkit.errors import ConfigError, DataError
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe, only_stages, override_recipe

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "a red circle left of a blue square"
TINY = ["data.val_samples=16", "train.log_every=1", "train.eval_every=1000", "train.save_every=1000",
        "train.batch_size=16", "model.depth=2", "stages.0.lr=1e-3", "stages.0.cond_dropout=0.2"]
CLIP = ["model.vision.width=32", "model.vision.depth=1", "model.vision.heads=2", "model.vision.mlp_dim=64",
        "model.text.width=32", "model.text.depth=1", "model.text.heads=2", "model.text.mlp_dim=64",
        "model.text.context_length=32", "model.contrastive.embed_dim=32", "tokenizer.vocab_size=400",
        "data.val_samples=16", "train.batch_size=16", "train.eval_every=1000", "train.save_every=1000",
        "stages.0.steps=10", "stages.0.train=[all]"]



@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """60 ShapesWorld scenes at 64 px with 240 text-to-image training pairs and 16 held-out ones; a VAE trained 12
    steps and a CLIP (32-wide text tower) trained 10 contrastive steps on them: enough to be the frozen parts."""
    out = tmp_path_factory.mktemp("data") / "shapes"
    t2i_shapes(out, n=60, pairs=240)
    vae = quiet(train, override_recipe(load_recipe("tiny-vae"), [
        f"data.path={out}", "stages.0.steps=12", "train.batch_size=16", "train.eval_every=1000",
        "train.save_every=1000", "data.val_samples=8"]), out.parent / "vae")
    clip = quiet(train, override_recipe(only_stages(load_recipe("tiny-clip"), "contrastive"),
                                        [f"data.path={out}", *CLIP]), out.parent / "clip")
    return out, vae.checkpoint, clip.checkpoint


def recipe(shapes, *extra):
    data, vae, clip = shapes
    return override_recipe(load_recipe("tiny-dit"), [f"data.path={data}", f"model.vae_from={vae}",
                                                     f"model.text_from={clip}", *TINY, *extra])


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "tiny-dit"
    return quiet(train, recipe(shapes, "stages.0.steps=40"), run), run


def test_the_flow_loss_falls(trained):
    """A fresh DiT outputs zero (adaLN-Zero), so the first steps' loss is E[(noise - x0)^2] ~ 1 + the latents'
    second moment (> 2 here); within 40 steps the mean of the last eight steps falls below 0.6 of the mean of the
    first two, and so does the held-out loss at fixed t and noise at the end."""
    _, run = trained
    steps = [r for r in rows(run) if r.get("stage") == "diffusion" and "loss" in r]
    assert len(steps) == 40
    first = sum(r["loss"] for r in steps[:2]) / 2
    last = sum(r["loss"] for r in steps[-8:]) / 8
    assert first > 2.0 and last < 0.6 * first, (first, last)
    val = [r for r in rows(run) if "val_loss" in r]
    assert val and val[-1]["val_loss"] < 0.6 * first, (first, val[-1])
    assert 0 < sum(r["dropped"] for r in steps) < 40 * 16 * 0.4  # cond_dropout 0.2 of 640 samples


def test_checkpoint_draws_seeded_images_and_does_not_chat(trained, shapes):
    res, _ = trained
    pipe = vlmkit.load(res.checkpoint)
    assert pipe.can_generate_images and not pipe.can_generate and pipe.has_image_latents
    images = pipe.generate_image(PROMPT, n=2, seed=0, steps=4)
    assert [im.size for im in images] == [(64, 64)] * 2
    again = pipe.generate_image(PROMPT, n=2, seed=0, steps=4)
    other = pipe.generate_image(PROMPT, n=2, seed=1, steps=4)
    assert [np.asarray(a).tobytes() for a in images] == [np.asarray(b).tobytes() for b in again]
    assert all(np.asarray(a).tobytes() != np.asarray(b).tobytes() for a, b in zip(images, other))
    assert np.asarray(images[0]).tobytes() != np.asarray(images[1]).tobytes()
    with pytest.raises(DataError, match="does not generate text: it draws images from text"):
        pipe.chat(images[0], "What colour is the circle?")
    with pytest.raises(ConfigError, match="temperature and top_k do not apply to ldm's sampler"):
        pipe.generate_image(PROMPT, temperature=0.7)
    vae = vlmkit.load(shapes[1])
    some = sorted((shapes[0] / "t2i_train").glob("*.png"))[:3]
    assert torch.equal(pipe.encode_latents(some), vae.encode_latents(some))  # its VAE is the checkpoint's


def test_it_serves_through_the_images_api_and_refuses_chat(trained):
    res, _ = trained
    with images_api(res.checkpoint) as (openai, client):
        assert_api_images_equal_pipelines(client, "tiny-dit", res.checkpoint, PROMPT, seed=3, steps=4,
                                          cfg_scale=2.0)
        with pytest.raises(openai.BadRequestError, match=r"steps must be in \[0, 1000\]"):
            client.images.generate(prompt=PROMPT, extra_body={"steps": 2000})
        with pytest.raises(openai.BadRequestError, match=r"draws images \(POST /v1/images/generations\); it "
                                                         r"does not chat"):
            client.chat.completions.create(model="tiny-dit", max_tokens=4,
                                           messages=[{"role": "user", "content": "what colour"}])


def test_the_judge_runs_on_it(trained, shapes, tmp_path):
    from vlmkit.eval.runner import run_eval

    res, _ = trained
    out = run_eval(res.checkpoint, ["shapes_t2i"], shapes[0], tmp_path / "results.json", limit=2, progress=False)
    t2i = out["tasks"]["shapes_t2i"]
    assert t2i["n"] == 2 and 0.0 <= t2i["metrics"]["accuracy"] <= 1.0


def test_resume_equals_uninterrupted(shapes, tmp_path):
    r = recipe(shapes, "stages.0.steps=3", "train.save_every=2")
    quiet(train, r, tmp_path / "full")
    quiet(train, r, tmp_path / "cut", stop_at_step=2)
    quiet(train, r, tmp_path / "cut", resume=True)
    a = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_of_the_wrong_kind_are_refused(shapes, tmp_path):
    data, vae, clip = shapes
    with pytest.raises(ConfigError, match=r"model.text_from .* is a vae model; give a dual encoder's checkpoint"):
        quiet(train, recipe(shapes, f"model.text_from={vae}", "stages.0.steps=1"), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"model.vae_from .* is a clip model; give a VAE's checkpoint"):
        quiet(train, recipe(shapes, f"model.vae_from={clip}", "stages.0.steps=1"), tmp_path / "b")
    with pytest.raises(ConfigError, match="model.vae_from must point at a trained VAE"):
        quiet(train, recipe(shapes, "model.vae_from=''", "stages.0.steps=1"), tmp_path / "c")
    with pytest.raises(ConfigError, match=r"stages\[0\]: the diffusion objective trains generation alone"):
        recipe(shapes, "stages.0.train=[all]")
