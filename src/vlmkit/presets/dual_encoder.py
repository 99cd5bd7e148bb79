"""Presets of the contrastive dual encoders: vlmkit's tiny CLIP and SigLIP, and the shapes of released ones."""

from __future__ import annotations

import dataclasses
import math

from vlmkit.config import VisionConfig
from vlmkit.models.dual_encoder import ContrastiveConfig, DualEncoderConfig, TextConfig
from vlmkit.presets import CLIP_MEAN, CLIP_STD, PRESETS, Preset
from vlmkit.presets.splice import tiny_llava_vit
from vlmkit.processing.text import TextProcessorConfig


def _dual_processor(**kw) -> TextProcessorConfig:
    """A dual encoder's processor: images at one size, texts with no image placeholder."""
    return TextProcessorConfig(image_token="", **kw)


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
    model = DualEncoderConfig(family="clip", vision=VisionConfig(**TINY_DUAL_CNN), text=text, contrastive=contrastive,
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
    model = DualEncoderConfig(family="siglip", vision=VisionConfig(**TINY_DUAL_CNN), text=text, contrastive=contrastive,
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
    model = DualEncoderConfig(family="siglip", vision=vision, text=base.model.text, contrastive=base.model.contrastive,
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
    model = DualEncoderConfig(family="clip", vision=vision, text=text, image_token="",
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
    model = DualEncoderConfig(family="siglip", vision=vision, text=text, contrastive=contrastive, image_token="")
    proc = _dual_processor(image_size=(224, 224), resample="bicubic", max_length=64, text_padding="max_length",
                           pad_token="</s>", eos_token="</s>", bos_token="")
    return Preset(model, proc, source="google/siglip-base-patch16-224")


