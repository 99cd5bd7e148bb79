"""Presets of the splice families: vlmkit's tiny LLaVA, and the shapes of released LLaVA-1.5, LLaVA-NeXT,
LLaVA-OneVision, PaliGemma (1 and 2), Qwen2-VL, SmolVLM and Idefics3 checkpoints."""

from __future__ import annotations

from vlmkit.config import ConnectorConfig, LanguageConfig, ProcessorConfig, VisionConfig, VLMConfig
from vlmkit.models.llava_next import LlavaNextConfig
from vlmkit.presets import CLIP_MEAN, CLIP_STD, PRESETS, SIGLIP_SO400M, Preset, whole
from vlmkit.processing.idefics3 import Idefics3ProcessorConfig, ImageSplitConfig
from vlmkit.processing.llava_next import AnyResConfig, AnyResProcessorConfig
from vlmkit.processing.qwen2_vl import NativeResolutionConfig, Qwen2VLProcessorConfig


@PRESETS.register("tiny-llava", "from-scratch LLaVA-style model (CNN tower + pixel-shuffle MLP + Llama) for ShapesWorld; the demo model")
def tiny_llava() -> Preset:
    # A small BatchNorm CNN instead of a ViT: from scratch on ShapesWorld it learns what is under each cell of
    # its 8x8 grid in 200 steps, tiny ViTs do not (docs/design.md). Fixed 2D positions: the LM must read
    # where objects are from the tokens themselves, and reads them far sooner at twice the unit scale.
    vision = VisionConfig(arch="cnn", image_size=(64, 64), patch_size=8, width=128, pos_embed="sincos2d",
                          pos_scale=2.0, class_token=False)
    # A small LM, 128 wide, learns ShapesWorld's questions as fast per step as 4 layers of 256 and costs a
    # fraction per step; the steps it frees are what the demo's budget needs. With Muon, 3 layers learn
    # more per second than 2 or 4. An untied head initialised large (std 0.25, not 0.02) learns several
    # times faster (docs/design.md).
    lm = LanguageConfig(vocab_size=1024, width=128, depth=3, heads=4, kv_heads=2, mlp_dim=384, max_seq_len=512,
                        tie_embeddings=False, head_init_std=0.25, rope_theta=10000.0)
    # 8x8 cells -> 2x2 pixel shuffle -> 16 LM tokens
    connector = ConnectorConfig(kind="pixel_shuffle", scale_factor=2, layers=2, bias=True)
    model = VLMConfig(family="llava", vision=vision, connector=connector, lm=lm)
    proc = ProcessorConfig(image_size=(64, 64), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resample="bicubic")
    return Preset(model, proc, source="Liu et al. 2023, Improved Baselines with Visual Instruction Tuning (shape "
                  "only); pixel-shuffle connector as Idefics3; VGG-style BatchNorm CNN tower")


@PRESETS.register("tiny-llava-vit", "tiny-llava with a CLIP-style ViT tower and LLaVA-1.5's MLP: trains with the same "
                  "recipe and exports as a transformers LLaVA checkpoint (vlmkit convert --to hf)")
def tiny_llava_vit() -> Preset:
    # tiny-llava's CNN tower and pixel-shuffle connector have no transformers equivalent; this sibling keeps
    # its LM and processor and takes LLaVA-1.5's layout (class token, pre-layernorm, quick-GELU, layer -2
    # without the class token, two-layer GELU MLP), so what it learns can leave vlmkit. It learns ShapesWorld
    # more slowly than the CNN (docs/design.md).
    base = tiny_llava()
    vision = VisionConfig(image_size=(64, 64), patch_size=8, width=128, depth=4, heads=4, mlp_dim=512,
                          act="quick_gelu", class_token=True, pre_norm=True, post_norm=False, patch_bias=False,
                          feature_layer=-2, drop_class_token=True)
    model = VLMConfig(family="llava", vision=vision, connector=ConnectorConfig(kind="mlp"), lm=base.model.lm)
    return Preset(model, base.processor, source="tiny-llava with LLaVA-1.5's tower and projector layout")


@PRESETS.register("llava-1.5-7b", "LLaVA-1.5-7B shapes: CLIP ViT-L/14-336 (layer -2) + MLP + Vicuna-7B")
def llava_15_7b() -> Preset:
    vision = VisionConfig(image_size=(336, 336), patch_size=14, width=1024, depth=24, heads=16, mlp_dim=4096,
                          act="quick_gelu", class_token=True, pre_norm=True, post_norm=False, patch_bias=False,
                          feature_layer=-2, drop_class_token=True)
    lm = LanguageConfig(vocab_size=32064, width=4096, depth=32, heads=32, kv_heads=32, mlp_dim=11008,
                        norm_eps=1e-5, max_seq_len=4096)
    model = VLMConfig(family="llava", vision=vision, connector=ConnectorConfig(kind="mlp"), lm=lm)
    proc = ProcessorConfig(image_size=(336, 336), mean=CLIP_MEAN, std=CLIP_STD, resample="bicubic",
                           chat_template="llava-1.5")
    return Preset(model, proc, source="llava-hf/llava-1.5-7b-hf",
                  notes=["the vision layer after the feature layer is not built (it never affects outputs)"])


@PRESETS.register("smolvlm-256m", "SmolVLM-256M shapes: SigLIP-B/16-512 + pixel shuffle x4 + SmolLM2-135M")
def smolvlm_256m() -> Preset:
    vision = VisionConfig(image_size=(512, 512), patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072,
                          act="gelu_tanh", norm_eps=1e-6, class_token=False, post_norm=True, feature_layer=-1)
    lm = LanguageConfig(vocab_size=49280, width=576, depth=30, heads=9, kv_heads=3, mlp_dim=1536,
                        rope_theta=100000.0, max_seq_len=8192, tie_embeddings=False)
    connector = ConnectorConfig(kind="pixel_shuffle", scale_factor=4, layers=1, bias=False)
    model = VLMConfig(family="idefics3", vision=vision, connector=connector, lm=lm)
    proc = Idefics3ProcessorConfig(image_size=(512, 512), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resample="lanczos",
                                   split=ImageSplitConfig(enabled=False),
                           chat_template="idefics3")
    return Preset(model, proc, source="HuggingFaceTB/SmolVLM-256M-Instruct",
                  notes=["single 512px image; Idefics3 image splitting arrives with checkpoint import"])


# imported Hugging Face families
# Shapes of released checkpoints (their config.json), for building on the meta device, for recipes that start
# from an import, and as the reference each family's converter is tested against: the parameter counts equal
# transformers' own classes built from the exported config (tests/convert/test_hf_presets.py).

@PRESETS.register("llava-next-mistral-7b", "LLaVA-NeXT (1.6) Mistral-7B shapes: CLIP ViT-L/14-336 on AnyRes tiles "
                                           "+ MLP + Mistral-7B")
def llava_next_mistral_7b() -> Preset:
    base = llava_15_7b()
    lm = LanguageConfig(vocab_size=32064, width=4096, depth=32, heads=32, kv_heads=8, mlp_dim=14336, norm_eps=1e-5,
                        rope_theta=1e6, max_seq_len=32768)
    pins = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
    model = LlavaNextConfig(family="llava_next", vision=base.model.vision, connector=ConnectorConfig(kind="mlp"), lm=lm,
                        anyres=AnyResConfig(grid_pinpoints=pins))
    proc = whole(AnyResProcessorConfig, image_size=(336, 336), shortest_edge=336, mean=CLIP_MEAN, std=CLIP_STD,
                  anyres=AnyResConfig(grid_pinpoints=pins), max_length=32768, eos_token="</s>", bos_token="<s>",
                  pad_token="<unk>")
    return Preset(model, proc, source="llava-hf/llava-v1.6-mistral-7b-hf")


@PRESETS.register("llava-onevision-0.5b", "LLaVA-OneVision-0.5B shapes: SigLIP-So400m/14-384 (26 layers) on AnyRes "
                                          "tiles (max 9) + MLP + Qwen2-0.5B")
def llava_onevision_05b() -> Preset:
    vision = VisionConfig(image_size=(384, 384), **{**SIGLIP_SO400M, "depth": 26}, post_norm=False,
                          feature_layer=-1, drop_class_token=False)
    lm = LanguageConfig(vocab_size=151647, width=896, depth=24, heads=14, kv_heads=2, mlp_dim=4864, norm_eps=1e-6,
                        rope_theta=1e6, max_seq_len=32768, tie_embeddings=True, qkv_bias=True)
    pins = [(384 * r, 384 * c) for r in range(1, 7) for c in range(1, 7)]
    anyres = AnyResConfig(grid_pinpoints=pins, max_tiles=9)
    model = LlavaNextConfig(family="llava_onevision", vision=vision, connector=ConnectorConfig(kind="mlp"), lm=lm,
                        anyres=anyres)
    proc = whole(AnyResProcessorConfig, image_size=(384, 384), anyres=anyres, max_length=32768,
                  eos_token="<|im_end|>", pad_token="<|endoftext|>", refused_placeholders=["<video>"])
    return Preset(model, proc, source="llava-hf/llava-onevision-qwen2-0.5b-ov-hf")


@PRESETS.register("paligemma-3b-224", "PaliGemma-3B-224 shapes: SigLIP-So400m/14-224 + linear + Gemma-2B, "
                                      "prefix-LM attention")
def paligemma_3b_224() -> Preset:
    vision = VisionConfig(image_size=(224, 224), **SIGLIP_SO400M, post_norm=True, feature_layer=-1,
                          drop_class_token=False)
    lm = LanguageConfig(vocab_size=257216, width=2048, depth=18, heads=8, kv_heads=1, head_dim=256, mlp_dim=16384,
                        act="gelu_tanh", norm_eps=1e-6, max_seq_len=8192, tie_embeddings=True, norm_offset=True,
                        embed_scale=True)
    model = VLMConfig(family="paligemma", vision=vision, connector=ConnectorConfig(kind="linear"), lm=lm)
    proc = whole(image_size=(224, 224), resample="bicubic", max_length=8192,
                  eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")
    return Preset(model, proc, source="google/paligemma-3b-pt-224")


@PRESETS.register("paligemma2-3b-224", "PaliGemma 2-3B-224 shapes: SigLIP-So400m/14-224 + linear + Gemma 2 2B "
                                       "(sliding-window layers of 4096 : full, soft-capping), prefix-LM attention")
def paligemma2_3b_224() -> Preset:
    base = paligemma_3b_224()
    layers = tuple("sliding" if i % 2 == 0 else "full" for i in range(26))  # Gemma 2: every other layer full
    lm = LanguageConfig(vocab_size=257216, width=2304, depth=26, heads=8, kv_heads=4, head_dim=256, mlp_dim=9216,
                        act="gelu_tanh", norm_eps=1e-6, max_seq_len=8192, tie_embeddings=True, norm_offset=True,
                        embed_scale=True, post_norms=True, attn_scalar=256.0, attn_softcap=50.0, logit_softcap=30.0,
                        sliding_window=4096, layer_types=layers)
    model = VLMConfig(family="paligemma", vision=base.model.vision, connector=ConnectorConfig(kind="linear"), lm=lm)
    return Preset(model, base.processor, source="google/paligemma2-3b-pt-224")


@PRESETS.register("qwen2-vl-2b", "Qwen2-VL-2B shapes: its 675M ViT (2D RoPE, 2x2 merger) at native resolution + "
                                 "Qwen2-1.5B with M-RoPE")
def qwen2_vl_2b() -> Preset:
    vision = VisionConfig(arch="qwen2_vl", image_size=(224, 224), patch_size=14, width=1280, depth=32, heads=16,
                          mlp_dim=5120, act="quick_gelu", norm_eps=1e-6, pos_embed="rope2d", post_norm=False,
                          patch_bias=False, temporal_patch_size=2, merge_size=2, drop_class_token=False)
    lm = LanguageConfig(vocab_size=151936, width=1536, depth=28, heads=12, kv_heads=2, mlp_dim=8960, norm_eps=1e-6,
                        rope_theta=1e6, max_seq_len=32768, tie_embeddings=True, qkv_bias=True,
                        mrope_section=(16, 24, 24))
    connector = ConnectorConfig(kind="patch_merger", scale_factor=2, layers=2, act="gelu", bias=True)
    model = VLMConfig(family="qwen2_vl", vision=vision, connector=connector, lm=lm, image_token="<|image_pad|>")
    proc = whole(Qwen2VLProcessorConfig, image_size=(224, 224), mean=CLIP_MEAN, std=CLIP_STD,
                  image_token="<|image_pad|>", max_length=32768,
                  native=NativeResolutionConfig(min_pixels=56 * 56, max_pixels=28 * 28 * 16384, patch_size=14,
                                                temporal_patch_size=2, merge_size=2), eos_token="<|im_end|>",
                  pad_token="<|endoftext|>", refused_placeholders=["<|video_pad|>"])
    return Preset(model, proc, source="Qwen/Qwen2-VL-2B-Instruct")


@PRESETS.register("idefics3-8b", "Idefics3-8B shapes: SigLIP-So400m/14 on 364-px tiles + pixel shuffle x2 + "
                                 "Llama-3.1-8B")
def idefics3_8b() -> Preset:
    vision = VisionConfig(image_size=(364, 364), **SIGLIP_SO400M, post_norm=True, feature_layer=-1,
                          drop_class_token=False)
    lm = LanguageConfig(vocab_size=128259, width=4096, depth=32, heads=32, kv_heads=8, mlp_dim=14336, norm_eps=1e-5,
                        rope_theta=500000.0, max_seq_len=131072)
    connector = ConnectorConfig(kind="pixel_shuffle", scale_factor=2, layers=1, bias=False)
    model = VLMConfig(family="idefics3", vision=vision, connector=connector, lm=lm)
    proc = whole(Idefics3ProcessorConfig, image_size=(364, 364), resample="lanczos",
                  split=ImageSplitConfig(longest_edge=4 * 364),
                  max_length=131072, eos_token="<|end_of_text|>", bos_token="<|begin_of_text|>",
                  pad_token="<|reserved_special_token_0|>", chat_template="idefics3")
    return Preset(model, proc, source="HuggingFaceM4/Idefics3-8B-Llama3")


