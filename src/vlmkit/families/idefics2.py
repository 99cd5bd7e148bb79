"""Idefics2 (Laurençon et al. 2024): a SigLIP-like NaViT tower on images at their own size (optionally four
quarters plus the whole image), the perceiver connector (a SwiGLU projection and a resampler to 64 latents per
image or crop) and a Mistral LM; each image or crop is ``<fake_token_around_image>`` + 64 ``<image>`` in the text.

Capabilities: ``tower_cache`` is off (the tower's output is a padded, masked list of each crop's patches, which
``MediaInputs.tower`` does not carry); ``shared_prefix`` holds (plain causal positions)."""

from __future__ import annotations

from vlmkit.convert.hf.idefics2 import MODEL_TYPE, TRANSFORMERS_CLASS, export_idefics2, load_idefics2_folder
from vlmkit.family import HFMapping, VLMFamily, register
from vlmkit.models.idefics2 import build_idefics2
from vlmkit.processing.idefics2 import Idefics2ImageProcessor, Idefics2Layout, Idefics2ProcessorConfig
from vlmkit.processing.layouts import SegmentLayout


@register
class Idefics2(VLMFamily):
    """NaViT SigLIP tower + perceiver resampler (64 latents) + Mistral LM (Idefics2)"""

    name = "idefics2"
    ProcessorConfig = Idefics2ProcessorConfig
    objectives = ("lm",)
    hf = HFMapping((MODEL_TYPE,), load_idefics2_folder, export_idefics2, TRANSFORMERS_CLASS)

    def image_tokens(self, model) -> str:
        return f"{model.image_seq_len}/crop"

    def build(self, cfg, image_token_id, init=True):
        return build_idefics2(cfg, image_token_id, init)

    def image_processor(self, pcfg):
        return Idefics2ImageProcessor(pcfg)

    def layout(self, pcfg, tokenizer, files):
        return (SegmentLayout if pcfg.text_mode == "segments" else Idefics2Layout)(pcfg, tokenizer)
