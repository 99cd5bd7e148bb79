"""The text-to-image approaches compared on one judge: tiny-janus (autoregressive over VQ codes), tiny-showo
(mask-predict over the same codes), tiny-transfusion (flow matching on tiny-vae's latents inside the LM that reads
the text) and tiny-dit (the latent-diffusion baseline: a DiT on tiny-vae's latents, a frozen tiny-clip text
tower), each trained by its own recipe on the same ShapesWorld data and judged by ``shapes_t2i`` (and asked
``shapes_vqa`` when it also reads images). One JSON line: per model its training seconds, trained parameters,
accuracy per prompt type, sampling seconds per image and where its judge grid is.

    python bench/generation.py [--data shapes] [--models tiny-janus,tiny-showo,tiny-transfusion,tiny-dit]
                               [--vq CKPT] [--vae CKPT] [--clip CKPT] [--steps N] [--set KEY=VALUE]
                               [--limit N] [--threads 2] [--out DIR]

The separately pretrained parts (tiny-vq's codes, tiny-vae's latents, tiny-clip's text tower) are trained first by
their own recipes when not given, and are not counted in a model's seconds (as bench/t2i.py leaves tiny-vq out).
``--steps N`` runs every stage of every recipe N steps (short runs and smoke tests); ``--set`` applies to every
recipe. docs/generation.md quotes the runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

# bench/t2i.py's data and evaluation (a script's own folder is on sys.path)
from t2i import _data, _evaluate

import vlmkit
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe

MODELS = ("tiny-janus", "tiny-showo", "tiny-transfusion", "tiny-dit")
# the recipe options that name a pretrained part, and the part
NEEDS = {"tiny-janus": {"model.gen.vq_from": "vq"}, "tiny-showo": {"model.gen.vq_from": "vq"},
         "tiny-transfusion": {"model.gen.vae_from": "vae"},
         "tiny-dit": {"model.vae_from": "vae", "model.text_from": "clip"}}
PARTS = {"vq": "tiny-vq", "vae": "tiny-vae", "clip": "tiny-clip"}
QUIET = dict(progress=False, log=lambda m: None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="a ShapesWorld folder with t2i_pairs_train.csv (default: generate one)")
    ap.add_argument("--n", type=int, default=2000, help="without --data: ShapesWorld scenes")
    ap.add_argument("--pairs", type=int, default=8000, help="without --data: text-to-image training pairs")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    for part, recipe in PARTS.items():
        ap.add_argument(f"--{part}", help=f"a trained {recipe} checkpoint (default: train {recipe} first)")
    ap.add_argument("--steps", type=int, help="run every stage of every recipe this many steps (short runs)")
    ap.add_argument("--set", action="append", default=[], help="recipe overrides for every recipe, KEY=VALUE")
    ap.add_argument("--limit", type=int, help="samples per evaluation task")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="keep data, runs, results and grids here (default: a temporary folder)")
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        ap.error(f"--models: unknown {unknown[0]!r}; choose among {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        data = Path(args.data) if args.data else _data(root / "shapes", args.n, args.pairs)
        parts = _parts(args, models, data, root)
        result = {"bench": "generation", "config": vars(args), "threads": torch.get_num_threads(),
                  "parts": {k: v["seconds"] for k, v in parts.items()}, "models": {}}
        for name in models:
            result["models"][name] = _run(name, args, data, root, {k: v["checkpoint"] for k, v in parts.items()})
    print(json.dumps(result))


def _overrides(recipe: str, args, data: Path, extra: dict | None = None) -> list[str]:
    """The recipe's overrides: the data, its stages' steps under --steps, --set, and the pretrained parts."""
    out = [f"data.path={data}", *[f"{k}={v}" for k, v in (extra or {}).items()]]
    if args.steps:
        out += [f"stages.{i}.steps={args.steps}" for i in range(len(load_recipe(recipe).stages))]
    return out + list(args.set)


def _parts(args, models: list[str], data: Path, root: Path) -> dict:
    """The pretrained parts the models need: given, or trained by their recipes."""
    parts = {}
    for part in sorted({p for m in models for p in NEEDS[m].values()}):
        given, t0 = getattr(args, part), time.perf_counter()
        ckpt = given or str(train(load_recipe(PARTS[part], _overrides(PARTS[part], args, data)), root / part,
                                  **QUIET).checkpoint)
        parts[part] = {"checkpoint": ckpt, "seconds": None if given else round(time.perf_counter() - t0, 1)}
    return parts


def _run(name: str, args, data: Path, root: Path, parts: dict) -> dict:
    """Train ``name`` by its recipe, then judge it: its figures."""
    recipe = load_recipe(name, _overrides(name, args, data, {k: parts[p] for k, p in NEEDS[name].items()}))
    t0 = time.perf_counter()
    run = train(recipe, root / name, **QUIET)
    seconds = time.perf_counter() - t0
    pipe = vlmkit.load(run.checkpoint)
    tasks = ["shapes_t2i"] + (["shapes_vqa"] if pipe.can_generate else [])
    out = {"train_seconds": round(seconds, 1), "trained_parameters": _trained(pipe.model, recipe),
           **_evaluate(run.checkpoint, data, root / f"eval-{name}", tasks, args.limit)}
    out["grid"] = str(root / f"eval-{name}" / "results_shapes_t2i_grid.png")
    return out


def _trained(model, recipe) -> int:
    """The parameters the recipe's stages train (their ``train`` module groups; ``all``: every one)."""
    groups = model.module_groups()
    names = {g for stage in recipe.stages for g in stage.train}
    modules = list(groups.values()) if "all" in names else [groups[g] for g in names if g in groups]
    return sum(p.numel() for p in {id(p): p for m in modules for p in m.parameters()}.values())


if __name__ == "__main__":
    main()
