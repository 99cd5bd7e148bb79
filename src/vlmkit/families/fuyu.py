"""Fuyu (Bavishi et al. 2023; Adept's Fuyu-8B): no image encoder. Each image is cut into patches that one Linear
maps into a Persimmon LM at the image tokens, the end of each row of patches marked by a ``|NEWLINE|`` token
(models/fuyu.py); images fitted into a target size and patched, and prompts laid out, as FuyuProcessor does
(processing/fuyu.py).

What the family decides for an encoder-free model:

- capabilities: no ``tower_cache`` (there is no tower whose output could be precomputed: the patch projection is
  trained with the LM), ``shared_prefix`` (causal attention at plain positions: questions about one image can share
  its prefix);
- objectives: ``lm``, and ``cell_labels``, which pretrains what sees the images: with no tower, that is the patch
  projection and the LM (``image_groups``), read at the patches through the model's ``image_tower()`` view;
- module groups: ``connector`` (the patch projection) and ``lm``;
- the tokenizer of a from-scratch model has the image token ``|SPEAKER|``, the row break ``|NEWLINE|`` and
  FuyuProcessor's beginning of answer ``<0x04>`` as special tokens; vlmkit's ``<image>`` placeholder in the data
  still marks where an image goes (processing/fuyu.py: ``FuyuSegmentLayout``).
"""

from __future__ import annotations

from vlmkit.config import apply_overrides
from vlmkit.convert.hf.fuyu import export_fuyu, load_fuyu_folder
from vlmkit.family import Capabilities, Family, HFMapping, register
from vlmkit.models.fuyu import NEWLINE_TOKEN, FuyuConfig, build_fuyu
from vlmkit.processing.fuyu import (FuyuImageProcessor, FuyuLayout, FuyuProcessorConfig, FuyuSegmentLayout,
                                    max_patches)
from vlmkit.processing.processor import Processor

# a from-scratch Fuyu's tokens: vlmkit's (without its <image> placeholder token: the data's placeholder is replaced
# by image tokens before tokenisation) and Fuyu's image token, row break and beginning of answer
FUYU_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>", "|SPEAKER|", NEWLINE_TOKEN,
                       "<0x04>"]


@register
class Fuyu(Family):
    """patches -> one Linear -> a Persimmon LM, no image encoder (Fuyu-8B)"""

    name = "fuyu"
    Config = FuyuConfig
    ProcessorConfig = FuyuProcessorConfig
    capabilities = Capabilities(tower_cache=False, shared_prefix=True)
    objectives = ("lm", "cell_labels")
    image_groups = ("connector", "lm")
    hf = HFMapping(("fuyu",), load_fuyu_folder, export_fuyu, "FuyuForCausalLM")

    def build(self, cfg, image_token_id, init=True):
        return build_fuyu(cfg, image_token_id, init)

    def image_processor(self, pcfg):
        return FuyuImageProcessor(pcfg)

    def layout(self, pcfg, tokenizer, files):
        return (FuyuSegmentLayout if pcfg.text_mode == "segments" else FuyuLayout)(pcfg, tokenizer)

    def image_tokens(self, model) -> str:
        return "by size"

    def configure(self, cfg, pcfg, tokenizer):
        """The LM's vocabulary and row break are the tokenizer's; the processor fits images into the model's
        target, cuts the model's patches and writes its image token."""
        cfg = apply_overrides(cfg, {"lm.vocab_size": tokenizer.vocab_size,
                                    "newline_token_id": tokenizer.token_id(pcfg.newline_token)})
        return cfg, apply_overrides(pcfg, {"image_size": list(cfg.image_size), "patch_size": cfg.patch_size,
                                           "image_token": cfg.image_token, "family": cfg.family})

    def new_processor(self, model, pcfg, tokenizer):
        """``image_seq_len``: the image tokens of an image that fills the target (smaller images take fewer)."""
        return Processor(apply_overrides(pcfg, {"image_seq_len": max_patches(pcfg)}), tokenizer)

    def new_tokenizer(self, texts, vocab_size):
        from vlmkit.processing.tokenizer import TextTokenizer, train_bpe

        return TextTokenizer(train_bpe(texts, vocab_size, FUYU_SPECIAL_TOKENS))
