"""The built-in tasks (a task is a data reader + a prompt format + a per-sample score + an aggregate, see
:mod:`vlmkit.eval.registry`); importing this module also registers the official benchmarks' tasks.

Tasks read the official layouts (:mod:`vlmkit.eval.readers`) from a data folder; ShapesWorld writes every layout,
so each task runs on it out of the box (``vlmkit data shapes``). The runner (:mod:`vlmkit.eval.runner`) asks the
model, scores each answer with ``score`` and reports ``aggregate`` with bootstrap confidence intervals of the
task's headline ``metric``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from vlmkit.errors import DataError
from vlmkit.eval.registry import TASKS, Task, aggregate, get_task, register_task  # noqa: F401 (re-exported)
from vlmkit.eval.metrics.caption import evaluate_captions
from vlmkit.eval.metrics.choice import circular_accuracy, circular_rotations, score_choice
from vlmkit.eval.metrics.grounding import score_grounding
from vlmkit.eval.metrics.pope import pope_metrics, score_pope
from vlmkit.eval.metrics.vqa import exact_match, gqa_accuracy, vqa_accuracy
from vlmkit.eval.metrics.retrieval import (classification_ranks, image_to_text_ranks, retrieval_metrics,
                                           zero_shot_classification_metrics)
from vlmkit.eval.readers import (COCO_IMAGE_PATTERN, SHAPES_IMAGE_PATTERN, EvalSample, read_coco_captions,
                                 read_class_templates, read_gqa, read_grounding, read_image_folder,
                                 read_multiple_choice, read_pope,
                                 read_scienceqa, read_vqav2, limit_across)

POPE_CATEGORIES = ("random", "popular", "adversarial")


# ------------------------------------------------------------------------------------------------ tasks
# Each reads ShapesWorld's files (``vlmkit data shapes``) or, when those are absent, the official release's names.


def _first(root: Path, *names: str) -> Path:
    """The first of ``names`` present under ``root`` (the error lists them all)."""
    for name in names:
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: none of {', '.join(names)} found; the task reads these files (see `vlmkit tasks`)")


def _vqav2(root: Path, split: str, limit: int | None) -> list[EvalSample]:
    questions = _first(root, f"vqav2_{split}_questions.json", f"v2_OpenEnded_mscoco_{split}_questions.json")
    if questions.name.startswith("vqav2_"):  # ShapesWorld (written by vlmkit data shapes since vlmkit 0.1)
        return read_vqav2(questions, root / f"vqav2_{split}_annotations.json", root, SHAPES_IMAGE_PATTERN, limit)
    annotations = root / f"v2_mscoco_{split}_annotations.json"
    return read_vqav2(questions, annotations if annotations.is_file() else None, root / split,
                      COCO_IMAGE_PATTERN, limit)


def _pope(root: Path, split: str, limit: int | None) -> list[EvalSample]:
    """The three negative samplings; ``limit`` samples in all, shared out evenly among them."""
    groups = []
    for category in POPE_CATEGORIES:
        path = _first(root, f"pope_{split}_{category}.jsonl", f"coco_pope_{category}.json")
        images = root if path.name.startswith("pope_") else root / "val2014"
        groups.append(read_pope(path, images, category, limit))
    return limit_across(groups, limit)


def _exact(prediction: str, sample: EvalSample) -> dict[str, float]:
    return {"exact_match": exact_match(prediction, sample.answers[0]).score}


def _vqa(prediction: str, sample: EvalSample) -> dict[str, float]:
    return {"vqa_accuracy": vqa_accuracy(prediction, sample.answers).score}


def _pope_score(prediction: str, sample: EvalSample) -> dict[str, float]:
    return {"accuracy": score_pope(prediction, sample.answers[0], sample.meta.get("category")).score}


def _pope_summary(predictions: list[str], samples: list[EvalSample]) -> dict[str, float]:
    return pope_metrics(score_pope(p, s.answers[0], s.meta.get("category")) for p, s in zip(predictions, samples))


register_task(Task(
    "shapes_vqa", "ShapesWorld questions (colour, shape, count, existence, position, relation), exact match",
    "exact_match", "vqav2_{split}_questions.json + vqav2_{split}_annotations.json (ShapesWorld)", _vqav2,
    lambda s: s.question, _exact, group_by="question_type", max_new_tokens=8))
def _shapes_multi(root: Path, split: str, limit: int | None) -> list[EvalSample]:
    """ShapesWorld's multi-image questions (multi_{split}.json, LLaVA format with an ``images`` list): the question
    keeps its "Image 1: <image> ..." placeholders, so each image goes where the text names it."""
    from vlmkit.data.conversations import read_conversations

    samples = read_conversations(_first(root, f"multi_{split}.json"))[:limit]
    return [EvalSample(s.id, list(s.images), s.conversations[0]["value"], [s.conversations[1]["value"]],
                       {"question_type": s.type}) for s in samples]


register_task(Task(
    "shapes_multi", "ShapesWorld multi-image questions (2-3 images: compare, per-image attribute, totals, which "
    "image), exact match", "exact_match", "multi_{split}.json (ShapesWorld)", _shapes_multi, lambda s: s.question,
    _exact, group_by="question_type", max_new_tokens=8))
register_task(Task(
    "vqav2", "VQAv2 open-ended questions, the official VQA accuracy (answer normalisation, 10 annotators)",
    "vqa_accuracy", "vqav2_{split}_*.json, or v2_OpenEnded_mscoco_{split}_questions.json + "
    "v2_mscoco_{split}_annotations.json and {split}/ images", _vqav2, lambda s: s.question, _vqa,
    group_by="answer_type", max_new_tokens=16))
register_task(Task(
    "pope", "POPE object hallucination probes: accuracy, precision, recall, F1, yes-ratio per negative sampling",
    "accuracy", "pope_{split}_{random,popular,adversarial}.jsonl, or coco_pope_*.json and val2014/ images", _pope,
    lambda s: s.question, _pope_score, max_new_tokens=8, summarize=_pope_summary))


def _captions(root: Path, split: str, limit: int | None) -> list[EvalSample]:
    path = _first(root, f"captions_{split}.json", f"annotations/captions_{split}.json")
    return read_coco_captions(path, root if path.parent == root else root / split, limit)


def _caption_summary(predictions: list[str], samples: list[EvalSample]) -> dict:
    """The COCO caption metrics over the whole set (CIDEr's weights come from all references); per-image CIDEr
    for the confidence interval."""
    ev = evaluate_captions({s.id: p for s, p in zip(samples, predictions)}, {s.id: s.answers for s in samples})
    return {**ev.scores, "n_empty": float(len(ev.empty_predictions)),
            "_per_sample": [float(ev.per_image[s.id]["CIDEr"]) for s in samples]}


def _grounding(root: Path, split: str, limit: int | None) -> list[EvalSample]:
    return read_grounding(_first(root, f"grounding_{split}.json", f"refcoco_{split}.json"), root, limit)


def _grounding_score(prediction: str, sample: EvalSample) -> dict[str, float]:
    r = score_grounding(prediction, sample.meta["box"], sample.meta["width"], sample.meta["height"])
    return {"accuracy": float(r.correct), "iou": r.iou, "unparsed": float(not r.parsed)}


register_task(Task(
    "coco_captions", "COCO-style captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap; needs Java)",
    "CIDEr", "captions_{split}.json (COCO captions layout) and its images", _captions,
    lambda s: "Provide a one-sentence caption for the provided image.", lambda p, s: {}, max_new_tokens=32,
    summarize=_caption_summary))
register_task(Task(
    "grounding", "Referring expressions (RefCOCO-style): a box parsed from the answer, accuracy at IoU >= 0.5",
    "accuracy", "grounding_{split}.json (image, expression, bbox [x, y, w, h], width, height)", _grounding,
    lambda s: f"Please provide the bounding box coordinate of the region this sentence describes: {s.question}.",
    _grounding_score, max_new_tokens=32))


CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."  # LLaVA-1.5's


def _choices(root: Path, split: str, limit: int | None) -> list[EvalSample]:
    return read_multiple_choice(_first(root, f"choice_{split}.json"), root, limit)


def _choice_prompt(sample: EvalSample) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in sample.meta["options"].items())
    return f"{sample.question}\n{options}\n{CHOICE_INSTRUCTION}"


def _choice_score(prediction: str, sample: EvalSample) -> dict[str, float]:
    r = score_choice(prediction, sample.meta["options"], sample.answers[0], style="mmbench")
    return {"accuracy": r.score, "unparsable": float(not r.parsed)}


def _circular(root: Path, split: str, limit: int | None) -> list[EvalSample]:
    """Each question once per rotation of its options (MMBench's CircularEval), the rotations consecutive."""
    out = []
    for s in _choices(root, split, limit):
        for r in circular_rotations(s.meta["options"], s.answers[0]):
            out.append(EvalSample(f"{s.id}/{r.shift}", s.images, s.question, [r.answer],
                                  {**s.meta, "options": r.options, "question_id": s.id, "shift": r.shift}))
    return out


def _circular_summary(predictions: list[str], samples: list[EvalSample]) -> dict:
    groups: dict[str, list] = defaultdict(list)
    for p, s in zip(predictions, samples):
        groups[s.meta["question_id"]].append(score_choice(p, s.meta["options"], s.answers[0], style="mmbench"))
    out = circular_accuracy(groups)
    out["_per_sample"] = [float(all(r.correct for r in g)) for g in groups.values()]  # per question
    return {k: float(v) if not isinstance(v, list) else v for k, v in out.items()}


register_task(Task(
    "multiple_choice", "Multiple choice (ScienceQA / MMMU style): the option letter extracted as MMBench does",
    "accuracy", "choice_{split}.json (question, options, answer letter or index, image)", _choices, _choice_prompt,
    _choice_score, group_by="category", max_new_tokens=8))
register_task(Task(
    "multiple_choice_circular", "MMBench CircularEval: each question asked once per rotation of its options, "
    "right only if every rotation is", "circular_accuracy", "choice_{split}.json", _circular, _choice_prompt,
    _choice_score, max_new_tokens=8, summarize=_circular_summary, failure_unit="question_id"))


def _gqa(root: Path, split: str, limit: int | None) -> list[EvalSample]:
    return read_gqa(_first(root, f"{split}_balanced_questions.json", f"{split}_all_questions.json"),
                    root / "images", limit)


def _scienceqa(root: Path, split: str, limit: int | None) -> list[EvalSample]:
    path = _first(root, "problems.json", f"choice_{split}.json")  # ScienceQA's own file, or ShapesWorld's choices
    if path.name == "problems.json":
        return read_scienceqa(path, root / "images", split, limit)
    return read_multiple_choice(path, root, limit)


def _scienceqa_score(prediction: str, sample: EvalSample) -> dict[str, float]:
    r = score_choice(prediction, sample.meta["options"], sample.answers[0], style="scienceqa")
    return {"accuracy": r.score, "unparsable": float(not r.parsed)}


register_task(Task(
    "gqa", "GQA balanced questions, exact match after LLaVA's clean-up of the answer (strip, '.', lower-case)",
    "accuracy", "{split}_balanced_questions.json and images/ (e.g. --split testdev)", _gqa, lambda s: s.question,
    lambda p, s: {"accuracy": gqa_accuracy(p, s.answers[0]).score}, group_by="structural_type", max_new_tokens=16))
register_task(Task(
    "scienceqa", "ScienceQA multiple choice, letters extracted as LLaVA's ScienceQA evaluation does",
    "accuracy", "problems.json and images/{split}/{pid}/, or choice_{split}.json", _scienceqa, _choice_prompt, _scienceqa_score,
    group_by="category", max_new_tokens=8))


# zero-shot classification and retrieval: a dual encoder (CLIP, SigLIP) compares embeddings, with CLIP's prompt
# ensembling for the class names; a generative model ranks candidates by Pipeline.rank (their per-token
# log-likelihood as the reply)


def _image_folder(root: Path, split: str, limit: int | None) -> list[EvalSample]:
    """``root/imagefolder_{split}``, else ``root/{split}``, else ``root`` itself when it holds the class folders
    (your own ImageFolder: ``--data my_folder``)."""
    candidates = (root / f"imagefolder_{split}", root / split)
    folder = next((c for c in candidates if c.is_dir()), root)
    samples, classes, _ = read_image_folder(folder, limit)
    templates = read_class_templates(folder)
    for s in samples:
        s.meta["classes"] = classes
        s.meta["templates"] = templates
    return samples


def _classify(pipe, samples: list[EvalSample], root: Path, progress: bool = False):
    labels = [s.meta["label"] for s in samples]
    classes = samples[0].meta["classes"] if samples else []
    if pipe.can_embed:
        weights = pipe.classifier(classes, samples[0].meta["templates"])  # [C, E]
        logits = pipe.embed_images([s.images[0] for s in samples], progress=progress) @ weights.t()
        extra = zero_shot_classification_metrics(logits, labels, ks=(1, 5))
        extra = {"mean_per_class_recall": extra["mean_per_class_recall"],
                 "prompt_templates": float(len(samples[0].meta["templates"]))}
        logits = logits.tolist()
    else:
        logits = [pipe.rank(s.images, s.question, s.meta["classes"])
                  for s in tqdm(samples, desc="classify", unit="image", disable=not progress, dynamic_ncols=True)]
        extra = {}
    ranks = classification_ranks(logits, labels).tolist()
    predictions = [classes[max(range(len(row)), key=row.__getitem__)] for row in logits]
    scores = [{"top1_accuracy": float(r < 1), "top5_accuracy": float(r < 5)} for r in ranks]
    return predictions, scores, extra


def _retrieval_samples(root: Path, split: str, limit: int | None) -> list[EvalSample]:
    return _captions(root, split, limit)


RETRIEVAL_PROMPT = "Provide a one-sentence caption for the provided image."


def _retrieve(pipe, samples: list[EvalSample], root: Path, progress: bool = False):
    """Every image against every caption of the set, recall@K both ways. Similarity: the cosine of the embeddings
    (a dual encoder) or the caption's per-token log-likelihood as the image's caption (a generative model)."""
    texts = [t for s in samples for t in s.answers]
    owner = [i for i, s in enumerate(samples) for _ in s.answers]
    extra = {}
    if pipe.can_embed:
        images = pipe.embed_images([s.images[0] for s in samples], progress=progress)
        sim = (images @ pipe.embed_texts(texts, progress=progress).t()).tolist()
        extra["truncated_captions"] = float(pipe.last_truncated)
    else:
        sim = [pipe.rank(s.images, RETRIEVAL_PROMPT, texts)
               for s in tqdm(samples, desc="retrieval", unit="image", disable=not progress, dynamic_ncols=True)]
    best = image_to_text_ranks(sim, owner).tolist()
    predictions = [texts[max(range(len(row)), key=row.__getitem__)] for row in sim]
    scores = [{"image_to_text_recall@1": float(r < 1), "image_to_text_recall@5": float(r < 5)} for r in best]
    return predictions, scores, {**retrieval_metrics(sim, owner, ks=(1, 5, 10)), **extra}


register_task(Task(
    "zero_shot_classification", "ImageFolder classification, top-1/top-5: image and prompt-ensembled class embeddings "
    "(dual encoders) or class names ranked by their likelihood as the answer", "top1_accuracy",
    "imagefolder_{split}/<class>/<image> (or {split}/, or the folder itself), optional classes.json", _image_folder,
    lambda s: s.question, lambda p, s: {}, evaluate=_classify))
register_task(Task(
    "retrieval", "Image-caption retrieval over a captions file: recall@1/5/10 both ways, by embedding similarity "
    "(dual encoders) or caption likelihood", "image_to_text_recall@1", "captions_{split}.json (COCO captions layout)",
    _retrieval_samples, lambda s: RETRIEVAL_PROMPT, lambda p, s: {}, evaluate=_retrieve))


# the benchmarks in their official layouts (MMMU, MMBench, MME, TextVQA, DocVQA, ...) register themselves
from vlmkit.eval import benchmarks  # noqa: E402,F401
