"""Named model presets. Each cites the checkpoint or paper whose shape it follows.

``tiny-*`` presets train from scratch on a laptop CPU; full-size presets are shape configs for building on
the meta device (parameter counts are tested against the published sizes) and for import.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dataclasses
import math

from vlmkit.config import (AnyResConfig, ConnectorConfig, ContrastiveConfig, CrossAttentionConfig, ImageSplitConfig,
                           LanguageConfig, MllamaConfig, ModelConfig, NativeResolutionConfig, PerceiverConfig,
                           ProcessorConfig, QFormerConfig, TextConfig, VisionConfig)
from vlmkit.registry import Registry


@dataclass
class Preset:
    model: ModelConfig
    processor: ProcessorConfig
    source: str = ""
    notes: list[str] = field(default_factory=list)


PRESETS: Registry[Preset] = Registry("preset")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
    model = ModelConfig(family="llava", vision=vision, connector=connector, lm=lm)
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
    model = ModelConfig(family="llava", vision=vision, connector=ConnectorConfig(kind="mlp"), lm=base.model.lm)
    return Preset(model, base.processor, source="tiny-llava with LLaVA-1.5's tower and projector layout")


@PRESETS.register("llava-1.5-7b", "LLaVA-1.5-7B shapes: CLIP ViT-L/14-336 (layer -2) + MLP + Vicuna-7B")
def llava_15_7b() -> Preset:
    vision = VisionConfig(image_size=(336, 336), patch_size=14, width=1024, depth=24, heads=16, mlp_dim=4096,
                          act="quick_gelu", class_token=True, pre_norm=True, post_norm=False, patch_bias=False,
                          feature_layer=-2, drop_class_token=True)
    lm = LanguageConfig(vocab_size=32064, width=4096, depth=32, heads=32, kv_heads=32, mlp_dim=11008,
                        norm_eps=1e-5, max_seq_len=4096)
    model = ModelConfig(family="llava", vision=vision, connector=ConnectorConfig(kind="mlp"), lm=lm)
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
    model = ModelConfig(family="idefics3", vision=vision, connector=connector, lm=lm)
    proc = ProcessorConfig(image_size=(512, 512), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resample="lanczos",
                           chat_template="idefics3")
    return Preset(model, proc, source="HuggingFaceTB/SmolVLM-256M-Instruct",
                  notes=["single 512px image; Idefics3 image splitting arrives with checkpoint import"])


# ------------------------------------------------------------------------- imported Hugging Face families
# Shapes of released checkpoints (their config.json), for building on the meta device, for recipes that start
# from an import, and as the reference each family's converter is tested against: the parameter counts equal
# transformers' own classes built from the exported config (tests/convert/test_hf_presets.py).

SIGLIP_SO400M = dict(patch_size=14, width=1152, depth=27, heads=16, mlp_dim=4304, act="gelu_tanh", norm_eps=1e-6,
                     class_token=False, patch_bias=True, qkv_bias=True)


def _whole(**kw) -> ProcessorConfig:
    """An imported family's processor settings: whole-string tokenisation, as its transformers processor."""
    return ProcessorConfig(text_mode="whole", **kw)


@PRESETS.register("llava-next-mistral-7b", "LLaVA-NeXT (1.6) Mistral-7B shapes: CLIP ViT-L/14-336 on AnyRes tiles "
                                           "+ MLP + Mistral-7B")
def llava_next_mistral_7b() -> Preset:
    base = llava_15_7b()
    lm = LanguageConfig(vocab_size=32064, width=4096, depth=32, heads=32, kv_heads=8, mlp_dim=14336, norm_eps=1e-5,
                        rope_theta=1e6, max_seq_len=32768)
    pins = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
    model = ModelConfig(family="llava_next", vision=base.model.vision, connector=ConnectorConfig(kind="mlp"), lm=lm,
                        anyres=AnyResConfig(grid_pinpoints=pins))
    proc = _whole(image_size=(336, 336), shortest_edge=336, mean=CLIP_MEAN, std=CLIP_STD, image_processor="anyres",
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
    model = ModelConfig(family="llava_onevision", vision=vision, connector=ConnectorConfig(kind="mlp"), lm=lm,
                        anyres=anyres)
    proc = _whole(image_size=(384, 384), image_processor="anyres", anyres=anyres, max_length=32768,
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
    model = ModelConfig(family="paligemma", vision=vision, connector=ConnectorConfig(kind="linear"), lm=lm)
    proc = _whole(image_size=(224, 224), resample="bicubic", image_processor="paligemma", max_length=8192,
                  eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")
    return Preset(model, proc, source="google/paligemma-3b-pt-224")


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
    model = ModelConfig(family="qwen2_vl", vision=vision, connector=connector, lm=lm, image_token="<|image_pad|>")
    proc = _whole(image_size=(224, 224), mean=CLIP_MEAN, std=CLIP_STD, image_processor="qwen2_vl",
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
    model = ModelConfig(family="idefics3", vision=vision, connector=connector, lm=lm)
    proc = _whole(image_size=(364, 364), resample="lanczos", image_processor="idefics3",
                  split=ImageSplitConfig(longest_edge=4 * 364),
                  max_length=131072, eos_token="<|end_of_text|>", bos_token="<|begin_of_text|>",
                  pad_token="<|reserved_special_token_0|>", chat_template="idefics3")
    return Preset(model, proc, source="HuggingFaceM4/Idefics3-8B-Llama3")


# BLIP-2's tower: EVA-CLIP ViT-g/14 (39 layers, 1408 wide) at 224 px, the final norm on every token (Blip2VisionConfig)
EVA_CLIP_G = VisionConfig(image_size=(224, 224), patch_size=14, width=1408, depth=39, heads=16, mlp_dim=6144,
                          act="gelu", norm_eps=1e-6, class_token=True, pre_norm=False, post_norm=True, patch_bias=True,
                          qkv_bias=True, feature_layer=-1, drop_class_token=False)


def _blip2_processor(**kw) -> ProcessorConfig:
    """BlipImageProcessor's pixels (224 px, CLIP's mean and std) and Blip2Processor's layout (image_processor blip2)."""
    return _whole(image_size=(224, 224), mean=CLIP_MEAN, std=CLIP_STD, resample="bicubic", image_processor="blip2",
                  max_length=2048, **kw)


@PRESETS.register("blip2-opt-2.7b", "BLIP-2 OPT-2.7B shapes: EVA-CLIP ViT-g/14 + Q-Former (32 queries) + OPT-2.7B")
def blip2_opt_27b() -> Preset:
    # OPT-2.7B: LayerNorms, ReLU MLP, biases, learned positions offset by 2; the vocabulary padded to 50304 rows
    lm = LanguageConfig(vocab_size=50304, width=2560, depth=32, heads=32, kv_heads=32, mlp_dim=10240, act="relu",
                        norm_eps=1e-5, max_seq_len=2048, tie_embeddings=True, norm="layernorm", mlp="plain", bias=True,
                        pos_embed="learned", pos_offset=2)
    model = ModelConfig(family="blip2", vision=EVA_CLIP_G,
                        connector=ConnectorConfig(kind="qformer", qformer=QFormerConfig(num_query_tokens=32)), lm=lm)
    proc = _blip2_processor(eos_token="</s>", bos_token="</s>", pad_token="<pad>")
    return Preset(model, proc, source="Salesforce/blip2-opt-2.7b")


@PRESETS.register("instructblip-vicuna-7b", "InstructBLIP Vicuna-7B shapes: EVA-CLIP ViT-g/14 + Q-Former reading the "
                                            "instruction (BERT vocabulary) + Vicuna-7B")
def instructblip_vicuna_7b() -> Preset:
    # the Q-Former's text embeddings: bert-base-uncased's 30522 tokens + InstructBLIP's [DEC], 512 positions
    qformer = QFormerConfig(num_query_tokens=32, vocab_size=30523, max_position_embeddings=512)
    lm = LanguageConfig(vocab_size=32001, width=4096, depth=32, heads=32, kv_heads=32, mlp_dim=11008, norm_eps=1e-6,
                        max_seq_len=2048)
    model = ModelConfig(family="instructblip", vision=EVA_CLIP_G, connector=ConnectorConfig(kind="qformer",
                                                                                          qformer=qformer), lm=lm)
    proc = _blip2_processor(eos_token="</s>", bos_token="<s>", pad_token="<unk>", qformer_max_length=512,
                            qformer_pad_token="[PAD]")
    return Preset(model, proc, source="Salesforce/instructblip-vicuna-7b",
                  notes=["Vicuna's 32000 tokens + the pad token InstructBLIP added (32001 rows)"])


@PRESETS.register("idefics-9b", "IDEFICS-9B shapes: CLIP ViT-H/14 (every token) + perceiver (64 latents, 6 layers) + "
                                "LLaMA-7B with gated cross-attention every 4 layers")
def idefics_9b() -> Preset:
    vision = VisionConfig(image_size=(224, 224), patch_size=14, width=1280, depth=32, heads=16, mlp_dim=5120,
                          act="gelu", norm_eps=1e-5, class_token=True, pre_norm=True, post_norm=False,
                          patch_bias=False, feature_layer=-1, drop_class_token=False)
    # LLaMA-7B's 32000 tokens + IDEFICS' 2 added ones (<fake_token_around_image>, <image>: additional_vocab_size)
    lm = LanguageConfig(vocab_size=32002, width=4096, depth=32, heads=32, kv_heads=32, mlp_dim=11008, norm_eps=1e-6,
                        max_seq_len=2048)
    xattn = CrossAttentionConfig(every=4, reset_token_id=2, perceiver=PerceiverConfig(), decoupled_vocab=2)
    model = ModelConfig(family="flamingo", vision=vision, lm=lm, xattn=xattn)
    proc = _whole(image_size=(224, 224), mean=CLIP_MEAN, std=CLIP_STD, resample="bicubic", image_processor="idefics",
                  max_length=2048, eos_token="</s>", bos_token="<s>", pad_token="<unk>")
    return Preset(model, proc, source="HuggingFaceM4/idefics-9b")


@PRESETS.register("llama-3.2-11b-vision", "Llama 3.2 11B Vision shapes: 32 + 8 gated-global-layer ViT-H/14 on up to 4 "
                                          "560-px tiles + linear + Llama-3.1-8B with 8 gated cross-attention layers")
def llama_32_11b_vision() -> Preset:
    vision = VisionConfig(arch="mllama", image_size=(560, 560), patch_size=14, width=1280, depth=32, heads=16,
                          mlp_dim=5120, act="gelu", norm_eps=1e-5, class_token=True, pre_norm=True, post_norm=True,
                          patch_bias=False, qkv_bias=False, drop_class_token=False)
    # 40 decoder layers in transformers' numbering: cross-attention at [3, 8, ..., 38], so 32 self-attention layers
    # with a gated block before layers 3, 7, ..., 31 (MllamaConfig's defaults)
    lm = LanguageConfig(vocab_size=128256, width=4096, depth=32, heads=32, kv_heads=8, mlp_dim=14336, norm_eps=1e-5,
                        rope_theta=500000.0, max_seq_len=131072)
    model = ModelConfig(family="mllama", vision=vision, connector=ConnectorConfig(kind="linear", bias=True), lm=lm,
                        image_token="<|image|>", mllama=MllamaConfig())
    proc = _whole(image_size=(560, 560), mean=CLIP_MEAN, std=CLIP_STD, resample="bilinear", image_processor="mllama",
                  max_image_tiles=4, image_token="<|image|>", max_length=131072, eos_token="<|end_of_text|>",
                  bos_token="<|begin_of_text|>", pad_token="<|finetune_right_pad_id|>")
    return Preset(model, proc, source="meta-llama/Llama-3.2-11B-Vision",
                  notes=["the released text model scales RoPE (rope_type llama3, factor 8), which vlmkit does not "
                         "implement: the shapes and parameter count are the checkpoint's, importing it is refused"])


# ----------------------------------------------------------------------------------- contrastive dual encoders


def _dual_processor(**kw) -> ProcessorConfig:
    """A dual encoder's processor: images at one size, texts with no image placeholder."""
    return ProcessorConfig(image_token="", **kw)


# the tiny dual encoders' image tower: tiny-llava's CNN, whose 8x8 token grid an attention-pooling head reads (CLIP's
# ResNets pool with attention too). Trained contrastively from scratch, ViTs and this CNN alike learn colours within
# minutes and shapes not at all (docs/contrastive.md); the recipes first pretrain it on ShapesWorld's object
# annotations (the cell_labels stage), as LiT starts from a tower trained on labels.
TINY_DUAL_CNN = dict(arch="cnn", image_size=(64, 64), patch_size=8, width=128, heads=4, mlp_dim=512, act="gelu",
                     pos_embed="sincos2d", class_token=False, post_norm=False, feature_layer=-1)
TINY_TEXT = dict(vocab_size=1024, width=128, depth=3, heads=4, mlp_dim=512, context_length=64)


@PRESETS.register("tiny-clip", "from-scratch CLIP (CNN tower with attention pooling + causal text transformer, softmax "
                               "contrastive loss) for ShapesWorld's image-caption pairs")
def tiny_clip() -> Preset:
    text = TextConfig(**TINY_TEXT, act="quick_gelu", causal=True, pool="eos")
    contrastive = ContrastiveConfig(embed_dim=128, image_pool="map", projection="clip", loss="clip")
    model = ModelConfig(family="clip", vision=VisionConfig(**TINY_DUAL_CNN), text=text, contrastive=contrastive,
                        image_token="")
    proc = _dual_processor(image_size=(64, 64), max_length=64, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    return Preset(model, proc, source="Radford et al. 2021, Learning Transferable Visual Models From Natural "
                                      "Language Supervision (CLIP's text tower and loss; attention pooling as its "
                                      "ResNets)")


@PRESETS.register("tiny-clip-vit", "tiny-clip with CLIP's ViT layout (class-token pooling): exports as a transformers "
                                   "CLIPModel; from scratch it learns colours, not shapes, in minutes")
def tiny_clip_vit() -> Preset:
    base = tiny_clip()
    # tiny-llava-vit's tower (CLIP's layout), pooled at the class token after its last layer and final norm
    vision = dataclasses.replace(tiny_llava_vit().model.vision, post_norm=True, feature_layer=-1,
                                 drop_class_token=False)
    contrastive = dataclasses.replace(base.model.contrastive, image_pool="class_token")
    model = dataclasses.replace(base.model, vision=vision, contrastive=contrastive)
    return Preset(model, base.processor, source="layout of openai/clip-vit-base-patch16, tiny")


@PRESETS.register("tiny-siglip", "from-scratch SigLIP (CNN tower with attention pooling, bidirectional text "
                                 "transformer, sigmoid loss) for ShapesWorld's image-caption pairs")
def tiny_siglip() -> Preset:
    text = TextConfig(**TINY_TEXT, act="gelu_tanh", norm_eps=1e-6, causal=False, pool="last")
    contrastive = ContrastiveConfig(embed_dim=128, image_pool="map", projection="siglip", loss="siglip",
                                    logit_scale_init=math.log(10.0), logit_bias_init=-10.0, max_logit_scale=0.0)
    model = ModelConfig(family="siglip", vision=VisionConfig(**TINY_DUAL_CNN), text=text, contrastive=contrastive,
                        image_token="")
    proc = _dual_processor(image_size=(64, 64), max_length=64, text_padding="max_length", pad_token="<pad>",
                           eos_token="</s>", bos_token="<s>")
    return Preset(model, proc, source="Zhai et al. 2023, Sigmoid Loss for Language Image Pre-Training (SigLIP's text "
                                      "tower, attention pooling and loss)")


@PRESETS.register("tiny-siglip-vit", "tiny-siglip with SigLIP's ViT tower: exports as a transformers SiglipModel")
def tiny_siglip_vit() -> Preset:
    base = tiny_siglip()
    vision = VisionConfig(image_size=(64, 64), patch_size=8, width=128, depth=4, heads=4, mlp_dim=512,
                          act="gelu_tanh", norm_eps=1e-6, class_token=False, post_norm=True, feature_layer=-1)
    model = ModelConfig(family="siglip", vision=vision, text=base.model.text, contrastive=base.model.contrastive,
                        image_token="")
    return Preset(model, base.processor, source="layout of google/siglip-base-patch16-224, tiny")


@PRESETS.register("clip-vit-b-16", "CLIP ViT-B/16 shapes: ViT-B/16 at 224 px + 12-layer causal text transformer, "
                                   "512-d joint space")
def clip_vit_b_16() -> Preset:
    vision = VisionConfig(image_size=(224, 224), patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072,
                          act="quick_gelu", class_token=True, pre_norm=True, post_norm=True, patch_bias=False,
                          feature_layer=-1, drop_class_token=False)
    text = TextConfig(vocab_size=49408, width=512, depth=12, heads=8, mlp_dim=2048, act="quick_gelu",
                      context_length=77, causal=True, pool="eos", eos_token_id=49407)
    model = ModelConfig(family="clip", vision=vision, text=text, image_token="",
                        contrastive=ContrastiveConfig(embed_dim=512))
    proc = _dual_processor(image_size=(224, 224), shortest_edge=224, mean=CLIP_MEAN, std=CLIP_STD,
                           resample="bicubic", max_length=77, pad_token="<|endoftext|>", eos_token="<|endoftext|>",
                           bos_token="<|startoftext|>")
    return Preset(model, proc, source="openai/clip-vit-base-patch16")


@PRESETS.register("siglip-b-16", "SigLIP B/16 shapes: ViT-B/16 at 224 px with attention pooling + 12-layer text "
                                 "transformer over 64 tokens, 768-d joint space")
def siglip_b_16() -> Preset:
    b16 = dict(width=768, depth=12, heads=12, mlp_dim=3072, act="gelu_tanh", norm_eps=1e-6)
    vision = VisionConfig(image_size=(224, 224), patch_size=16, class_token=False, post_norm=True, feature_layer=-1,
                          **b16)
    text = TextConfig(vocab_size=32000, context_length=64, causal=False, pool="last", eos_token_id=1, **b16)
    contrastive = ContrastiveConfig(embed_dim=768, image_pool="map", projection="siglip", loss="siglip",
                                    logit_scale_init=math.log(10.0), logit_bias_init=-10.0, max_logit_scale=0.0)
    model = ModelConfig(family="siglip", vision=vision, text=text, contrastive=contrastive, image_token="")
    proc = _dual_processor(image_size=(224, 224), resample="bicubic", max_length=64, text_padding="max_length",
                           pad_token="</s>", eos_token="</s>", bos_token="")
    return Preset(model, proc, source="google/siglip-base-patch16-224")


def get_preset(name: str) -> Preset:
    return PRESETS.build(name)


# the tiny presets of the query-based and cross-attention families register themselves on import
from vlmkit.presets import tiny_fusion as _tiny_fusion  # noqa: E402,F401
