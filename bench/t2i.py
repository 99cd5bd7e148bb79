"""tiny-janus to the issue's bar: trained from scratch on ShapesWorld questions and text-to-image pairs, then judged
by ``shapes_t2i`` (accuracy per prompt type, GenEval's rules) and asked ``shapes_vqa``; tiny-llava trained on the same
data in the same run gives the VQA it is compared with. One JSON line.

    python bench/t2i.py --vq runs/tiny-vq/checkpoint [--n 2000] [--pairs 8000] [--threads 2] [--recipe R] [--steps N]
                        [--llava] [--out DIR]

The VQ tokenizer is a separate pretrained model (as Janus takes LlamaGen's): ``python bench/vq.py --out DIR``
trains one (DIR/run/checkpoint); without ``--vq`` this script trains tiny-vq first (not counted in the 20 minutes).
docs/generation.md quotes a run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from vlmkit.data.shapes import generate_shapes
from vlmkit.eval.judge.pairs import write_t2i_pairs
from vlmkit.eval.judge.task import IMAGES_PER_PROMPT
from vlmkit.eval.runner import run_eval
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe

QUIET = dict(progress=False, log=lambda m: None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vq", help="a trained VQ tokenizer's checkpoint (default: train tiny-vq first)")
    ap.add_argument("--vq-steps", type=int, help="without --vq: override tiny-vq's steps")
    ap.add_argument("--data", help="a ShapesWorld folder with t2i_pairs_train.csv (default: generate one)")
    ap.add_argument("--n", type=int, default=2000, help="ShapesWorld scenes (80/10/10 train/val/test)")
    ap.add_argument("--pairs", type=int, default=8000, help="text-to-image training pairs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipe", default="tiny-janus", help="the recipe (a built-in name or a YAML path)")
    ap.add_argument("--steps", type=int, help="override the unified stage's steps")
    ap.add_argument("--set", action="append", default=[], help="more recipe overrides, KEY=VALUE")
    ap.add_argument("--llava", action="store_true", help="also train tiny-llava on the same data (VQA baseline)")
    ap.add_argument("--limit", type=int, help="samples per evaluation task")
    ap.add_argument("--out", help="keep data, runs and results here (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        data = Path(args.data) if args.data else _data(root / "shapes", args.n, args.pairs)
        vq_set = [f"data.path={data}"] + ([f"stages.0.steps={args.vq_steps}"] if args.vq_steps else [])
        vq = args.vq or str(train(load_recipe("tiny-vq", vq_set), root / "vq", **QUIET).checkpoint)
        overrides = [f"data.path={data}", f"model.gen.vq_from={vq}", *args.set]
        if args.steps:
            unified = [i for i, s in enumerate(load_recipe(args.recipe).stages) if s.objective == "unified"][0]
            overrides.append(f"stages.{unified}.steps={args.steps}")
        t0 = time.perf_counter()
        janus = train(load_recipe(args.recipe, overrides), root / "janus", progress=True, log=lambda m: None)
        seconds = time.perf_counter() - t0
        result = {"bench": "t2i", "config": vars(args), "threads": torch.get_num_threads(),
                  "train_seconds": round(seconds, 1), "janus": _evaluate(janus.checkpoint, data, root / "eval-janus",
                                                                         ["shapes_t2i", "shapes_vqa"], args.limit)}
        if args.llava:
            llava = train(load_recipe("tiny-llava", [f"data.path={data}"]), root / "llava", **QUIET)
            result["llava"] = _evaluate(llava.checkpoint, data, root / "eval-llava", ["shapes_vqa"], args.limit)
            result["vqa_gap"] = round(result["llava"]["shapes_vqa"]["exact_match"]
                                      - result["janus"]["shapes_vqa"]["exact_match"], 4)
    print(json.dumps(result))


def _data(out: Path, n: int, pairs: int) -> Path:
    if not (out / "t2i_pairs_train.csv").is_file():
        generate_shapes(out, n=n, seed=0, size=64, progress=False, overwrite=True)
        write_t2i_pairs(out, pairs, seed=0)
        write_t2i_pairs(out, max(16, pairs // 20), seed=0, split="val")
    return out


def _evaluate(checkpoint, data: Path, out: Path, tasks: list[str], limit: int | None) -> dict:
    res = run_eval(checkpoint, tasks, data, out / "results.json", limit=limit, progress=False)
    out = {name: {k: round(v, 4) for k, v in r["metrics"].items() if isinstance(v, float)}
           for name, r in res["tasks"].items()}
    if "shapes_t2i" in res["tasks"]:  # 4 guided images per prompt, on this run's threads
        t2i = res["tasks"]["shapes_t2i"]
        out["shapes_t2i"]["seconds_per_image"] = round(t2i["seconds"] / (t2i["n"] * IMAGES_PER_PROMPT), 3)
    return out


if __name__ == "__main__":
    main()
