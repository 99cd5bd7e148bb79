"""InternVL 2.5 / 3 (Chen et al. 2024): InternViT (encoders/internvit.py) on every tile of an image, a pixel shuffle
that folds each 2x2 block of patch features into one, LayerNorm -> Linear -> GELU -> Linear to the LM width, and the
features of each image's tiles spliced flat, in the processor's order, into a decoder LM (Qwen2 for InternVL3-1B)
at the ``<IMG_CONTEXT>`` placeholders. transformers' ``InternVLForConditionalGeneration``.

The pixel shuffle is the shared :func:`~vlmkit.connectors.projector.pixel_shuffle` with factor 2: transformers'
``InternVLModel.pixel_shuffle`` at ``downsample_ratio`` 0.5 merges two neighbours along a row, transposes, merges two
along a column and transposes back, which is that function's element order (its test holds the two equal).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vlmkit.config import VLMConfig
from vlmkit.connectors.projector import pixel_shuffle
from vlmkit.encoders.internvit import InternViTConfig, InternViTEncoder
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models.init import check_head_init, init_from_scratch
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.nn import activation


@dataclass
class InternVLConfig(VLMConfig):
    """InternVL: an InternViT tower (``vision`` with ``arch: internvit`` and ``internvit``'s options), the
    pixel-shuffle projector (``connector``: kind pixel_shuffle, scale_factor 2, layers 2) and an LM."""

    family: str = "internvl"
    internvit: InternViTConfig = field(default_factory=InternViTConfig)


class InternVLProjector(nn.Module):
    """Pixel shuffle by ``scale`` then LayerNorm -> Linear -> act -> Linear (``InternVLMultiModalProjector``):
    [B, h*w, D_v] -> [B, (h/s)*(w/s), D_lm]."""

    def __init__(self, d_vision: int, d_lm: int, scale: int = 2, act: str = "gelu"):
        super().__init__()
        self.scale = scale
        d_in = d_vision * scale * scale
        self.norm = nn.LayerNorm(d_in)  # transformers' default eps (1e-5), whatever the tower's
        self.fc1 = nn.Linear(d_in, d_lm)
        self.fc2 = nn.Linear(d_lm, d_lm)
        self.act = activation(act)

    def num_tokens(self, n: int, grid: tuple[int, int] | None = None) -> int:
        return n // self.scale**2

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(pixel_shuffle(x, grid, self.scale)))))


def check_internvl(cfg: InternVLConfig) -> None:
    """Refuse what InternVL's architecture cannot be, by field."""
    if cfg.vision.arch != "internvit":
        raise ValueError(f"vision.arch {cfg.vision.arch!r}: the internvl family's tower is InternViT "
                         f"(arch: internvit)")
    c = cfg.connector
    if c.kind != "pixel_shuffle" or c.layers != 2 or not c.bias:
        raise ValueError(f"connector kind {c.kind!r}, layers {c.layers}, bias {c.bias}: InternVL's projector is a "
                         f"pixel shuffle, a LayerNorm and a two-layer MLP with biases (kind: pixel_shuffle, "
                         f"layers: 2, bias: true)")
    gh, gw = cfg.vision.grid
    if gh != gw or c.scale_factor < 1 or gh % c.scale_factor:
        raise ValueError(f"connector.scale_factor {c.scale_factor} must divide the tower's square {gh}x{gw} patch "
                         f"grid (vision.image_size // patch_size)")


def build_internvl(cfg: InternVLConfig, image_token_id: int, init: bool = True) -> VisionLanguageModel:
    """InternVLConfig -> VisionLanguageModel(InternViT, InternVLProjector, DecoderLM). ``init``: vlmkit's
    from-scratch initialisation (the class token and positions at 0.02, the layer scales at
    ``internvit.layer_scale_init``)."""
    check_internvl(cfg)
    check_head_init(cfg)
    encoder = InternViTEncoder(cfg.vision, cfg.internvit)
    connector = InternVLProjector(cfg.vision.width, cfg.lm.width, cfg.connector.scale_factor, cfg.connector.act)
    model = VisionLanguageModel(encoder, connector, DecoderLM(cfg.lm), image_token_id)
    if init and not any(p.is_meta for p in model.parameters()):
        init_from_scratch(model, cfg)
        with torch.no_grad():
            encoder.class_token.normal_(std=0.02)
    return model
