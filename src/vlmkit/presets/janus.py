"""Presets of the Janus family (models/janus.py): the from-scratch tiny-janus for ShapesWorld."""

from __future__ import annotations

import dataclasses

from vlmkit.config import VLMConfig
from vlmkit.models.janus import JanusConfig, JanusGenConfig
from vlmkit.presets import PRESETS, Preset
from vlmkit.presets.splice import tiny_llava
from vlmkit.presets.vq import tiny_vq
from vlmkit.processing.janus import JanusProcessorConfig


@PRESETS.register("tiny-janus", "from-scratch Janus for ShapesWorld: tiny-llava's understanding parts (CNN tower, "
                                "pixel-shuffle aligner, 3-layer LM) and generation of tiny-vq's 8x8 codes through "
                                "their own embeddings, aligner and head")
def tiny_janus() -> Preset:
    # understanding is tiny-llava's, so that its VQA can be compared with tiny-llava's at equal parts; the codes
    # are tiny-vq's (a recipe points model.gen.vq_from at a trained one); the generation aligner and head are
    # Janus' shape (2 Linear layers, GELU) at the LM's width
    base = tiny_llava()
    parts = {f.name: getattr(base.model, f.name) for f in dataclasses.fields(VLMConfig)}
    model = JanusConfig(**{**parts, "family": "janus"}, gen=JanusGenConfig(vq=tiny_vq().model))
    pcfg = JanusProcessorConfig(**{f.name: getattr(base.processor, f.name)
                                   for f in dataclasses.fields(base.processor)}, )
    pcfg.family = "janus"
    return Preset(model, pcfg, source="Wu et al. 2024, Janus; Chen et al. 2025, Janus-Pro (shape only): decoupled "
                                      "understanding and generation paths in one LM")
