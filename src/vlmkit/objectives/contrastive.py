"""Contrastive losses over a batch of image-text pairs, exact under data parallelism.

* ``clip``: the symmetric InfoNCE of CLIP (Radford et al. 2021): cross-entropy of each image over all texts and
  of each text over all images, the matching pair being the target, averaged over both directions.
* ``siglip``: the pairwise sigmoid loss of SigLIP (Zhai et al. 2023): every (image, text) pair is a binary
  classification, positive on the diagonal; ``-sum(log sigmoid(z_ij * logit_ij)) / n_images``.

The ``contrastive`` stage objective (:class:`ContrastiveObjective`) draws batches of whole images, one caption of
each, and validates with the held-out loss and retrieval.

Data parallelism (open_clip's ``gather_with_grad`` + ``local_loss``): every rank gathers the embeddings of all
ranks with :func:`torch.distributed.nn.functional.all_gather`, whose backward sums the gradients reaching each
rank's own shard, and computes the loss of its *own* rows against *all* columns. The mean of the ranks' losses
is then the loss of one process on the concatenated batch, and DDP's averaging of parameter gradients gives that
process's gradients exactly (tested with two gloo processes in tests/unit/test_contrastive_ddp.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlmkit.data.conversations import ReadReport
from vlmkit.data.pairs import PairDataset, read_pairs
from vlmkit.errors import ConfigError
from vlmkit.eval.metrics.retrieval import retrieval_metrics
from vlmkit.objectives import Objective, StepResult, register
from vlmkit.train.precision import autocast
from vlmkit.train.stream import BatchStream

KINDS = ("clip", "siglip")


def gather_embeddings(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(every rank's ``x`` concatenated along dim 0 with gradients flowing back to each shard, this rank's
    offset in it). Ranks must hold the same number of rows."""
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous())
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor | None = None, kind: str = "clip",
                     gather: bool | None = None) -> torch.Tensor:
    """The loss of L2-normalised ``image_embeds`` [B, E] against ``text_embeds`` [B, E] (row i of each is a pair)
    with the log temperature ``logit_scale`` (and SigLIP's ``logit_bias``). ``gather``: compare against every
    rank's batch (default: when torch.distributed is initialised with more than one process); the result is this
    rank's share, whose mean over ranks is the loss of the whole batch."""
    if kind not in KINDS:
        raise ValueError(f"contrastive loss must be one of {', '.join(KINDS)}, got {kind!r}")
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image and text embeddings must pair up row by row, got {tuple(image_embeds.shape)} and "
                         f"{tuple(text_embeds.shape)}")
    if gather is None:
        gather = _distributed()
    if gather:
        all_images, offset = gather_embeddings(image_embeds)
        all_texts, _ = gather_embeddings(text_embeds)
    else:
        all_images, all_texts, offset = image_embeds, text_embeds, 0
    scale = logit_scale.exp()
    n = image_embeds.shape[0]
    if kind == "clip":
        target = torch.arange(offset, offset + n, device=image_embeds.device)
        per_image = scale * image_embeds @ all_texts.t()  # [n, N]: own images against every text
        per_text = scale * text_embeds @ all_images.t()  # [n, N]: own texts against every image
        return (F.cross_entropy(per_image.float(), target) + F.cross_entropy(per_text.float(), target)) / 2
    if logit_bias is None:
        raise ValueError("the sigmoid (siglip) loss needs a learned logit bias")
    logits = scale * image_embeds @ all_texts.t() + logit_bias  # [n, N]
    signs = -torch.ones_like(logits)
    signs[torch.arange(n), torch.arange(offset, offset + n)] = 1.0
    return -F.logsigmoid((signs * logits).float()).sum() / n




# ------------------------------------------------------------------------------------------------ the stage objective


def load_pairs(recipe, log=print):
    """(training pairs, validation pairs, read report) of the recipe's data section; a file named that does not
    exist is an error naming it."""
    d = recipe.data
    root = Path(d.path) if d.path else Path(".")
    report = ReadReport()
    kw = dict(image_key=d.csv_image_key, caption_key=d.csv_caption_key, separator=d.csv_separator,
              image_root=d.image_root or None, skip_bad=d.skip_bad_samples, report=report)

    def read(files: list[str], what: str) -> list:
        for f in files:
            if not (root / f).is_file():
                raise ConfigError(f"{what}: {root / f} does not exist (files are relative to data.path {str(root)!r})")
        return [p for f in files for p in read_pairs(root / f, **kw)]

    train = read(d.train, "data.train")
    val = read([d.val], "data.val") if d.val else []
    if report.skipped:
        log(f"skipped {report.skipped} of {report.rows} rows (--skip-bad-samples); first: {report.reasons[0]}")
    if not train:
        raise ConfigError(f"no training pairs in {root}: {d.train}")
    return train, val, report


def first_images(pairs, n: int):
    """The pairs of the first ``n`` distinct images (all their captions)."""
    keep, out = set(), []
    for p in pairs:
        if p.image not in keep:
            if len(keep) == n:
                continue
            keep.add(p.image)
        out.append(p)
    return out


@torch.no_grad()
def validate(model, ds, batch_size: int) -> dict[str, float]:
    """Held-out loss (mean over fixed batches of ``batch_size`` images, each with its first caption; the loss of a
    contrastive model depends on the batch), retrieval recall@1/5 over the whole set (every caption of every image
    a candidate), and recall@1/5 of an image among the set's distinct captions (:func:`distinct_caption_recall`)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    losses, images = [], []
    for start in range(0, len(ds), batch_size):
        idx = list(range(start, min(len(ds), start + batch_size)))
        out = model(ds.batch(idx), gather=False)
        if len(idx) == batch_size or start == 0:
            losses.append(float(out.loss))
        images.append(out.image_embeds)
    rows = [r for caps in ds.captions for r in caps]
    owner = [i for i, caps in enumerate(ds.captions) for _ in caps]
    texts = torch.cat([model.encode_texts(ds.processor.pad_texts(rows[s:s + 512])) for s in range(0, len(rows), 512)])
    images = torch.cat(images)
    rec = retrieval_metrics(images @ texts.t(), owner, ks=(1, 5))
    rec |= distinct_caption_recall(images, texts, rows, owner, ks=(1, 5))
    for m, training in modes.items():
        m.train(training)
    return {"val_loss": sum(losses) / len(losses), **{f"val_{k}": v for k, v in rec.items()}}


def distinct_caption_recall(images: torch.Tensor, texts: torch.Tensor, rows: list[list[int]], owner: list[int],
                            ks=(1, 5)) -> dict[str, float]:
    """Image -> caption recall@K among the *distinct* captions (identical token ids are one candidate, and it is a
    hit for every image it describes). On class-like captions ("a red circle." for every red circle) the recall of
    an image's own captions among all of them is near chance even for a perfect model, since the same caption of
    other images ranks equally; among distinct captions it is the model's zero-shot accuracy over the set's
    descriptions, which reflects what it learned. With unique captions it equals image -> text recall."""
    distinct: dict[tuple, int] = {}
    first = []
    for j, r in enumerate(rows):
        if tuple(r) not in distinct:
            distinct[tuple(r)] = len(distinct)
            first.append(j)
    positives = [set() for _ in range(len(images))]
    for j, r in enumerate(rows):
        positives[owner[j]].add(distinct[tuple(r)])
    sim = images @ texts[first].t()  # [n_images, n_distinct]
    order = sim.argsort(dim=1, descending=True, stable=True)
    best = [min(int((order[i] == c).nonzero()) for c in positives[i]) for i in range(len(images))]
    out = {f"distinct_caption_recall@{k}": sum(b < k for b in best) / len(best) for k in ks}
    out["n_distinct_captions"] = float(len(first))
    return out


@register
class ContrastiveObjective(Objective):
    """a dual encoder's contrastive loss (CLIP's InfoNCE or SigLIP's sigmoid) on image-caption pairs"""

    name = "contrastive"

    @classmethod
    def check_recipe(cls, recipe) -> None:
        if recipe.train.distributed == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("train.distributed fsdp: dual encoders train under DDP (train.distributed: ddp); they "
                              "are small enough to replicate, and their loss already gathers every rank's embeddings")
        if recipe.train.grad_accum != 1:
            raise ConfigError(f"train.grad_accum {recipe.train.grad_accum}: a contrastive loss compares every pair of "
                              f"a batch, so micro-batches accumulated are not the loss of their union; set "
                              f"grad_accum: 1 and the batch you want as train.batch_size")

    def __init__(self, run):
        super().__init__(run)
        recipe = run.recipe
        self.pairs, self.val_pairs, self.report = load_pairs(recipe, run.log)

    def texts(self) -> list[str]:
        return [p.caption for p in self.pairs]

    def bind(self, model, processor) -> None:
        run, recipe = self.run, self.run.recipe
        self.train_ds = PairDataset(self.pairs, processor, seed=recipe.train.seed)
        self.val_ds = PairDataset(first_images(self.val_pairs, recipe.data.val_samples), processor) \
            if self.val_pairs else None
        self.truncated = self.train_ds.truncated + (self.val_ds.truncated if self.val_ds else 0)
        batch_size = recipe.train.batch_size
        if batch_size > len(self.train_ds):
            raise ConfigError(f"train.batch_size {batch_size} is larger than the {len(self.train_ds)} training images")
        if batch_size % run.info.world:
            raise ConfigError(f"train.batch_size {batch_size} is not a multiple of the {run.info.world} processes "
                              f"(the contrastive loss gathers equal shares from every rank)")
        position = run.state.get("stream_position", 0) if run.state else 0
        # drop_last: one image never twice in a batch, even across an epoch's end
        self.stream = BatchStream(len(self.train_ds), batch_size, recipe.train.seed, position, drop_last=True)
        if self.truncated:
            run.log(f"{self.truncated} captions are longer than the text context ({processor.cfg.max_length} "
                    f"tokens) and were truncated")

    def describe(self) -> str:
        return (f"{len(self.train_ds)} training images with {self.train_ds.n_captions} captions, "
                f"{len(self.val_ds) if self.val_ds else 0} validation images")

    def first_rows(self) -> list[dict]:
        """The data event a new run logs after its run event."""
        return [{"event": "data", "step": 0, "images": len(self.train_ds), "captions": self.train_ds.n_captions,
                 "truncated_captions": self.truncated, "context_length": self.run.processor.cfg.max_length,
                 "skipped_rows": self.report.skipped}]

    def step(self, net, model) -> StepResult:
        info = self.run.info
        position = self.stream.position
        batch = self.train_ds.batch(self.stream.next(), position, part=(info.rank, info.world))
        with autocast(self.run.recipe.train.precision):
            res = net(batch)
        res.loss.backward()  # each rank's rows against every rank's columns; DDP averages the gradients
        loss = info.all_sum([float(res.loss.detach())])[0] / info.world  # the whole batch's loss
        return StepResult(loss, samples=self.run.recipe.train.batch_size)

    def after_step(self, model) -> None:
        model.clamp_logit_scale()

    def row(self, result: StepResult) -> dict:
        run = self.run
        return {"logit_scale": float(run.model.logits.scale.detach().exp()),
                "samples_per_second": run.samples / run.elapsed, "elapsed": run.elapsed}

    def postfix(self, result: StepResult) -> dict:
        return {"images_s": f"{self.run.samples / self.run.elapsed:.0f}"}

    def validate(self, model, last: bool) -> dict[str, float]:
        return validate(model, self.val_ds, self.run.recipe.train.batch_size) if self.val_ds else {}

    def state(self) -> dict:
        return {"stream_position": self.stream.position}


__all__ = ["ContrastiveObjective", "KINDS", "contrastive_loss", "distinct_caption_recall", "gather_embeddings",
           "load_pairs", "validate"]
