"""BLIP-2's stage-1 objectives (Li et al. 2023, section 3.2): the Q-Former learns to pull out of a frozen image
tower the visual features most relevant to the text, before any language model is attached.

Three losses share one Q-Former; each uses its own self-attention pattern between the learned queries and the
text (:func:`~vlmkit.connectors.qformer.qformer_self_mask`):

- **ITC**, image-text contrastive, *unimodal* mask: the queries' outputs are the image embeddings, the text's
  first ([CLS]) output the text embedding; similarity is the best-matching query's; InfoNCE both ways.
- **ITM**, image-text matching, *bidirectional* mask: a linear head on the query outputs (averaged over the
  queries) says whether the pair matches. Negatives are hard: for each image a text drawn by its ITC
  similarity (and for each text an image), never one of the same image.
- **ITG**, image-grounded text generation, *multimodal causal* mask: the text, its first token replaced by
  [DEC], is generated from the queries alone (the text never sees the image itself), through BERT's LM head
  with its decoder tied to the Q-Former's word embeddings.

As LAVIS' ``Blip2Qformer``: label smoothing 0.1 on ITC and ITG, the learned temperature starts at 0.07 and is
clamped to [0.001, 0.5]. The three forwards here are the three of LAVIS, except that the contrastive image and
text passes are one pass under the unimodal mask (the same numbers: neither side sees the other) and the
generation pass recomputes the queries instead of reusing their cached keys and values (the same numbers too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmkit.connectors.qformer import QFormerConnector, resolve_bert_folder
from vlmkit.data.pairs import read_pairs
from vlmkit.errors import ConfigError
from vlmkit.objectives import Objective, StepResult, register
from vlmkit.train.frozen_features import FrozenVisionFeatures
from vlmkit.train.stream import BatchStream


@dataclass
class Stage1Losses:
    loss: torch.Tensor  # itc + itm + itg
    itc: float
    itm: float
    itg: float
    itc_accuracy: float  # image -> text retrieval in the batch (top-1 is the pair's own text)
    itm_accuracy: float  # matching head right on positives and hard negatives


def _in_batch_targets(image_keys: torch.Tensor) -> torch.Tensor:
    """[B, B] True where text j belongs to the image of row i (the same image may come with several captions)."""
    return image_keys[:, None] == image_keys[None, :]


def _itc_loss(connector, queries: torch.Tensor, image: torch.Tensor, text_ids: torch.Tensor,
              text_mask: torch.Tensor, image_keys: torch.Tensor,
              label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """ITC: one pass, queries and text blind to each other; InfoNCE both ways on the best query's similarity.

    Returns the loss, the logits [B_img, B_txt] and the same-image mask [B, B] (ITM draws its hard negatives
    from them) and the image -> text top-1 accuracy."""
    heads = connector.heads
    Q = connector.cfg.num_query_tokens
    B = image.shape[0]
    hidden = connector.qformer(queries, image, text_ids=text_ids, text_mask=text_mask, attention="unimodal")
    image_feats = F.normalize(heads.vision_proj(hidden[:, :Q]), dim=-1)  # [B, Q, E]
    text_feat = F.normalize(heads.text_proj(hidden[:, Q]), dim=-1)  # [B, E] (the [CLS] output)
    sim = torch.einsum("iqe,je->ijq", image_feats, text_feat).amax(-1)  # [B_img, B_txt]: best query
    logits = sim / heads.temp
    same = _in_batch_targets(image_keys)
    # a caption of the same image elsewhere in the batch is a positive too: the target spreads over them (BLIP's
    # sim_targets), then label smoothing
    soft = same.float() / same.float().sum(1, keepdim=True)
    soft = (1 - label_smoothing) * soft + label_smoothing / B
    itc = (-(soft * F.log_softmax(logits, 1)).sum(1).mean() - (soft * F.log_softmax(logits.t(), 1)).sum(1).mean()) / 2
    itc_accuracy = float(same.gather(1, logits.detach().argmax(1, keepdim=True)).float().mean())
    return itc, logits, same, itc_accuracy


def _hard_negatives(logits: torch.Tensor, same: torch.Tensor,
                    generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image a text, and for each text an image, drawn by ITC similarity and never of the same image:
    ITM's hard negatives, indices [B] each (no gradient flows through the draw)."""
    B = logits.shape[0]
    with torch.no_grad():
        weights = F.softmax(logits.detach().masked_fill(same, float("-inf")), dim=1)  # [B_img, B_txt]
        weights_t = F.softmax(logits.detach().t().masked_fill(same, float("-inf")), dim=1)  # [B_txt, B_img]
        # a row whose every candidate is the same image (a batch of one image) draws uniformly among the others
        weights = torch.where(torch.isnan(weights), (~torch.eye(B, dtype=torch.bool, device=logits.device)).float(),
                              weights)
        weights_t = torch.where(torch.isnan(weights_t),
                                (~torch.eye(B, dtype=torch.bool, device=logits.device)).float(), weights_t)
        neg_text = torch.multinomial(weights, 1, generator=generator).squeeze(1)  # [B] a text for each image
        neg_image = torch.multinomial(weights_t, 1, generator=generator).squeeze(1)  # [B] an image for each text
    return neg_text, neg_image


def _itm_loss(connector, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor, logits: torch.Tensor,
              same: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, float]:
    """ITM: one bidirectional pass over the B pairs, B images with a hard-negative text and B texts with a
    hard-negative image; the matching head on the query outputs, averaged. Returns the loss and the head's
    accuracy on the 3B."""
    Q = connector.cfg.num_query_tokens
    B = image.shape[0]
    neg_text, neg_image = _hard_negatives(logits, same, generator)
    ids_all = torch.cat([text_ids, text_ids[neg_text], text_ids])
    mask_all = torch.cat([text_mask, text_mask[neg_text], text_mask])
    image_all = torch.cat([image, image, image[neg_image]])
    hidden = connector.qformer(connector.query_tokens.expand(3 * B, -1, -1), image_all, text_ids=ids_all,
                               text_mask=mask_all, attention="bidirectional")
    itm_logits = connector.heads.itm_head(hidden[:, :Q]).mean(1)  # [3B, 2]
    itm_labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]).to(image.device)
    itm = F.cross_entropy(itm_logits, itm_labels)
    itm_accuracy = float((itm_logits.detach().argmax(1) == itm_labels).float().mean())
    return itm, itm_accuracy


def _itg_loss(connector, queries: torch.Tensor, image: torch.Tensor, text_ids: torch.Tensor,
              text_mask: torch.Tensor, dec_id: int, label_smoothing: float) -> torch.Tensor:
    """ITG: the caption generated from the queries under the causal mask, [DEC] in place of [CLS]; the
    cross-entropy of each next token (padding ignored)."""
    Q = connector.cfg.num_query_tokens
    qformer = connector.qformer
    dec_ids = text_ids.clone()
    dec_ids[:, 0] = dec_id
    hidden = qformer(queries, image, text_ids=dec_ids, text_mask=text_mask, attention="causal")
    text_hidden = hidden[:, Q:-1]  # [B, T - 1, W]: position t predicts token t + 1
    targets = dec_ids[:, 1:].masked_fill(text_mask[:, 1:] == 0, -100)
    lm_logits = connector.heads.lm_logits(text_hidden, qformer.word_embed.weight)
    return F.cross_entropy(lm_logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)


def blip2_stage1_losses(connector, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                        image_keys: torch.Tensor, dec_id: int, generator: torch.Generator | None = None,
                        label_smoothing: float = 0.1) -> Stage1Losses:
    """ITC + ITM + ITG of a batch of B image-caption pairs through ``connector`` (a QFormerConnector with text
    input and pretraining heads).

    image [B, N, D_v] (the frozen tower's features), text_ids / text_mask [B, T] (each text starting with its
    [CLS] token, padded on the right), image_keys [B] (equal for pairs of the same image: they are neither
    contrastive negatives nor drawn as matching negatives), ``dec_id`` the [DEC] token that replaces [CLS] for
    generation. ``generator`` seeds the draw of hard negatives.

    The three passes run in this order (ITC, ITM, ITG): ITM draws its negatives from ITC's similarities."""
    B = image.shape[0]
    if B < 2:
        raise ValueError("the Q-Former's stage-1 objectives need at least 2 pairs per batch (in-batch negatives)")
    queries = connector.query_tokens.expand(B, -1, -1)
    with torch.no_grad():
        connector.heads.temp.clamp_(0.001, 0.5)
    itc, logits, same, itc_accuracy = _itc_loss(connector, queries, image, text_ids, text_mask, image_keys,
                                                label_smoothing)
    itm, itm_accuracy = _itm_loss(connector, image, text_ids, text_mask, logits, same, generator)
    itg = _itg_loss(connector, queries, image, text_ids, text_mask, dec_id, label_smoothing)
    return Stage1Losses(itc + itm + itg, float(itc.detach()), float(itm.detach()), float(itg.detach()),
                        itc_accuracy, itm_accuracy)


# ------------------------------------------------------------------------------------------------ the stage objective

MAX_TEXT = 64  # Q-Former text positions read per caption (ShapesWorld's longest caption is ~40 BPE tokens)


class QFormerTexts:
    """Captions -> Q-Former text ids: [CLS] first (its output is the ITC text embedding), [DEC] for generation."""

    def __init__(self, connector: QFormerConnector, tokenizer):
        from tokenizers import Tokenizer

        cfg = connector.cfg
        if cfg.init_from:
            folder = resolve_bert_folder(cfg.init_from)
            self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            vocab = self.tok.get_vocab_size()
            if cfg.vocab_size != vocab + 1:
                raise ConfigError(f"qformer.vocab_size {cfg.vocab_size}: a Q-Former initialised from {cfg.init_from!r} "
                                  f"reads its tokenizer ({vocab} tokens) plus BLIP-2's [DEC]; set it to {vocab + 1}")
            self.cls, self.end, self.dec = None, None, vocab  # the BERT post-processor adds [CLS] ... [SEP]
            self.pad = self.tok.token_to_id("[PAD]") or 0
        else:
            if cfg.vocab_size != tokenizer.vocab_size:
                raise ConfigError(f"qformer.vocab_size {cfg.vocab_size}: the Q-Former reads the model's tokenizer "
                                  f"({tokenizer.vocab_size} tokens); set it to {tokenizer.vocab_size}")
            self.tok = tokenizer.tok
            self.cls, self.end = tokenizer.token_id("<s>"), tokenizer.eos_id
            self.dec, self.pad = tokenizer.token_id("</s>"), tokenizer.pad_id

    def encode(self, text: str) -> list[int]:
        if self.cls is None:
            ids = self.tok.encode(text).ids
            return ids[:MAX_TEXT - 1] + ids[-1:] if len(ids) > MAX_TEXT else ids
        return [self.cls] + self.tok.encode(text, add_special_tokens=False).ids[:MAX_TEXT - 2] + [self.end]

    def pad_rows(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return ids, mask


def check_qformer_stage(model, stage) -> QFormerConnector:
    connector = model.module_groups().get("connector")
    if not isinstance(connector, QFormerConnector) or not hasattr(connector, "heads"):
        raise ConfigError(f"stage {stage.name!r}: objective qformer trains a Q-Former's stage-1 heads; the model "
                          f"needs connector.kind: qformer with qformer.embed_dim > 0 (and qformer.vocab_size > 0)")
    return connector  # the stage trains [connector] alone (QFormerObjective.check_stage)


@torch.no_grad()
def held_out_retrieval(connector, encoder, processor, texts: QFormerTexts, path: Path, n_images: int = 256) -> float:
    """Top-1 image -> text retrieval by ITC similarity among batches of 64 held-out images (first caption each)."""
    pairs = read_pairs(path)
    first: dict[Path, str] = {}
    for p in pairs:
        first.setdefault(p.image, p.caption)
    images = sorted(first)[:n_images]
    was = connector.training
    connector.eval()
    hits = 0
    heads, Q = connector.heads, connector.cfg.num_query_tokens
    for start in range(0, len(images), 64):
        chunk = images[start:start + 64]
        ids, mask = texts.pad_rows([texts.encode(first[p]) for p in chunk])
        feats = encoder(processor.prepare_images(chunk, str(path)).pixel_values)
        queries = connector.query_tokens.expand(len(chunk), -1, -1)
        hidden = connector.qformer(queries, feats, text_ids=ids, text_mask=mask, attention="unimodal")
        img = torch.nn.functional.normalize(heads.vision_proj(hidden[:, :Q]), dim=-1)
        txt = torch.nn.functional.normalize(heads.text_proj(hidden[:, Q]), dim=-1)
        sim = torch.einsum("iqe,je->ijq", img, txt).amax(-1)
        hits += int((sim.argmax(1) == torch.arange(len(chunk))).sum())
    connector.train(was)
    return hits / max(len(images), 1)


@register
class QFormerObjective(Objective):
    """BLIP-2's stage 1: the Q-Former and its heads learn ITC, ITM and ITG on image-caption pairs, the tower frozen"""

    name = "qformer"
    resumable = False  # an interrupted stage reruns whole
    distributed = False  # every rank runs it whole (the same seeded computation: the replicas stay equal)
    log_every = 10
    trains = ["connector"]
    own_batch_size = True
    stage_options = ("pairs",)

    def start(self, stage, si: int, model) -> None:
        run = self.run
        self.connector = check_qformer_stage(model, stage)
        self.texts = QFormerTexts(self.connector, run.processor.tokenizer)
        self.root = Path(run.recipe.data.path or ".")
        self.path = self.root / stage.pairs
        pairs = read_pairs(self.path)
        self.by_image: dict[Path, list[list[int]]] = {}
        for p in pairs:
            self.by_image.setdefault(p.image, []).append(self.texts.encode(p.caption))
        self.images = sorted(self.by_image)
        batch_size = stage.batch_size or run.recipe.train.batch_size
        if len(self.images) < batch_size:
            raise ConfigError(f"stage {stage.name!r}: batch_size {batch_size} > {len(self.images)} images in {self.path}")
        t0 = time.perf_counter()
        model.encoder.eval()
        self.features = FrozenVisionFeatures(model.encoder, run.processor, self.images, progress=run.progress)
        run.elapsed += time.perf_counter() - t0
        run.log(f"  Q-Former stage 1: {len(pairs):,} captions of {len(self.images):,} images, vision features in "
                f"{time.perf_counter() - t0:.1f} s; losses ITC + ITM + ITG")
        self.seed, self.encoder = run.recipe.train.seed + si, model.encoder
        self.stream = BatchStream(len(self.images), batch_size, self.seed, drop_last=True)
        self.window: dict[str, float] = {}

    def step(self, net, model) -> StepResult:
        idx = self.stream.next()
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.stream.position)
        picks = torch.randint(0, 2**31 - 1, (len(idx),), generator=g).tolist()
        rows = [self.by_image[self.images[i]][k % len(self.by_image[self.images[i]])] for i, k in zip(idx, picks)]
        ids, mask = self.texts.pad_rows(rows)
        feats = self.features.lookup([self.images[i] for i in idx])
        res = blip2_stage1_losses(self.connector, feats, ids, mask, torch.tensor(idx), self.texts.dec, generator=g)
        res.loss.backward()
        for k in ("itc", "itm", "itg", "itc_accuracy", "itm_accuracy"):
            self.window[k] = self.window.get(k, 0.0) + getattr(res, k)
        self.window["n"] = self.window.get("n", 0) + 1
        return StepResult(float(res.loss.detach()), metrics={"itc": res.itc, "itm": res.itm, "itg": res.itg})

    def row(self, result: StepResult) -> dict:
        """The means of the logging window; loss is their sum."""
        n = self.window.pop("n")
        means = {k: v / n for k, v in self.window.items()}
        self.window = {}
        return {"loss": means["itc"] + means["itm"] + means["itg"], "elapsed": self.run.elapsed, **means}

    def postfix(self, result: StepResult) -> dict:
        return {k: f"{v:.2f}" for k, v in result.metrics.items()}

    def validation_due(self, step: int, last: bool) -> bool:
        return last

    def validate(self, model, last: bool) -> dict[str, float]:
        held_out = self.root / self.path.name.replace("train", "val")
        if held_out == self.path or not held_out.is_file():
            return {}
        acc = held_out_retrieval(self.connector, self.encoder, self.run.processor, self.texts, held_out)
        self.run.log(f"  image -> text retrieval on {held_out.name} (batches of 64 images, one caption each): top-1 "
                     f"{acc:.3f}")
        return {"val_itc_accuracy": acc}
