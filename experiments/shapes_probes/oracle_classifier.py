"""How fast can a small causal transformer learn ShapesWorld's questions at all, given perfect image features?

The ceiling for the demo's language side, without its chat template or vocabulary: each question is one
sequence [16 image tokens; question words], the image tokens built from ideal per-cell features (learned
colour and shape embeddings of the object over each of the 8x8 cells plus a position embedding, 2x2 cells
concatenated and projected, as a pixel-shuffle connector would), and the answer is a class read at the last
question token. Options swap pieces towards vlmkit's (its decoder, its embedding scale, a tied-vocabulary
head) to find what slows the real model down. Prints accuracy checkpoints on 900 test questions and one
``RESULT`` JSON line.

    python experiments/shapes_probes/oracle_classifier.py --data DIR [--steps 1500] [--width 128] \
        [--lm torch|vlmkit] [--pos-std 1.0] [--emb-std 0.02] [--head linear|tied]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from torch import nn

from common import GRID, cell_labels, scenes


def load(data: Path, split: str) -> list[tuple[Path, str, str, str]]:
    rows = json.loads((data / f"{split}.json").read_text())
    return [((data / r["image"]).resolve(), r["conversations"][0]["value"].replace("<image>", "").strip(),
             r["conversations"][1]["value"], r["type"]) for r in rows]


def words(question: str) -> list[str]:
    return question.lower().replace("?", " ?").split()


class Probe(nn.Module):
    def __init__(self, a, n_words: int, n_answers: int, max_len: int):
        super().__init__()
        d, self.a, self.n_words = a.width, a, n_words
        self.color, self.shape = nn.Embedding(7, 64), nn.Embedding(6, 64)
        self.pos = nn.Parameter(torch.randn(GRID * GRID, 64) * a.pos_std)
        self.proj = nn.Sequential(nn.Linear(256, d), nn.GELU(), nn.Linear(d, d))
        # answers get their own ids after the question words, so a tied head never sees them as inputs
        self.embed = nn.Embedding(n_words + n_answers, d)
        nn.init.normal_(self.embed.weight, std=a.emb_std)
        self.tpos = nn.Parameter(torch.randn(16 + max_len, d) * 0.02) if a.tpos else None
        if a.lm == "vlmkit":
            from vlmkit.config import LanguageConfig
            from vlmkit.lm.decoder import DecoderLM
            from vlmkit.nn import init_linear_

            self.body = DecoderLM(LanguageConfig(vocab_size=8, width=d, depth=a.depth, heads=4, kv_heads=2,
                                                 mlp_dim=3 * d))
            init_linear_(self.body)
            with torch.no_grad():
                for block in self.body.layers:
                    for lin in (block.attn.o_proj, block.mlp.down_proj):
                        lin.weight.mul_((2 * a.depth) ** -0.5)
        else:
            layer = nn.TransformerEncoderLayer(d, 4, 3 * d, dropout=0.0, batch_first=True, norm_first=True)
            self.body = nn.TransformerEncoder(layer, a.depth, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_answers)

    def forward(self, cells: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        b = cells.shape[0]
        f = self.color(cells[:, 0].flatten(1)) + self.shape(cells[:, 1].flatten(1)) + self.pos  # [B, 64, 64]
        f = f.view(b, 4, 2, 4, 2, 64).permute(0, 1, 3, 2, 4, 5).reshape(b, 16, 256)  # 2x2 cells per token
        x = torch.cat([self.proj(f), self.embed(q)], 1)
        if self.tpos is not None:
            x = x + self.tpos
        if self.a.lm == "vlmkit":
            h = self.body(x)
        else:
            mask = torch.triu(torch.full((x.shape[1],) * 2, float("-inf")), 1)
            h = self.norm(self.body(x, mask=mask))
        h = h[torch.arange(b), 16 + (q > 0).sum(1) - 1]  # the last question token
        return h @ self.embed.weight[self.n_words:].T if self.a.head == "tied" else self.head(h)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--bs", type=int, default=256)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lm", choices=["torch", "vlmkit"], default="torch",
                    help="torch: nn.TransformerEncoder (LayerNorm, ReLU); vlmkit: its decoder and GPT-2 init")
    ap.add_argument("--pos-std", type=float, default=1.0, help="std of the learned cell positions")
    ap.add_argument("--emb-std", type=float, default=0.02, help="std of the word embeddings")
    ap.add_argument("--tpos", type=int, default=0, help="1: learned absolute positions on every token")
    ap.add_argument("--head", choices=["linear", "tied"], default="linear",
                    help="linear: nn.Linear over the answers; tied: the answers' word embeddings")
    ap.add_argument("--evals", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    cells = {(a.data / sc["file_name"]).resolve(): cell_labels(sc) for sc in scenes(a.data)}
    train, test = load(a.data, "train"), random.Random(a.seed).sample(load(a.data, "test"), 900)
    vocab = {w: i + 1 for i, w in enumerate(sorted({w for _, q, _, _ in train + test for w in words(q)}))}
    answers = {x: i for i, x in enumerate(sorted({ans for _, _, ans, _ in train + test}))}
    max_len = max(len(words(q)) for _, q, _, _ in train + test)

    def encode(rows):
        q = torch.zeros(len(rows), max_len, dtype=torch.long)
        for i, (_, question, _, _) in enumerate(rows):
            ids = [vocab[w] for w in words(question)]
            q[i, : len(ids)] = torch.tensor(ids)
        return torch.stack([cells[p] for p, *_ in rows]), q, torch.tensor([answers[r[2]] for r in rows])

    model = Probe(a, len(vocab) + 1, len(answers), max_len)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    tc, tq, ty = encode(test)
    hist, t0 = [], time.time()
    for step in range(a.steps):
        warm = min(1.0, (step + 1) / 15)
        for g in opt.param_groups:  # 15 warm-up steps, then cosine to 0.1
            g["lr"] = a.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        c, q, y = encode(random.Random(a.seed * 100_003 + step).sample(train, a.bs))
        loss = nn.functional.cross_entropy(model(c, q), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if (step + 1) % max(1, a.steps // a.evals) == 0 or step + 1 == a.steps:
            with torch.no_grad():
                ok = (model(tc, tq).argmax(-1) == ty).tolist()
            per: dict[str, list[int]] = {}
            for o, (*_, t) in zip(ok, test):
                per.setdefault(t, []).append(o)
            hist.append((step + 1, round(float(loss), 3), round(sum(ok) / len(ok), 3),
                         {k: round(sum(v) / len(v), 2) for k, v in sorted(per.items())}))
            print(*hist[-1], f"{time.time() - t0:.0f}s", flush=True)
    print("RESULT", json.dumps({"probe": "oracle_classifier", "args": vars(a), "seconds": round(time.time() - t0),
                                "final": hist[-1]}, default=str))


if __name__ == "__main__":
    main()
