"""Text-to-image training pairs for ShapesWorld: prompts drawn as ``shapes_t2i``'s are (every prompt type in equal
shares, :func:`~vlmkit.eval.judge.specs.make_prompt`), each with an image of a scene that satisfies it
(:func:`~vlmkit.eval.judge.specs.render_spec`), written as ``t2i_pairs_{split}.csv`` (``image``, ``caption``: the
pairs format every objective reads) and the images under ``t2i_{split}/``: ``vlmkit data shapes --t2i N`` writes N
training pairs and N/20 (at least 16) validation pairs, drawn apart.

The held-out prompts of ``shapes_t2i`` (its val and test splits) are never training prompts, except single objects:
their 30 colour-shape pairs are all there are, so a model meets each in training (as GenEval's single-object
prompts name COCO classes every model has seen); it is judged on new images of them.
"""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path

from vlmkit.errors import ConfigError
from vlmkit.eval.judge.specs import PROMPT_TYPES, make_prompt, make_prompts, render_spec
from vlmkit.utils import atomic_write_text

HELD_OUT_SPLITS = ("val", "test")


def held_out_prompts() -> set[str]:
    """The evaluation prompts training never shows (all but single objects)."""
    return {r["prompt"] for split in HELD_OUT_SPLITS for r in make_prompts(split) if r["type"] != "single_object"}


def write_t2i_pairs(folder: str | Path, n: int, seed: int = 0, size: tuple[int, int] = (64, 64),
                    split: str = "train", progress: bool = False) -> Path:
    """``n`` prompt-image pairs of ``split`` into ``folder`` (module docstring): ``t2i_pairs_{split}.csv`` and the
    images under ``t2i_{split}/``; returns the CSV's path. The CSV is written last and atomically, so a folder
    without it holds no finished pairs."""
    from tqdm.auto import tqdm

    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"--t2i must be an int >= 1 (prompt-image pairs), got {n!r}")
    folder = Path(folder)
    (folder / f"t2i_{split}").mkdir(parents=True, exist_ok=True)
    rng, banned = random.Random(f"t2i-pairs:{split}:{seed}"), held_out_prompts()
    rows = []
    for i in tqdm(range(n), desc="t2i pairs", unit="pair", disable=not progress, dynamic_ncols=True):
        ptype = PROMPT_TYPES[i % len(PROMPT_TYPES)]
        prompt, spec = make_prompt(rng, ptype)
        while prompt in banned:
            prompt, spec = make_prompt(rng, ptype)
        name = f"t2i_{split}/{i:06d}.png"
        render_spec(spec, seed=rng.randrange(2**31), width=size[0], height=size[1]).save(folder / name)
        rows.append((name, prompt))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", "caption"])
    writer.writerows(rows)
    path = folder / f"t2i_pairs_{split}.csv"
    atomic_write_text(path, out.getvalue())
    return path


__all__ = ["held_out_prompts", "write_t2i_pairs"]
