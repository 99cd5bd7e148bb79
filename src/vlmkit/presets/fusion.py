"""Presets of the query-based and cross-attention families: the from-scratch tiny ones for ShapesWorld, and the
shapes of released BLIP-2, InstructBLIP, IDEFICS and Llama 3.2 Vision checkpoints.

Each tiny preset keeps tiny-llava's parts where its family allows, so that what differs between them is the fusion
alone: the same BatchNorm CNN tower (pretrained on cell labels by each recipe's first stage), the same 3-layer LM,
the same processor. Their recipes (``recipes/tiny-*.yaml``) and the comparison table are in docs/fusion.md.
"""

from __future__ import annotations

import dataclasses

from vlmkit.config import ConnectorConfig, LanguageConfig, ProcessorConfig, QFormerConfig, VisionConfig, VLMConfig
from vlmkit.models.flamingo import CrossAttentionConfig, FlamingoConfig, PerceiverConfig
from vlmkit.models.mllama import MllamaConfig, MllamaFusionConfig
from vlmkit.presets import CLIP_MEAN, CLIP_STD, PRESETS, Preset, whole
from vlmkit.presets.splice import tiny_llava
from vlmkit.processing.blip2 import InstructBlipProcessorConfig
from vlmkit.processing.mllama import MllamaProcessorConfig

# a Q-Former at the LM's width: 2 BERT layers, each cross-attending to the 8x8 cells, 16 queries (tiny-llava's
# 16 image tokens). vocab_size 1 is a placeholder: a recipe gives the Q-Former the model's tokenizer
# (objectives/qformer.py), whose [CLS]/[DEC] are <s> / </s>; embed_dim: BLIP-2's stage-1 heads (ITC space of 64)
TINY_QFORMER = QFormerConfig(width=128, depth=2, heads=4, mlp_dim=256, num_query_tokens=16,
                             cross_attention_frequency=1, vocab_size=1, max_position_embeddings=128, embed_dim=64)


def _with(family: str, config: type = VLMConfig, processor: type = ProcessorConfig, **model) -> Preset:
    """tiny-llava's parts in ``family``'s config types, with ``model`` fields changed."""
    base = tiny_llava()
    parts = {f.name: getattr(base.model, f.name) for f in dataclasses.fields(VLMConfig)}
    pcfg = processor(**{f.name: getattr(base.processor, f.name) for f in dataclasses.fields(ProcessorConfig)})
    return Preset(config(**{**parts, "family": family, **model}), dataclasses.replace(pcfg, family=family))


@PRESETS.register("tiny-blip2", "from-scratch BLIP-2 (tiny-llava's CNN tower and LM, a 2-layer Q-Former with 16 "
                  "queries and stage-1 heads) for ShapesWorld")
def tiny_blip2() -> Preset:
    p = _with("blip2", connector=ConnectorConfig(kind="qformer", qformer=TINY_QFORMER))
    p.source = "Li et al. 2023, BLIP-2 (shape only): Q-Former with ITC/ITM/ITG stage 1, then LM stage 2"
    return p


@PRESETS.register("tiny-instructblip", "tiny-blip2 whose Q-Former also reads the question (InstructBLIP's "
                  "instruction-aware queries)")
def tiny_instructblip() -> Preset:
    p = _with("instructblip", processor=InstructBlipProcessorConfig,
              connector=ConnectorConfig(kind="qformer", qformer=TINY_QFORMER))
    p.source = "Dai et al. 2023, InstructBLIP (shape only): the instruction enters the Q-Former's self-attention"
    return p


@PRESETS.register("tiny-flamingo", "from-scratch Flamingo (tiny-llava's CNN tower and LM, gated cross-attention "
                  "before every LM layer reading the 64 cell features) for ShapesWorld")
def tiny_flamingo() -> Preset:
    # every=1: with 3 LM layers a block before each is Flamingo's "every k" at k=1. No perceiver resampler: the
    # blocks read the tower's 64 cells (with their fixed 2D positions) directly; a 1-layer perceiver with 16 latents
    # lost where things are (relation and position questions near chance, docs/fusion.md). only_last false plus
    # image-index embeddings: a question after several images reads all of them and knows which is which
    xattn = CrossAttentionConfig(every=1, heads=4, mlp_dim=384, use_resampler=False, only_last=False,
                                 image_index_embed=3)
    p = _with("flamingo", FlamingoConfig, xattn=xattn)
    p.source = "Alayrac et al. 2022, Flamingo (shape only): tanh-gated cross-attention blocks initialised closed"
    return p


@PRESETS.register("tiny-mllama", "from-scratch Llama 3.2 Vision (tiny-llava's CNN on every tile, an MLP projector, "
                  "gated cross-attention layers before every LM layer) for ShapesWorld")
def tiny_mllama() -> Preset:
    # tiles of the tower's 64 px, up to 4 per image (Mllama's canvas choice: a 64 px ShapesWorld scene is one tile,
    # larger or oblong images several); the blocks are Mllama's (GQA, q/k RMSNorm, tanh gates, empty rows zeroed)
    p = _with("mllama", MllamaConfig, MllamaProcessorConfig, connector=ConnectorConfig(kind="mlp", layers=2),
              mllama=MllamaFusionConfig(xattn_positions=[0, 1, 2], max_tiles=4, extra_embeddings=0))
    p.processor.max_image_tiles = 4
    return Preset(p.model, p.processor, source="Meta 2024, Llama 3.2 Vision (shape only): tiled tower, cross-attention "
                  "layers with tanh gates initialised closed")


# BLIP-2's tower: EVA-CLIP ViT-g/14 (39 layers, 1408 wide) at 224 px, the final norm on every token (Blip2VisionConfig)
EVA_CLIP_G = VisionConfig(image_size=(224, 224), patch_size=14, width=1408, depth=39, heads=16, mlp_dim=6144,
                          act="gelu", norm_eps=1e-6, class_token=True, pre_norm=False, post_norm=True, patch_bias=True,
                          qkv_bias=True, feature_layer=-1, drop_class_token=False)


def _blip2_processor(config: type = ProcessorConfig, **kw) -> ProcessorConfig:
    """BlipImageProcessor's pixels (224 px, CLIP's mean and std) and Blip2Processor's layout."""
    return whole(config, image_size=(224, 224), mean=CLIP_MEAN, std=CLIP_STD, resample="bicubic",
                  max_length=2048, **kw)


@PRESETS.register("blip2-opt-2.7b", "BLIP-2 OPT-2.7B shapes: EVA-CLIP ViT-g/14 + Q-Former (32 queries) + OPT-2.7B")
def blip2_opt_27b() -> Preset:
    # OPT-2.7B: LayerNorms, ReLU MLP, biases, learned positions offset by 2; the vocabulary padded to 50304 rows
    lm = LanguageConfig(vocab_size=50304, width=2560, depth=32, heads=32, kv_heads=32, mlp_dim=10240, act="relu",
                        norm_eps=1e-5, max_seq_len=2048, tie_embeddings=True, norm="layernorm", mlp="plain", bias=True,
                        pos_embed="learned", pos_offset=2)
    model = VLMConfig(family="blip2", vision=EVA_CLIP_G,
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
    model = VLMConfig(family="instructblip", vision=EVA_CLIP_G, connector=ConnectorConfig(kind="qformer",
                                                                                          qformer=qformer), lm=lm)
    proc = _blip2_processor(InstructBlipProcessorConfig, eos_token="</s>", bos_token="<s>", pad_token="<unk>",
                            qformer_max_length=512,
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
    model = FlamingoConfig(family="flamingo", vision=vision, lm=lm, xattn=xattn)
    proc = whole(image_size=(224, 224), mean=CLIP_MEAN, std=CLIP_STD, resample="bicubic",
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
    model = MllamaConfig(family="mllama", vision=vision, connector=ConnectorConfig(kind="linear", bias=True), lm=lm,
                        image_token="<|image|>", mllama=MllamaFusionConfig())
    proc = whole(MllamaProcessorConfig, image_size=(560, 560), mean=CLIP_MEAN, std=CLIP_STD, resample="bilinear",
                  max_image_tiles=4, image_token="<|image|>", max_length=131072, eos_token="<|end_of_text|>",
                  bos_token="<|begin_of_text|>", pad_token="<|finetune_right_pad_id|>")
    return Preset(model, proc, source="meta-llama/Llama-3.2-11B-Vision",
                  notes=["the released text model scales RoPE (rope_type llama3, factor 8), which vlmkit does not "
                         "implement: the shapes and parameter count are the checkpoint's, importing it is refused"])


