"""The ``unified`` objective: text-to-image and image-to-text in one model and one stage (Janus, Chameleon, Emu3).

Two kinds of sample are drawn from one stream, as the data holds them:

- **image-to-text**: the conversations of ``data.train`` (LLaVA JSON), supervised on the replies as ``lm`` does;
- **text-to-image**: the image-caption pairs of the stage's ``pairs`` file (``t2i_pairs_train.csv`` from ``vlmkit
  data shapes --t2i N``): the caption in the family's image-generation prompt (``Processor.image_prompt``), then the
  image's tokens as the family writes them (its VQ codes, plus row or image ends), supervised on those tokens. The
  codes of every image are computed once, when the stage binds, by the model's frozen VQ tokenizer.

The loss is ``text_weight * (mean loss over the text targets) + image_weight * (mean loss over the image
targets)``, each mean over the whole global batch (micro-batches and ranks), so the two weights say how much each
task counts whatever their token counts. ``cond_dropout``: the share of text-to-image samples whose prompt is the
family's unconditional one, which classifier-free guidance compares with at sampling time (drawn per sample and
step from the run's seed, so a resumed run drops the same ones). The image tokens are what the family trains on
(``Family.t2i_training_tokens``, from the same per-sample, per-step generator): an autoregressive family reads them
as they are and predicts each from the ones before; a mask-predict family (Show-o) reads some codes replaced by its
mask id and predicts the originals there. Validation: the text loss on ``data.val``'s
conversations and the image loss on up to ``data.val_samples`` held-out pairs (``t2i_pairs_val.csv`` beside the
training pairs, when there is one).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from vlmkit.batch import IGNORE
from vlmkit.data.collate import Item
from vlmkit.data.pairs import read_pairs
from vlmkit.errors import ConfigError
from vlmkit.image_generation import image_tokens
from vlmkit.objectives import StepResult, register
from vlmkit.objectives.lm import LMObjective, forward_batch
from vlmkit.train.batches import LocalBatches
from vlmkit.train.precision import autocast

KINDS = ("text", "image")


class CodePairs:
    """Text-to-image samples: each pair's prompt ids (conditional and unconditional) and its image's tokens."""

    def __init__(self, pairs, processor, model, where: str, progress: bool = False, batch_size: int = 128):
        from tqdm.auto import tqdm

        self.pairs, grid = pairs, model.image_grid
        paths = sorted({p.image for p in pairs})
        codes: dict[Path, torch.Tensor] = {}
        device = next(model.parameters()).device
        for start in tqdm(range(0, len(paths), batch_size), desc="image codes", unit="batch",
                          disable=not progress, dynamic_ncols=True):
            chunk = paths[start:start + batch_size]
            media = processor.prepare_images(chunk, where).to(device)
            codes.update(zip(chunk, model.encode_codes(media).cpu()))
        self.model, self.family = model, processor.family
        self.tokens = [image_tokens(model, codes[p.image]) for p in pairs]
        self.cond = [processor.image_prompt(p.caption, grid, where=p.source) for p in pairs]
        self.uncond = [processor.image_prompt(p.caption, grid, unconditional=True, where=p.source) for p in pairs]
        self.empty = processor.prepare_images([], "text-to-image sample")
        h, w = grid
        forced = [t for t in model.image_plan(h, w) if t is not None]
        self.image_ids = torch.cat([model.code_ids(torch.arange(model.codebook_size)),
                                    torch.tensor(forced, dtype=torch.long)])

    def counts(self, batch) -> tuple[int, int]:
        """(text targets, image targets) of a collated batch (:func:`split_counts`)."""
        return split_counts(batch, self.image_ids)

    def __len__(self) -> int:
        return len(self.pairs)

    def length(self, i: int) -> int:
        return max(len(self.cond[i]), len(self.uncond[i])) + len(self.tokens[i])

    def item(self, i: int, unconditional: bool, rng: random.Random) -> Item:
        """Sample ``i`` with its conditional or unconditional prompt; its image tokens as the family trains them
        (``Family.t2i_training_tokens``: as they are for an autoregressive family, some codes masked for a
        mask-predict one, drawn from ``rng``)."""
        prompt = self.uncond[i] if unconditional else self.cond[i]
        inputs, targets = self.family.t2i_training_tokens(self.model, self.tokens[i], rng)
        ids = prompt + inputs
        labels = [IGNORE] * len(prompt) + targets
        n = len(ids)
        return Item(torch.tensor(ids), torch.tensor(labels), torch.arange(n), torch.zeros(n, dtype=torch.long),
                    len(prompt), self.empty, [])


class _Length:
    """What LocalBatches reads of a sample it has not drawn: its length."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class MixedDataset:
    """Conversations first, then text-to-image pairs, as one indexable dataset; ``step`` (set before each draw)
    seeds the condition dropout of the pairs drawn."""

    def __init__(self, conversations, pairs: CodePairs, seed: int, dropout: float):
        self.conv, self.pairs, self.seed, self.dropout = conversations, pairs, seed, dropout
        self.n_conv = len(conversations) if conversations is not None else 0
        self.encoded = (list(conversations.encoded) if conversations is not None else []) + \
            [_Length(pairs.length(i)) for i in range(len(pairs))]
        self.step = 0

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> Item:
        if i < self.n_conv:
            return self.conv[i]
        k = i - self.n_conv
        rng = random.Random(f"{self.seed}:{self.step}:{k}")
        drop = rng.random() < self.dropout
        return self.pairs.item(k, drop, rng)


def t2i_pairs(pairs, processor, model, where: str, progress: bool = False):
    """The text-to-image samples of ``pairs`` as the family trains on them (``Family.t2i_pairs``; by default
    :class:`CodePairs`, a VQ family's codes)."""
    made = processor.family.t2i_pairs(pairs, processor, model, where, progress)
    return made if made is not None else CodePairs(pairs, processor, model, where, progress)


def check_pair_stages(recipe, objective: str) -> None:
    """The checks every stage of ``objective`` that reads text-to-image pairs shares: one pairs file for all of them
    and ``cond_dropout`` in [0, 1)."""
    stages = [s for s in recipe.stages if s.objective == objective]
    if len({s.pairs for s in stages}) > 1:
        raise ConfigError(f"{objective} stages read one pairs file; got {sorted({s.pairs for s in stages})}")
    for i, s in enumerate(recipe.stages):
        if s.objective == objective and not 0 <= s.cond_dropout < 1:
            raise ConfigError(f"stages[{i}].cond_dropout must be in [0, 1), got {s.cond_dropout}")


def read_stage_pairs(recipe, stage) -> tuple[Path, list, list]:
    """(path, rows, held-out rows) of a stage's text-to-image pairs: ``stage.pairs`` under ``data.path`` (the data
    section's CSV keys and image root), and up to ``data.val_samples`` pairs of its ``_val`` twin when there is
    one; ConfigError naming the file when it is missing."""
    root = Path(recipe.data.path) if recipe.data.path else Path(".")
    path = root / stage.pairs
    if not path.is_file():
        raise ConfigError(f"stages.pairs: {path} does not exist (text-to-image pairs: image,caption CSV; "
                          f"ShapesWorld's: vlmkit data shapes --t2i N)")
    rows = read_pairs(path, recipe.data.csv_image_key, recipe.data.csv_caption_key, recipe.data.csv_separator,
                      recipe.data.image_root or None)
    val = path.with_name(path.name.replace("_train", "_val"))
    return path, rows, read_pairs(val)[:recipe.data.val_samples] if val != path and val.is_file() else []


def split_counts(batch, image_ids: torch.Tensor) -> tuple[int, int]:
    """(text targets, image targets) of a collated batch: a target is an image token when its id is one the family
    writes in images (codes, row and image ends)."""
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE
    image = keep & torch.isin(targets, image_ids)
    return int(keep.sum()) - int(image.sum()), int(image.sum())


@register
class UnifiedObjective(LMObjective):
    """text-to-image and image-to-text in one stage: the LM loss on replies and on image tokens, weighted apart"""

    name = "unified"
    stage_options = ("pairs", "text_weight", "image_weight", "cond_dropout")
    unused_parameters = True  # a rank's samples may all be conversations, or all text-to-image pairs

    @classmethod
    def check_recipe(cls, recipe) -> None:
        if recipe.data.shards:
            raise ConfigError("unified stages read data.train's conversations and the stage's pairs from files; "
                              "data.shards (streamed) is not supported for them")
        check_pair_stages(recipe, cls.name)
        for i, s in enumerate(recipe.stages):
            if s.objective == cls.name and (s.text_weight < 0 or s.image_weight < 0
                                            or s.text_weight + s.image_weight == 0):
                raise ConfigError(f"stages[{i}]: text_weight and image_weight must be >= 0, not both 0; got "
                                  f"{s.text_weight}, {s.image_weight}")

    def __init__(self, run):
        super().__init__(run)
        self.stage_cfg = next(s for s in run.recipe.stages if s.objective == self.name)
        self.pairs_path, self.pair_rows, self.val_pair_rows = read_stage_pairs(run.recipe, self.stage_cfg)

    def texts(self) -> list[str]:
        return super().texts() + [p.caption for p in self.pair_rows]

    def bind(self, model, processor) -> None:
        super().bind(model, processor)
        if not processor.family.capabilities.generate_images:
            raise ConfigError(f"objective unified trains a model that generates images; the {processor.family.name} "
                              f"family does not (train it with: {', '.join(processor.family.objectives)})")
        t0 = time.perf_counter()
        self.code_pairs = t2i_pairs(self.pair_rows, processor, model, str(self.pairs_path), self.run.progress)
        self.val_pairs = t2i_pairs(self.val_pair_rows, processor, model, "val pairs") if self.val_pair_rows else None
        self.run.log(f"  {len(self.code_pairs):,} text-to-image pairs prepared in {time.perf_counter() - t0:.1f} s")
        t = self.run.recipe.train
        self.mixed = MixedDataset(self.train_ds, self.code_pairs, t.seed, self.stage_cfg.cond_dropout)
        self.batches = LocalBatches(self.mixed, self.run.recipe, self.run.info, self.run.state)
        self.pack_length = t.pack_length or (max(self.batches.lengths) if t.packing else 0)

    def describe(self) -> str:
        return (f"{self.mixed.n_conv} conversations and {len(self.code_pairs)} text-to-image pairs "
                f"({len(self.val_ds) if self.val_ds else 0} + {len(self.val_pairs) if self.val_pairs else 0} "
                f"held out)")

    def start(self, stage, si: int, model) -> None:
        super().start(stage, si, model)
        self.stage_cfg = stage
        self.mixed.dropout = stage.cond_dropout

    def step(self, net, model) -> StepResult:
        info, st = self.run.info, self.stage_cfg
        self.mixed.step = self.run.step
        micro = [self.collate(items) for items in self.batches.next_step()]
        counts = [self.code_pairs.counts(b) for b in micro]
        n_text, n_image, samples, tokens, slots = info.all_sum([
            float(sum(c[0] for c in counts)), float(sum(c[1] for c in counts)), float(sum(b.n_samples for b in micro)),
            float(sum(b.real_tokens for b in micro)), float(sum(b.input_ids.numel() for b in micro))])
        weights = {"text": st.text_weight / max(n_text, 1), "image": st.image_weight / max(n_image, 1)}
        sums = {k: 0.0 for k in KINDS}
        for batch in micro:
            with autocast(self.run.recipe.train.precision):
                res = forward_batch(net, batch, self.features)
            if res.parts is None:
                raise ConfigError("objective unified needs a model that reports its text and image losses apart "
                                  "(ModelOutput.parts)")
            loss = sum(weights[k] * res.parts[k][0] for k in KINDS)
            (loss * info.world).backward()
            for k in KINDS:
                sums[k] += float(res.parts[k][0].detach())
        text_sum, image_sum = info.all_sum([sums["text"], sums["image"]])
        text_loss, image_loss = text_sum / max(n_text, 1), image_sum / max(n_image, 1)
        loss = st.text_weight * text_loss + st.image_weight * image_loss
        metrics = {"samples": int(samples), "text_loss": text_loss, "image_loss": image_loss}
        return StepResult(loss, int(samples), int(tokens), int(slots), metrics)

    def validate(self, model, last: bool) -> dict[str, float]:
        out = super().validate(model, last)
        if self.val_pairs is not None:
            out["val_image_loss"] = image_loss(model, self.val_pairs, self.pad_id)
        return out


@torch.no_grad()
def image_loss(model, pairs: CodePairs, pad_id: int, batch_size: int = 64) -> float:
    """The mean loss over the image tokens of held-out pairs (conditional prompts; a mask-predict family's masks
    drawn from a fixed per-pair seed, so every validation masks the same codes)."""
    from vlmkit.data.collate import collate

    modes = {m: m.training for m in model.modules()}
    model.eval()
    total, n = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        batch = collate([pairs.item(i, False, random.Random(f"val:{i}"))
                         for i in range(start, min(len(pairs), start + batch_size))], pad_id)
        out = model(batch)
        total += float(out.parts["image"][0])
        n += out.parts["image"][1]
    for m, training in modes.items():
        m.train(training)
    return total / max(n, 1)


__all__ = ["CodePairs", "MixedDataset", "UnifiedObjective", "check_pair_stages", "read_stage_pairs", "split_counts",
           "t2i_pairs"]
