"""ShapesWorld's language: captions and questions about one scene, and questions about 2-3 scenes at once.

Every question has exactly one correct answer that is clearly visible in the image, every referring expression
("the red circle") names exactly one object, and yes/no answers are balanced. Everything is drawn from the
``random.Random`` passed in, so the text depends only on the scene and that generator's state.
"""

from __future__ import annotations

import random
from collections import Counter

from vlmkit.data.shapes.scenes import COLORS, SHAPES, Scene, ShapeObject
from vlmkit.errors import ConfigError

QUESTION_TYPES = ("color", "shape", "count", "exist", "position", "relation")
# questions about 2-3 images of one sample (multi_{split}.json)
MULTI_TYPES = ("multi_compare", "multi_attribute", "multi_total", "multi_all", "multi_which")
ORDINALS = ("first", "second", "third")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
POSITION_MARGIN = 0.08  # position questions: centre at least this fraction of the canvas from both mid-lines
RELATION_MARGIN = 0.15  # relation questions: centres at least this fraction of the width apart
CAPTIONS_PER_IMAGE = 3
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


# ------------------------------------------------------------------------------------------- language


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(word: str) -> str:
    return word + "s"


def _join(items: list[str], last: str = " and ") -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + last + items[-1]


def _left_to_right(scene: Scene) -> list[ShapeObject]:
    return sorted(scene.objects, key=lambda o: (o.cx, o.cy))


def make_captions(scene: Scene, rng: random.Random, k: int = 3) -> list[str]:
    """``k`` different captions, each describing every object, objects listed left to right."""
    objects = _left_to_right(scene)
    n, bg = len(objects), scene.background
    sized = [_article(f"{o.size} {o.color} {o.shape}") for o in objects]
    plain = [_article(f"{o.color} {o.shape}") for o in objects]
    noun, be = ("shape", "is 1 object") if n == 1 else ("shapes", f"are {n} objects")
    templates = [
        f"{_join(sized)} on {_article(bg)} background",
        f"{_NUMBER_WORDS[n]} {noun}: {_join(plain)}.",
        f"There {be} in the picture: {_join(sized, ', ')}.",
        f"{_article(bg).capitalize()} background with {_join(sized)}.",
        f"From left to right: {_join(sized, ', ')}." if n > 1 else f"Just one shape: {sized[0]}.",
    ]
    if not 1 <= k <= len(templates):
        raise ConfigError(f"captions per image must be between 1 and {len(templates)}, got {k}")
    return [templates[i] for i in sorted(rng.sample(range(len(templates)), k))]


# ------------------------------------------------------------------------------------------- questions


def _count(scene: Scene, **attrs) -> int:
    return sum(all(getattr(o, a) == v for a, v in attrs.items()) for o in scene.objects)


def _unique_by(scene: Scene, obj: ShapeObject, attrs: tuple[str, ...]) -> bool:
    return _count(scene, **{a: getattr(obj, a) for a in attrs}) == 1


def _phrase(obj: ShapeObject, attrs: tuple[str, ...]) -> str:
    """Referring phrase in fixed word order size, colour, shape; "object" when the shape is not named."""
    words = [getattr(obj, a) for a in ("size", "color", "shape") if a in attrs]
    return " ".join(words if "shape" in attrs else words + ["object"])


def _referable(scene: Scene, options: tuple[tuple[str, ...], ...]) -> list[tuple[ShapeObject, str]]:
    """(object, phrase) for objects that one of ``options`` (tried in order) describes uniquely."""
    found = []
    for obj in scene.objects:
        attrs = next((a for a in options if _unique_by(scene, obj, a)), None)
        if attrs is not None:
            found.append((obj, _phrase(obj, attrs)))
    return found


def _q(question: str, answer: str, qtype: str) -> dict:
    return {"question": question, "answer": answer, "type": qtype}


def _color_questions(scene: Scene, rng: random.Random) -> list[dict]:
    candidates = _referable(scene, (("shape",), ("size", "shape")))
    if not candidates:
        return []
    obj, ref = rng.choice(candidates)
    template = rng.choice(
        ("What color is the {}?", "What is the color of the {}?", "Which color does the {} have?")
    )
    return [_q(template.format(ref), obj.color, "color")]


def _shape_questions(scene: Scene, rng: random.Random) -> list[dict]:
    candidates = _referable(scene, (("color",), ("size", "color")))
    if not candidates:
        return []
    obj, ref = rng.choice(candidates)
    template = rng.choice(("What shape is the {}?", "What is the shape of the {}?", "Which shape is the {}?"))
    return [_q(template.format(ref), obj.shape, "shape")]


def _count_questions(scene: Scene, rng: random.Random) -> list[dict]:
    """One count question: all objects, one shape or one colour. Zero answers are kept to ~20%."""
    kind = rng.choice(("total", "shape", "color"))
    if kind == "total":
        template = rng.choice(
            (
                "How many objects are there?",
                "How many shapes are in the image?",
                "How many objects can you see?",
            )
        )
        return [_q(template, str(len(scene.objects)), "count")]
    values = SHAPES if kind == "shape" else tuple(COLORS)
    present = [v for v in values if _count(scene, **{kind: v})]
    absent = [v for v in values if v not in present]
    value = rng.choice(absent if absent and rng.random() < 0.2 else present)
    noun = _plural(value) if kind == "shape" else f"{value} objects"
    template = rng.choice(
        ("How many {} are there?", "How many {} are in the image?", "How many {} can you see?")
    )
    return [_q(template.format(noun), str(_count(scene, **{kind: value})), "count")]


def _exist_questions(scene: Scene, rng: random.Random) -> list[dict]:
    """One yes and one no per image; half of the negatives are hard (colour or shape present elsewhere)."""
    templates = ("Is there {}?", "Is there {} in the image?", "Does the image contain {}?")
    pairs = {(o.color, o.shape) for o in scene.objects}
    yes = rng.choice(scene.objects)
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in pairs]
    colors, shapes = {c for c, _ in pairs}, {s for _, s in pairs}
    hard = [(c, s) for c, s in absent if c in colors or s in shapes]
    easy = [p for p in absent if p not in hard]
    no = rng.choice(hard if (rng.random() < 0.5 and hard) or not easy else easy)
    return [
        _q(rng.choice(templates).format(_article(f"{yes.color} {yes.shape}")), "yes", "exist"),
        _q(rng.choice(templates).format(_article(f"{no[0]} {no[1]}")), "no", "exist"),
    ]


def quadrant(scene: Scene, obj: ShapeObject) -> str:
    """Quadrant of the object's centre: "top left", "top right", "bottom left" or "bottom right"."""
    vertical = "top" if obj.cy < scene.height / 2 else "bottom"
    return f"{vertical} {'left' if obj.cx < scene.width / 2 else 'right'}"


def _position_questions(scene: Scene, rng: random.Random) -> list[dict]:
    candidates = [
        (obj, ref)
        for obj, ref in _referable(scene, (("color", "shape"),))
        if abs(obj.cx - scene.width / 2) >= POSITION_MARGIN * scene.width
        and abs(obj.cy - scene.height / 2) >= POSITION_MARGIN * scene.height
    ]
    if not candidates:
        return []
    obj, ref = rng.choice(candidates)
    template = rng.choice(
        ("Where is the {}?", "In which part of the image is the {}?", "Where is the {} located?")
    )
    return [_q(template.format(ref), quadrant(scene, obj), "position")]


def _relation_questions(scene: Scene, rng: random.Random) -> list[dict]:
    """One yes and one no left/right question about uniquely described objects far enough apart in x."""
    referable = _referable(scene, (("color", "shape"),))
    pairs = [
        (a, b)
        for i, a in enumerate(referable)
        for b in referable[i + 1 :]
        if abs(a[0].cx - b[0].cx) >= RELATION_MARGIN * scene.width
    ]
    if not pairs:
        return []
    rng.shuffle(pairs)
    templates = (
        "Is the {} {} of the {}?",
        "Is the {} to the {} of the {}?",
        "Is the {} on the {} side of the {}?",
    )
    questions = []
    for answer, pair in (("yes", pairs[0]), ("no", pairs[-1])):
        (a, ref_a), (b, ref_b) = pair if rng.random() < 0.5 else pair[::-1]
        truth = "left" if a.cx < b.cx else "right"
        side = truth if answer == "yes" else {"left": "right", "right": "left"}[truth]
        questions.append(_q(rng.choice(templates).format(ref_a, side, ref_b), answer, "relation"))
    return questions


_QUESTION_MAKERS = {
    "color": _color_questions,
    "shape": _shape_questions,
    "count": _count_questions,
    "exist": _exist_questions,
    "position": _position_questions,
    "relation": _relation_questions,
}


def make_questions(scene: Scene, rng: random.Random) -> list[dict]:
    """Questions of every type the scene supports (~7-9), each ``{"question", "answer", "type"}``."""
    questions, seen = [], set()
    for qtype in QUESTION_TYPES:
        for q in _QUESTION_MAKERS[qtype](scene, rng):
            if q["question"] not in seen:
                seen.add(q["question"])
                questions.append(q)
    return questions


# --------------------------------------------------------------------------- questions about several images


def _multi_questions(scenes: list[Scene], rng: random.Random) -> list[dict]:
    """Questions about several images of one sample, each with one clear answer: which image has more of a
    shape, an attribute of an object that one image names uniquely ("In the second image, ..."), a count over
    all the images, whether every image has a shape, which image shows a colour-shape pair."""
    n = len(scenes)
    out = []
    counts = {s: [_count(sc, shape=s) for sc in scenes] for s in SHAPES}
    contrast = [s for s, c in counts.items() if max(c) > 0 and c.count(max(c)) == 1]
    if contrast:
        shape = rng.choice(contrast)
        best = counts[shape].index(max(counts[shape]))
        out.append(_q(f"Which image has more {_plural(shape)}? Answer with first, second or third."
                      if n == 3 else f"Which image has more {_plural(shape)}? Answer with first or second.",
                      ORDINALS[best], "multi_compare"))
    k = rng.randrange(n)
    refs = _referable(scenes[k], (("shape",), ("size", "shape")))
    if refs:
        obj, phrase = rng.choice(refs)
        out.append(_q(f"In the {ORDINALS[k]} image, what color is the {phrase}?", obj.color, "multi_attribute"))
    color = rng.choice(sorted({o.color for sc in scenes for o in sc.objects}))
    total = sum(_count(sc, color=color) for sc in scenes)
    out.append(_q(f"How many {color} objects are there in the {_NUMBER_WORDS[n]} images together?", str(total),
                  "multi_total"))
    everywhere = [s for s in SHAPES if all(counts[s])]
    missing = [s for s in SHAPES if not all(counts[s])]
    if everywhere and missing:  # yes and no equally often: asked only when either answer could be asked
        want = rng.random() < 0.5
        pool = everywhere if want else missing
        out.append(_q(f"Does every image contain a {rng.choice(pool)}?", "yes" if want else "no", "multi_all"))
    pairs = Counter((o.color, o.shape) for sc in scenes for o in {(x.color, x.shape): x for x in sc.objects}.values())
    single = sorted(p for p, c in pairs.items() if c == 1)
    if single:
        color, shape = rng.choice(single)
        which = next(i for i, sc in enumerate(scenes) if _count(sc, color=color, shape=shape))
        out.append(_q(f"Which image shows a {color} {shape}? Answer with "
                      f"{'first, second or third' if n == 3 else 'first or second'}.", ORDINALS[which], "multi_which"))
    return out
