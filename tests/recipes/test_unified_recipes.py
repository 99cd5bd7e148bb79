"""The early-fusion recipes (tiny-janus: decoupled generation path; tiny-chameleon: image codes in the vocabulary)
trained through vlmkit.train.loop.train on a small ShapesWorld with text-to-image pairs (the unified objective,
objectives/unified.py): both losses fall, the held-out image loss is logged, the checkpoint loads, draws images and
reads them, its codes are the VQ checkpoint's, a resumed run equals an uninterrupted one (condition dropout
included), packed rows give the padded loss, 2 DDP processes follow 1, and the refusals name what to change. The
full tiny-janus recipe to the issue's bar is `python bench/t2i.py` (docs/generation.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from helpers import quiet, t2i_shapes
from safetensors.torch import load_file

import vlmkit
from vlmkit.errors import ConfigError
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe, override_recipe

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = ["data.val_samples=16", "train.log_every=1", "train.eval_every=1000", "train.save_every=1000",
          "data.group_turns=4"]


@dataclass(frozen=True)
class Early:
    """A recipe under test: where its VQ checkpoint goes, which stage is unified, its small settings, and a resume
    plan (unified steps, save_every, the step a run is cut after)."""

    name: str
    vq_key: str
    stage: int
    tiny: tuple[str, ...]
    resume: tuple[int, int, int]

    def __str__(self) -> str:
        return self.name


JANUS = Early("tiny-janus", "model.gen.vq_from", 2, ("train.batch_size=16", "stages.0.steps=4", "stages.1.steps=4",
                                                     "stages.2.lr=3e-3", "stages.2.cond_dropout=0.3"), (8, 6, 13))
CHAMELEON = Early("tiny-chameleon", "model.vq_from", 0, ("train.batch_size=8", "stages.0.lr=3e-3",
                                                        "stages.0.cond_dropout=0.3"), (6, 3, 4))
EARLY = [JANUS, CHAMELEON]
UNI = f"stages.{JANUS.stage}"  # tiny-janus's unified stage



@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """60 ShapesWorld scenes at 64 px with 240 text-to-image training pairs and 16 held-out ones, and a VQ
    tokenizer trained for a few steps on them."""
    out = tmp_path_factory.mktemp("data") / "shapes"
    t2i_shapes(out, n=60, pairs=240)
    vq = quiet(train, override_recipe(load_recipe("tiny-vq"), [
        f"data.path={out}", "stages.0.steps=12", "train.batch_size=16", "train.eval_every=1000",
        "train.save_every=1000", "data.val_samples=8", "model.recon_loss=l1"]), out.parent / "vq")
    return out, vq.checkpoint


def recipe(shapes, early: Early = JANUS, *extra):
    data, vq = shapes
    return override_recipe(load_recipe(early.name), [f"data.path={data}", f"{early.vq_key}={vq}", *COMMON,
                                                     *early.tiny, *extra])


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def unified_rows(run) -> list[dict]:
    return [r for r in rows(run) if r.get("stage") == "unified" and "image_loss" in r]


@pytest.fixture(scope="module", params=EARLY, ids=str)
def trained(request, shapes, tmp_path_factory):
    early = request.param
    run = tmp_path_factory.mktemp("run") / early.name
    return quiet(train, recipe(shapes, early, f"stages.{early.stage}.steps=40"), run), run


def test_text_and_image_losses_fall(trained):
    _, run = trained
    steps = unified_rows(run)
    assert len(steps) == 40
    first, last = steps[0], steps[-1]
    assert last["image_loss"] < first["image_loss"] - 0.5, (first, last)
    assert last["text_loss"] < first["text_loss"] - 0.5, (first, last)
    assert last["loss"] == pytest.approx(last["text_loss"] + last["image_loss"], rel=1e-6)
    val = [r for r in rows(run) if "val_image_loss" in r]
    assert val and val[-1]["val_image_loss"] < first["image_loss"] and "val_loss" in val[-1]


def test_checkpoint_draws_images_and_reads_them(trained, shapes):
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
    assert torch.equal(pipe.decode_codes(codes), vq.decode_codes(codes))


@pytest.mark.parametrize("early", EARLY, ids=str)
def test_resume_equals_uninterrupted(shapes, tmp_path, early):
    """A resumed run (its tokenizer, code tokens included, read from its checkpoint; the condition dropout drawn
    from the step) ends where an uninterrupted one does."""
    steps, save_every, cut = early.resume
    r = recipe(shapes, early, f"stages.{early.stage}.steps={steps}", f"train.save_every={save_every}")
    quiet(train, r, tmp_path / "full")
    quiet(train, r, tmp_path / "cut", stop_at_step=cut)
    quiet(train, r, tmp_path / "cut", resume=True)
    a = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_janus_refusals_name_what_to_change(shapes, tmp_path):
    with pytest.raises(ConfigError, match="cond_dropout must be in"):
        quiet(train, recipe(shapes, JANUS, f"{UNI}.cond_dropout=1.0"), tmp_path / "a")
    with pytest.raises(ConfigError, match="text_weight and image_weight"):
        quiet(train, recipe(shapes, JANUS, f"{UNI}.text_weight=0", f"{UNI}.image_weight=0"), tmp_path / "b")
    with pytest.raises(ConfigError, match="--t2i"):
        quiet(train, recipe(shapes, JANUS, f"{UNI}.pairs=missing.csv"), tmp_path / "c")
    with pytest.raises(ConfigError, match="gen.vq_from"):
        quiet(train, recipe(shapes, JANUS, f"model.gen.vq_from={tmp_path / 'nowhere'}"), tmp_path / "d")
    with pytest.raises(ConfigError, match="cell_labels stages do not read it"):
        quiet(train, recipe(shapes, JANUS, "stages.0.cond_dropout=0.2"), tmp_path / "e")


def test_packed_rows_give_the_padded_loss(shapes, tmp_path):
    """A unified step whose conversations and text-to-image samples are packed into rows has the loss (text and
    image parts) of the same samples one per padded row."""
    padded = quiet(train, recipe(shapes, JANUS, f"{UNI}.steps=2"), tmp_path / "padded")
    packed = quiet(train, recipe(shapes, JANUS, f"{UNI}.steps=2", "train.packing=true"), tmp_path / "packed")
    a, b = unified_rows(tmp_path / "padded"), unified_rows(tmp_path / "packed")
    assert padded.steps == packed.steps and len(a) == len(b) == 2
    for x, y in zip(a, b):
        for key in ("loss", "text_loss", "image_loss"):
            assert y[key] == pytest.approx(x[key], abs=1e-4), key
    assert b[0]["padding_fraction"] < a[0]["padding_fraction"]


@pytest.mark.slow
def test_two_processes_follow_the_single_process_curve(shapes, tmp_path):
    """torchrun, 2 processes under DDP at the same global batch: the unified losses of 1 process (the text and
    image token counts are all-reduced before each backward, so each part is the mean over the global batch)."""
    import os
    import subprocess
    import sys

    data, vq = shapes
    sets = [f"data.path={data}", f"model.gen.vq_from={vq}", *COMMON, *JANUS.tiny, f"{UNI}.steps=4", "train.threads=1",
            "train.precompute_frozen_vision=false"]
    curves = []
    for nproc in (1, 2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(29600 + os.getpid() % 1000)] if nproc > 1 else [sys.executable]
        out = tmp_path / f"run{nproc}"
        proc = subprocess.run([*launcher, "-m", "vlmkit", "train", "tiny-janus", "--out", str(out), "--quiet",
                               *[x for s in sets for x in ("--set", s)]], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        curves.append(unified_rows(out))
    one, two = curves
    assert len(one) == len(two) == 4
    for x, y in zip(one, two):
        for key in ("loss", "text_loss", "image_loss"):
            assert y[key] == pytest.approx(x[key], abs=1e-4), (key, x["step"])


@pytest.fixture(scope="module")
def chameleon_checkpoint(shapes, tmp_path_factory):
    """A tiny-chameleon trained for one step: its tokenizer, layout and plan, and a folder that is no VQ."""
    return quiet(train, recipe(shapes, CHAMELEON, "stages.0.steps=1"), tmp_path_factory.mktemp("cham")).checkpoint


def test_chameleon_layout_of_images_and_image_prompts(chameleon_checkpoint):
    pipe = vlmkit.load(chameleon_checkpoint)
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


def pipe_image():
    from PIL import Image

    return Image.new("RGB", (64, 64), (200, 30, 30))


def test_chameleon_refusals_name_what_to_change(shapes, chameleon_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="model.vq_from"):
        quiet(train, recipe(shapes, CHAMELEON, f"model.vq_from={tmp_path / 'nowhere'}"), tmp_path / "a")
    with pytest.raises(ConfigError, match="processor.mean"):
        quiet(train, recipe(shapes, CHAMELEON, "processor.mean=[0.4,0.4,0.4]"), tmp_path / "b")
    with pytest.raises(ConfigError, match="is a chameleon model; give a VQ"):
        quiet(train, recipe(shapes, CHAMELEON, f"model.vq_from={chameleon_checkpoint}"),
              tmp_path / "c")


def test_unified_recipe_checks_refuse_before_any_data_is_read():
    """The unified stages' recipe refusals (UnifiedObjective.check_recipe), by the setting to change."""
    from vlmkit.objectives.unified import UnifiedObjective

    base = load_recipe("tiny-janus")
    with pytest.raises(ConfigError, match="data.shards"):
        UnifiedObjective.check_recipe(override_recipe(base, ["data.shards=shards/index.json"]))
    two = override_recipe(base, ["stages.0.objective=unified", "stages.0.batch_size=0", "stages.0.pairs=other.csv"])
    with pytest.raises(ConfigError, match="one pairs file"):
        UnifiedObjective.check_recipe(two)
    UnifiedObjective.check_recipe(base)  # the shipped recipe passes
