"""tiny-llava with the field's other connectors (docs/connectors.md): the same CNN tower, LM and processor,
each connector turning the tower's 8x8 grid into 16 LM tokens as tiny-llava's 2x2 pixel shuffle does, so that
what differs on ShapesWorld is the connector alone."""

from __future__ import annotations

import dataclasses

from vlmkit.config import ConnectorConfig
from vlmkit.presets import PRESETS, Preset
from vlmkit.presets.splice import tiny_llava


def with_connector(connector: ConnectorConfig, source: str) -> Preset:
    base = tiny_llava()
    model = dataclasses.replace(base.model, connector=connector)
    return Preset(model, base.processor, source=f"tiny-llava with {source}")


@PRESETS.register("tiny-llava-ldp", "tiny-llava with MobileVLM's LDP connector (MLP, depthwise-conv blocks, "
                                    "stride 2: 8x8 -> 16 tokens)")
def tiny_llava_ldp() -> Preset:
    return with_connector(ConnectorConfig(kind="ldp", pool=2),
                          "MobileVLM's Lightweight Downsample Projector (Chu et al. 2023, MobileVLM)")


@PRESETS.register("tiny-llava-ldpv2", "tiny-llava with MobileVLM V2's LDPv2 connector (MLP, 2x2 average pooling, "
                                      "depthwise-conv positional encoding: 8x8 -> 16 tokens)")
def tiny_llava_ldpv2() -> Preset:
    return with_connector(ConnectorConfig(kind="ldp_v2", pool=2),
                          "MobileVLM V2's LDPv2 (Chu et al. 2024, MobileVLM V2)")


@PRESETS.register("tiny-llava-cabs", "tiny-llava with Honeybee's C-Abstractor (ResNet blocks, adaptive "
                                     "pooling to 16 queries, ResNet blocks, MLP)")
def tiny_llava_cabs() -> Preset:
    # Honeybee stacks 3 blocks on each side of the pooling for a ViT-L grid; 2 suffice for an 8x8 one
    return with_connector(ConnectorConfig(kind="c_abstractor", num_queries=16, depth=2),
                          "Honeybee's C-Abstractor (Cha et al. 2024, Honeybee; MM1's connector)")


@PRESETS.register("tiny-llava-avgpool", "tiny-llava with 2x2 average pooling then the MLP "
                                        "(LLaVA-NeXT-Video's pooler)")
def tiny_llava_avgpool() -> Preset:
    return with_connector(ConnectorConfig(kind="avg_pool", pool=2),
                          "LLaVA-NeXT-Video's 2x2 average pooling before LLaVA-1.5's MLP")


@PRESETS.register("tiny-llava-attnpool", "tiny-llava with Molmo's attention pooling of 2x2 windows "
                                         "(query: the window's mean) then the MLP")
def tiny_llava_attnpool() -> Preset:
    return with_connector(ConnectorConfig(kind="attn_pool", pool=2, heads=4),
                          "Molmo's attention pooling (Deitke et al. 2024, Molmo and PixMo)")
