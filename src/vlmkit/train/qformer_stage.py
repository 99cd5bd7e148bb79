"""BLIP-2's stage 1 as a recipe stage (``objective: qformer``): the Q-Former and its stage-1 heads learn
image-text contrast, matching and image-grounded captioning (objectives/qformer.py) from image-caption pairs,
on a frozen image tower, before the language model reads the queries.

The pairs are ShapesWorld's ``pairs_train.csv`` (or any CSV/TSV/COCO captions file, ``stage.pairs``), grouped by
image: each step draws whole images (an epoch is a seeded permutation) and one caption of each, so a batch never
holds two captions of one image. The frozen tower's features are computed once. The text the Q-Former reads is
tokenised by the BERT tokenizer of ``qformer.init_from`` when the Q-Former starts from a BERT (with [DEC] the id
after BERT's vocabulary, as BLIP-2 adds it), otherwise by the model's own tokenizer between ``<s>`` ([CLS]) and
its end token, with ``</s>`` as [DEC].

Like a cell_labels stage it runs whole and is checkpointed at its end (an interrupted one reruns).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from vlmkit.connectors.qformer import QFormerConnector, resolve_bert_folder
from vlmkit.data.pairs import read_pairs
from vlmkit.errors import ConfigError
from vlmkit.objectives.qformer import blip2_stage1_losses
from vlmkit.train.frozen_features import FrozenVisionFeatures
from vlmkit.train.optim import lr_factor, make_optimizer, set_lr, trained_groups
from vlmkit.train.stream import BatchStream

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
    connector = getattr(model, "connector", None)
    if not isinstance(connector, QFormerConnector) or not hasattr(connector, "heads"):
        raise ConfigError(f"stage {stage.name!r}: objective qformer trains a Q-Former's stage-1 heads; the model "
                          f"needs connector.kind: qformer with qformer.embed_dim > 0 (and qformer.vocab_size > 0)")
    trained = trained_groups(model, stage)
    if trained != {"connector"}:
        raise ConfigError(f"stage {stage.name!r}: objective qformer trains the Q-Former on a frozen image tower "
                          f"(BLIP-2's stage 1); set train: [connector], got {stage.train}")
    return connector


def run_qformer_stage(model, tokenizer, processor, stage, batch_size: int, root: Path, seed: int, metrics, pbar,
                      step: int, max_grad_norm: float, log, stop_at_step: int | None = None,
                      progress: bool = True) -> tuple[int, float]:
    """Train ``model.connector`` (Q-Former + heads) for ``stage.steps`` steps -> (global step, seconds spent)."""
    connector = check_qformer_stage(model, stage)
    texts = QFormerTexts(connector, tokenizer)
    pairs = read_pairs(root / stage.pairs)
    by_image: dict[Path, list[list[int]]] = {}
    for p in pairs:
        by_image.setdefault(p.image, []).append(texts.encode(p.caption))
    images = sorted(by_image)
    if len(images) < batch_size:
        raise ConfigError(f"stage {stage.name!r}: batch_size {batch_size} > {len(images)} images in "
                          f"{root / stage.pairs}")
    t0 = time.perf_counter()
    model.encoder.eval()
    features = FrozenVisionFeatures(model.encoder, processor, images, progress=progress)
    elapsed = time.perf_counter() - t0
    log(f"  Q-Former stage 1: {len(pairs):,} captions of {len(images):,} images, vision features in {elapsed:.1f} s; "
        f"losses ITC + ITM + ITG")
    opt = make_optimizer(model, stage)
    stream = BatchStream(len(images), batch_size, seed, drop_last=True)
    window: dict[str, float] = {}
    for s in range(stage.steps):
        t0 = time.perf_counter()
        set_lr(opt, lr_factor(s, stage))
        idx = stream.next()
        g = torch.Generator().manual_seed(seed * 1_000_003 + stream.position)
        picks = torch.randint(0, 2**31 - 1, (len(idx),), generator=g).tolist()
        rows = [by_image[images[i]][k % len(by_image[images[i]])] for i, k in zip(idx, picks)]
        ids, mask = texts.pad_rows(rows)
        feats = features.lookup([images[i] for i in idx])
        res = blip2_stage1_losses(connector, feats, ids, mask, torch.tensor(idx), texts.dec, generator=g)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed += time.perf_counter() - t0
        step += 1
        for k in ("itc", "itm", "itg", "itc_accuracy", "itm_accuracy"):
            window[k] = window.get(k, 0.0) + getattr(res, k)
        window["n"] = window.get("n", 0) + 1
        pbar.update(1)
        pbar.set_postfix(stage=stage.name, itc=f"{res.itc:.2f}", itm=f"{res.itm:.2f}", itg=f"{res.itg:.2f}")
        if (s + 1) % 10 == 0 or s == stage.steps - 1:
            n = window.pop("n")
            means = {k: v / n for k, v in window.items()}
            metrics.write(step=step, stage=stage.name, loss=means["itc"] + means["itm"] + means["itg"],
                          lr=opt.param_groups[0]["lr"], elapsed=elapsed, **means)
            window = {}
        if stop_at_step is not None and step >= stop_at_step:
            return step, elapsed
    held_out = root / stage.pairs.replace("train", "val")
    if held_out != root / stage.pairs and held_out.is_file():
        acc = held_out_retrieval(connector, model.encoder, processor, texts, held_out)
        metrics.write(step=step, stage=stage.name, val_itc_accuracy=acc)
        log(f"  image -> text retrieval on {held_out.name} (batches of 64 images, one caption each): top-1 {acc:.3f}")
    return step, elapsed


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
