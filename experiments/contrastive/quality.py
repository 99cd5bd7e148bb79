"""The quality bar of the contrastive recipes: train a dual encoder on ShapesWorld pairs and track, against training
time, zero-shot top-1 on held-out single-object images (``objects_val``) and text->image recall@5 on held-out
captions (``captions_val``); at the end, the same on the test split. One JSON line per run on stdout; the curve
goes to OUT/curve.jsonl (docs/contrastive.md plots it with plot.py).

    python experiments/contrastive/quality.py --recipe tiny-clip --data shapes --out runs/q-clip [--set k=v ...]
    python experiments/contrastive/quality.py --recipe tiny-clip --data shapes --out runs/q-vit \
        --set preset=tiny-clip-vit --contrastive-only 400       # contrastive training alone
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vlmkit.eval.readers import read_class_templates, read_image_folder
from vlmkit.eval.metrics.retrieval import retrieval_metrics, zero_shot_classification_metrics
from vlmkit.pipeline import Pipeline
from vlmkit.train.contrastive import train_contrastive
from vlmkit.train.recipe import load_recipe, only_stages, override_recipe


def measure(pipe: Pipeline, data: Path, split: str) -> dict:
    folder = data / f"objects_{split}"
    samples, classes, _ = read_image_folder(folder)
    logits = pipe.embed_images([s.images[0] for s in samples]) @ pipe.classifier(classes, read_class_templates(folder)).t()
    zs = zero_shot_classification_metrics(logits, [s.meta["label"] for s in samples], ks=(1, 5))
    return {"zero_shot_top1": zs["top1_accuracy"], "zero_shot_top5": zs["top5_accuracy"], **_retrieval(pipe, data, split)}


def _retrieval(pipe: Pipeline, data: Path, split: str) -> dict:
    from vlmkit.eval.tasks import _captions

    samples = _captions(data, split, None)
    texts = [t for s in samples for t in s.answers]
    owner = [i for i, s in enumerate(samples) for _ in s.answers]
    sim = pipe.embed_images([s.images[0] for s in samples]) @ pipe.embed_texts(texts).t()
    r = retrieval_metrics(sim, owner, ks=(1, 5, 10))
    return {"t2i_r1": r["text_to_image_recall@1"], "t2i_r5": r["text_to_image_recall@5"],
            "i2t_r1": r["image_to_text_recall@1"], "i2t_r5": r["image_to_text_recall@5"], "n_images": len(samples)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="tiny-clip")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contrastive-only", type=int, metavar="STEPS",
                    help="drop the image-tower stage and run the contrastive stage for STEPS steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data, out = Path(args.data), Path(args.out)
    recipe = load_recipe(args.recipe)
    if args.contrastive_only:
        recipe = only_stages(recipe, "contrastive")
        args.set.append(f"stages.0.steps={args.contrastive_only}")
    recipe = override_recipe(recipe, [f"data.path={data}", *args.set])
    out.mkdir(parents=True, exist_ok=True)
    curve = []

    def on_eval(model, processor, step, seconds):
        t0 = time.perf_counter()
        m = measure(Pipeline(model, processor, model.cfg), data, "val")
        curve.append({"step": step, "train_seconds": round(seconds, 1), **m})
        print(json.dumps(curve[-1]), flush=True)
        (out / "curve.jsonl").write_text("".join(json.dumps(c) + "\n" for c in curve))
        return time.perf_counter() - t0

    res = train_contrastive(recipe, out, progress=False, log=lambda m: None, on_eval=on_eval)
    pipe = Pipeline.from_pretrained(res.checkpoint)
    final = measure(pipe, data, "test")
    print(json.dumps({"recipe": args.recipe, "set": args.set, "train_seconds": round(res.train_seconds, 1),
                      "steps": res.steps, "test": final}), flush=True)


if __name__ == "__main__":
    main()
