"""InternVL 2.5 / 3 (Chen et al. 2024): InternViT (layer scale, class token) on dynamic tiles plus a thumbnail, a
pixel shuffle and a LayerNorm + MLP projector, spliced into a Qwen2 (or Llama) LM at ``<IMG_CONTEXT>``
(models/internvl.py); GotOcr2's tiling (processing/internvl.py); transformers' InternVLForConditionalGeneration
folders both ways (convert/hf/internvl.py)."""

from __future__ import annotations

from vlmkit.convert.hf.internvl import export_internvl, load_internvl_folder
from vlmkit.family import HFMapping, VLMFamily, register
from vlmkit.models.internvl import InternVLConfig, build_internvl
from vlmkit.processing.internvl import InternVLImageProcessor, InternVLProcessorConfig


@register
class InternVL(VLMFamily):
    """InternViT on dynamic tiles + pixel shuffle + LayerNorm/MLP + Qwen2 LM (InternVL 2.5 / 3)"""

    name = "internvl"
    Config = InternVLConfig
    ProcessorConfig = InternVLProcessorConfig
    objectives = ("lm",)
    hf = HFMapping(("internvl",), load_internvl_folder, export_internvl, "InternVLForConditionalGeneration")

    def image_tokens(self, model) -> str:
        return f"{model.image_seq_len}/tile"

    def build(self, cfg, image_token_id, init=True):
        return build_internvl(cfg, image_token_id, init)

    def image_processor(self, pcfg):
        return InternVLImageProcessor(pcfg)
