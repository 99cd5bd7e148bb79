"""The README's own-data CLIP recipe, run as written on real images: how long it takes and what its validation
says. One JSON line.

    python bench/own_clip.py [--steps 2000] [--out DIR] [--threads N]     # needs scikit-learn

The data is scikit-learn's handwritten digits (1,797 real 8x8 scans, upscaled to 64x64 PNGs), written the way a
user brings their own: ``train.csv`` / ``val.csv`` of (filepath, title) pairs with class-like captions ("a
handwritten digit three.": every image of a class shares its caption) and an ImageFolder of
held-out digits (one folder per class, ``classes.json`` naming them) for zero-shot classification. The recipe is
the README's ``my-clip.yaml``: ``tiny-clip``, batch 128, one contrastive stage of ``--steps`` steps, lr 1e-3
(``--threads``: torch threads, 0 for its default; scikit-learn: ``pip install scikit-learn``).

Printed: training seconds, steps per second and threads; the last validation row (``val_image_to_text_recall@1``,
which class-like captions keep near 1 / images-per-caption however well the model learns, and
``val_distinct_caption_recall@1``, the recall among the distinct captions, which follows learning); and the
zero-shot top-1 on the held-out folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION = "a handwritten digit {name}."
RECIPE = """preset: tiny-clip
data: {{path: {data}, train: [train.csv], val: val.csv, csv_image_key: filepath, csv_caption_key: title}}
train: {{batch_size: 128, threads: {threads}}}
stages:
  - {{name: contrastive, objective: contrastive, steps: {steps}, lr: 1.0e-3, warmup: 0.1}}
"""


def write_digits(root: Path, seed: int = 0) -> None:
    """train.csv / val.csv pairs (70 % / 15 % of the images) and an ImageFolder of the other 15 %."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = list(range(len(digits.images)))
    random.Random(seed).shuffle(order)
    n = len(order)
    splits = {"train": order[: int(0.7 * n)], "val": order[int(0.7 * n): int(0.85 * n)], "test": order[int(0.85 * n):]}
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in order:
        pixels = (255 - digits.images[i] * 255 / 16).astype(np.uint8)  # dark ink on white, as scanned
        Image.fromarray(pixels).resize((64, 64), Image.BICUBIC).convert("RGB").save(root / "images" / f"{i:04d}.png")
    for split in ("train", "val"):
        with (root / f"{split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filepath", "title"])
            for i in splits[split]:
                d = int(digits.target[i])
                w.writerow([f"images/{i:04d}.png", CAPTION.format(name=NAMES[d])])
    test = root / "test"
    for i in splits["test"]:
        d = int(digits.target[i])
        (test / str(d)).mkdir(parents=True, exist_ok=True)
        Image.open(root / "images" / f"{i:04d}.png").save(test / str(d) / f"{i:04d}.png")
    classes = {"classes": {str(d): f"digit {NAMES[d]}" for d in range(10)},
               "templates": ["a handwritten {}.", "the {}."]}
    (test / "classes.json").write_text(json.dumps(classes))


def main() -> None:
    from vlmkit.eval.runner import run_eval
    from vlmkit.train.loop import train
    from vlmkit.train.recipe import load_recipe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", help="working folder (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="own-clip-"))
    data = root / "data"
    if not (data / "train.csv").exists():
        write_digits(data)
    (root / "my-clip.yaml").write_text(RECIPE.format(data=data, steps=args.steps, threads=args.threads))
    t0 = time.perf_counter()
    res = train(load_recipe(str(root / "my-clip.yaml")), root / "run", overwrite=True, progress=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r][-1]
    zs = run_eval(res.checkpoint, ["zero_shot_classification"], data / "test", root / "eval" / "results.json",
                  progress=False)
    task = zs["tasks"]["zero_shot_classification"]
    print(json.dumps({
        "bench": "own_clip", "steps": args.steps, "train_seconds": round(res.train_seconds, 1),
        "wall_seconds": round(wall, 1), "steps_per_second": round(args.steps / res.train_seconds, 3),
        "threads": torch.get_num_threads(), "val_image_to_text_recall@1": val["val_image_to_text_recall@1"],
        "val_distinct_caption_recall@1": val["val_distinct_caption_recall@1"],
        "val_n_distinct_captions": val["val_n_distinct_captions"], "val_n_images": val["val_n_images"],
        "zero_shot": task["metrics"], "test_images": task["n"]}))


if __name__ == "__main__":
    main()
