"""Presets of the Mistral 3 family: Mistral Small 3.1's shape (counted against transformers on the meta device) and a
tiny from-scratch one."""

from __future__ import annotations

from vlmkit.config import ConnectorConfig, LanguageConfig, VisionConfig, VLMConfig
from vlmkit.presets import CLIP_MEAN, CLIP_STD, PRESETS, Preset, whole
from vlmkit.processing.mistral3 import Mistral3ProcessorConfig


@PRESETS.register("mistral-small-3.1-24b", "Mistral-Small-3.1-24B shapes: Pixtral ViT (2D RoPE, 14-px patches, "
                                           "images up to 1540 px) + 2x2 patch merger + Mistral-24B")
def mistral_small_3_1_24b() -> Preset:
    vision = VisionConfig(arch="pixtral", image_size=(1540, 1540), patch_size=14, width=1024, depth=24, heads=16,
                          mlp_dim=4096, act="silu", norm="rmsnorm", norm_eps=1e-5, pos_embed="rope2d",
                          rope_theta=10000.0, class_token=False, pre_norm=True, post_norm=False, patch_bias=False,
                          qkv_bias=False, feature_layer=-1, drop_class_token=False, merge_size=2)
    lm = LanguageConfig(vocab_size=131072, width=5120, depth=40, heads=32, kv_heads=8, head_dim=128, mlp_dim=32768,
                        norm_eps=1e-5, rope_theta=1e9, max_seq_len=131072, tie_embeddings=False)
    connector = ConnectorConfig(kind="patch_merger", scale_factor=2, layers=2, act="gelu", bias=False)
    model = VLMConfig(family="mistral3", vision=vision, connector=connector, lm=lm, image_token="[IMG]")
    proc = whole(Mistral3ProcessorConfig, image_size=(1540, 1540), mean=CLIP_MEAN, std=CLIP_STD, resample="bicubic",
                 longest_edge=1540, patch_size=14, merge_size=2, max_length=131072, bos_token="<s>",
                 eos_token="</s>", pad_token="<pad>")
    return Preset(model, proc, source="mistralai/Mistral-Small-3.1-24B-Instruct-2503")


@PRESETS.register("tiny-mistral3", "from-scratch Mistral 3-style model (Pixtral ViT with 2D RoPE, 2x2 patch merger, "
                                   "Mistral LM) for ShapesWorld")
def tiny_mistral3() -> Preset:
    # ShapesWorld's 64x64 images: 8x8 patches of 8 px merged 2x2 into 16 image tokens, 3 row breaks and an image end;
    # other sizes keep their aspect ratio within the 64-px longest edge. The LM is tiny-llava's scale
    vision = VisionConfig(arch="pixtral", image_size=(64, 64), patch_size=8, width=64, depth=2, heads=2, mlp_dim=128,
                          act="silu", norm="rmsnorm", norm_eps=1e-5, pos_embed="rope2d", rope_theta=10000.0,
                          class_token=False, pre_norm=True, post_norm=False, patch_bias=False, qkv_bias=False,
                          feature_layer=-1, drop_class_token=False, merge_size=2)
    lm = LanguageConfig(vocab_size=1024, width=128, depth=2, heads=4, kv_heads=2, mlp_dim=256, max_seq_len=512)
    connector = ConnectorConfig(kind="patch_merger", scale_factor=2, layers=2, act="gelu", bias=False)
    model = VLMConfig(family="mistral3", vision=vision, connector=connector, lm=lm, image_token="<image>")
    proc = Mistral3ProcessorConfig(image_size=(64, 64), longest_edge=64, patch_size=8, merge_size=2,
                                   image_token="<image>", resample="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return Preset(model, proc, source="Mistral AI's Pixtral / Mistral 3 (architecture only); tiny-llava's LM scale")
