"""Llama 3.2 Vision (Mllama; Meta 2024): a tiled tower -> a projector -> a Llama LM reading the images through gated
cross-attention layers (models/mllama.py); images tiled and prompts laid out as MllamaProcessor does
(processing/mllama.py)."""

from __future__ import annotations

from vlmkit.convert.hf.mllama import export_mllama, load_mllama_folder
from vlmkit.family import HFMapping, VLMFamily, register
from vlmkit.models.mllama import MllamaConfig, build_mllama
from vlmkit.processing.layouts import SegmentLayout, TemplateLayout
from vlmkit.processing.mllama import MllamaImageProcessor, MllamaLayout, MllamaProcessorConfig


@register
class Mllama(VLMFamily):
    """tiled ViT -> linear projector -> Llama LM with gated cross-attention layers (Llama 3.2 Vision)"""

    name = "mllama"
    Config = MllamaConfig
    ProcessorConfig = MllamaProcessorConfig
    hf = HFMapping(("mllama",), load_mllama_folder, export_mllama, "MllamaForConditionalGeneration")

    def build(self, cfg, image_token_id, init=True):
        return build_mllama(cfg, image_token_id, init)

    def image_processor(self, pcfg):
        return MllamaImageProcessor(pcfg)

    def layout(self, pcfg, tokenizer, files):
        if pcfg.text_mode == "segments":
            return SegmentLayout(pcfg, tokenizer)
        # MllamaProcessor's layout puts BOS after the leading images: a tokenizer without one keeps the plain layout
        return (MllamaLayout if pcfg.bos_token else TemplateLayout)(pcfg, tokenizer)
