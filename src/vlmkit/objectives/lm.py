"""The ``lm`` objective: next-token cross-entropy on the assistant replies of conversations (LLaVA JSON, COCO
captions, or WebDataset shards of them), the mean over every supervised token of the global batch.

A step draws this rank's micro-batches (train/batches.py), collates each padded or packed (data/collate.py), and
accumulates the gradients of each micro-batch's loss weighted by its share of the global batch's supervised tokens,
so that gradient accumulation and several processes give the gradient of the whole batch. With the image tower
frozen and ``train.precompute_frozen_vision``, the tower's output of every training image is computed once at the
stage's start and looked up (train/frozen_features.py). Validation is the loss on the held-out conversations.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from vlmkit.batch import IGNORE, Batch, MediaInputs
from vlmkit.data.collate import collate, collate_packed
from vlmkit.data.conversations import ConversationDataset, ReadReport, group_by_image, read_conversations
from vlmkit.errors import ConfigError
from vlmkit.objectives import Objective, StepResult, register
from vlmkit.train.batches import LocalBatches, StreamedBatches, shard_samples
from vlmkit.train.frozen_features import FrozenVisionFeatures
from vlmkit.train.optim import trained_groups
from vlmkit.train.precision import autocast


def read_split(recipe, files: list[str], what: str, report: ReadReport) -> list:
    """The conversations of ``files`` under data.path; a file named that does not exist is an error naming it."""
    root = Path(recipe.data.path) if recipe.data.path else Path(".")
    out = []
    for f in files:
        path = root / f
        if not path.is_file():
            raise ConfigError(f"{what}: {path} does not exist (files are relative to data.path {str(root)!r})")
        out += read_conversations(path, recipe.data.image_root or None, recipe.data.skip_bad_samples, report=report)
    return out


def load_data(recipe, log=print) -> tuple[list, list, ReadReport]:
    """(training samples, validation samples, read report) of the recipe's data section."""
    report = ReadReport()
    train = [] if recipe.data.shards else read_split(recipe, recipe.data.train, "data.train", report)
    val = read_split(recipe, [recipe.data.val], "data.val", report) if recipe.data.val else []
    if report.skipped:
        log(f"skipped {report.skipped} of {report.rows} rows (--skip-bad-samples); first: {report.reasons[0]}")
    if not train and not recipe.data.shards:
        raise ConfigError(f"no training samples in {recipe.data.path or '.'}: {recipe.data.train}")
    return train, val[: recipe.data.val_samples], report


def forward_batch(model, batch: Batch, features: FrozenVisionFeatures | None = None, labels: bool = True):
    """The model on a collated batch: its images, or the frozen tower's precomputed ``features`` looked up by path
    (``MediaInputs.tower``); packed or grouped batches carry their documents, segments and positions (the model
    builds their mask). Right padding + causal attention needs no padding mask: real tokens never see padding."""
    if features is not None:
        tower = features.lookup(batch.image_paths)
        batch = dataclasses.replace(batch, media=MediaInputs(tower[:, :0, :0], [0] * len(tower), tower=tower))
    if not labels:
        batch = dataclasses.replace(batch, labels=None)
    return model(batch)


@torch.no_grad()
def evaluate_loss(model, ds: ConversationDataset, pad_id: int, batch_size: int = 64) -> float:
    modes = {m: m.training for m in model.modules()}  # restored after: frozen modules stay in eval mode
    model.eval()
    total, n = 0.0, 0
    for start in range(0, len(ds), batch_size):
        out = forward_batch(model, collate([ds[i] for i in range(start, min(len(ds), start + batch_size))], pad_id))
        total += float(out.loss) * out.n_tokens
        n += out.n_tokens
    for m, training in modes.items():
        m.train(training)
    return total / max(n, 1)


def conversation_texts(samples) -> list[str]:
    """The texts of conversations, image placeholders blanked: what a from-scratch tokenizer learns from."""
    return [str(turn.get("value", turn.get("content", ""))).replace("<image>", " ")
            for s in samples for turn in s.conversations]


@register
class LMObjective(Objective):
    """next-token loss on the assistant replies of conversations"""

    name = "lm"

    def __init__(self, run):
        super().__init__(run)
        self.samples, self.val_samples, self.report = load_data(run.recipe, run.log)
        self.features = None

    def texts(self) -> list[str]:
        recipe = self.run.recipe
        return conversation_texts(self.samples if not recipe.data.shards else shard_samples(recipe))

    def bind(self, model, processor) -> None:
        run, recipe, t = self.run, self.run.recipe, self.run.recipe.train
        samples, streamed = self.samples, bool(recipe.data.shards)
        if recipe.data.group_turns and not streamed:
            if not processor.family.capabilities.shared_prefix:
                raise ConfigError(f"data.group_turns {recipe.data.group_turns}: grouped questions share one prompt "
                                  f"prefix at plain positions with a causal segment mask, and the "
                                  f"{processor.family.name} family reads each question its own way (its positions, "
                                  f"its attention or what its image encoder reads); set data.group_turns: 0")
            samples = group_by_image(samples, recipe.data.group_turns, t.seed)
        self.val_ds = ConversationDataset(self.val_samples, processor) if self.val_samples else None
        self.train_ds = None if streamed else ConversationDataset(samples, processor)
        self.batches = StreamedBatches(recipe, processor, run.info, run.state, run.log) if streamed else \
            LocalBatches(self.train_ds, recipe, run.info, run.state)
        if t.packing and streamed and not t.pack_length:
            raise ConfigError("train.packing with data.shards needs train.pack_length (the stream's longest sample "
                              "is not known in advance)")
        self.pack_length = t.pack_length or (max(self.batches.lengths) if t.packing and not streamed else 0)
        self.pad_id = processor.tokenizer.pad_id
        self.all_images = [p for x in samples for p in x.images]

    def describe(self) -> str:
        val = len(self.val_ds) if self.val_ds else 0
        packed = f"; packed into rows of {self.pack_length} tokens" if self.run.recipe.train.packing else ""
        return f"{self.batches.n_samples} training sequences, {val} validation samples{packed}"

    def collate(self, items) -> Batch:
        if self.run.recipe.train.packing:
            return collate_packed(items, self.pad_id, self.pack_length)
        return collate(items, self.pad_id)

    def start(self, stage, si: int, model) -> None:
        """A stage on a frozen tower reads the tower's precomputed output (``train.precompute_frozen_vision``)."""
        self.features = None
        if self.train_ds is not None:
            self.train_ds.load_images = True
        t, run = self.run.recipe.train, self.run
        if not t.precompute_frozen_vision or "vision" in trained_groups(model, stage) or self.train_ds is None:
            return
        family = run.processor.family
        if not family.capabilities.tower_cache:
            raise ConfigError(f"train.precompute_frozen_vision: the {family.name} family's image features are not "
                              f"the tower's output of each image alone at one size (tiled or resized images, or a "
                              f"question read with the image, as InstructBLIP's); set it to false")
        if run.info.strategy == "fsdp":
            raise ConfigError("train.precompute_frozen_vision with train.distributed fsdp: the sharded tower cannot "
                              "run outside the model's forward; set it to false")
        t0 = time.perf_counter()
        self.features = FrozenVisionFeatures(model.image_tower(), run.processor, self.all_images,
                                             progress=run.progress)
        self.train_ds.load_images = False
        run.elapsed += time.perf_counter() - t0
        run.log(f"  vision features of {len(self.features):,} images precomputed in {time.perf_counter() - t0:.1f} "
                f"s ({self.features.nbytes / 2**20:,.0f} MiB)")

    def step(self, net, model) -> StepResult:
        info = self.run.info
        micro = [self.collate(items) for items in self.batches.next_step()]
        sums = [float(sum(int((b.labels[:, 1:] != IGNORE).sum()) for b in micro)),
                float(sum(b.n_samples for b in micro)), float(sum(b.real_tokens for b in micro)),
                float(sum(b.input_ids.numel() for b in micro))]
        n_sup, samples, tokens, slots = info.all_sum(sums)
        loss_sum = 0.0
        for batch in micro:
            with autocast(self.run.recipe.train.precision):
                res = forward_batch(net, batch, self.features)
            # the mean over every supervised token of the global batch (all micro-batches, all ranks): DDP and FSDP
            # average gradients over ranks, hence the factor world (a micro-batch without supervised tokens has a
            # NaN mean: it contributes zero, gradients included)
            (res.loss.nan_to_num(0.0) * (res.n_tokens * info.world / max(n_sup, 1))).backward()
            loss_sum += float(res.loss.detach().nan_to_num(0.0)) * res.n_tokens
        loss = info.all_sum([loss_sum])[0] / max(n_sup, 1)
        return StepResult(loss, int(samples), int(tokens), int(slots), {"samples": int(samples)})

    def row(self, result: StepResult) -> dict:
        run = self.run
        return {"samples_per_second": run.samples / run.elapsed, "tokens_per_second": run.tokens / run.elapsed,
                "padding_fraction": run.padding.fraction, **result.metrics, "elapsed": run.elapsed}

    def postfix(self, result: StepResult) -> dict:
        return {"samples_s": f"{self.run.samples / self.run.elapsed:.1f}"}

    def validate(self, model, last: bool) -> dict[str, float]:
        if not self.val_ds:
            return {}
        return {"val_loss": evaluate_loss(model, self.val_ds, self.pad_id)}

    def state(self) -> dict:
        return self.batches.state()


__all__ = ["LMObjective", "evaluate_loss", "forward_batch", "load_data"]
