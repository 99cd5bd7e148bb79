"""Flamingo / IDEFICS (Alayrac et al. 2022; Laurençon et al. 2023): a tower -> a perceiver resampler -> an LM that
reads each image through tanh-gated cross-attention blocks (models/flamingo.py, fusion/cross_attention.py); each
image is one placeholder token in the text, laid out as IdeficsProcessor lays it out for imported folders
(processing/idefics.py)."""

from __future__ import annotations

from vlmkit.convert.hf.idefics import export_idefics, load_idefics_folder
from vlmkit.family import Capabilities, HFMapping, VLMFamily, register
from vlmkit.models.flamingo import FlamingoConfig, build_flamingo
from vlmkit.processing.idefics import IdeficsLayout
from vlmkit.processing.layouts import SegmentLayout


@register
class Flamingo(VLMFamily):
    """vision tower -> perceiver resampler -> gated cross-attention blocks every k LM layers (Flamingo, IDEFICS)"""

    name = "flamingo"
    Config = FlamingoConfig
    capabilities = Capabilities(tower_cache=True)
    hf = HFMapping(("idefics",), load_idefics_folder, export_idefics, "IdeficsForVisionText2Text")

    def build(self, cfg, image_token_id, init=True):
        return build_flamingo(cfg, image_token_id, init)

    def layout(self, pcfg, tokenizer, files):
        return (SegmentLayout if pcfg.text_mode == "segments" else IdeficsLayout)(pcfg, tokenizer)
