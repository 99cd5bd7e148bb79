"""How fast does the demo's from-scratch LM learn ShapesWorld questions when the image features are perfect?

The vision tower is replaced by ideal symbolic features: for each of the 8x8 cells, learned embeddings of
the true colour and shape of the object there (from scenes.json) plus a learned position. Everything else
(connector, LM, recipe, turn grouping, optimiser, schedule) is the demo's. Prints accuracy checkpoints and
one ``RESULT`` JSON line.

    python experiments/shapes_probes/oracle_features.py --data DIR [--steps 300] [--eval-on train] \
        [stages.1.lr=3e-3 ...]

DIR is a ShapesWorld folder (``vlmkit data shapes --out DIR --n 4000``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import torch
from torch import nn

from common import GRID, answer_accuracy, cell_labels, lecun_init_lm, scenes, train_vlm
from vlmkit.data.conversations import ConversationDataset, group_by_image, read_conversations
from vlmkit.nn.rope import sincos_2d
from vlmkit.train import loop as L
from vlmkit.train.optim import freeze_for_stage, make_optimizer
from vlmkit.train.recipe import load_recipe


class OracleTower(nn.Module):
    """Cell ids -> [B, 64, width] features: colour embedding + shape embedding + position."""

    def __init__(self, width: int, pos: str = "learned"):
        super().__init__()
        self.width, self.grid = width, (GRID, GRID)
        self.color = nn.Embedding(7, width)  # N(0, 1) init: unit-scale features
        self.shape = nn.Embedding(6, width)
        if pos == "learned":  # as the tiny ViT's learned positions: std 0.02
            self.pos = nn.Parameter(torch.randn(GRID * GRID, width) * 0.02)
        else:  # fixed 2D sine-cosine, unit scale
            self.register_buffer("pos", sincos_2d(GRID, GRID, width) * 2**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x[:, 0, :GRID, :GRID].flatten(1).long()
        s = x[:, 1, :GRID, :GRID].flatten(1).long()
        return self.color(c) + self.shape(s) + self.pos


class OracleDataset(ConversationDataset):
    """Puts each image's cell ids where its pixels would go (channels 0-1, top-left 8x8)."""

    def __init__(self, samples, processor, ids: dict):
        super().__init__(samples, processor)
        self.ids = ids

    def _image(self, path, where):
        return self.ids[Path(path).resolve()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--group", type=int, default=8, help="questions per sequence, as the demo recipe")
    ap.add_argument("--eval-on", choices=["test", "train"], default="test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pre-data", type=Path,
                    help="curriculum: first train --pre-steps on this ShapesWorld folder")
    ap.add_argument("--pre-steps", type=int, default=0)
    ap.add_argument("--pos", choices=["learned", "sincos2d"], default="learned",
                    help="cell positions: learned (std 0.02, as the ViT) or fixed sine-cosine at unit scale")
    ap.add_argument("--lm-init", choices=["gpt2", "lecun"], default="gpt2",
                    help="gpt2: the build's std 0.02; lecun: std 1/sqrt(fan_in) (see common.lecun_init_lm)")
    ap.add_argument("--head-std", type=float, default=None,
                    help="re-initialise the (untied: model.lm.tie_embeddings=false) LM head with this std")
    ap.add_argument("set", nargs="*", help="recipe overrides key=value")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    k = load_recipe("tiny-llava").stage_index("lm")
    recipe = load_recipe("tiny-llava", [f"data.path={a.data}", f"stages.{k}.steps={a.steps}"] + a.set)
    train = read_conversations(a.data / "train.json")
    pool = train if a.eval_on == "train" else read_conversations(a.data / "test.json")
    evalset = random.Random(a.seed).sample(pool, min(900, len(pool)))
    tok = L.prepare_tokenizer(recipe, train, None)
    _, model, proc = L.build_for_recipe(recipe, tok)
    h, w = proc.cfg.image_size
    ids = {}
    for folder in [a.data] + ([a.pre_data] if a.pre_data else []):
        for sc in scenes(folder):
            x = torch.zeros(3, h, w)
            x[:2, :GRID, :GRID] = cell_labels(sc).float()
            ids[(folder / sc["file_name"]).resolve()] = x
    model.encoder = OracleTower(model.encoder.width, a.pos)
    if a.head_std is not None:
        if model.lm.lm_head.weight is model.lm.embed_tokens.weight:
            raise SystemExit("--head-std needs untied embeddings: add model.lm.tie_embeddings=false")
        torch.nn.init.normal_(model.lm.lm_head.weight, std=a.head_std)
    if a.lm_init == "lecun":
        lecun_init_lm(model.lm, len(model.lm.layers))
    ds = OracleDataset(group_by_image(train, a.group, a.seed) if a.group else train, proc, ids)
    eds = OracleDataset(evalset, proc, ids)
    stage = recipe.stages[k]
    freeze_for_stage(model, stage)
    t0 = time.time()
    if a.pre_data and a.pre_steps:
        pre = read_conversations(a.pre_data / "train.json")
        pds = OracleDataset(group_by_image(pre, a.group, a.seed) if a.group else pre, proc, ids)
        pre_stage = dataclasses.replace(stage, steps=a.pre_steps)
        print("curriculum stage on", a.pre_data, flush=True)
        train_vlm(model, make_optimizer(model, pre_stage), pre_stage, pds,
                  L.BatchStream(len(pds), a.bs, a.seed), tok.pad_id, a.pre_steps,
                  lambda: answer_accuracy(model, eds, evalset, tok.pad_id), evals=2)
    opt = make_optimizer(model, stage)
    stream = L.BatchStream(len(ds), a.bs, a.seed)
    hist = train_vlm(model, opt, stage, ds, stream, tok.pad_id, a.steps,
                     lambda: answer_accuracy(model, eds, evalset, tok.pad_id))
    print("RESULT", json.dumps({"probe": "oracle_features", "args": vars(a),
                                "seconds": round(time.time() - t0), "final": hist[-1]}, default=str))


if __name__ == "__main__":
    main()
