"""Evaluation throughput: the same POPE probes answered with each image shared across its questions (read and
encoded once per batch) and with every question carrying its own copy, and the time to build a model for a
checkpoint with and without PyTorch's default random init, as one JSON line.

    python bench/eval.py [--images 64] [--batch-size 64] [--threads 2] [--preset smolvlm-256m]

The model is a from-scratch tiny-llava (random weights: speed does not depend on them) with a tokenizer trained
on the generated ShapesWorld split. Both settings of each comparison run in the same process on the same data,
so their ratios are meaningful on a noisy machine; absolute figures are not.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from vlmkit.config import apply_overrides
from vlmkit.data.conversations import read_conversations
from vlmkit.data.shapes import generate_shapes
from vlmkit.eval.readers import read_pope
from vlmkit.models import build_model
from vlmkit.pipeline import Pipeline
from vlmkit.presets import get_preset
from vlmkit.processing import Processor, TextTokenizer, train_bpe


def answers_per_second(pipe: Pipeline, requests: list, batch_size: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        pipe.chat_batch(requests[i:i + batch_size], max_new_tokens=4)
    return len(requests) / (time.perf_counter() - t0)


def build_seconds(preset: str, init: bool) -> float:
    """Seconds to build the preset's model for a checkpoint to fill: ``init`` with PyTorch's default random
    init (what build_model(init=False) did before it skipped it), else as build_model(init=False) does now."""
    cfg = get_preset(preset).model
    t0 = time.perf_counter()
    model = build_model(cfg, 0, init=False)
    if init:
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64, help="test images probed (6 POPE questions each)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default="smolvlm-256m", help="preset whose model build is timed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "shapes"
        generate_shapes(data, n=args.images * 10, seed=0, progress=False)
        texts = [t["value"] for s in read_conversations(data / "train.json") for t in s.conversations]
        tokenizer = TextTokenizer(train_bpe(texts, 1024))
        preset = get_preset("tiny-llava")
        model = build_model(apply_overrides(preset.model, {"lm.vocab_size": tokenizer.vocab_size}),
                            tokenizer.token_id("<image>")).eval()
        processor = Processor(apply_overrides(preset.processor, {"image_seq_len": model.image_seq_len}), tokenizer)
        pipe = Pipeline(model, processor)
        samples = read_pope(data / "pope_test_random.jsonl", data)
        samples = samples[:args.images * 6]
        shared = [(s.images, s.question) for s in samples]
        separate = [([Image.open(s.images[0]).convert("RGB")], s.question) for s in samples]
        answers_per_second(pipe, separate[:args.batch_size], args.batch_size)  # warm-up
        rates = {"separate": answers_per_second(pipe, separate, args.batch_size),
                 "shared": answers_per_second(pipe, shared, args.batch_size)}
    build = {"default_init": build_seconds(args.preset, True), "skipped_init": build_seconds(args.preset, False)}
    print(json.dumps({
        "bench": "eval", "config": {"images": args.images, "questions": len(samples), "batch_size": args.batch_size,
                                    "threads": args.threads, "build_preset": args.preset},
        "answers_per_second": {k: round(v, 1) for k, v in rates.items()},
        "shared_over_separate": round(rates["shared"] / rates["separate"], 2),
        "build_seconds": {k: round(v, 2) for k, v in build.items()},
        "default_over_skipped_init": round(build["default_init"] / build["skipped_init"], 1),
    }))


if __name__ == "__main__":
    main()
