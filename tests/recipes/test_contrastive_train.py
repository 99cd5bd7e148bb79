"""Contrastive training (objectives/contrastive.py) through vlmkit.train.loop.train on the tiny-clip / tiny-siglip
recipes, shrunk: the loss falls below chance, the checkpoint embeds, resume equals an uninterrupted run, a LiT
stage keeps the image tower bit-identical, and the refusals (grad_accum, LM objective or modules, a batch larger
than the data, bad rows) name what to change."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import vlmkit
from vlmkit.data.pairs import PairDataset, read_pairs
from vlmkit.data.shapes import generate_shapes
from vlmkit.errors import ConfigError, DataError
from vlmkit.processing import Processor
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe, only_stages, override_recipe

pytestmark = pytest.mark.usefixtures("single_thread")

WIDTH = 32
TINY = [
    "model.vision.image_size=[32, 32]", "model.vision.patch_size=8", f"model.vision.width={WIDTH}",
    "model.vision.depth=1", "model.vision.heads=2", f"model.vision.mlp_dim={2 * WIDTH}",
    f"model.text.width={WIDTH}", "model.text.depth=1", "model.text.heads=2", f"model.text.mlp_dim={2 * WIDTH}",
    "model.text.context_length=32", f"model.contrastive.embed_dim={WIDTH}",  # SigLIP: embed_dim = vision width
    "tokenizer.vocab_size=400", "data.train=[pairs_train.csv]", "data.val=pairs_val.csv", "data.val_samples=16",
    "train.batch_size=16", "train.log_every=1", "train.eval_every=1000", "train.save_every=1000",
    "stages.0.lr=2e-3", "stages.0.warmup=0.05", "stages.0.min_lr_ratio=0.1", "stages.0.weight_decay=0.1",
    "stages.0.train=[all]", "stages.0.objective=contrastive",
]
QUIET = dict(progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """100 ShapesWorld scenes at 32 px: 80 training images with 3 captions each, 10 validation images."""
    out = tmp_path_factory.mktemp("data") / "shapes"
    generate_shapes(out, n=100, seed=1, size=32, progress=False)
    return out


def recipe(shapes, *extra, preset: str = "tiny-clip"):
    """The preset's built-in recipe without its image-tower stage (stages.0 is the contrastive one), tiny."""
    return override_recipe(only_stages(load_recipe(preset), "contrastive"), [f"data.path={shapes}", *TINY, *extra])


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run) -> list[float]:
    return [r["loss"] for r in rows(run) if "loss" in r]


@pytest.mark.slow
def test_trains_end_to_end_loss_falls_and_checkpoint_embeds(shapes, tmp_path):
    said = []
    res = train(recipe(shapes, "stages.0.steps=60"), tmp_path / "run", progress=False, log=said.append)
    assert res.steps == 60 and res.checkpoint == tmp_path / "run" / "checkpoint"
    data = next(x for x in rows(tmp_path / "run") if x.get("event") == "data")
    # the data event, with the truncation count recomputed from the saved tokenizer and context
    processor = Processor.from_pretrained(res.checkpoint)
    train_caps = [p.caption for p in read_pairs(shapes / "pairs_train.csv")]
    val_caps = [p.caption for p in read_pairs(shapes / "pairs_val.csv")]  # 10 images < val_samples: all of them
    expected = processor.tokenize_texts(train_caps + val_caps)[1]
    assert data == {"event": "data", "step": 0, "images": 80, "captions": 240, "truncated_captions": expected,
                    "context_length": 32, "skipped_rows": 0}
    assert expected > 0 and any(f"{expected} captions are longer than the text context (32 tokens)" in m for m in said)
    # the loss: the first batches start above chance (random embeddings at CLIP's temperature 1/0.07), log(16)
    # is where a collapsed model (every embedding alike) sits; the trained one must be well below both
    ls = losses(tmp_path / "run")
    assert len(ls) == 60
    first, last = sum(ls[:3]) / 3, sum(ls[-10:]) / 10
    assert last < math.log(16) - 0.25 and last < 0.85 * first, (first, last)
    assert res.val_loss is not None and res.val_loss < math.log(10)  # 10 validation images in one batch
    val = [r for r in rows(tmp_path / "run") if "val_loss" in r]
    assert len(val) == 1 and val[0]["val_n_images"] == 10 and val[0]["val_n_texts"] == 30
    # the recall among distinct captions (ShapesWorld's repeat across images) is logged beside the retrieval's
    assert 1 <= val[0]["val_n_distinct_captions"] <= 30 and 0 <= val[0]["val_distinct_caption_recall@1"] <= 1
    # the checkpoint is a dual encoder for the Pipeline: unit-norm rows of embed_dim
    pipe = vlmkit.load(res.checkpoint)
    assert pipe.can_embed and not pipe.can_generate
    images = sorted((shapes / "images").glob("*.png"))[:5]
    zi = pipe.embed_images(images, batch_size=2)
    zt = pipe.embed_texts(val_caps[:7] + [" ".join(val_caps)], batch_size=3)
    assert zi.shape == (5, WIDTH) and zt.shape == (8, WIDTH) and zi.dtype == zt.dtype == torch.float32
    torch.testing.assert_close(zi.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(zt.norm(dim=-1), torch.ones(8))
    assert pipe.last_truncated >= 1  # the joined captions are longer than the context
    # batched as one: the same rows
    torch.testing.assert_close(pipe.embed_images(images, batch_size=64), zi, rtol=1e-5, atol=1e-6)


def test_no_batch_repeats_an_image(shapes, tmp_path, monkeypatch):
    """24 does not divide the 80 training images: batches stay inside an epoch instead of straddling two, where
    one image could come twice (and be its own negative)."""
    seen = []
    original = PairDataset.batch

    def spy(self, indices, position=None, part=(0, 1)):
        if position is not None:
            seen.append(list(indices))
        return original(self, indices, position, part)

    monkeypatch.setattr(PairDataset, "batch", spy)
    train(recipe(shapes, "stages.0.steps=10", "train.batch_size=24"), tmp_path / "run", **QUIET)
    assert len(seen) == 10  # 3 whole batches per epoch: 10 steps cross three epoch ends
    assert all(len(set(b)) == 24 for b in seen), [len(set(b)) for b in seen]
    for epoch in (seen[0:3], seen[3:6], seen[6:9]):  # within an epoch no image is drawn twice
        flat = [i for b in epoch for i in b]
        assert len(set(flat)) == 72


@pytest.mark.parametrize("preset", ["tiny-clip", "tiny-siglip"])
def test_resume_equals_uninterrupted(shapes, tmp_path, preset):
    # interrupted after step 5; the last checkpoint is at step 3, so resume replays steps 4-5 with the same
    # batches, captions and optimizer state; validation at steps 4 and 8 in both runs
    r = recipe(shapes, "stages.0.steps=8", "train.save_every=3", "train.eval_every=4", preset=preset)
    train(r, tmp_path / "full", **QUIET)
    train(r, tmp_path / "cut", **QUIET, stop_at_step=5)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    train(r, tmp_path / "cut", resume=True, **QUIET)
    a = load_file(tmp_path / "full" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")
    strip = [{k: v for k, v in x.items() if k not in ("elapsed", "samples_per_second")} for x in rows(tmp_path / "full")]
    again = [{k: v for k, v in x.items() if k not in ("elapsed", "samples_per_second")} for x in rows(tmp_path / "cut")]
    assert [x for x in strip if "val_loss" in x] == [x for x in again if "val_loss" in x]
    assert sum(x.get("event") == "data" for x in again) == 1  # the data event is not written twice


def test_lit_stage_keeps_every_vision_parameter(shapes, tmp_path):
    """Stage 0 trains everything; stage 1 is LiT's locked image tower (train: [text, logits])."""
    r = recipe(shapes, "stages.0.steps=3", "train.eval_every=2")
    lit = dataclasses.replace(r.stages[0], name="lit", train=["text", "logits"], steps=4)
    r = dataclasses.replace(r, stages=[r.stages[0], lit])
    r.validate()
    train(r, tmp_path / "run", **QUIET, stop_at_step=3)  # the checkpoint at the end of stage 0
    before = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    train(r, tmp_path / "run", resume=True, **QUIET)
    after = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    vision = [k for k in after if k.startswith("vision.")]
    text = [k for k in after if k.startswith("text.")]
    logits = [k for k in after if k.startswith("logits.")]
    assert vision and text and logits and len(vision) + len(text) + len(logits) == len(after), sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in vision), [k for k in vision
                                                                   if not torch.equal(before[k], after[k])]
    assert sum(not torch.equal(before[k], after[k]) for k in text) > len(text) // 2
    assert any(not torch.equal(before[k], after[k]) for k in logits)
    stages = [x for x in rows(tmp_path / "run") if x.get("event") == "stage"]
    table = {m["module"]: m["trainable"] for m in stages[-1]["modules"]}
    assert table == {"vision": False, "text": True, "logits": True}


@pytest.mark.slow
def test_lora_on_the_text_tower_trains_adapters_and_the_checkpoint_embeds(shapes, tmp_path):
    """LiT with LoRA: the image tower and the text tower's weights stay, the adapters and the temperature train."""
    r = recipe(shapes, "stages.0.steps=12", "stages.0.train=[lora, logits]", "lora.targets=['text.blocks.*.attn.*']",
               "lora.rank=4")
    train(r, tmp_path / "run", **QUIET)
    losses = [x["loss"] for x in rows(tmp_path / "run") if "loss" in x]
    assert sum(losses[-3:]) < sum(losses[:3])
    after = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    assert float(after["text.blocks.0.attn.q_proj.lora_B.weight"].abs().max()) > 0
    stage = next(x for x in rows(tmp_path / "run") if x.get("event") == "stage")
    assert {m["module"]: m["trainable"] for m in stage["modules"]} == {"vision": False, "text": False,
                                                                         "logits": True, "lora": True}
    pipe = vlmkit.load(tmp_path / "run" / "checkpoint")  # adapters merged into a plain dual encoder
    assert not any("lora" in k for k in pipe.model.state_dict())
    assert pipe.embed_texts(["a red circle."]).shape[0] == 1


@pytest.mark.parametrize("override, message", [
    ("train.grad_accum=2", r"train.grad_accum 2: a contrastive loss .* set grad_accum: 1"),
    ("stages.0.objective=lm", r"stages\[0\].objective: 'lm' .* is a dual encoder: set objective: contrastive"),
    ("stages.0.train=[lm]", r"names 'lm', which this model does not have; its modules: all, vision, text, logits"),
    ("stages.0.train=[vision, connector]", r"names 'connector', which this model does not have"),
    ("train.batch_size=81", r"train.batch_size 81 is larger than the 80 training images"),
])
def test_refusals_name_what_to_change(shapes, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train(recipe(shapes, "stages.0.steps=2", override), tmp_path / "run", **QUIET)
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_missing_image_fails_or_is_skipped_and_counted(shapes, tmp_path):
    lines = (shapes / "pairs_train.csv").read_text().splitlines()
    lines.insert(5, "images/nope.png,a red circle")  # line 6 of the file (the header is line 1)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    common = [f"data.train=[{bad}]", f"data.image_root={shapes}", "stages.0.steps=2"]
    with pytest.raises(DataError, match=r"row 6 of .*bad.csv: image file not found: .*nope.png .*column 'image'.*"
                                        r"--skip-bad-samples"):
        train(recipe(shapes, *common), tmp_path / "run", **QUIET)
    said = []
    res = train(recipe(shapes, *common, "data.skip_bad_samples=true"), tmp_path / "run", progress=False,
                log=said.append)
    assert res.steps == 2
    assert any("skipped 1 of 271 rows" in m and "nope.png" in m for m in said), said  # 241 train + 30 val rows
    data = next(x for x in rows(tmp_path / "run") if x.get("event") == "data")
    assert data["skipped_rows"] == 1 and data["captions"] == 240


@pytest.mark.slow
def test_the_builtin_recipe_pretrains_the_image_tower_then_trains_contrastively(shapes, tmp_path):
    """The built-in recipe's two stages: cell_labels on the image tower alone (ShapesWorld's scenes.json), then
    contrastive training; interrupted at the stage boundary and resumed, it ends bit-identical to one run."""
    over = [f"data.path={shapes}", *[o for o in TINY if not o.startswith("stages.")], "stages.0.steps=3",
            "stages.0.batch_size=16", "stages.1.steps=3", "train.save_every=1000"]
    r = load_recipe("tiny-clip", over)
    assert [s.objective for s in r.stages] == ["cell_labels", "contrastive"]
    train(r, tmp_path / "full", **QUIET)
    stages = [(x["stage"], "cell_accuracy" in x) for x in rows(tmp_path / "full") if "loss" in x]
    assert ("vision", True) in stages and stages[-1] == ("contrastive", False)
    train(r, tmp_path / "cut", **QUIET, stop_at_step=3)  # the checkpoint written at the end of stage 0
    assert json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())["stage"] == 1
    first = load_file(tmp_path / "cut" / "checkpoint" / "model.safetensors")
    train(r, tmp_path / "cut", resume=True, **QUIET)
    a = load_file(tmp_path / "full" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # stage 0 trains the image tower alone; stage 1 moves the text tower
    table = [x["modules"] for x in rows(tmp_path / "full") if x.get("event") == "stage"][0]
    assert {m["module"]: m["trainable"] for m in table} == {"vision": True, "text": False, "logits": False}
    assert any(not torch.equal(first[k], a[k]) for k in a if k.startswith("text."))
