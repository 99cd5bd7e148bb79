"""Train the ShapesWorld scene parser (:mod:`vlmkit.eval.judge.parser`) on scenes rendered on the fly, and
measure it on freshly rendered held-out scenes.

Regenerate the shipped weights (a few minutes on 2 CPU cores)::

    python -m vlmkit.eval.judge.train --out src/vlmkit/eval/judge/shapes_parser.safetensors

Training scenes come from their own seeded stream (``judge-train:{seed}:{step}``), held-out scenes from
another (``judge-heldout:{seed}:{index}``), so a run is deterministic given its arguments and never sees its
test scenes. The weights are stored in float16 (the network runs in float32); the sidecar JSON beside them
records the steps, seed, time and held-out accuracy.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
from PIL import ImageFilter
from tqdm.auto import tqdm

from vlmkit.data.shapes.scenes import render_scene, sample_scene
from vlmkit.eval.judge.parser import SceneParser, image_tensor, parse_images, parser_loss, scene_targets
from vlmkit.errors import ConfigError
from vlmkit.utils import atomic_write_bytes, atomic_write_json

CANVASES = ((64, 64), (64, 64), (96, 64), (64, 96))  # the canvas of a training batch cycles through these


def render_batch(
    rng: random.Random, size: int, width: int, height: int, augment: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
    """``size`` scenes of 1-6 objects on a ``width`` x ``height`` canvas drawn from ``rng``: (images [B, 3, H,
    W], batched targets, the scenes). ``augment``: light blur and pixel noise on some images, so the parser
    also reads imperfect (reconstructed or generated) renders."""
    images, targets, scenes = [], [], []
    for _ in range(size):
        scene = sample_scene(rng, width, height, 1, 6)
        image = render_scene(scene)
        if augment and rng.random() < 0.3:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
        tensor, _ = image_tensor(image)
        if augment and rng.random() < 0.3:
            noise = torch.Generator().manual_seed(rng.randrange(2**31))
            tensor = (tensor + rng.uniform(0.0, 0.04) * torch.randn(tensor.shape, generator=noise)).clamp(
                0, 1
            )
        images.append(tensor)
        targets.append(scene_targets(scene))
        scenes.append(scene)
    batched = {k: torch.stack([t[k] for t in targets]) for k in targets[0]}
    return torch.stack(images), batched, scenes


def train_parser(
    steps: int = 3000,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    width: int = 64,
    progress: bool = True,
    model: SceneParser | None = None,
    warmup: int = 100,
) -> tuple[SceneParser, list[float]]:
    """Train a parser (or continue ``model``) for ``steps`` AdamW steps (``warmup`` of them warming up, then a
    cosine schedule); (model in eval mode, the loss of every step)."""
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    torch.manual_seed(seed)
    model = model if model is not None else SceneParser(width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    losses = []
    for step in tqdm(
        range(steps), desc="scene parser", unit="step", disable=not progress, dynamic_ncols=True
    ):
        rng = random.Random(f"judge-train:{seed}:{step}")
        images, targets, _ = render_batch(rng, batch_size, *CANVASES[step % len(CANVASES)])
        loss = parser_loss(model(images), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return model.eval(), losses


def _match(truth, found, radius: float) -> list:
    """For each true object, the found object whose centre is nearest (within ``radius`` px), else None."""
    pairs, free = [], list(found)
    for o in truth:
        best = min(free, key=lambda f: (f.cx - o.cx) ** 2 + (f.cy - o.cy) ** 2, default=None)
        if best is not None and math.hypot(best.cx - o.cx, best.cy - o.cy) <= radius:
            free.remove(best)
            pairs.append(best)
        else:
            pairs.append(None)
    return pairs


def heldout_accuracy(
    model: SceneParser | None = None,
    n: int = 500,
    seed: int = 1,
    canvases=((64, 64), (96, 64)),
    degrade=None,
) -> dict[str, float]:
    """The parser on ``n`` freshly rendered scenes (clean renders unless ``degrade(image) -> image`` is given,
    e.g. a blur; 1-6 objects, ``canvases`` in turn) from the held-out stream ``judge-heldout:{seed}``: per
    true object, whether it was found (a detection within 0.6 of its radius) with the right colour, shape and
    size; per image, whether the object count is exact; the mean centre error in pixels."""
    scenes = [
        sample_scene(random.Random(f"judge-heldout:{seed}:{i}"), *canvases[i % len(canvases)], 1, 6)
        for i in range(n)
    ]
    images = [render_scene(s) for s in scenes]
    parsed = parse_images([degrade(im) for im in images] if degrade else images, model)
    hits = {"color": 0, "shape": 0, "size": 0, "found": 0}
    objects, exact, error = 0, 0, []
    for scene, found in zip(scenes, parsed):
        exact += len(found) == len(scene.objects)
        for o, f in zip(scene.objects, _match(scene.objects, found, 0.6 * min(o.r for o in scene.objects))):
            objects += 1
            if f is not None:
                hits["found"] += 1
                error.append(math.hypot(f.cx - o.cx, f.cy - o.cy))
                for key in ("color", "shape", "size"):
                    hits[key] += getattr(f, key) == getattr(o, key)
    return {
        **{f"{k}_accuracy": round(v / objects, 4) for k, v in hits.items()},
        "count_accuracy": round(exact / n, 4),
        "mean_center_error_px": round(sum(error) / max(1, len(error)), 3),
        "images": n,
        "objects": objects,
    }


def save_parser(model: SceneParser, out: str | Path, record: dict) -> None:
    """The weights (float16) at ``out`` and ``record`` as JSON beside it (same name, .json), both
    atomically."""
    from safetensors.torch import save

    state = {
        k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()
    }
    out = Path(out)
    atomic_write_bytes(out, save(state))
    atomic_write_json(out.with_suffix(".json"), record)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m vlmkit.eval.judge.train", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", required=True, help="the .safetensors file to write (its .json record beside it)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", type=int, default=1000, help="held-out scenes measured after training")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest for this small network)"
    )
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model, losses = train_parser(a.steps, a.batch_size, a.lr, a.seed)
    seconds = time.perf_counter() - t0
    # the held-out check runs on the weights as stored (float16), not on the float32 ones trained
    record = {
        "steps": a.steps,
        "batch_size": a.batch_size,
        "lr": a.lr,
        "seed": a.seed,
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "command": f"python -m vlmkit.eval.judge.train --out {a.out} --steps {a.steps} "
        f"--batch-size {a.batch_size} --lr {a.lr} --seed {a.seed}",
    }
    save_parser(model, a.out, record)
    from vlmkit.eval.judge.parser import load_parser

    record["heldout"] = heldout_accuracy(load_parser(a.out), a.heldout, seed=a.seed + 1)
    save_parser(model, a.out, record)
    print(record)
    return record


if __name__ == "__main__":
    main()
