"""Presets of the Janus family (models/janus.py): deepseek-ai/Janus-Pro-1B's shape and the from-scratch tiny-janus
for ShapesWorld."""

from __future__ import annotations

import dataclasses

from vlmkit.config import ConnectorConfig, LanguageConfig, VisionConfig, VLMConfig
from vlmkit.convert.hf.vq import vq_config_from_hf
from vlmkit.models.janus import JanusConfig, JanusGenConfig
from vlmkit.presets import PRESETS, Preset, whole
from vlmkit.presets.splice import tiny_llava
from vlmkit.presets.vq import tiny_vq
from vlmkit.processing.janus import JanusProcessorConfig


@PRESETS.register("janus-pro-1b", "Janus-Pro-1B shapes: SigLIP-L/16 at 384 px (576 tokens) + 2-layer aligner, a "
                                  "Llama-style 1.5B LM (2048 wide, 24 layers), LlamaGen's VQ-16 (16384 codes, 24x24 "
                                  "per image) with the generation embeddings, aligner and head")
def janus_pro_1b() -> Preset:
    # the tower, aligner and VQ at transformers' JanusVisionConfig / JanusVQVAEConfig defaults (Janus-Pro's); the
    # LM is DeepSeek-LLM-1.5B's shape (deepseek-ai/Janus-Pro-1B's language_config)
    vision = VisionConfig(arch="vit", image_size=(384, 384), patch_size=16, width=1024, depth=24, heads=16,
                          mlp_dim=4096, act="gelu", norm_eps=1e-6, class_token=False, pre_norm=False, post_norm=True,
                          patch_bias=True, qkv_bias=True, feature_layer=-1, drop_class_token=False)
    lm = LanguageConfig(vocab_size=102400, width=2048, depth=24, heads=16, kv_heads=16, mlp_dim=5632, act="silu",
                        norm_eps=1e-6, rope_theta=10000.0, max_seq_len=16384, tie_embeddings=False)
    gen = JanusGenConfig(vq=vq_config_from_hf({"num_patches": 24}, "janus_vqgan"), embed_dim=8, aligner_depth=2,
                         projection_dim=2048, act="gelu")
    model = JanusConfig(family="janus", vision=vision, connector=ConnectorConfig(kind="mlp", act="gelu"), lm=lm,
                        gen=gen)
    proc = whole(JanusProcessorConfig, family="janus", image_size=(384, 384), image_token="<image_placeholder>",
                 image_seq_len=576, max_length=16384, pad_square=True, min_size=14, background=(127, 127, 127),
                 bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>", pad_token="<｜▁pad▁｜>")
    return Preset(model, proc, source="deepseek-ai/Janus-Pro-1B (deepseek-community/Janus-Pro-1B in transformers)")


@PRESETS.register("tiny-janus", "from-scratch Janus for ShapesWorld: tiny-llava's understanding parts (CNN tower, "
                                "pixel-shuffle aligner, 3-layer LM) and generation of tiny-vq's 16x16 codes through "
                                "their own embeddings, aligner and head")
def tiny_janus() -> Preset:
    # understanding is tiny-llava's, so that its VQA can be compared with tiny-llava's at equal parts; the codes
    # are tiny-vq's (a recipe points model.gen.vq_from at a trained one); the generation aligner and head are
    # Janus' shape (2 Linear layers, GELU) at the LM's width
    base = tiny_llava()
    parts = {f.name: getattr(base.model, f.name) for f in dataclasses.fields(VLMConfig)}
    # the codes' row and column embeddings (gen.pos_embed "grid"): a 3-layer LM writing 256 codes in raster order
    # otherwise has only RoPE's relative offsets to know which column it is in (docs/generation.md)
    model = JanusConfig(**{**parts, "family": "janus"}, gen=JanusGenConfig(vq=tiny_vq().model, pos_embed="grid"))
    pcfg = JanusProcessorConfig(**{f.name: getattr(base.processor, f.name)
                                   for f in dataclasses.fields(base.processor)}, )
    pcfg.family = "janus"
    return Preset(model, pcfg, source="Wu et al. 2024, Janus; Chen et al. 2025, Janus-Pro (shape only): decoupled "
                                      "understanding and generation paths in one LM")
