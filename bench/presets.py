"""The tiny presets side by side on ShapesWorld: each trained with its own recipe on the same data, then asked the
held-out questions (test.json; with ``--multi`` also the multi-image ones, multi_test.json). One JSON line per
recipe: accuracy overall and per question type, parameters, LM positions per image, training seconds, and the
recipe's overrides; the table in docs/fusion.md is built from these lines.

    python bench/presets.py tiny-llava tiny-blip2 tiny-instructblip tiny-flamingo tiny-mllama \\
        [--data DIR] [--out DIR] [--multi] [--set K=V ...]

``--data`` is a ShapesWorld folder (default: generated with the demo's 20,000 images, seed 0, into
``OUT/data``). Progress bars and the training log go to stderr, the JSON lines to stdout. Runs are sequential in one process, so their training times compare; they take minutes each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vlmkit.data.conversations import read_conversations
from vlmkit.data.shapes import generate_shapes
from vlmkit.demo import DEMO_IMAGES
from vlmkit.eval.vqa import evaluate_vqa
from vlmkit.models import count_parameters
from vlmkit.pipeline import Pipeline
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe


def lm_positions_per_image(pipe) -> int:
    """What one image costs the LM's sequence: its spliced tokens, or 1 placeholder for cross-attention models."""
    return int(pipe.processor.cfg.image_seq_len)


def visual_tokens(pipe) -> int:
    """Image tokens the LM reads per image (spliced, or attended to through cross-attention)."""
    model = pipe.model
    encoder = getattr(model, "encoder", None)
    if encoder is None:  # no image tower (Fuyu): the rows of one 64x64 scene's encoded patches
        from PIL import Image

        media = pipe.processor.prepare_images([Image.new("RGB", (64, 64), "white")])
        return int(model.encode_media(media).split()[0].values.shape[0])
    n = getattr(encoder, "num_tokens", 0)
    connector = getattr(model, "connector", None)
    if connector is not None and hasattr(connector, "num_tokens"):
        return int(connector.num_tokens(n, getattr(encoder, "grid", None)))
    return int(n)


def run(name: str, data: Path, out: Path, overrides: list[str], multi: bool) -> dict:
    recipe = load_recipe(name, [f"data.path={data}", *overrides])
    t0 = time.perf_counter()
    result = train(recipe, out / recipe.name, overwrite=True, progress=True, log=lambda m: print(m, file=sys.stderr))
    wall = time.perf_counter() - t0
    pipe = Pipeline.from_pretrained(result.checkpoint)
    single = evaluate_vqa(pipe, read_conversations(data / "test.json"), progress=True)
    row = {"recipe": name, "preset": recipe.preset, "family": pipe.config.family, "vqa_accuracy": single["vqa_accuracy"], "by_type": single["by_type"],
           "parameters": count_parameters(pipe.model), "visual_tokens_per_image": visual_tokens(pipe),
           "lm_positions_per_image": lm_positions_per_image(pipe), "train_seconds": result.train_seconds,
           "wall_seconds": wall, "steps": result.steps, "threads": torch.get_num_threads(), "overrides": overrides}
    if multi:
        ev = evaluate_vqa(pipe, read_conversations(data / "multi_test.json"), progress=True)
        row |= {"multi_accuracy": ev["vqa_accuracy"], "multi_by_type": ev["by_type"]}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--data", type=Path)
    ap.add_argument("--out", type=Path, default=Path("bench-presets"))
    ap.add_argument("--multi", action="store_true", help="also evaluate multi_test.json (multi-image questions)")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="K=V")
    args = ap.parse_args()
    data = args.data or args.out / "data"
    if not (data / "meta.json").exists():
        generate_shapes(data, n=DEMO_IMAGES, seed=0, progress=False)
    for name in args.recipes:
        print(json.dumps(run(name, data, args.out, args.overrides, args.multi)), flush=True)


if __name__ == "__main__":
    main()
