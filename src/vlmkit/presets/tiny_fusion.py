"""The from-scratch tiny presets of the query-based and cross-attention families, for ShapesWorld.

Each keeps tiny-llava's parts where its family allows, so that what differs between them is the fusion alone: the
same BatchNorm CNN tower (pretrained on cell labels by each recipe's first stage), the same 3-layer LM, the same
processor. Their recipes (``recipes/tiny-*.yaml``) and the comparison table are in docs/fusion.md.
"""

from __future__ import annotations

import dataclasses

from vlmkit.config import ConnectorConfig, CrossAttentionConfig, MllamaConfig, QFormerConfig
from vlmkit.presets import PRESETS, Preset, tiny_llava

# a Q-Former at the LM's width: 2 BERT layers, each cross-attending to the 8x8 cells, 16 queries (tiny-llava's
# 16 image tokens). vocab_size 1 is a placeholder: a recipe gives the Q-Former the model's tokenizer
# (train/loop.py), whose [CLS]/[DEC] are <s> / </s>; embed_dim: BLIP-2's stage-1 heads (ITC space of 64)
TINY_QFORMER = QFormerConfig(width=128, depth=2, heads=4, mlp_dim=256, num_query_tokens=16,
                             cross_attention_frequency=1, vocab_size=1, max_position_embeddings=128, embed_dim=64)


def _with(family: str, **model) -> Preset:
    base = tiny_llava()
    return Preset(dataclasses.replace(base.model, family=family, **model), base.processor)


@PRESETS.register("tiny-blip2", "from-scratch BLIP-2 (tiny-llava's CNN tower and LM, a 2-layer Q-Former with 16 "
                  "queries and stage-1 heads) for ShapesWorld")
def tiny_blip2() -> Preset:
    p = _with("blip2", connector=ConnectorConfig(kind="qformer", qformer=TINY_QFORMER))
    p.source = "Li et al. 2023, BLIP-2 (shape only): Q-Former with ITC/ITM/ITG stage 1, then LM stage 2"
    return p


@PRESETS.register("tiny-instructblip", "tiny-blip2 whose Q-Former also reads the question (InstructBLIP's "
                  "instruction-aware queries)")
def tiny_instructblip() -> Preset:
    p = _with("instructblip", connector=ConnectorConfig(kind="qformer", qformer=TINY_QFORMER))
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
    p = _with("flamingo", xattn=xattn)
    p.source = "Alayrac et al. 2022, Flamingo (shape only): tanh-gated cross-attention blocks initialised closed"
    return p


@PRESETS.register("tiny-mllama", "from-scratch Llama 3.2 Vision (tiny-llava's CNN on every tile, an MLP projector, "
                  "gated cross-attention layers before every LM layer) for ShapesWorld")
def tiny_mllama() -> Preset:
    # tiles of the tower's 64 px, up to 4 per image (Mllama's canvas choice: a 64 px ShapesWorld scene is one tile,
    # larger or oblong images several); the blocks are Mllama's (GQA, q/k RMSNorm, tanh gates, empty rows zeroed)
    base = tiny_llava()
    model = dataclasses.replace(base.model, family="mllama", connector=ConnectorConfig(kind="mlp", layers=2),
                                mllama=MllamaConfig(xattn_positions=[0, 1, 2], max_tiles=4, extra_embeddings=0))
    processor = dataclasses.replace(base.processor, image_processor="mllama", max_image_tiles=4)
    return Preset(model, processor, source="Meta 2024, Llama 3.2 Vision (shape only): tiled tower, cross-attention "
                  "layers with tanh gates initialised closed")
