"""Connectors from vision features to language-model embeddings."""

from torch import nn

from vlmkit.config import ConnectorConfig
from vlmkit.connectors.projector import LinearConnector, MLPConnector, PixelShuffleConnector, pixel_shuffle
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


def build_connector(cfg: ConnectorConfig, d_vision: int, d_lm: int) -> nn.Module:
    return CONNECTORS.build(cfg.kind, cfg, d_vision, d_lm)


__all__ = [
    "CONNECTORS",
    "LinearConnector",
    "MLPConnector",
    "PixelShuffleConnector",
    "build_connector",
    "pixel_shuffle",
]
