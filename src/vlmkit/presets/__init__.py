"""Named model presets. Each cites the checkpoint or paper whose shape it follows.

``tiny-*`` presets train from scratch on a laptop CPU; full-size presets are shape configs for building on
the meta device (parameter counts are tested against the published sizes) and for import.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmkit.config import ConnectorConfig, LanguageConfig, ModelConfig, ProcessorConfig, VisionConfig
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


def get_preset(name: str) -> Preset:
    return PRESETS.build(name)
