"""Connectors from vision features to language-model embeddings."""

from torch import nn

from vlmkit.config import ConnectorConfig
from vlmkit.connectors.perceiver import PerceiverConnector
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


def build_connector(cfg: ConnectorConfig, d_vision: int, d_lm: int) -> nn.Module:
    return CONNECTORS.build(cfg.kind, cfg, d_vision, d_lm)


__all__ = [
    "CONNECTORS",
    "LinearConnector",
    "MLPConnector",
    "PerceiverConnector",
    "PixelShuffleConnector",
    "QFormer",
    "QFormerConnector",
    "build_connector",
    "pixel_shuffle",
]
