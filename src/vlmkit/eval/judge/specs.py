"""Text-to-image prompts about ShapesWorld scenes, the structured spec each one is judged by, an oracle that
renders a scene satisfying a spec, and the checker (GenEval's rules adapted to ShapesWorld).

Prompt types (GenEval's, with ShapesWorld's colours and shapes):

- ``single_object``: "a red circle"
- ``two_objects``: "a red circle and a blue square" (two different colour-shape pairs)
- ``counting``: "three green triangles" (2-4)
- ``relation``: "a red circle left of a blue square" (left of / right of / above / below)
- ``color_binding``: "a red circle and a blue square" with two different shapes *and* two different colours,
  so that the swapped binding (a blue circle and a red square) is a different scene that fails

A spec is ``{"objects": [{"color", "shape", "count"}, ...], "exact": bool, "relation": null | [i, "left of",
j]}``. The rules (:func:`check`), as GenEval's ``evaluate``:

- every named object is present: at least ``count`` parsed objects with its colour and shape (GenEval: the
  class found ``count`` times, with the colour asked); counting prompts are exact (GenEval excludes ``count +
  1``), so ``exact`` asks for exactly ``count``;
- a relation holds between every parsed object of the first and every parsed object of the second (GenEval
  compares every found object with every target), judged on the centres as ShapesWorld's own relation
  questions are: along the relation's axis the centres differ by at least ``RELATION_MARGIN`` (0.15) of the
  image's width (left/right) or height (above/below), in the named direction; the other axis is not
  constrained;
- other objects are allowed (GenEval only excludes more of a counted class): a scene with an extra yellow star
  is still "a red circle". Sizes are never named, so never checked.
"""

from __future__ import annotations

import random

from vlmkit.data.shapes.language import RELATION_MARGIN
from vlmkit.data.shapes.scenes import BACKGROUNDS, COLORS, SHAPES, SIZES, Scene, _place_one, render_scene
from vlmkit.errors import DataError

PROMPT_TYPES = ("single_object", "two_objects", "counting", "relation", "color_binding")
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
PROMPTS_PER_TYPE = 30  # per split: 150 prompts (30 = every colour-shape pair once for single_object)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _obj(color: str, shape: str, count: int = 1) -> dict:
    return {"color": color, "shape": shape, "count": count}


def make_prompt(rng: random.Random, ptype: str) -> tuple[str, dict]:
    """One prompt of type ``ptype`` and its spec, drawn from ``rng``."""
    colors = list(COLORS)
    if ptype == "single_object":
        c, s = rng.choice(colors), rng.choice(SHAPES)
        return _article(f"{c} {s}"), {"objects": [_obj(c, s)], "exact": False, "relation": None}
    if ptype == "counting":
        n, c, s = rng.choice(tuple(COUNT_WORDS)), rng.choice(colors), rng.choice(SHAPES)
        return f"{COUNT_WORDS[n]} {c} {s}s", {"objects": [_obj(c, s, n)], "exact": True, "relation": None}
    if ptype == "color_binding":
        (c1, c2), (s1, s2) = rng.sample(colors, 2), rng.sample(SHAPES, 2)
    else:  # two objects, a relation: two different colour-shape pairs
        pairs = [(c, s) for c in colors for s in SHAPES]
        (c1, s1), (c2, s2) = rng.sample(pairs, 2)
    spec = {"objects": [_obj(c1, s1), _obj(c2, s2)], "exact": False, "relation": None}
    if ptype == "relation":
        rel = rng.choice(RELATIONS)
        spec["relation"] = [0, rel, 1]
        return f"{_article(f'{c1} {s1}')} {rel} {_article(f'{c2} {s2}')}", spec
    if ptype in ("two_objects", "color_binding"):
        return f"{_article(f'{c1} {s1}')} and {_article(f'{c2} {s2}')}", spec
    raise DataError(f"unknown prompt type {ptype!r}; the types: {', '.join(PROMPT_TYPES)}")


def make_prompts(split: str, per_type: int = PROMPTS_PER_TYPE) -> list[dict]:
    """The fixed held-out prompts of ``split``: ``per_type`` of each type, types interleaved, no prompt twice;
    rows ``{"id", "prompt", "type", "spec"}``. They depend on the split's name only (seeded
    ``shapes_t2i:{split}``)."""
    rng = random.Random(f"shapes_t2i:{split}")
    rows, seen = [], set()
    for k in range(per_type):
        for ptype in PROMPT_TYPES:
            for _ in range(10_000):
                prompt, spec = make_prompt(rng, ptype)
                if prompt not in seen:
                    break
            else:
                raise DataError(f"cannot draw {per_type} different {ptype} prompts")
            seen.add(prompt)
            rows.append({"id": f"{split}-{len(rows):04d}", "prompt": prompt, "type": ptype, "spec": spec})
    return rows


# ------------------------------------------------------------------------------------------------ the checker


def _holds(a, rel: str, b, width: float, height: float) -> bool:
    if rel in ("left of", "right of"):
        dx = (b.cx - a.cx) if rel == "left of" else (a.cx - b.cx)
        return dx >= RELATION_MARGIN * width
    dy = (b.cy - a.cy) if rel == "above" else (a.cy - b.cy)
    return dy >= RELATION_MARGIN * height


def check(spec: dict, objects: list, width: float, height: float) -> tuple[bool, str]:
    """(whether the parsed ``objects`` of a ``width`` x ``height`` image satisfy ``spec``, why not: "" when
    they do). Objects need ``color``, ``shape``, ``cx``, ``cy`` (parsed objects and ShapesWorld's both have
    them)."""
    matched = []
    for want in spec["objects"]:
        found = [o for o in objects if o.color == want["color"] and o.shape == want["shape"]]
        n, name = want["count"], f"{want['color']} {want['shape']}{'s' if want['count'] != 1 else ''}"
        if len(found) < n or (spec.get("exact") and len(found) != n):
            return (
                False,
                f"expected {'exactly' if spec.get('exact') else 'at least'} {n} {name}, found {len(found)}",
            )
        matched.append(found)
    if spec.get("relation"):
        i, rel, j = spec["relation"]
        for a in matched[i]:
            for b in matched[j]:
                if not _holds(a, rel, b, width, height):
                    return False, (
                        f"{spec['objects'][i]['color']} {spec['objects'][i]['shape']} at "
                        f"({a.cx:.0f}, {a.cy:.0f}) is not {rel} the {spec['objects'][j]['color']} "
                        f"{spec['objects'][j]['shape']} at ({b.cx:.0f}, {b.cy:.0f})"
                    )
    return True, ""


# ------------------------------------------------------------------------------------------------ the oracle


def spec_scene(spec: dict, seed: int, width: int = 64, height: int = 64, tries: int = 200) -> Scene:
    """A ShapesWorld scene satisfying ``spec`` (only the objects it names, random sizes and background), drawn
    from ``seed``. A relation is placed with 1.5x ShapesWorld's margin, so a parser's small centre errors
    never flip it."""
    rng = random.Random(f"shapes_t2i-oracle:{seed}")
    background = rng.choice(list(BACKGROUNDS))
    wanted = [(o["color"], o["shape"]) for o in spec["objects"] for _ in range(o["count"])]
    for _ in range(tries):
        placed = []
        for color, shape in wanted:
            size = rng.choice(list(SIZES))
            obj = _place_one(rng, shape, color, size, placed, width, height, False)
            if obj is None:
                break
            placed.append(obj)
        if len(placed) == len(wanted) and _relation_clear(spec, placed, width, height):
            return Scene(width, height, background, tuple(placed))
    raise DataError(f"cannot place the scene of spec {spec} on a {width}x{height} canvas")


def _relation_clear(spec: dict, placed: list, width: int, height: int) -> bool:
    if not spec.get("relation"):
        return True
    i, rel, j = spec["relation"]
    a, b = (
        placed[sum(o["count"] for o in spec["objects"][:i])],
        placed[sum(o["count"] for o in spec["objects"][:j])],
    )
    return _holds(a, rel, b, width * 1.5, height * 1.5)


def render_spec(spec: dict, seed: int, width: int = 64, height: int = 64):
    """A PIL image of a scene satisfying ``spec`` (:func:`spec_scene`): the oracle a text-to-image model is
    measured against, and the tests' stand-in for one."""
    return render_scene(spec_scene(spec, seed, width, height))
