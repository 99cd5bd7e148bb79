"""Idefics3 / SmolVLM (Laurençon et al. 2024): a SigLIP-like tower on image tiles plus a global view, a pixel
shuffle and one linear, spliced into a Llama-family LM; each image's tiles are marked by row and column in the
text (processing/idefics3.py)."""

from __future__ import annotations

from vlmkit.convert.hf.idefics3 import MODEL_TYPES, export_idefics3, load_idefics3_folder
from vlmkit.family import HFMapping, VLMFamily, register
from vlmkit.models.init import build_vlm
from vlmkit.processing.idefics3 import Idefics3ImageProcessor, Idefics3ProcessorConfig


@register
class Idefics3(VLMFamily):
    """SigLIP-like tower on tiles + pixel shuffle + LM, tiles marked in the text (Idefics3, SmolVLM)"""

    name = "idefics3"
    ProcessorConfig = Idefics3ProcessorConfig
    hf = HFMapping(tuple(MODEL_TYPES), load_idefics3_folder, export_idefics3, "Idefics3ForConditionalGeneration")

    def image_tokens(self, model) -> str:
        return f"{model.image_seq_len}/tile"

    def build(self, cfg, image_token_id, init=True):
        return build_vlm(cfg, image_token_id, init)

    def image_processor(self, pcfg):
        return Idefics3ImageProcessor(pcfg)
