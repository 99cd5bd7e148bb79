"""tiny-chameleon trained through vlmkit.train.loop.train on a small ShapesWorld with text-to-image pairs (the unified
objective, objectives/unified.py): both losses fall, the checkpoint loads, draws 64x64 images and answers in chat,
its codes are the VQ checkpoint's, and the refusals name what to change."""

from __future__ import annotations

import json

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

TINY = ["data.val_samples=16", "train.batch_size=8", "train.log_every=1", "train.eval_every=1000",
        "train.save_every=1000", "stages.0.lr=3e-3", "stages.0.cond_dropout=0.3", "data.group_turns=4"]


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
    tokenizer trained for a few steps on them."""
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
    return override_recipe(load_recipe("tiny-chameleon"), [f"data.path={data}", f"model.vq_from={vq}", *TINY,
                                                           *extra])


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "chameleon"
    return quiet(train, recipe(shapes, "stages.0.steps=40"), run), run


def test_text_and_image_losses_fall(trained):
    _, run = trained
    steps = [r for r in rows(run) if r.get("stage") == "unified" and "image_loss" in r]
    assert len(steps) == 40
    first, last = steps[0], steps[-1]
    assert last["image_loss"] < first["image_loss"] - 0.5, (first, last)
    assert last["text_loss"] < first["text_loss"] - 0.5, (first, last)
    assert last["loss"] == pytest.approx(last["text_loss"] + last["image_loss"], rel=1e-6)
    val = [r for r in rows(run) if "val_image_loss" in r]
    assert val and val[-1]["val_image_loss"] < first["image_loss"] and "val_loss" in val[-1]


def test_checkpoint_draws_images_and_answers(trained, shapes):
    res, _ = trained
    pipe = vlmkit.load(res.checkpoint)
    assert pipe.can_generate_images and pipe.can_generate and pipe.has_image_codes
    images = pipe.generate_image("a red circle", n=2, seed=0)
    assert [im.size for im in images] == [(64, 64)] * 2
    assert isinstance(pipe.chat(images[0], "What colour is the circle?"), str)
    # its VQ tokenizer is the checkpoint's: the same codes, and the same pictures of them
    vq = vlmkit.load(shapes[1])
    some = sorted((shapes[0] / "t2i_train").glob("*.png"))[:3]
    codes = pipe.encode_codes(some)
    assert torch.equal(codes, vq.encode_codes(some))
    assert torch.equal(pipe.model.decode_codes(codes), vq.model.decode_codes(codes))


def test_layout_of_images_and_image_prompts(trained):
    res, _ = trained
    pipe = vlmkit.load(res.checkpoint)
    proc, model, tok = pipe.processor, pipe.model, pipe.processor.tokenizer
    start, end = tok.token_id("<racm3:break>"), tok.token_id("<eoss>")
    ids = proc.chat([{"role": "user", "content": "<image>\nWhat colour?"}],
                    proc.prepare_images([pipe_image()])).ids
    k, n = ids.index(start), model.image_grid[0] * model.image_grid[1]
    assert ids[k + 1:k + 1 + n] == [tok.token_id("<image>")] * n and ids[k + 1 + n] == end
    cond = proc.image_prompt("a red circle", model.image_grid)
    uncond = proc.image_prompt("a red circle", model.image_grid, unconditional=True)
    assert cond[-1] == start and len(uncond) == len(cond) and uncond[-1] == start
    assert set(uncond[:-1]) == {tok.pad_id}
    assert model.image_plan(*model.image_grid) == [None] * n + [end]
    assert model.code_ids(torch.arange(3)).tolist() == [tok.token_id(f"<img{j:04d}>") for j in range(3)]


def test_resume_equals_uninterrupted(shapes, tmp_path):
    """A resumed run reads its tokenizer (code tokens included) from its checkpoint and ends where an uninterrupted
    one does."""
    r = recipe(shapes, "stages.0.steps=6", "train.save_every=3")
    quiet(train, r, tmp_path / "full")
    quiet(train, r, tmp_path / "cut", stop_at_step=4)  # the last checkpoint is at step 3
    quiet(train, r, tmp_path / "cut", resume=True)
    a = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def pipe_image():
    from PIL import Image

    return Image.new("RGB", (64, 64), (200, 30, 30))


def test_refusals_name_what_to_change(shapes, trained, tmp_path):
    with pytest.raises(ConfigError, match="model.vq_from"):
        quiet(train, recipe(shapes, f"model.vq_from={tmp_path / 'nowhere'}"), tmp_path / "a")
    with pytest.raises(ConfigError, match="processor.mean"):
        quiet(train, recipe(shapes, "processor.mean=[0.4,0.4,0.4]"), tmp_path / "b")
    with pytest.raises(ConfigError, match="is a chameleon model; give a VQ"):
        quiet(train, recipe(shapes, f"model.vq_from={trained[0].checkpoint}"), tmp_path / "c")
