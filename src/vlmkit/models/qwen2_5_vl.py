"""Qwen2.5-VL: Qwen2-VL's model (models/qwen2_vl.py: the patch merger's tokens spliced into a Qwen2 LM with
M-RoPE) on Qwen2.5-VL's tower (encoders/qwen2_5_vl.py: RMSNorm, SwiGLU, window attention but in
``tower.full_attention_blocks``) with an RMSNorm patch merger.

The LM's M-RoPE is Qwen2-VL's for images. For videos Qwen2.5-VL's temporal ids are absolute time
(``tower.tokens_per_second`` ids per second of video: :func:`~vlmkit.models.qwen2_vl.mrope_position_ids` with
``time_scales``); vlmkit reads no video yet (the processor refuses the video placeholder), so the model's
position ids are those of images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmkit.config import VLMConfig
from vlmkit.encoders.qwen2_5_vl import Qwen25VLVisionEncoder
from vlmkit.encoders.qwen2_vl import PatchMerger
from vlmkit.errors import ConfigError
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models.init import init_from_scratch
from vlmkit.models.qwen2_vl import Qwen2VLModel


@dataclass
class Qwen25TowerConfig:
    """What Qwen2.5-VL's tower has beyond ``vision``: its attention windows and the time scale of videos."""

    window_size: int = 112  # pixels: windows of window_size / patch_size / merge_size merge units a side
    full_attention_blocks: tuple[int, ...] = (7, 15, 23, 31)  # the blocks that attend over the whole image
    tokens_per_second: int = 4  # videos only: M-RoPE temporal ids per second (absolute time)

    def __post_init__(self):
        if self.window_size < 1 or self.tokens_per_second < 1:
            raise ConfigError(f"tower.window_size {self.window_size} and tower.tokens_per_second "
                              f"{self.tokens_per_second} must be positive")


@dataclass
class Qwen25VLConfig(VLMConfig):
    """Qwen2.5-VL: VLMConfig's parts (vision.arch "qwen2_5_vl", connector "patch_merger", an M-RoPE LM) and
    ``tower``."""

    family: str = "qwen2_5_vl"
    tower: Qwen25TowerConfig = field(default_factory=Qwen25TowerConfig)


class Qwen25VLModel(Qwen2VLModel):
    """Qwen2_5_VLForConditionalGeneration: Qwen2VLModel on Qwen2.5-VL's windowed tower."""

    family_name = "qwen2_5_vl"


def build_qwen2_5_vl(cfg: Qwen25VLConfig, image_token_id: int, init: bool = True) -> Qwen25VLModel:
    """A Qwen25VLModel from its config: vision.arch "qwen2_5_vl" (norm rmsnorm), connector.kind "patch_merger"
    (its norm the tower's), an LM with lm.mrope_section."""
    if cfg.vision.arch != "qwen2_5_vl":
        raise ConfigError(f"family qwen2_5_vl needs vision.arch 'qwen2_5_vl', got {cfg.vision.arch!r}")
    if cfg.connector.kind != "patch_merger":
        raise ConfigError(f"family qwen2_5_vl needs connector.kind 'patch_merger', got {cfg.connector.kind!r}")
    if cfg.connector.scale_factor != cfg.vision.merge_size:
        raise ConfigError(f"connector.scale_factor {cfg.connector.scale_factor} must equal vision.merge_size "
                          f"{cfg.vision.merge_size} (the patch merger folds the tower's merge windows)")
    if not cfg.lm.mrope_section:
        raise ConfigError("family qwen2_5_vl needs lm.mrope_section (the M-RoPE sections of its rotary dimensions)")
    try:
        encoder = Qwen25VLVisionEncoder(cfg.vision, cfg.tower.window_size, cfg.tower.full_attention_blocks)
    except ValueError as e:
        raise ConfigError(f"tower: {e}") from e
    connector = PatchMerger(cfg.vision.width, cfg.lm.width, cfg.vision.merge_size, cfg.connector.act,
                            cfg.vision.norm_eps, norm=cfg.vision.norm)
    model = Qwen25VLModel(encoder, connector, DecoderLM(cfg.lm), image_token_id)
    if init:
        init_from_scratch(model, cfg)
    return model
