"""The connector presets' recipes (tiny-llava with LDP, C-Abstractor, average or attention pooling) learn in a
short run: the answers' loss falls, and the checkpoint answers with 16 tokens per image. How well they learn
at full length is measured by bench/presets.py (docs/connectors.md), not here."""

from __future__ import annotations

import json

import pytest

import vlmkit
from vlmkit.data.conversations import read_conversations
from vlmkit.data.shapes import generate_shapes
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("single_thread")

KINDS = {"tiny-llava-ldp": "ldp", "tiny-llava-ldpv2": "ldp_v2", "tiny-llava-cabs": "c_abstractor",
         "tiny-llava-avgpool": "avg_pool", "tiny-llava-attnpool": "attn_pool"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    generate_shapes(out, n=48, seed=4, size=64, progress=False)
    return out


@pytest.mark.parametrize("name", sorted(KINDS))
def test_connector_recipe_learns_in_a_short_run(shapes, tmp_path, name):
    recipe = load_recipe(name, [f"data.path={shapes}", "train.batch_size=8", "train.log_every=1",
                                "data.val_samples=8", "stages.0.steps=20", "stages.0.batch_size=16",
                                "stages.1.steps=30", "stages.1.warmup=0.1"])
    assert recipe.preset == name
    train(recipe, tmp_path / "run", progress=False, log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in rows if "loss" in x and x.get("stage") == "instruct"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    pipe = vlmkit.load(tmp_path / "run" / "checkpoint")
    assert pipe.config.connector.kind == KINDS[name] and pipe.processor.cfg.image_seq_len == 16
    single = read_conversations(shapes / "test.json")[0]
    assert isinstance(pipe.chat(single.images, single.conversations[0]["value"], max_new_tokens=4), str)
