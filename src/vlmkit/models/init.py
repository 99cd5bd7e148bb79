"""vlmkit's from-scratch initialisation of the parts most families compose (tower, connector, decoder LM), and the
plain splice model's builder (LLaVA, Idefics3)."""

from __future__ import annotations

import torch

from vlmkit.config import VLMConfig
from vlmkit.connectors import build_connector
from vlmkit.encoders.cnn import ConvEncoder
from vlmkit.encoders.vit import ViTEncoder
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.nn import init_linear_

TOWERS = {"vit": ViTEncoder, "cnn": ConvEncoder}


def build_tower(cfg: VLMConfig, family: str):
    """The image tower of ``cfg.vision`` (a ViT or vlmkit's CNN), refused by name otherwise."""
    if cfg.vision.arch not in TOWERS:
        raise ValueError(f"the {family} family needs vision.arch one of {sorted(TOWERS)}, got {cfg.vision.arch!r}")
    return TOWERS[cfg.vision.arch](cfg.vision)


def check_head_init(cfg: VLMConfig) -> None:
    if cfg.lm.head_init_std is not None and cfg.lm.tie_embeddings:
        raise ValueError("lm.head_init_std initialises an untied LM head; with lm.tie_embeddings: true the head "
                         "is the token embedding (set tie_embeddings: false, or leave head_init_std unset)")


def build_vlm(cfg: VLMConfig, image_token_id: int, init: bool = True) -> VisionLanguageModel:
    """encoder -> connector -> splice into the LM (LLaVA, Idefics3)."""
    check_head_init(cfg)
    encoder = build_tower(cfg, cfg.family)
    connector = build_connector(cfg.connector, cfg.vision.width, cfg.lm.width)
    model = VisionLanguageModel(encoder, connector, DecoderLM(cfg.lm), image_token_id)
    if init:
        init_from_scratch(model, cfg)
    return model


def init_from_scratch(model, cfg: VLMConfig) -> None:
    """vlmkit's from-scratch initialisation, for every family's model (encoder, connector, lm): GPT-2's std
    0.02 for the tower and the LM, fan-in for the connector, the head at ``lm.head_init_std`` when set, and
    residual outputs scaled by depth. Nothing happens on the meta device."""
    if any(p.is_meta for p in model.parameters()):
        return
    init_linear_(model.encoder)
    _init_connector_fan_in(model.connector)
    init_lm_from_scratch(model.lm, cfg.lm)
    with torch.no_grad():
        for block in model.image_tower().blocks:  # a tiled tower's: those of the tower it runs on each tile
            for lin in block.residual_outputs():
                lin.weight.mul_((2 * cfg.vision.depth) ** -0.5)


def init_lm_from_scratch(lm: DecoderLM, cfg) -> None:
    """A decoder LM's from-scratch initialisation (``cfg``: its LanguageConfig): GPT-2's std 0.02, the head at
    ``head_init_std`` when set, and GPT-2's 1/sqrt(2 * depth) scaling of the projections that write into the
    residual stream."""
    with torch.no_grad():
        init_linear_(lm)
        if cfg.head_init_std is not None:
            torch.nn.init.normal_(lm.lm_head.weight, std=cfg.head_init_std)
        for block in lm.layers:
            for lin in block.residual_outputs():
                lin.weight.mul_((2 * cfg.depth) ** -0.5)


def _init_connector_fan_in(connector: torch.nn.Module) -> None:
    """LeCun (fan-in) init for the connector, so image tokens enter the LM at about unit scale.

    With GPT-2's std 0.02 a from-scratch connector emits image tokens of RMS ~0.08, and the LM is slow to
    read them: in a controlled test (the LM alone, fed fixed random "image" vectors that carry the answer to
    ShapesWorld colour questions) vectors of RMS 1 were read within 30 steps and vectors of RMS 0.08 needed
    ~150. This init gives image tokens of RMS ~0.6 from the first step.
    """
    with torch.no_grad():
        for m in connector.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=m.in_features**-0.5)
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)


__all__ = ["build_tower", "build_vlm", "check_head_init", "init_from_scratch", "init_lm_from_scratch"]
