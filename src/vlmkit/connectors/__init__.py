"""Connectors from vision features to language-model embeddings."""

from torch import nn

from vlmkit.config import ConnectorConfig
from vlmkit.connectors.perceiver import PerceiverConnector
from vlmkit.connectors.pooling import (
    AttnPoolConnector,
    AvgPoolConnector,
    CAbstractor,
    LDPConnector,
    LDPv2Connector,
)
from vlmkit.connectors.projector import LinearConnector, MLPConnector, PixelShuffleConnector, pixel_shuffle
from vlmkit.connectors.qformer import QFormer, QFormerConnector
from vlmkit.registry import Registry

CONNECTORS: Registry[nn.Module] = Registry("connector")


@CONNECTORS.register("linear", "one linear map per patch (LLaVA)")
def _linear(cfg: ConnectorConfig, d_vision: int, d_lm: int) -> nn.Module:
    return LinearConnector(d_vision, d_lm, bias=cfg.bias)


@CONNECTORS.register("mlp", "two-layer GELU MLP per patch (LLaVA-1.5)")
def _mlp(cfg: ConnectorConfig, d_vision: int, d_lm: int) -> nn.Module:
    return MLPConnector(d_vision, d_lm, act=cfg.act, bias=cfg.bias)


@CONNECTORS.register("pixel_shuffle", "pixel shuffle then projection (Idefics3 / SmolVLM)")
def _pixel_shuffle(cfg: ConnectorConfig, d_vision: int, d_lm: int) -> nn.Module:
    return PixelShuffleConnector(d_vision, d_lm, cfg.scale_factor, cfg.layers, cfg.act, cfg.bias)


@CONNECTORS.register("qformer", "learned queries read the image through a Q-Former, then a projection (BLIP-2)")
def _qformer(cfg: ConnectorConfig, d_vision: int, d_lm: int) -> nn.Module:
    return QFormerConnector(d_vision, d_lm, cfg.qformer)


@CONNECTORS.register("perceiver", "SwiGLU projection then a perceiver resampler with n_latents queries (Idefics2)")
def _perceiver(cfg: ConnectorConfig, d_vision: int, d_lm: int) -> nn.Module:
    return PerceiverConnector(d_vision, d_lm, cfg.perceiver, cfg.act)
@CONNECTORS.register("ldp", "MLP then depthwise-conv blocks, one of stride 2: 4x fewer tokens (MobileVLM)")
def _ldp(cfg: ConnectorConfig, d_vision: int, d_lm: int) -> nn.Module:
    return LDPConnector(d_vision, d_lm, cfg.pool, cfg.act, cfg.bias)


@CONNECTORS.register("ldp_v2", "MLP, 2x2 average pooling, depthwise-conv positional encoding (MobileVLM V2)")
def _ldp_v2(cfg: ConnectorConfig, d_vision: int, d_lm: int) -> nn.Module:
    return LDPv2Connector(d_vision, d_lm, cfg.pool, cfg.num_queries, cfg.act, cfg.bias)


@CONNECTORS.register("c_abstractor", "ResNet blocks, adaptive pooling to num_queries, ResNet blocks, MLP "
                                     "(Honeybee / MM1)")
def _c_abstractor(cfg: ConnectorConfig, d_vision: int, d_lm: int) -> nn.Module:
    return CAbstractor(d_vision, d_lm, cfg.num_queries, cfg.depth, cfg.act, cfg.bias)


@CONNECTORS.register("avg_pool", "average pooling of the patch grid, then the MLP (LLaVA-NeXT-Video)")
def _avg_pool(cfg: ConnectorConfig, d_vision: int, d_lm: int) -> nn.Module:
    return AvgPoolConnector(d_vision, d_lm, cfg.pool, cfg.num_queries, cfg.act, cfg.bias)


@CONNECTORS.register("attn_pool", "each 2x2 window pooled by attention from its mean, then the MLP (Molmo)")
def _attn_pool(cfg: ConnectorConfig, d_vision: int, d_lm: int) -> nn.Module:
    return AttnPoolConnector(d_vision, d_lm, cfg.pool, cfg.heads, cfg.act, cfg.bias)


def build_connector(cfg: ConnectorConfig, d_vision: int, d_lm: int) -> nn.Module:
    return CONNECTORS.build(cfg.kind, cfg, d_vision, d_lm)


__all__ = [
    "CONNECTORS",
    "AttnPoolConnector",
    "AvgPoolConnector",
    "CAbstractor",
    "LDPConnector",
    "LDPv2Connector",
    "LinearConnector",
    "MLPConnector",
    "PerceiverConnector",
    "PixelShuffleConnector",
    "QFormer",
    "QFormerConnector",
    "build_connector",
    "pixel_shuffle",
]
