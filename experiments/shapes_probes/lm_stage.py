"""How fast does the demo's LM stage learn on a given trained tower, under recipe overrides?

Runs only the recipe's LM stage (the tower stage is skipped), on the vision tower of an existing checkpoint
(e.g. a `vlmkit demo` run), then evaluates on held-out questions. Used for the LM depth and position-scale
comparisons in docs/design.md. Prints one ``RESULT`` JSON line.

    python experiments/shapes_probes/lm_stage.py --data vlmkit-demo/data --tower vlmkit-demo/checkpoint \
        --steps 800 [model.lm.depth=3 model.vision.pos_scale=2 ...]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from safetensors.torch import load_file

import vlmkit.train.loop as L
from vlmkit.data.conversations import read_conversations
from vlmkit.eval.vqa import evaluate_vqa
from vlmkit.pipeline import Pipeline
from vlmkit.train.recipe import load_recipe


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a ShapesWorld folder")
    ap.add_argument("--tower", type=Path, required=True, help="checkpoint folder whose vision tower is used")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--out", type=Path, default=Path("runs/lm_stage"))
    ap.add_argument("--questions", type=int, default=900)
    ap.add_argument("set", nargs="*", help="recipe overrides key=value (the LM stage is stages.1)")
    a = ap.parse_args()
    weights = load_file(str(a.tower / "model.safetensors"))
    tower = {k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")}
    build = L.build_for_recipe

    def build_with_tower(recipe, tokenizer):
        cfg, model, processor = build(recipe, tokenizer)
        _, unexpected = model.encoder.load_state_dict(tower, strict=False)
        if unexpected:
            raise SystemExit(f"{a.tower}: tower weights do not fit this preset: {unexpected[:5]}")
        return cfg, model, processor

    L.build_for_recipe = build_with_tower
    k = load_recipe("tiny-llava").stage_index("lm")
    recipe = load_recipe("tiny-llava", [f"data.path={a.data}", f"stages.{k}.steps={a.steps}",
                                        "train.eval_every=100000", "train.save_every=100000", *a.set])
    recipe.stages = recipe.stages[k:]
    res = L.train(recipe, a.out, progress=False, log=lambda m: None)
    pipe = Pipeline.from_pretrained(res.checkpoint)
    test = random.Random(0).sample(read_conversations(a.data / "test.json"), a.questions)
    ev = evaluate_vqa(pipe, test, progress=False)
    print("RESULT", json.dumps({"probe": "lm_stage", "args": vars(a), "accuracy": round(ev["vqa_accuracy"], 3),
                                "by_type": {t: round(v, 2) for t, v in ev["by_type"].items()},
                                "train_seconds": round(res.train_seconds), "val_loss": res.val_loss},
                               default=str))


if __name__ == "__main__":
    main()
