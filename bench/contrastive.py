"""Dual-encoder (CLIP / SigLIP) throughput: the contrastive training step and the two embedding passes, as one
JSON line.

    python bench/contrastive.py [--preset tiny-clip] [--batch-size 64] [--steps 20] [--threads 2]
                                [--text-length 0] [--set KEY=VALUE ...]

The model is the preset's from-scratch dual encoder (random weights: speed does not depend on them), fed one
fixed batch of random images and random texts of ``--text-length`` tokens ending in end-of-text (0: the text
tower's context length, which is what SigLIP's processor pads to; CLIP's pads to the batch's longest text).
``train`` times forward (both towers and the configured loss) + backward + AdamW step + the logit-scale clamp;
``embed`` times ``encode_images`` and ``encode_texts`` under ``torch.no_grad`` in eval mode. Warm-up steps are
excluded; figures are medians over the timed steps, so a noisy neighbour on the machine moves them less
(``load_avg_1m``: the machine's 1-minute load average before and after the run; on a 2-core machine shared
with other jobs, 2 threads can be several times slower than 1).

``gflops`` is the training step's forward + backward FLOPs, counted once with torch's FlopCounterMode
(matmuls, the patch convolution, attention; AdamW's elementwise work and the normalisations are not counted),
divided by the median step time; ``peak_fraction`` divides it by 175 GFLOP/s, the fp32 matmul peak
measured on 2 threads of the development machines. FlopCounterMode has no formula for CPU attention
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward) and would silently leave attention
out, so the script registers torch's own SDPA formulas for those ops (attention counted in full, causal or
not, as torch counts it elsewhere; the backward includes flash attention's recomputed scores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from vlmkit.batch import Batch, MediaInputs
from vlmkit.config import apply_overrides, parse_value
from vlmkit.models import build_model, count_parameters
from vlmkit.presets import get_preset

PEAK_GFLOPS = 175.0
EOS = 2  # vlmkit's BPE puts </s> at id 2; the presets leave TextConfig.eos_token_id to the recipe

_aten = torch.ops.aten
CPU_ATTENTION_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(
            grad_out, q, k, v),
}


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        out[key] = parse_value(value)
    return out


def make_batch(model, batch_size: int, text_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    vision, text = model.cfg.vision, model.cfg.text
    pixels = torch.randn(batch_size, vision.channels, *vision.image_size)
    ids = torch.randint(3, text.vocab_size, (batch_size, text_length))
    ids[ids == text.eos_token_id] = 3
    ids[:, -1] = text.eos_token_id
    return pixels, ids


def pairs(pixels: torch.Tensor, ids: torch.Tensor) -> Batch:
    """The batch a dual encoder trains on: image i with text i."""
    return Batch(input_ids=ids, media=MediaInputs(pixels, [1] * len(pixels)))


def step_flops(model, pixels: torch.Tensor, ids: torch.Tensor) -> dict:
    """FLOPs of one forward + backward, by operator family."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        model(pairs(pixels, ids)).loss.backward()
    model.zero_grad(set_to_none=True)
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    attention = sum(v for k, v in by_op.items() if "attention" in k)
    return {"total": int(counter.get_total_flops()), "attention": attention}


def time_train(model, pixels, ids, steps: int, warmup: int) -> tuple[list[float], float]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, opt_time = [], 0.0
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(pairs(pixels, ids))
        out.loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.clamp_logit_scale()
        t2 = time.perf_counter()
        if step >= warmup:
            times.append(t2 - t0)
            opt_time += t2 - t1
    return times, opt_time / sum(times)


def time_embed(fn, x, steps: int, warmup: int) -> list[float]:
    times = []
    with torch.no_grad():
        for step in range(warmup + steps):
            t0 = time.perf_counter()
            fn(x)
            if step >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny-clip")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text-length", type=int, default=0,
                    help="tokens per text, end-of-text included (0: the text tower's context length)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="model config overrides, e.g. vision.depth=2 text.width=64")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]  # other jobs on the machine: the figures mean little when it is busy
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_preset(args.preset).model
    if not getattr(cfg, "text", None) or cfg.family not in ("clip", "siglip"):
        raise SystemExit(f"--preset {args.preset} is not a dual encoder (family clip or siglip)")
    overrides = parse_overrides(args.set)
    if cfg.text.eos_token_id >= cfg.text.vocab_size and "text.eos_token_id" not in overrides:
        overrides["text.eos_token_id"] = EOS  # the tiny presets' tokenizer is trained by the recipe
    cfg = apply_overrides(cfg, overrides)
    model = build_model(cfg, None)
    text_length = args.text_length or cfg.text.context_length
    pixels, ids = make_batch(model, args.batch_size, text_length)
    print(f"{args.preset}: {count_parameters(model) / 1e6:.2f} M parameters, {args.steps} steps of "
          f"{args.batch_size} pairs ...", file=sys.stderr, flush=True)

    flops = step_flops(model.train(), pixels, ids)
    train_times, opt_fraction = time_train(model, pixels, ids, args.steps, args.warmup)
    step_s = statistics.median(train_times)
    gflops = flops["total"] / step_s / 1e9
    model.eval()
    image_s = statistics.median(time_embed(model.encode_images, pixels, args.steps, args.warmup))
    text_s = statistics.median(time_embed(model.encode_texts, ids, args.steps, args.warmup))
    print(json.dumps({
        "bench": "contrastive",
        "config": {**vars(args), "text_length": text_length, "loss": cfg.contrastive.loss,
                   "image_size": list(cfg.vision.image_size), "parameters": count_parameters(model),
                   "torch": torch.__version__, "cpus": os.cpu_count(),
                   "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        "train": {"images_per_s": round(args.batch_size / step_s, 1), "step_ms": round(step_s * 1e3, 1),
                  "step_ms_min_max": [round(min(train_times) * 1e3, 1), round(max(train_times) * 1e3, 1)],
                  "gflop_per_step": round(flops["total"] / 1e9, 2),
                  "attention_flop_fraction": round(flops["attention"] / flops["total"], 3),
                  "gflops": round(gflops, 1), "peak_fraction": round(gflops / PEAK_GFLOPS, 3),
                  "optimizer_fraction": round(opt_fraction, 3)},
        "embed": {"images_per_s": round(args.batch_size / image_s, 1),
                  "texts_per_s": round(args.batch_size / text_s, 1)},
    }))


if __name__ == "__main__":
    main()
