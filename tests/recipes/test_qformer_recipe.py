"""BLIP-2's stage 1 as a recipe stage: a Q-Former connector learns ITC + ITM + ITG on ShapesWorld's captions with
the tower frozen, then the LM stage reads its queries; what the stage cannot train is refused by name."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

import vlmkit
from vlmkit.data.shapes import generate_shapes
from vlmkit.errors import ConfigError
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["model.vision.image_size=[32, 32]", "model.vision.patch_size=8", "model.vision.width=32",
        "model.lm.width=64", "model.lm.depth=2", "model.lm.heads=4", "model.lm.kv_heads=2", "model.lm.mlp_dim=128",
        "train.batch_size=8", "train.log_every=1", "train.eval_every=1000", "data.val_samples=16",
        "model.connector.kind=qformer"]
QFORMER = {"width": 32, "depth": 2, "heads": 4, "mlp_dim": 64, "num_query_tokens": 4, "vocab_size": 1,
           "embed_dim": 16, "cross_attention_frequency": 1, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    generate_shapes(out, n=120, seed=1, size=32, progress=False)
    return out


def recipe(shapes, stages, qformer=QFORMER):
    return load_recipe("tiny-llava", [f"data.path={shapes}", *TINY, f"model.connector.qformer={json.dumps(qformer)}",
                                      f"stages={json.dumps(stages)}"])


@pytest.mark.slow
def test_stage_one_learns_then_the_lm_reads_the_queries(shapes, tmp_path):
    stages = [{"name": "qformer", "objective": "qformer", "train": ["connector"], "steps": 40, "lr": 3e-3,
               "batch_size": 16},
              {"name": "instruct", "train": ["connector", "lm"], "steps": 3}]
    train(recipe(shapes, stages), tmp_path / "run", progress=False, log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stage1 = [r for r in rows if "itc" in r]
    assert len(stage1) == 4 and all(r["stage"] == "qformer" for r in stage1)
    assert stage1[-1]["itg"] < 0.7 * stage1[0]["itg"]  # captioning from the queries is learnt first
    assert any("val_itc_accuracy" in r for r in rows)
    # the Q-Former's vocabulary followed the recipe's tokenizer; the heads are saved with the model
    pipe = vlmkit.load(tmp_path / "run" / "checkpoint")
    assert pipe.model.connector.cfg.vocab_size == pipe.processor.tokenizer.vocab_size
    assert "heads.itm_head.weight" in dict(pipe.model.connector.named_parameters())
    image = Image.new("RGB", (32, 32), "grey")
    assert all(map(math.isfinite, pipe.score(image, "<image>\nWhat colour is the circle?", "red")))


def test_what_a_qformer_stage_cannot_train_is_refused(shapes, tmp_path):
    with pytest.raises(ConfigError, match=r"the qformer objective trains connector alone.*set train: \['connector'\]"):
        recipe(shapes, [{"name": "q", "objective": "qformer", "train": ["connector", "lm"], "steps": 1}])
    no_heads = dict(QFORMER, embed_dim=0)
    r = recipe(shapes, [{"name": "q", "objective": "qformer", "train": ["connector"], "steps": 1}], no_heads)
    with pytest.raises(ConfigError, match="qformer.embed_dim > 0"):
        train(r, tmp_path / "run", progress=False, log=lambda m: None)
