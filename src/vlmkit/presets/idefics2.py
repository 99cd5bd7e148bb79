"""Presets of the Idefics2 family: HuggingFaceM4/idefics2-8b's shape."""

from __future__ import annotations

from vlmkit.config import ConnectorConfig, LanguageConfig, ResamplerConfig, VisionConfig, VLMConfig
from vlmkit.presets import PRESETS, SIGLIP_SO400M, Preset, whole
from vlmkit.processing.idefics2 import Idefics2ProcessorConfig


@PRESETS.register("idefics2-8b", "Idefics2-8B shapes: SigLIP-So400m/14 NaViT (up to 980 px) + perceiver "
                                 "(64 latents, 3 layers) + Mistral-7B")
def idefics2_8b() -> Preset:
    vision = VisionConfig(image_size=(980, 980), **SIGLIP_SO400M, post_norm=True, feature_layer=-1)
    # Mistral-7B-v0.1 with Idefics2's three added tokens; its 4096-token sliding window caps the length
    lm = LanguageConfig(vocab_size=32003, width=4096, depth=32, heads=32, kv_heads=8, mlp_dim=14336, norm_eps=1e-5,
                        rope_theta=10000.0, max_seq_len=4096)
    resampler = ResamplerConfig(n_latents=64, depth=3, heads=16, head_dim=96, kv_heads=4, norm_eps=1e-6,
                                proj_dim=14336)
    connector = ConnectorConfig(kind="perceiver", act="silu", bias=False, perceiver=resampler)
    model = VLMConfig(family="idefics2", vision=vision, connector=connector, lm=lm)
    # the released processor splits each image into four quarters and the whole (320 image tokens); its chat
    # template, "User:...<end_of_utterance>\nAssistant:", is the idefics3 template's text
    proc = whole(Idefics2ProcessorConfig, image_size=(980, 980), min_edge=378, max_edge=980, split=True,
                 patch_size=14, resample="bilinear", image_seq_len=64, max_length=4096, eos_token="</s>",
                 bos_token="<s>", pad_token="<unk>", chat_template="idefics3")
    return Preset(model, proc, source="HuggingFaceM4/idefics2-8b")
