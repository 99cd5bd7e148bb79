"""LLaVA-NeXT and LLaVA-OneVision (Liu et al. 2024; Li et al. 2024): LLaVA's parts on AnyRes tiles, each image's
tile features reassembled into its grid, unpadded, closed by a learned newline per row (models/llava_next.py);
tiling as transformers' processors (processing/llava_next.py)."""

from __future__ import annotations

from vlmkit.convert.hf.llava_next import export_llava_next, load_llava_next_folder
from vlmkit.family import HFMapping, VLMFamily, register
from vlmkit.models.llava_next import LlavaNextConfig, build_llava_next
from vlmkit.processing.llava_next import AnyResImageProcessor, AnyResProcessorConfig


@register
class LlavaNext(VLMFamily):
    """CLIP tower (layer -2) + MLP + LM on AnyRes tiles (LLaVA-NeXT)"""

    name = "llava_next"
    Config = LlavaNextConfig
    ProcessorConfig = AnyResProcessorConfig
    objectives = ("lm",)
    hf = HFMapping(("llava_next",), load_llava_next_folder, export_llava_next, "LlavaNextForConditionalGeneration")

    def image_tokens(self, model) -> str:
        return f"{model.image_seq_len}/tile"

    def build(self, cfg, image_token_id, init=True):
        return build_llava_next(cfg, image_token_id, init)

    def image_processor(self, pcfg):
        return AnyResImageProcessor(pcfg)


@register
class LlavaOnevision(LlavaNext):
    """SigLIP tower + MLP + Qwen2 LM on AnyRes tiles, anyres_max_N (LLaVA-OneVision, images)"""

    name = "llava_onevision"
    hf = HFMapping(("llava_onevision",), load_llava_next_folder, export_llava_next,
                   "LlavaOnevisionForConditionalGeneration")
