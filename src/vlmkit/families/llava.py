"""LLaVA (Liu et al. 2023): an image tower -> a connector -> image features spliced into a decoder LM at the image
placeholders. vlmkit's from-scratch presets (tiny-llava's CNN and pixel-shuffle connector) and LLaVA-1.5 folders
(CLIP tower read at layer -2, two-layer MLP, Llama-family LM) are this family."""

from __future__ import annotations

from vlmkit.convert.hf.llava import export_llava, load_llava_folder
from vlmkit.family import Capabilities, HFMapping, VLMFamily, register
from vlmkit.models.init import build_vlm


@register
class Llava(VLMFamily):
    """encoder -> connector -> splice into the LM (LLaVA-1.5, vlmkit's tiny-llava)"""

    name = "llava"
    capabilities = Capabilities(tower_cache=True)
    hf = HFMapping(("llava",), load_llava_folder, export_llava, "LlavaForConditionalGeneration")

    def build(self, cfg, image_token_id, init=True):
        return build_vlm(cfg, image_token_id, init)
