"""Janus (Wu et al. 2024) and Janus-Pro: a LLaVA for understanding and a VQ-token generator in one LM, with
decoupled visual paths (models/janus.py). vlmkit's from-scratch tiny-janus (tiny-llava's understanding parts, the
generation path on a trained tiny-vq tokenizer).

Decisions in the family interface's terms:

- capabilities: it generates text and images (``generate_images``) and has a codebook (``image_codes``);
- objectives: ``lm`` (understanding alone), ``cell_labels`` (its tower), ``unified`` (text-to-image and
  image-to-text in one stage, objectives/unified.py);
- text: vlmkit's segment layout with Janus' image-generation prompt (processing/janus.py); a from-scratch
  tokenizer gets ``<begin_of_image>`` among its special tokens;
- ``gen.vq_from``: a from-scratch model takes a trained VQ tokenizer's config and weights (as Janus takes
  LlamaGen's VQ); its generation embeddings start at the codebook.
"""

from __future__ import annotations

import dataclasses

import torch

from vlmkit.convert.hf.janus import export_janus, load_janus_folder
from vlmkit.families.vq import load_vq_weights, vq_config_from
from vlmkit.family import Capabilities, HFMapping, VLMFamily, register
from vlmkit.models.janus import JanusConfig, build_janus
from vlmkit.processing.janus import JanusImageProcessor, JanusLayout, JanusProcessorConfig, JanusSegmentLayout
from vlmkit.processing.tokenizer import SPECIAL_TOKENS


@register
class Janus(VLMFamily):
    """understanding: tower -> aligner -> LM; generation: VQ codes -> embeddings + aligner -> LM -> generation head"""

    name = "janus"
    Config = JanusConfig
    ProcessorConfig = JanusProcessorConfig
    capabilities = Capabilities(generate_images=True, image_codes=True, tower_cache=True)
    objectives = ("lm", "cell_labels", "unified")
    hf = HFMapping(("janus",), load_janus_folder, export_janus, "JanusForConditionalGeneration")

    def build(self, cfg, image_token_id, init=True):
        return build_janus(cfg, image_token_id, init)

    def image_processor(self, pcfg):
        return JanusImageProcessor(pcfg)

    def layout(self, pcfg, tokenizer, files):
        if pcfg.text_mode == "segments":
            return JanusSegmentLayout(pcfg, tokenizer)
        return JanusLayout(pcfg, tokenizer)

    def new_tokenizer(self, texts, vocab_size):
        from vlmkit.processing.tokenizer import TextTokenizer, train_bpe

        return TextTokenizer(train_bpe(texts, vocab_size, SPECIAL_TOKENS + [JanusProcessorConfig.boi_token]))

    def configure(self, cfg, pcfg, tokenizer):
        """VLMFamily's, and the VQ tokenizer's config from ``gen.vq_from`` (whose processor must read images as
        this model's does)."""
        cfg, pcfg = super().configure(cfg, pcfg, tokenizer)
        if not cfg.gen.vq_from:
            return cfg, pcfg
        vq_cfg = vq_config_from(cfg.gen.vq_from, pcfg, "model.gen.vq_from")
        return dataclasses.replace(cfg, gen=dataclasses.replace(cfg.gen, vq=vq_cfg)), pcfg

    def new_model(self, cfg, pcfg, tokenizer):
        """A from-scratch model whose VQ tokenizer is ``gen.vq_from``'s trained one, the generation embeddings
        starting at its codebook."""
        cfg, model, processor = super().new_model(cfg, pcfg, tokenizer)
        if cfg.gen.vq_from:
            load_vq_weights(model.vqmodel, cfg.gen.vq_from)
            book = model.vqmodel.quantize.codebook().detach()
            if model.generation_embeddings.weight.shape == book.shape:
                with torch.no_grad():
                    model.generation_embeddings.weight.copy_(book / book.std())
        return cfg, model, processor

    def image_tokens(self, model) -> str:
        h, w = model.image_grid
        return f"{model.image_seq_len} read, {h * w} written ({h}x{w} codes)"


__all__ = ["Janus"]
