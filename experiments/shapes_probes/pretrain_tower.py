"""Can a small CNN tower learn to see ShapesWorld objects, and does a tower that sees them help the VLM?

Stage 1 trains a conv tower alone on dense cell labels (per 8x8 cell: colour and shape of the object over
the cell centre, or none; two linear heads) and reports cell accuracy on the test images. With
``--vlm-steps N`` the tower then replaces the demo's ViT, frozen, and the demo's connector + LM train on
the questions for N steps (the demo's recipe otherwise). Prints checkpoints and one ``RESULT`` JSON line.

    python experiments/shapes_probes/pretrain_tower.py --data DIR [--norm bn|gn|none] [--lr 3e-3] \
        [--steps 200] [--vlm-steps 300] [--pos sincos2d] [model.lm.depth=2 ...]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common import GRID, answer_accuracy, cell_labels, scenes, train_vlm
from vlmkit.data.conversations import ConversationDataset, group_by_image, read_conversations
from vlmkit.nn.rope import sincos_2d
from vlmkit.processing.image import load_image
from vlmkit.train import loop as L
from vlmkit.train.optim import freeze_for_stage, lr_factor, make_optimizer
from vlmkit.train.recipe import StageConfig, load_recipe


class ConvTower(nn.Module):
    """(3x3 conv, norm, ReLU, 2x2 max pool) x 3, then a 3x3 conv: 64x64 image -> 8x8 grid of features."""

    def __init__(self, width: int, norm: str, pos: str = "none"):
        super().__init__()
        self.width, self.grid = width, (GRID, GRID)
        self.frozen = False  # frozen: BatchNorm keeps using its running statistics under model.train()

        def block(i, o):
            norms = {"bn": lambda: nn.BatchNorm2d(o), "gn": lambda: nn.GroupNorm(8, o), "none": nn.Identity}
            n = norms[norm]()
            return [nn.Conv2d(i, o, 3, padding=1), n, nn.ReLU()]

        self.net = nn.Sequential(*block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2),
                                 *block(64, width), nn.MaxPool2d(2), *block(width, width))
        # "sincos2d": fixed unit-scale 2D positions added to the output features (the LM's own rotary
        # positions are 1D and relative, so where a token sits in the image is otherwise only implicit)
        pe = sincos_2d(GRID, GRID, width)[None] if pos == "sincos2d" else torch.zeros(1, 1, width)
        self.register_buffer("pos", pe, persistent=False)

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(2).transpose(1, 2) + self.pos  # [B, 64, width]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--norm", choices=["bn", "gn", "none"], default="bn")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--vlm-steps", type=int, default=0)
    ap.add_argument("--pos", choices=["none", "sincos2d"], default="none",
                    help="fixed 2D positions added to the tower's features")
    ap.add_argument("--bs", type=int, default=32, help="VLM batch (the tower trains on 64 images a step)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("set", nargs="*", help="recipe overrides key=value")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    steps = max(1, a.vlm_steps)
    k = load_recipe("tiny-llava").stage_index("lm")
    recipe = load_recipe("tiny-llava", [f"data.path={a.data}", f"stages.{k}.steps={steps}"] + a.set)
    train = read_conversations(a.data / "train.json")
    tok = L.prepare_tokenizer(recipe, train, None)
    _, model, proc = L.build_for_recipe(recipe, tok)
    split = {"train": ([], []), "test": ([], [])}
    for sc in scenes(a.data):
        if sc["split"] in split:
            split[sc["split"]][0].append(proc.transform(load_image(a.data / sc["file_name"])))
            split[sc["split"]][1].append(cell_labels(sc))
    (xtr, ytr), (xte, yte) = [(torch.stack(x), torch.stack(y)) for x, y in split.values()]
    tower = ConvTower(model.encoder.width, a.norm, a.pos)
    head = nn.Linear(tower.width, 7 + 6)

    def loss_fn(x, y):
        o = head(tower(x))
        return (F.cross_entropy(o[..., :7].flatten(0, 1), y[:, 0].flatten())
                + F.cross_entropy(o[..., 7:].flatten(0, 1), y[:, 1].flatten()))

    @torch.no_grad()
    def cell_accuracy():
        tower.eval()
        o = head(tower(xte))
        tower.train()
        c, s = yte[:, 0].flatten(1), yte[:, 1].flatten(1)
        right = (o[..., :7].argmax(-1) == c) & (o[..., 7:].argmax(-1) == s)
        return round(right[c > 0].float().mean().item(), 3)

    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=a.lr, weight_decay=0.0)
    tower_stage = StageConfig(steps=a.steps, warmup=10 / a.steps)  # 10 warm-up steps, cosine to 0.1
    t0 = time.time()
    for s in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = a.lr * lr_factor(s, tower_stage)
        i = torch.randint(0, len(xtr), (64,))
        loss = loss_fn(xtr[i], ytr[i])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if (s + 1) % 50 == 0 or s + 1 == a.steps:
            print("tower", s + 1, round(loss.item(), 4), "cell accuracy", cell_accuracy(), flush=True)
    result = {"probe": "pretrain_tower", "args": vars(a),
              "tower_seconds": round(time.time() - t0), "cell_accuracy": cell_accuracy()}
    if a.vlm_steps:
        tower.frozen = True
        model.encoder = tower.eval()
        test = random.Random(a.seed).sample(read_conversations(a.data / "test.json"), 900)
        ds = ConversationDataset(group_by_image(train, 8, a.seed), proc)
        eds = ConversationDataset(test, proc)
        stage = recipe.stages[k]
        stage.train = ["connector", "lm"]
        freeze_for_stage(model, stage)
        opt = make_optimizer(model, stage)
        t0 = time.time()
        hist = train_vlm(model, opt, stage, ds, L.BatchStream(len(ds), a.bs, a.seed), tok.pad_id, a.vlm_steps,
                         lambda: answer_accuracy(model, eds, test, tok.pad_id))
        result.update(vlm_seconds=round(time.time() - t0), final=hist[-1])
    print("RESULT", json.dumps(result, default=str))


if __name__ == "__main__":
    main()
