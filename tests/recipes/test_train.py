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


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run, stage: str = "instruct") -> list[float]:
    return [r["loss"] for r in rows(run) if "loss" in r and r["stage"] == stage]


@pytest.mark.slow
def test_loss_goes_down(shapes, tmp_path):
    r = recipe(shapes, "stages.0.steps=2", "stages.1.steps=45", "stages.1.lr=3e-3")
    res = train(r, tmp_path / "run", progress=False, log=lambda m: None)
    ls = losses(tmp_path / "run")
    assert len(ls) == 45
    first, last = sum(ls[:3]) / 3, sum(ls[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert res.val_loss is not None and res.val_loss < first


@pytest.mark.slow
def test_cell_label_stage_teaches_the_tower(tmp_path):
    data = tmp_path / "shapes64"
    generate_shapes(data, n=200, seed=2, size=64, progress=False)
    r = recipe(data, "model.vision.image_size=[64, 64]", "model.vision.width=64", "stages.0.steps=80",
               "stages.0.batch_size=32", "stages.1.steps=1")
    train(r, tmp_path / "run", progress=False, log=lambda m: None)
    # fraction of object cells (training batches) with both colour and shape right: ~0 at the start
    acc = [x["cell_accuracy"] for x in rows(tmp_path / "run") if "cell_accuracy" in x]
    assert len(acc) == 8 and acc[0] < 0.1 and acc[-1] > 0.4, acc
    held_out = [x["val_cell_accuracy"] for x in rows(tmp_path / "run") if "val_cell_accuracy" in x]
    assert len(held_out) == 1 and held_out[0] > 0.3, held_out  # the validation images, BatchNorm in eval mode
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").exists()


def test_a_cell_label_stage_trains_what_sees_images_alone(tmp_path):
    # refused before any data is read (the data path does not exist)
    r = load_recipe("tiny-llava", [f"data.path={tmp_path / 'nowhere'}", "stages.0.train=[vision, lm]"])
    with pytest.raises(ConfigError, match=r"stages\[0\]: the cell_labels objective trains what sees an image before "
                                          r"the LM reads it, alone \(llava: vision\); set train: \['vision'\]"):
        train(r, tmp_path / "run", progress=False, log=lambda m: None)
    # an encoder-free family's groups, in any order, pass the check; one of them alone does not
    from vlmkit.objectives.cell_labels import CellLabelsObjective

    CellLabelsObjective.check_recipe(load_recipe("tiny-fuyu", ["stages.0.train=[lm, connector]"]))
    with pytest.raises(ConfigError, match=r"\(fuyu: connector, lm\)"):
        CellLabelsObjective.check_recipe(load_recipe("tiny-fuyu", ["stages.0.train=[lm]"]))


def test_cell_label_stage_needs_scene_annotations(shapes, tmp_path):
    data = tmp_path / "noscenes"
    data.mkdir()
    for name in ("train.json", "val.json"):
        (data / name).write_text((shapes / name).read_text())
    r = recipe(shapes, f"data.path={data}", f"data.image_root={shapes}", "stages.0.steps=1", "stages.1.steps=1")
    with pytest.raises(ConfigError, match=r"cell_labels objective needs .*noscenes/scenes\.json"):
        train(r, tmp_path / "run", progress=False, log=lambda m: None)


@pytest.mark.parametrize("tower", [[], ["model.vision.arch=vit", "model.vision.pos_embed=learned",
                                        "model.vision.pos_scale=1", "model.vision.stem=conv",
                                        "model.vision.stem_norm=batch"]],
                         ids=["cnn", "vit-batchnorm-stem"])
def test_stage_freezing_keeps_vision_fixed(shapes, tmp_path, tower):
    # a BatchNorm tower frozen in stage 1 must also keep its running statistics (eval mode), including across
    # the periodic validation (eval_every=2), which switches the model to eval and back
    r = recipe(shapes, "stages.0.steps=3", "stages.1.steps=4", "train.save_every=3", "train.eval_every=2", *tower)
    train(r, tmp_path / "run", progress=False, log=lambda m: None, stop_at_step=3)
    after_stage0 = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    train(r, tmp_path / "run", resume=True, progress=False, log=lambda m: None)
    final = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    vision = [k for k in final if k.startswith("encoder.")]
    lm = [k for k in final if k.startswith("lm.layers.")]
    assert vision and all(torch.equal(after_stage0[k], final[k]) for k in vision)  # frozen in stage 2
    assert any(not torch.equal(after_stage0[k], final[k]) for k in lm)  # trained in stage 2


# mid-way through the tower stage (never checkpointed: resume starts over), just after it, and late in stage 1;
# with the frozen tower's features precomputed (recomputed on resume) and with Muon's state to restore
@pytest.mark.parametrize("stop, saved, extra", [
    (2, None, []), (5, 3, []), (10, 9, []),
    (8, 6, ["train.precompute_frozen_vision=true", "stages.1.optimizer=muon"]),
])
def test_resume_equals_uninterrupted(shapes, tmp_path, stop, saved, extra):
    r = recipe(shapes, "stages.0.steps=3", "stages.1.steps=8", "train.save_every=3", *extra)
    train(r, tmp_path / "full", progress=False, log=lambda m: None)
    # interrupted after step `stop`; the last checkpoint is at step `saved`, so resume replays the rest
    train(r, tmp_path / "cut", progress=False, log=lambda m: None, stop_at_step=stop)
    state_file = tmp_path / "cut" / "checkpoint" / "trainer_state.json"
    assert (json.loads(state_file.read_text())["global_step"] if saved else state_file.exists()) == (saved or False)
    train(r, tmp_path / "cut", resume=True, progress=False, log=lambda m: None)
    a = load_file(tmp_path / "full" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")
    assert losses(tmp_path / "full", "vision") == losses(tmp_path / "cut", "vision")
    # the log is cut back to the resumed step: each stage's event once, as in the uninterrupted run
    events = [[r for r in rows(tmp_path / run) if r.get("event") == "stage"] for run in ("full", "cut")]
    assert events[0] == events[1] and [e["stage"] for e in events[1]] == ["vision", "instruct"]


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(shapes, tmp_path):
    r = recipe(shapes, "stages.0.steps=1", "stages.1.steps=2")
    train(r, tmp_path / "run", progress=False, log=lambda m: None)
    kept = {f: (tmp_path / "run" / f).read_bytes() for f in ("metrics.jsonl", "checkpoint/model.safetensors")}
    with pytest.raises(ConfigError, match=r"already holds a run .*--resume to continue it, or --overwrite"):
        train(r, tmp_path / "run", progress=False, log=lambda m: None)
    assert kept == {f: (tmp_path / "run" / f).read_bytes() for f in kept}  # nothing lost
    longer = recipe(shapes, "stages.0.steps=1", "stages.1.steps=3")
    res = train(longer, tmp_path / "run", overwrite=True, progress=False, log=lambda m: None)
    assert res.steps == 4 and [r["step"] for r in rows(tmp_path / "run") if r.get("event") == "run"] == [0]


def test_a_validation_file_that_does_not_exist_is_an_error(shapes, tmp_path):
    r = recipe(shapes, "data.val=nope.json", "stages.0.steps=1", "stages.1.steps=1")
    with pytest.raises(ConfigError, match=r"data\.val: .*nope\.json does not exist"):
        train(r, tmp_path / "run", progress=False, log=lambda m: None)


def test_the_start_says_how_many_threads_each_process_uses(shapes, tmp_path):
    lines, threads = [], torch.get_num_threads()
    try:
        train(recipe(shapes, "stages.0.steps=1", "stages.1.steps=1", "train.threads=1"), tmp_path / "run",
              progress=False, log=lines.append)
    finally:
        torch.set_num_threads(threads)  # train.threads sets the process's count
    assert any(line.endswith("; 1 thread") for line in lines), lines[:3]
    assert next(r for r in rows(tmp_path / "run") if r.get("event") == "run")["threads"] == 1


@pytest.mark.slow
def test_precomputed_frozen_vision_trains_as_the_tower_would(shapes, tmp_path):
    common = ["stages.0.steps=2", "stages.1.steps=6", "train.eval_every=3"]
    train(recipe(shapes, *common), tmp_path / "live", progress=False, log=lambda m: None)
    said = []
    train(recipe(shapes, *common, "train.precompute_frozen_vision=true"), tmp_path / "pre", progress=False,
          log=said.append)
    assert any("vision features of 48 images precomputed" in m for m in said), said  # the train split
    # same computation, tower run in other batch groupings: equal up to float rounding
    assert losses(tmp_path / "pre") == pytest.approx(losses(tmp_path / "live"), rel=1e-4)
    val = [[r["val_loss"] for r in rows(tmp_path / run) if "val_loss" in r] for run in ("live", "pre")]
    assert len(val[0]) == 3 and val[1] == pytest.approx(val[0], rel=1e-4)
    a = load_file(tmp_path / "live" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "pre" / "checkpoint" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


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
