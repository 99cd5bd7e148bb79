"""Training-step throughput of a preset on ShapesWorld: turn grouping, single turns, (when the stage freezes the
tower) grouping on precomputed tower features, and packed against padded batches on a mix of sequence lengths,
as one JSON line.

    python bench/train.py [--preset tiny-llava] [--batch-size 32] [--steps 20] [--threads 2] [--set K=V ...]

It times the recipe's language-model stage as the demo runs it (modules that stage freezes are frozen and in
eval mode, e.g. tiny-llava's pretrained tower). All settings run in the same process on the same data, so
their ratios are meaningful on a noisy machine; absolute figures are not. ``optimizer_fraction`` is the share of
step time spent in ``opt.step()`` (tiny-llava uses Muon; ``--set stages.1.optimizer=adamw`` to compare); the precomputed
setting excludes the one-off feature pass, reported separately as ``precompute_seconds``, and the others
the one-off image decoding. Step time includes building the batch. ``gflops`` counts the LM as 6 *
parameters * tokens (forward + backward) and the vision tower by its measured forward FLOPs per image
(torch's FlopCounterMode), times 3 if the stage trains it; ``peak_fraction`` divides it by 175 GFLOP/s, the
fp32 matmul peak measured on 2 threads of the development machines; ``measured_peak_fraction`` divides it by
the fp32 matmul rate this run measures itself (a 2048^2 matmul on the same threads). ``padding_fraction`` is
the share of token slots that held padding, ``peak_rss_mib`` the process's peak resident memory.

The packing comparison (``mixed_padded`` vs ``mixed_packed``) takes the same batches of a length mix (half the
images' questions grouped 8 per sequence, the other half single questions) and either pads each batch to its
longest sequence or packs it into rows of the longest sequence's length (data/collate.py): the same samples,
loss and gradients, fewer slots. ``packed_vs_padded_samples_ratio`` is the bar of issue 6 (>= 1.5).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from vlmkit.data.collate import PaddingStats, collate, collate_packed
from vlmkit.data.conversations import ConversationDataset, group_by_image, read_conversations
from vlmkit.data.shapes import generate_shapes
from vlmkit.models import count_parameters
from vlmkit.objectives.lm import conversation_texts, forward_batch
from vlmkit.train.build import build_for_recipe, prepare_tokenizer
from vlmkit.train.frozen_features import FrozenVisionFeatures
from vlmkit.train.optim import freeze_for_stage, make_optimizer, set_train_mode
from vlmkit.train.recipe import load_recipe
from vlmkit.train.stream import BatchStream

PEAK_GFLOPS = 175.0


def tower_forward_flops(model, image_size) -> float:
    """Forward FLOPs of the image tower for one image of ``image_size`` (height, width)."""
    x = torch.zeros(1, 3, *image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.image_tower().eval()(x)
    return float(counter.get_total_flops())


def matmul_peak(threads: int, n: int = 2048, reps: int = 5) -> float:
    """fp32 matmul GFLOP/s on this machine now (best of ``reps``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def run(model, ds, pad_id, stage, batch_size: int, steps: int, warmup: int = 3, precompute: bool = False,
        pack_length: int = 0, measured_peak: float = 0.0) -> dict:
    tower = tower_forward_flops(model, ds.processor.cfg.image_size) * (3 if "vision" in stage.train else 1)  # before the modes are set
    n_lm = count_parameters(model.lm) - model.lm.embed_tokens.weight.numel()
    freeze_for_stage(model, stage)
    set_train_mode(model, stage)
    opt = make_optimizer(model, stage)
    features, extra = None, {}
    if precompute:
        t0 = time.perf_counter()
        features = FrozenVisionFeatures(model.image_tower(), ds.processor, [p for s in ds.samples for p in s.images],
                                        progress=False)
        extra = {"precompute_seconds": round(time.perf_counter() - t0, 2), "precomputed_images": len(features)}
        ds.load_images = False
        tower = 0.0  # the tower no longer runs per step
    else:
        for i in range(len(ds)):  # decode every image once, as in every epoch after the first
            ds[i]
    stream = BatchStream(len(ds), batch_size, seed=0)
    padding = PaddingStats()
    seqs = tokens = answers = images = 0
    flops = 0.0
    elapsed = opt_time = 0.0
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        items = [ds[i] for i in stream.next()]
        batch = collate_packed(items, pad_id, pack_length) if pack_length else collate(items, pad_id)
        out = forward_batch(model, batch, features)
        out.loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step < warmup:
            continue
        t2 = time.perf_counter()
        elapsed += t2 - t0
        opt_time += t2 - t1
        n_tok = batch.real_tokens
        n_img = len(batch.image_paths)
        seqs += batch.n_samples
        tokens += n_tok
        padding.add(batch)
        images += n_img
        # an answer ends at each supervised end-of-turn: count label runs
        lab = batch.labels != -100
        answers += int((lab[:, 1:] & ~lab[:, :-1]).sum() + lab[:, 0].sum())
        flops += 6.0 * n_lm * n_tok + tower * n_img
    gflops = flops / elapsed / 1e9
    return {"sequences_per_s": round(seqs / elapsed, 2), "tokens_per_s": round(tokens / elapsed),
            "answers_per_s": round(answers / elapsed, 1), "images_per_s": round(images / elapsed, 1),
            "mean_tokens": round(tokens / seqs, 1), "gflops": round(gflops, 1),
            "peak_fraction": round(gflops / PEAK_GFLOPS, 3), "optimizer_fraction": round(opt_time / elapsed, 3),
            "padding_fraction": round(padding.fraction, 3),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            **({"measured_peak_fraction": round(gflops / measured_peak, 3)} if measured_peak else {}), **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny-llava")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="recipe overrides, as `vlmkit train --set` (e.g. model.lm.width=128)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "shapes"
        print(f"generating {args.images} ShapesWorld images ...", file=sys.stderr, flush=True)
        generate_shapes(data, n=args.images, seed=0, progress=False)
        recipe = load_recipe("tiny-llava", [f"data.path={data}", f"preset={args.preset}", *args.set])
        samples = read_conversations(data / "train.json")
        tokenizer = prepare_tokenizer(recipe, conversation_texts(samples), None)
        results = {}
        stage = recipe.stages[recipe.stage_index("lm")]
        peak = matmul_peak(args.threads)
        half = {p for p in sorted({x.images[0] for x in samples})[::2]}
        mix = group_by_image([x for x in samples if x.images[0] in half], 8, 0) + \
            [x for x in samples if x.images[0] not in half]
        settings = [("grouped", recipe.data.group_turns, False, False), ("single_turn", 0, False, False),
                    ("mixed_padded", "mix", False, False), ("mixed_packed", "mix", False, True)]
        if "vision" not in stage.train:
            settings.append(("grouped_precomputed", recipe.data.group_turns, True, False))
        for name, group, precompute, packed in settings:
            torch.manual_seed(0)
            _, model, processor = build_for_recipe(recipe, tokenizer)  # a fresh model for each setting
            print(f"timing {name}: {args.steps} steps of {args.batch_size} ...", file=sys.stderr, flush=True)
            rows = mix if group == "mix" else group_by_image(samples, group, 0) if group else samples
            ds = ConversationDataset(rows, processor)
            pack = max(len(e) for e in ds.encoded) if packed else 0
            results[name] = run(model, ds, tokenizer.pad_id, stage, args.batch_size, args.steps,
                                precompute=precompute, pack_length=pack, measured_peak=peak)
    ratio = results["grouped"]["answers_per_s"] / results["single_turn"]["answers_per_s"]
    if "grouped_precomputed" in results:
        results["precomputed_vs_grouped_answers_ratio"] = round(
            results["grouped_precomputed"]["answers_per_s"] / results["grouped"]["answers_per_s"], 2)
    packed_ratio = results["mixed_packed"]["sequences_per_s"] / results["mixed_padded"]["sequences_per_s"]
    print(json.dumps({"bench": "train", "config": {**vars(args), "group_turns": recipe.data.group_turns,
                                                   "parameters": count_parameters(model),
                                                   "measured_matmul_gflops": round(peak, 1)},
                      **results, "grouped_vs_single_answers_ratio": round(ratio, 2),
                      "packed_vs_padded_samples_ratio": round(packed_ratio, 2)}))


if __name__ == "__main__":
    main()
