"""Presets of the InternVL family: the shape of OpenGVLab's InternVL3-1B (transformers' -hf conversion)."""

from __future__ import annotations

from vlmkit.config import ConnectorConfig, LanguageConfig, VisionConfig
from vlmkit.encoders.internvit import InternViTConfig
from vlmkit.models.internvl import InternVLConfig
from vlmkit.presets import PRESETS, Preset, whole
from vlmkit.processing.internvl import InternVLProcessorConfig, TilingConfig

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@PRESETS.register("internvl3-1b", "InternVL3-1B shapes: InternViT-300M-448px (layer scale) on up to 12 tiles and a "
                                  "thumbnail + pixel shuffle + LayerNorm/MLP + Qwen2.5-0.5B, 256 tokens a tile")
def internvl3_1b() -> Preset:
    vision = VisionConfig(arch="internvit", image_size=(448, 448), patch_size=14, width=1024, depth=24, heads=16,
                          mlp_dim=4096, act="gelu", norm="layernorm", norm_eps=1e-6, class_token=True,
                          pos_embed="learned", post_norm=False, qkv_bias=True, feature_layer=-1, drop_class_token=True)
    lm = LanguageConfig(vocab_size=151674, width=896, depth=24, heads=14, kv_heads=2, mlp_dim=4864, norm_eps=1e-6,
                        rope_theta=1e6, max_seq_len=32768, tie_embeddings=True, qkv_bias=True)
    connector = ConnectorConfig(kind="pixel_shuffle", scale_factor=2, layers=2, act="gelu", bias=True)
    model = InternVLConfig(vision=vision, connector=connector, lm=lm, internvit=InternViTConfig(qk_norm=False),
                           image_token="<IMG_CONTEXT>")
    proc = whole(InternVLProcessorConfig, image_size=(448, 448), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 resample="bicubic", tiling=TilingConfig(enabled=True, min_tiles=1, max_tiles=12),
                 image_token="<IMG_CONTEXT>", image_seq_len=256, max_length=32768, eos_token="<|im_end|>",
                 pad_token="<|endoftext|>", refused_placeholders=["<video>"])
    return Preset(model, proc, source="OpenGVLab/InternVL3-1B-hf")
