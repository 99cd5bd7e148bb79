"""Presets of the Gemma 3 family: google/gemma-3-4b-it's shape."""

from __future__ import annotations

from vlmkit.config import LanguageConfig, RopeScalingConfig, VisionConfig
from vlmkit.models.gemma3 import GEMMA3_CONNECTOR, Gemma3Config
from vlmkit.presets import PRESETS, SIGLIP_SO400M, Preset, whole
from vlmkit.processing.gemma3 import Gemma3ProcessorConfig


def gemma3_layers(depth: int, pattern: int = 6) -> tuple[str, ...]:
    """Gemma 3's layer pattern: five sliding layers, then a full one (sliding_window_pattern 6)."""
    return tuple("sliding" if (i + 1) % pattern else "full" for i in range(depth))


@PRESETS.register("gemma-3-4b-it", "Gemma-3-4B-it shapes: SigLIP-So400m/14 at 896 px pooled to 256 tokens + "
                                   "Gemma 3 4B (5 sliding-window layers of 1024 : 1 full)")
def gemma_3_4b_it() -> Preset:
    vision = VisionConfig(image_size=(896, 896), **SIGLIP_SO400M, post_norm=True, feature_layer=-1,
                          drop_class_token=False)
    lm = LanguageConfig(vocab_size=262208, width=2560, depth=34, heads=8, kv_heads=4, head_dim=256, mlp_dim=10240,
                        act="gelu_tanh", norm_eps=1e-6, rope_theta=1e6, max_seq_len=131072, tie_embeddings=True,
                        norm_offset=True, embed_scale=True, qk_norm=True, qk_norm_kind="rmsnorm",
                        rope_scaling=RopeScalingConfig(kind="linear", factor=8.0), post_norms=True,
                        attn_scalar=256.0, sliding_window=1024, layer_types=gemma3_layers(34),
                        local_rope_theta=10000.0)
    model = Gemma3Config(vision=vision, connector=GEMMA3_CONNECTOR, lm=lm, mm_tokens_per_image=256)
    proc = whole(Gemma3ProcessorConfig, image_size=(896, 896), resample="bilinear", max_length=131072,
                 eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")
    return Preset(model, proc, source="google/gemma-3-4b-it")


@PRESETS.register("tiny-gemma3", "from-scratch Gemma 3-style model (SigLIP-style ViT pooled to 16 tokens, Gemma 3 LM "
                                 "with 16-token sliding windows) for ShapesWorld")
def tiny_gemma3() -> Preset:
    # ShapesWorld's 64x64 images: an 8x8 patch grid average-pooled 2x2 into 16 image tokens, which see each other both
    # ways; three sliding layers of a 16-token window (shorter than an image and its question) and a full one. The LM
    # is tiny-llava's scale; vlmkit's <image> is the image token and <start_of_image> / <end_of_image> close it
    vision = VisionConfig(image_size=(64, 64), patch_size=8, width=64, depth=2, heads=2, mlp_dim=128, act="gelu_tanh",
                          norm_eps=1e-6, class_token=False, post_norm=True, feature_layer=-1, drop_class_token=False)
    lm = LanguageConfig(vocab_size=1024, width=128, depth=4, heads=4, kv_heads=2, head_dim=32, mlp_dim=256,
                        act="gelu_tanh", max_seq_len=512, norm_offset=True, embed_scale=True, post_norms=True,
                        qk_norm=True, qk_norm_kind="rmsnorm", attn_scalar=32.0, sliding_window=16,
                        layer_types=gemma3_layers(4, 4), local_rope_theta=10000.0, rope_theta=1e6,
                        tie_embeddings=False, head_init_std=0.25)
    model = Gemma3Config(vision=vision, connector=GEMMA3_CONNECTOR, lm=lm, mm_tokens_per_image=16, image_token="<image>")
    proc = Gemma3ProcessorConfig(image_size=(64, 64), image_token="<image>", resample="bilinear",
                                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return Preset(model, proc, source="Gemma Team 2025, Gemma 3 (architecture only); tiny-llava's LM scale")
