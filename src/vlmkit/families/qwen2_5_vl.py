"""Qwen2.5-VL (Bai et al. 2025): Qwen2-VL's model and processor with its own tower (window attention with a few
full-attention blocks, RMSNorm, SwiGLU) and an RMSNorm patch merger (models/qwen2_5_vl.py); images as Qwen2-VL's
(processing/qwen2_vl.py: Qwen2_5_VLProcessor lays images out as Qwen2VLProcessor does)."""

from __future__ import annotations

from vlmkit.convert.hf.qwen2_5_vl import export_qwen2_5_vl, load_qwen2_5_vl_folder
from vlmkit.family import Capabilities, HFMapping, VLMFamily, register
from vlmkit.models.qwen2_5_vl import Qwen25VLConfig, build_qwen2_5_vl
from vlmkit.processing.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLProcessorConfig


@register
class Qwen25VL(VLMFamily):
    """windowed dynamic-resolution ViT (2D RoPE, RMSNorm, SwiGLU) + patch merger + Qwen2 LM with M-RoPE"""

    name = "qwen2_5_vl"
    Config = Qwen25VLConfig
    ProcessorConfig = Qwen2VLProcessorConfig
    objectives = ("lm",)
    capabilities = Capabilities(shared_prefix=False)  # M-RoPE positions are not the plain ones grouping shares
    hf = HFMapping(("qwen2_5_vl",), load_qwen2_5_vl_folder, export_qwen2_5_vl, "Qwen2_5_VLForConditionalGeneration")

    def image_tokens(self, model) -> str:
        return "by size"

    def build(self, cfg, image_token_id, init=True):
        return build_qwen2_5_vl(cfg, image_token_id, init)

    def image_processor(self, pcfg):
        return Qwen2VLImageProcessor(pcfg)
