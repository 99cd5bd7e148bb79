"""Model builders: typed configs -> composed modules."""

from __future__ import annotations

import contextlib

import torch

from vlmkit.config import ModelConfig
from vlmkit.connectors import build_connector
from vlmkit.encoders.cnn import ConvEncoder
from vlmkit.encoders.vit import ViTEncoder
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models.vlm import ModelOutput, VisionLanguageModel
from vlmkit.nn import init_linear_
from vlmkit.registry import Registry

# ModelConfig.family -> builder(cfg, image_token_id, init) for families whose model is not the plain
# encoder -> connector -> splice VisionLanguageModel (their own file under models/, registered on import)
MODEL_FAMILIES: Registry = Registry("model family")
SPLICE_FAMILIES = ("llava", "idefics3")


@contextlib.contextmanager
def skip_default_init():
    """Build modules without PyTorch's default random initialisation (Kaiming-uniform for every Linear, normal
    for embeddings), for models whose weights a checkpoint is about to overwrite: at 7B parameters that init
    costs minutes of CPU and its values are thrown away. The init functions are restored on exit."""
    names = ("kaiming_uniform_", "kaiming_normal_", "uniform_", "normal_", "trunc_normal_", "xavier_uniform_",
             "xavier_normal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def build_model(cfg: ModelConfig, image_token_id: int, init: bool = True):
    """Build the model of ``cfg.family`` from its config. ``init`` applies the from-scratch initialisation;
    without it the weights are left uninitialised, for a checkpoint to fill."""
    if not init:
        with skip_default_init():
            return _build(cfg, image_token_id, init)
    return _build(cfg, image_token_id, init)


def _build(cfg: ModelConfig, image_token_id: int, init: bool):
    if cfg.family not in SPLICE_FAMILIES:
        return MODEL_FAMILIES.build(cfg.family, cfg, image_token_id, init)
    if cfg.lm.head_init_std is not None and cfg.lm.tie_embeddings:
        raise ValueError("lm.head_init_std initialises an untied LM head; with lm.tie_embeddings: true the head "
                         "is the token embedding (set tie_embeddings: false, or leave head_init_std unset)")
    encoders = {"vit": ViTEncoder, "cnn": ConvEncoder}
    if cfg.vision.arch not in encoders:
        raise ValueError(f"vision.arch must be one of {sorted(encoders)}, got {cfg.vision.arch!r}")
    encoder = encoders[cfg.vision.arch](cfg.vision)
    lm = DecoderLM(cfg.lm)
    connector = build_connector(cfg.connector, cfg.vision.width, cfg.lm.width)
    model = VisionLanguageModel(encoder, connector, lm, image_token_id)
    if init:
        init_from_scratch(model, cfg)
    return model


def init_from_scratch(model, cfg: ModelConfig) -> None:
    """vlmkit's from-scratch initialisation, for every family's model (encoder, connector, lm): GPT-2's std
    0.02 for the tower and the LM, fan-in for the connector, the head at ``lm.head_init_std`` when set, and
    residual outputs scaled by depth. Nothing happens on the meta device."""
    if any(p.is_meta for p in model.parameters()):
        return
    init_linear_(model.encoder)
    _init_connector_fan_in(model.connector)
    qformer_cfg = getattr(getattr(model.connector, "qformer", None), "cfg", None)
    if qformer_cfg is not None and qformer_cfg.init_from:  # BLIP-2: the Q-Former starts from a BERT
        from vlmkit.connectors.qformer import init_qformer_from_bert

        init_qformer_from_bert(model.connector.qformer, qformer_cfg.init_from)
    init_linear_(model.lm)
    if cfg.lm.head_init_std is not None:
        torch.nn.init.normal_(model.lm.lm_head.weight, std=cfg.lm.head_init_std)
    _scale_residual_outputs(model, cfg)


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


def _scale_residual_outputs(model: VisionLanguageModel, cfg: ModelConfig) -> None:
    """GPT-2's 1/sqrt(2*depth) scaling of the projections that write into the residual stream."""
    with torch.no_grad():
        for block in model.lm.layers:
            down = getattr(block.mlp, "down_proj", None) or block.mlp.fc2  # gated MLP, or plain (lm.mlp: plain)
            for lin in (block.attn.o_proj, down):
                lin.weight.mul_((2 * cfg.lm.depth) ** -0.5)
        for block in getattr(model.encoder, "blocks", ()):
            out_proj = getattr(block.attn, "o_proj", None) or block.attn.proj  # Qwen2-VL's fused attention: proj
            for lin in (out_proj, block.mlp.fc2):
                lin.weight.mul_((2 * cfg.vision.depth) ** -0.5)


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


__all__ = ["MODEL_FAMILIES", "ModelOutput", "VisionLanguageModel", "build_model", "count_parameters",
           "init_from_scratch"]

# the families with their own model class register themselves in MODEL_FAMILIES on import
from vlmkit.models import llava_next as _llava_next  # noqa: E402,F401  (llava_next, llava_onevision)
from vlmkit.models import paligemma as _paligemma  # noqa: E402,F401  (paligemma)
from vlmkit.models import qwen2_vl as _qwen2_vl  # noqa: E402,F401  (qwen2_vl)
from vlmkit.models import dual_encoder as _dual_encoder  # noqa: E402,F401  (clip, siglip)
from vlmkit.models import mllama as _mllama  # noqa: E402,F401  (mllama)
from vlmkit.models import blip2 as _blip2  # noqa: E402,F401  (blip2, instructblip)
from vlmkit.models import flamingo as _flamingo  # noqa: E402,F401  (flamingo)
