"""``shapes_t2i``: GenEval on ShapesWorld. A model that generates images (``Pipeline.can_generate_images``)
draws ``IMAGES_PER_PROMPT`` images for each held-out prompt (``t2i_{split}.json``, written by ``vlmkit data
shapes``); the fixed scene parser (:mod:`vlmkit.eval.judge.parser`) reads every image and the checker
(:func:`vlmkit.eval.judge.specs.check`) judges it against the prompt's spec. A prompt's score is the fraction
of its images judged correct; the task reports it overall and per prompt type, and an image grid of the first
prompts of each type with their verdicts (saved by the runner beside the report).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from vlmkit.data.shapes.scenes import COLORS, SHAPES
from vlmkit.errors import ConfigError, DataError
from vlmkit.eval.benchmarks.layouts import shapes_writer
from vlmkit.eval.judge.specs import PROMPT_TYPES, RELATIONS, make_prompts
from vlmkit.eval.readers import EvalSample, benchmark_root
from vlmkit.eval.registry import Task, register_task
from vlmkit.utils import atomic_write_text

IMAGES_PER_PROMPT = 4  # GenEval's
GRID_PER_TYPE = 2  # prompts of each type shown in the report's grid
GRID_KEY = "_grid"  # the reserved extra-metrics key of an image the runner saves (runner.py)


@shapes_writer
def write_t2i_shapes(folder: Path, split: str, items: list) -> None:
    """``shapes_t2i_{split}/t2i_{split}.json``: the split's fixed text-to-image prompts with their specs (one
    row per line), in the task's own folder as every benchmark layout ShapesWorld writes."""
    rows = make_prompts(split)
    body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    out = Path(folder) / f"shapes_t2i_{split}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"t2i_{split}.json", "[\n" + body + "\n]\n")


def _check_row(path: Path, n: int, row) -> None:
    where = f"{path}: row {n}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with id, prompt, type, spec")
    for key, kind in (("id", str), ("prompt", str), ("type", str), ("spec", dict)):
        if not isinstance(row.get(key), kind):
            raise DataError(f"{where}: field {key!r} is missing or not a {kind.__name__}")
    spec = row["spec"]
    objects = spec.get("objects")
    if not isinstance(objects, list) or not objects:
        raise DataError(f"{where}: field 'spec.objects' must be a non-empty list")
    for o in objects:
        if (
            not isinstance(o, dict)
            or o.get("color") not in COLORS
            or o.get("shape") not in SHAPES
            or not (isinstance(o.get("count"), int) and o["count"] >= 1)
        ):
            raise DataError(
                f"{where}: field 'spec.objects' has {o!r}; each needs a ShapesWorld color, shape and a "
                f"count >= 1"
            )
    rel = spec.get("relation")
    if rel is not None and not (
        isinstance(rel, list)
        and len(rel) == 3
        and rel[1] in RELATIONS
        and all(isinstance(k, int) and 0 <= k < len(objects) for k in (rel[0], rel[2]))
    ):
        raise DataError(
            f"{where}: field 'spec.relation' must be null or [i, one of {list(RELATIONS)}, j], got {rel!r}"
        )


def read_t2i(root: Path, split: str, limit: int | None) -> list[EvalSample]:
    """The prompts of ``t2i_{split}.json`` as samples (no images; meta: type, spec), checked row by row: in
    ``root/shapes_t2i_{split}/`` (ShapesWorld's), else in ``root`` itself (your own prompts file)."""
    path = benchmark_root(root, "shapes_t2i", split) / f"t2i_{split}.json"
    if not path.is_file():
        raise DataError(
            f"{path}: not found; `vlmkit data shapes` writes it (in shapes_t2i_{{val,test}}/) for "
            f"the val and test splits"
        )
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of prompts")
    for n, row in enumerate(rows):
        _check_row(path, n, row)
    return [
        EvalSample(r["id"], [], r["prompt"], [], {"type": r["type"], "spec": r["spec"]}) for r in rows[:limit]
    ]


def prompt_seed(sample_id: str) -> int:
    """The fixed sampling seed of a prompt, so a model's images for it are the same in every run."""
    return zlib.crc32(sample_id.encode("utf-8"))


def _refuse(pipe) -> str:
    """Why ``pipe`` cannot run shapes_t2i ("" when it can): it must draw images."""
    if pipe.can_generate_images:
        return ""
    return ("it judges generated images; this model does not generate images (Pipeline.can_generate_images is "
            "False): evaluate a model that does")


def judge_prompt(pipe, sample: EvalSample, **sampling) -> tuple[list, list[tuple[bool, str]]]:
    """The ``IMAGES_PER_PROMPT`` images ``pipe`` draws for one shapes_t2i prompt (its fixed seed; ``sampling``: more
    ``generate_image`` keywords) and each one's verdict (judged right, why not)."""
    from vlmkit.eval.judge.parser import parse_images
    from vlmkit.eval.judge.specs import check

    images = pipe.generate_image(sample.question, n=IMAGES_PER_PROMPT, seed=prompt_seed(sample.id), **sampling)
    return images, [check(sample.meta["spec"], objs, *im.size) for im, objs in zip(images, parse_images(images))]


def _evaluate(pipe, samples: list[EvalSample], root: Path, progress: bool = False):
    """(predictions: per prompt its verdicts, per-sample accuracy, extra metrics with the grid image)."""
    why = _refuse(pipe)
    if why:  # run_eval asks first (Task.refuse); this guards a direct run_task
        raise ConfigError(f"task 'shapes_t2i': {why}")
    from tqdm.auto import tqdm

    predictions, scores, shown = [], [], []
    per_type: dict[str, int] = {}
    for s in tqdm(samples, desc="shapes_t2i", unit="prompt", disable=not progress, dynamic_ncols=True):
        images, verdicts = judge_prompt(pipe, s)
        ok = [v for v, _ in verdicts]
        predictions.append(" | ".join("correct" if v else why for v, why in verdicts))
        scores.append({"accuracy": sum(ok) / max(1, len(ok))})
        if per_type.get(s.meta["type"], 0) < GRID_PER_TYPE:
            per_type[s.meta["type"]] = per_type.get(s.meta["type"], 0) + 1
            shown.append((s.question, images, ok))
    return predictions, scores, {"images_per_prompt": float(IMAGES_PER_PROMPT), GRID_KEY: grid(shown)}


def grid(rows: list[tuple[str, list, list[bool]]], cell: int = 96):
    """An image grid: one row per prompt (its text above), its images side by side, each framed green (judged
    correct) or red (wrong)."""
    from PIL import Image, ImageDraw

    cols = max((len(images) for _, images, _ in rows), default=1)
    text_h, pad = 14, 4
    height = max(1, len(rows)) * (text_h + cell + 2 * pad)
    canvas = Image.new("RGB", (cols * (cell + 2 * pad) + pad, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (prompt, images, ok) in enumerate(rows):
        y = r * (text_h + cell + 2 * pad)
        draw.text((pad, y + 1), f"{prompt}  ({sum(ok)}/{len(ok)})", fill=(0, 0, 0))
        for c, (image, right) in enumerate(zip(images, ok)):
            x = pad + c * (cell + 2 * pad)
            scale = cell / max(image.size)
            shown = image.convert("RGB").resize((round(image.size[0] * scale), round(image.size[1] * scale)))
            draw.rectangle(
                [x - 2, y + text_h - 2, x + shown.size[0] + 1, y + text_h + shown.size[1] + 1],
                fill=(40, 170, 60) if right else (220, 40, 40),
            )
            canvas.paste(shown, (x, y + text_h))
    return canvas


register_task(
    Task(
        "shapes_t2i",
        "GenEval on ShapesWorld: images generated for held-out prompts (single object, two objects, "
        f"counting, relation, colour binding), judged by a fixed scene parser; {IMAGES_PER_PROMPT} images "
        "per prompt",
        "accuracy",
        "shapes_t2i_{split}/t2i_{split}.json (ShapesWorld), or t2i_{split}.json in --data",
        read_t2i,
        lambda s: s.question,
        lambda p, s: {},
        group_by="type",
        evaluate=_evaluate,
        refuse=_refuse,
    )
)

__all__ = ["PROMPT_TYPES", "grid", "judge_prompt", "read_t2i", "write_t2i_shapes"]
