"""Chameleon (Chameleon Team 2024; Meta's chameleon-7b / -30b): early fusion. A VQ-GAN encoder turns each image into
a grid of codes, each code a token of the LM's one vocabulary (models/chameleon.py); images prepared and prompts
laid out as ChameleonImageProcessor and ChameleonProcessor do (processing/chameleon.py).

What the family decides:

- capabilities: text generation and scoring (image-code tokens suppressed in the text head, as transformers);
  ``generate_images`` and ``image_codes``: the model writes an image's codes after ``<racm3:break>``
  (``image_plan``, ``code_ids``, ``forward(head="image")``) and encodes images to codes. Decoding codes to pixels
  needs a VQ decoder, which the released checkpoints lack: ``decode_codes`` refuses it by name;
  no ``tower_cache`` (the codes are the features; they are cheap and exact), ``shared_prefix`` (plain causal
  attention at plain positions);
- objectives: ``lm`` and ``unified`` (text-to-image pairs: the caption's image prompt, then the image's code tokens
  and ``<eoss>``); the codes are discrete: no gradient reaches the VQ encoder;
- models come from transformers' folders (``ChameleonForConditionalGeneration``), or from scratch (tiny-chameleon,
  presets/chameleon.py): a BPE on the recipe's texts with vlmkit's special tokens, ``<racm3:break>`` and ``<eoss>``,
  and one token per VQ code (``<img0000>``, ...; their ids are the model's ``code_token_ids``), the VQ tokenizer's
  config and weights from a trained vlmkit VQ checkpoint (``model.vq_from``, decoder kept: such a model draws),
  and vlmkit's segment layout (``text_mode: segments``, processing/chameleon.py).
"""

from __future__ import annotations

import dataclasses

from vlmkit.config import apply_overrides
from vlmkit.convert.hf.chameleon import export_chameleon, load_chameleon_folder
from vlmkit.families.vq import load_vq_weights, vq_config_from
from vlmkit.family import Capabilities, Family, HFMapping, register
from vlmkit.models.chameleon import IMAGE_END, IMAGE_START, ChameleonConfig, build_chameleon
from vlmkit.processing.chameleon import (ChameleonImageProcessor, ChameleonLayout, ChameleonProcessorConfig,
                                         ChameleonSegmentLayout)
from vlmkit.processing.tokenizer import SPECIAL_TOKENS


def code_token(j: int) -> str:
    """The token of VQ code ``j`` in a from-scratch model's vocabulary."""
    return f"<img{j:04d}>"


def add_code_tokens(tokenizer, n: int) -> tuple[int, ...]:
    """The ids of the tokens of codes 0..n-1, added to ``tokenizer`` as special tokens where it lacks them (the
    codebook's size is known once the VQ tokenizer is: ``model.vq_from``'s)."""
    missing = [code_token(j) for j in range(n) if tokenizer.tok.token_to_id(code_token(j)) is None]
    if missing:
        tokenizer.tok.add_special_tokens(missing)
    return tuple(tokenizer.token_id(code_token(j)) for j in range(n))


@register
class Chameleon(Family):
    """VQ-GAN image codes as vocabulary tokens of a Llama-style LM with per-head QK-norm (Chameleon-7B / 30B)"""

    name = "chameleon"
    Config = ChameleonConfig
    ProcessorConfig = ChameleonProcessorConfig
    capabilities = Capabilities(generate=True, generate_images=True, image_codes=True, tower_cache=False,
                                shared_prefix=True)
    objectives = ("lm", "unified")
    image_groups = ("vision",)
    hf = HFMapping(("chameleon",), load_chameleon_folder, export_chameleon, "ChameleonForConditionalGeneration")

    def build(self, cfg, image_token_id, init=True):
        return build_chameleon(cfg, image_token_id, init)

    def image_processor(self, pcfg):
        return ChameleonImageProcessor(pcfg)

    def layout(self, pcfg, tokenizer, files):
        return (ChameleonSegmentLayout if pcfg.text_mode == "segments" else ChameleonLayout)(pcfg, tokenizer)

    def new_tokenizer(self, texts, vocab_size):
        """A BPE on ``texts`` with vlmkit's special tokens, ``<racm3:break>`` and ``<eoss>``; the code tokens are
        added by ``configure``, which knows the codebook."""
        from vlmkit.processing.tokenizer import TextTokenizer, train_bpe

        return TextTokenizer(train_bpe(texts, vocab_size, SPECIAL_TOKENS + [IMAGE_START, IMAGE_END]))

    def configure(self, cfg, pcfg, tokenizer):
        """The VQ tokenizer ``model.vq_from``'s (its processor must read images as this one), one vocabulary token
        per code (:func:`add_code_tokens`), the LM's vocabulary the tokenizer's; the processor's images the VQ's
        size, each filling its grid of codes."""
        vq = vq_config_from(cfg.vq_from, pcfg, "model.vq_from") if cfg.vq_from else cfg.vq
        codes = add_code_tokens(tokenizer, vq.codebook_size)
        cfg = dataclasses.replace(cfg, vq=vq, lm=dataclasses.replace(cfg.lm, vocab_size=tokenizer.vocab_size),
                                  code_token_ids=codes, image_end_token_id=tokenizer.token_id(pcfg.image_end))
        h, w = vq.grid
        return cfg, apply_overrides(pcfg, {"family": cfg.family, "image_size": list(vq.image_size),
                                           "image_seq_len": h * w})

    def new_model(self, cfg, pcfg, tokenizer):
        """A from-scratch model whose VQ tokenizer is ``model.vq_from``'s trained one (weights included)."""
        cfg, model, processor = super().new_model(cfg, pcfg, tokenizer)
        if cfg.vq_from:
            load_vq_weights(model.vq, cfg.vq_from)
        return cfg, model, processor

    def export_class(self, cfg) -> str:
        """A model with a VQ decoder (a from-scratch one that draws) does not export: transformers' ChameleonVQVAE
        has no decoder to hold it."""
        return "" if cfg.vq.decoder else super().export_class(cfg)

    def image_tokens(self, model) -> str:
        h, w = model.image_grid
        return f"{h * w} ({h}x{w} codes) + 2"
