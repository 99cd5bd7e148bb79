"""Qwen2-VL (Wang et al. 2024): its own dynamic-resolution tower (2D RoPE) and patch merger, spliced into a Qwen2
LM with multimodal RoPE (models/qwen2_vl.py); images at (about) their native resolution
(processing/qwen2_vl.py)."""

from __future__ import annotations

from vlmkit.convert.hf.qwen2_vl import export_qwen2_vl, load_qwen2_vl_folder
from vlmkit.family import Capabilities, HFMapping, VLMFamily, register
from vlmkit.models.qwen2_vl import build_qwen2_vl
from vlmkit.processing.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLProcessorConfig


@register
class Qwen2VL(VLMFamily):
    """dynamic-resolution ViT (2D RoPE) + patch merger + Qwen2 LM with M-RoPE"""

    name = "qwen2_vl"
    ProcessorConfig = Qwen2VLProcessorConfig
    objectives = ("lm",)
    capabilities = Capabilities(shared_prefix=False)  # M-RoPE positions are not the plain ones grouping shares
    hf = HFMapping(("qwen2_vl",), load_qwen2_vl_folder, export_qwen2_vl, "Qwen2VLForConditionalGeneration")

    def image_tokens(self, model) -> str:
        return "by size"

    def build(self, cfg, image_token_id, init=True):
        return build_qwen2_vl(cfg, image_token_id, init)

    def image_processor(self, pcfg):
        return Qwen2VLImageProcessor(pcfg)
