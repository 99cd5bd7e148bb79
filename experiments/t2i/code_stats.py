"""How learnable a VQ tokenizer's codes are for an LM that writes them (docs/generation.md, "Why a patch encoder"):
the distinct codes of one flat image per ShapesWorld background, and over the codes of the first N text-to-image
training pairs the unigram entropy, the ten most frequent codes' share and the plug-in entropy of a code given its
four causal neighbours (left, up, up-left, up-right; a lower bound: contexts seen once count as certain).

    python experiments/t2i/code_stats.py --vq runs/tiny-vq/checkpoint --data shapes [--pairs 2000]
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import tempfile
from pathlib import Path

import torch
from PIL import Image

import vlmkit
from vlmkit.data.shapes.scenes import BACKGROUNDS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vq", required=True, help="a VQ tokenizer's checkpoint")
    ap.add_argument("--data", required=True, help="a ShapesWorld folder with t2i_pairs_train.csv")
    ap.add_argument("--pairs", type=int, default=2000)
    args = ap.parse_args()
    pipe = vlmkit.load(args.vq)
    flat = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, rgb in BACKGROUNDS.items():
            path = Path(tmp) / "flat.png"
            Image.new("RGB", pipe.model.cfg.image_size[::-1], rgb).save(path)
            flat[name] = int(pipe.encode_codes([str(path)]).unique().numel())
    root = Path(args.data)
    with open(root / "t2i_pairs_train.csv", newline="") as f:
        paths = [str(root / r["image"]) for r in csv.DictReader(f)][:args.pairs]
    codes = torch.cat([pipe.encode_codes(paths[i:i + 200]) for i in range(0, len(paths), 200)])
    counts = torch.bincount(codes.flatten()).float()
    p = counts[counts > 0] / counts.sum()
    top10 = float(counts.sort(descending=True).values[:10].sum() / counts.sum())
    n, h, w = codes.shape
    pad = torch.full((n, h + 1, w + 2), -1, dtype=torch.long)  # -1: outside the image
    pad[:, 1:, 1:-1] = codes
    context = collections.defaultdict(collections.Counter)
    for k in range(n):
        g = pad[k].tolist()
        for i in range(h):
            for j in range(w):
                context[(g[i + 1][j], g[i][j + 1], g[i][j], g[i][j + 2])][g[i + 1][j + 1]] += 1
    total = sum(sum(c.values()) for c in context.values())
    cond = -sum(v * math.log(v / sum(c.values())) for c in context.values() for v in c.values()) / total
    print("RESULT", json.dumps({"config": vars(args), "flat_image_codes": flat,
                                "unigram_entropy": round(float(-(p * p.log()).sum()), 3), "top10_share": round(top10, 3),
                                "conditional_entropy_4_neighbours": round(cond, 3), "contexts": len(context)}))


if __name__ == "__main__":
    main()
