"""PaliGemma (Beyer et al. 2024): SigLIP tower -> linear projector -> Gemma LM with prefix-LM attention over the
prompt (models/paligemma.py), and PaliGemmaProcessor's prompt + suffix layout (processing/paligemma.py)."""

from __future__ import annotations

from vlmkit.convert.hf.paligemma import export_paligemma, load_paligemma_folder
from vlmkit.family import Capabilities, HFMapping, VLMFamily, register
from vlmkit.models.paligemma import build_paligemma
from vlmkit.processing.layouts import SegmentLayout
from vlmkit.processing.paligemma import PaliGemmaLayout


@register
class PaliGemma(VLMFamily):
    """SigLIP ViT -> linear projector -> Gemma LM with prefix-LM attention"""

    name = "paligemma"
    # grouped questions would share a prefix that each question's prefix-LM attention reads differently
    capabilities = Capabilities(tower_cache=True, shared_prefix=False)
    hf = HFMapping(("paligemma",), load_paligemma_folder, export_paligemma, "PaliGemmaForConditionalGeneration")

    def build(self, cfg, image_token_id, init=True):
        return build_paligemma(cfg, image_token_id, init)

    def layout(self, pcfg, tokenizer, files):
        return (SegmentLayout if pcfg.text_mode == "segments" else PaliGemmaLayout)(pcfg, tokenizer)
