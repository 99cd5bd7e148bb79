"""Presets of the Qwen2.5-VL family: the shape of Qwen/Qwen2.5-VL-3B-Instruct."""

from __future__ import annotations

from vlmkit.config import ConnectorConfig, LanguageConfig, VisionConfig
from vlmkit.models.qwen2_5_vl import Qwen25TowerConfig, Qwen25VLConfig
from vlmkit.presets import CLIP_MEAN, CLIP_STD, PRESETS, Preset, whole
from vlmkit.processing.qwen2_vl import NativeResolutionConfig, Qwen2VLProcessorConfig


@PRESETS.register("qwen2.5-vl-3b", "Qwen2.5-VL-3B shapes: its ViT (2D RoPE, 112-px windows, 4 full-attention "
                                   "blocks, RMSNorm, SwiGLU) + 2x2 merger at native resolution + Qwen2.5-3B with "
                                   "M-RoPE")
def qwen2_5_vl_3b() -> Preset:
    vision = VisionConfig(arch="qwen2_5_vl", image_size=(224, 224), patch_size=14, width=1280, depth=32, heads=16,
                          mlp_dim=3420, act="silu", norm="rmsnorm", norm_eps=1e-6, pos_embed="rope2d",
                          post_norm=False, patch_bias=False, temporal_patch_size=2, merge_size=2,
                          drop_class_token=False)
    lm = LanguageConfig(vocab_size=151936, width=2048, depth=36, heads=16, kv_heads=2, mlp_dim=11008, norm_eps=1e-6,
                        rope_theta=1e6, max_seq_len=128000, tie_embeddings=True, qkv_bias=True,
                        mrope_section=(16, 24, 24))
    connector = ConnectorConfig(kind="patch_merger", scale_factor=2, layers=2, act="gelu", bias=True)
    tower = Qwen25TowerConfig(window_size=112, full_attention_blocks=(7, 15, 23, 31), tokens_per_second=2)
    model = Qwen25VLConfig(vision=vision, connector=connector, lm=lm, image_token="<|image_pad|>", tower=tower)
    proc = whole(Qwen2VLProcessorConfig, image_size=(224, 224), mean=CLIP_MEAN, std=CLIP_STD,
                 image_token="<|image_pad|>", max_length=128000,
                 native=NativeResolutionConfig(min_pixels=56 * 56, max_pixels=28 * 28 * 16384, patch_size=14,
                                               temporal_patch_size=2, merge_size=2), eos_token="<|im_end|>",
                 pad_token="<|endoftext|>", refused_placeholders=["<|video_pad|>"])
    return Preset(model, proc, source="Qwen/Qwen2.5-VL-3B-Instruct")
