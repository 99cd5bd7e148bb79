"""The tiny-vq recipe to its bar: `vlmkit train tiny-vq` on 2000 ShapesWorld scenes at 64 px, then the validation
PSNR and codebook usage it logged, and how much of the originals' scene the fixed ShapesWorld parser of
``shapes_t2i`` reads in the reconstructions (the issue's bar: >= 0.95 of the judged attributes). One JSON line.

    python bench/vq.py [--n 2000] [--threads 2] [--steps N] [--set KEY=VALUE] [--images 200] [--figure PNG] [--out DIR]

About 8 minutes on one core of these machines (docs/generation.md quotes a run).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import vlmkit
from vlmkit.data.shapes import generate_shapes
from vlmkit.eval.judge.parser import agreement, load_parser, parse_images
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="ShapesWorld scenes (80/10/10 train/val/test)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, help="override the recipe's steps (stages.0.steps)")
    ap.add_argument("--set", action="append", default=[], help="more recipe overrides, KEY=VALUE")
    ap.add_argument("--figure", help="write the first 8 test images (top) and their reconstructions (bottom) here")
    ap.add_argument("--images", type=int, default=200, help="test images the judge compares")
    ap.add_argument("--out", help="keep the data and the run here (the trained tokenizer: OUT/run/checkpoint), e.g. for "
                                  "a tiny-janus recipe's model.vq_from; default: a temporary folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        if not (root / "shapes" / "pairs_train.csv").is_file():  # a kept --out folder's scenes are reused
            generate_shapes(root / "shapes", n=args.n, seed=0, size=64, progress=False)
        overrides = [f"data.path={root / 'shapes'}", *args.set] + ([f"stages.0.steps={args.steps}"] if args.steps else [])
        t0 = time.perf_counter()
        res = train(load_recipe("tiny-vq", overrides), root / "run", progress=True, log=lambda m: None)
        seconds = time.perf_counter() - t0
        rows = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
        val = [r for r in rows if "val_psnr" in r][-1]
        images = sorted((root / "shapes" / "images").glob("*.png"))[-args.images:]  # the test split's
        pipe = vlmkit.load(res.checkpoint)
        originals = [Image.open(p).convert("RGB") for p in images]
        recon = pipe.decode_codes(pipe.encode_codes(originals))
        pictures = [_to_image(x) for x in recon]
        if args.figure:
            _figure(originals[:8], pictures[:8], args.figure)
        parser = load_parser()
        agree = sum(agreement(a, b) for a, b in zip(parse_images(originals, parser), parse_images(pictures, parser)))
    print(json.dumps({"bench": "vq", "config": vars(args), "train_seconds": round(seconds, 1),
                      "val_psnr": val["val_psnr"], "val_codebook_usage": val["val_codebook_usage"],
                      "judge_agreement": round(agree / len(images), 4)}))


def _figure(top: list, bottom: list, path: str, scale: int = 2) -> None:
    """Two rows of images, 4 px apart, each image ``scale`` x its size, as a PNG at ``path``."""
    w, h = top[0].width * scale, top[0].height * scale
    sheet = Image.new("RGB", (len(top) * (w + 4) - 4, 2 * h + 4), (255, 255, 255))
    for row, images in enumerate((top, bottom)):
        for i, im in enumerate(images):
            sheet.paste(im.resize((w, h), Image.NEAREST), (i * (w + 4), row * (h + 4)))
    sheet.save(path)


def _to_image(x: torch.Tensor):
    """A decoder output in [-1, 1] (the family's normalisation) -> a PIL image."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


if __name__ == "__main__":
    main()
