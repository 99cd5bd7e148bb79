"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) <-> vlmkit's Qwen25VLModel (:mod:`vlmkit.models.qwen2_5_vl`).

Everything but the tower is Qwen2-VL's and read and written by :mod:`vlmkit.convert.hf.qwen2_vl`'s helpers: the
LM (both config layouts: transformers 5's nested ``text_config``, the Hub's 4.x flat keys), the weight layouts
(``visual.`` / ``model.`` or ``model.visual.`` / ``model.language_model.``), the image processor (Qwen2_5_VLProcessor
lays images out as Qwen2VLProcessor) and the tokenizer. The tower's ``vision_config``: ``hidden_size`` is the
tower's width and ``out_hidden_size`` the merger's output (Qwen2-VL's ``embed_dim`` / ``hidden_size``),
``intermediate_size`` the SwiGLU MLP's, ``window_size`` (pixels), ``fullatt_block_indexes`` and
``tokens_per_second`` (videos' absolute time; kept, unused for images).

Not implemented, and refused by name: videos (the ``<|video_pad|>`` placeholder in a prompt), as for Qwen2-VL.
"""

from __future__ import annotations

from pathlib import Path

from vlmkit.config import ConnectorConfig, VisionConfig
from vlmkit.convert.hf.lm import lm_key_map
from vlmkit.convert.hf.qwen2_vl import (
    HF_VISION_ACTS,
    VISION_ACTS,
    VISION_NORM_EPS,
    _int,
    load_qwen2_vl_folder,
    qwen2_vl_lm_config,
    qwen2_vl_text_to_hf,
    qwen2_vl_token_ids,
    write_folder,
)
from vlmkit.errors import ConfigError
from vlmkit.models.qwen2_5_vl import Qwen25TowerConfig, Qwen25VLConfig, Qwen25VLModel
from vlmkit.processing import Processor

# transformers' Qwen2_5_VLVisionConfig defaults, where a config leaves a key out
DEFAULT_VISION = {"depth": 32, "hidden_size": 3584, "hidden_act": "silu", "intermediate_size": 3420, "num_heads": 16,
                  "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                  "tokens_per_second": 4, "window_size": 112, "out_hidden_size": 3584,
                  "fullatt_block_indexes": [7, 15, 23, 31]}


def qwen2_5_vl_vision_config(cfg: dict, where: str) -> tuple[VisionConfig, Qwen25TowerConfig]:
    """A Qwen2_5_VLVisionConfig (``vision_config``) -> (VisionConfig of arch "qwen2_5_vl", its tower settings)."""
    if cfg.get("model_type") not in (None, "qwen2_5_vl_vision", "qwen2_5_vl"):
        raise ConfigError(f"{where}: model_type {cfg['model_type']!r} is not Qwen2.5-VL's tower (qwen2_5_vl_vision)")
    v = {**DEFAULT_VISION, **cfg}
    if "in_chans" in cfg and "in_channels" not in cfg:  # 4.x Hub configs
        v["in_channels"] = cfg["in_chans"]
    if v["hidden_act"] not in VISION_ACTS:
        raise ConfigError(f"{where}: hidden_act {v['hidden_act']!r} is not implemented; supported: "
                          f"{', '.join(VISION_ACTS)}")
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ConfigError(f"{where}: rope_parameters.rope_type {rope['rope_type']!r} is not implemented for the "
                          f"Qwen2.5-VL tower; supported: axial")
    width, heads = _int(v["hidden_size"], "hidden_size", where), _int(v["num_heads"], "num_heads", where)
    if width % heads or (width // heads) % 4:
        raise ConfigError(f"{where}: hidden_size {width} / num_heads {heads} must be a head size divisible by 4 "
                          f"(2D rotary embeddings)")
    blocks = v["fullatt_block_indexes"]
    if not isinstance(blocks, (list, tuple)):
        raise ConfigError(f"{where}: fullatt_block_indexes {blocks!r} must be a list of block indices")
    vision = VisionConfig(
        arch="qwen2_5_vl", patch_size=_int(v["patch_size"], "patch_size", where),
        channels=_int(v["in_channels"], "in_channels", where), width=width, depth=_int(v["depth"], "depth", where),
        heads=heads, mlp_dim=_int(v["intermediate_size"], "intermediate_size", where),
        act=VISION_ACTS[v["hidden_act"]], norm="rmsnorm", norm_eps=VISION_NORM_EPS, class_token=False,
        pos_embed="rope2d", rope_theta=float(rope.get("rope_theta", 10000.0)), pre_norm=False, post_norm=False,
        patch_bias=False, qkv_bias=True, drop_class_token=False,
        temporal_patch_size=_int(v["temporal_patch_size"], "temporal_patch_size", where),
        merge_size=_int(v["spatial_merge_size"], "spatial_merge_size", where))
    tower = Qwen25TowerConfig(window_size=_int(v["window_size"], "window_size", where),
                              full_attention_blocks=tuple(_int(i, "fullatt_block_indexes", where) for i in blocks),
                              tokens_per_second=_int(v["tokens_per_second"], "tokens_per_second", where))
    if tower.window_size < vision.patch_size * vision.merge_size:
        raise ConfigError(f"{where}: window_size {tower.window_size} is less than one merge unit (patch_size x "
                          f"spatial_merge_size = {vision.patch_size * vision.merge_size} pixels)")
    bad = [i for i in tower.full_attention_blocks if not 0 <= i < vision.depth]
    if bad:
        raise ConfigError(f"{where}: fullatt_block_indexes {bad} are not blocks of a tower of depth {vision.depth}")
    return vision, tower


def qwen2_5_vl_config_from_hf(cfg: dict, where: str = "config.json") -> tuple[Qwen25VLConfig, int]:
    """A Qwen2_5_VLForConditionalGeneration config -> (Qwen25VLConfig, image token id)."""
    if cfg.get("model_type") != "qwen2_5_vl":
        raise ConfigError(f"{where}: model_type {cfg.get('model_type')!r} is not 'qwen2_5_vl'")
    lm = qwen2_vl_lm_config(cfg, where)
    raw = cfg.get("vision_config") or {}
    vision, tower = qwen2_5_vl_vision_config(raw, f"{where} (vision_config)")
    out = raw.get("out_hidden_size", DEFAULT_VISION["out_hidden_size"])
    if out != lm.width:
        raise ConfigError(f"{where}: vision_config.out_hidden_size {out} (the patch merger's output) must equal the "
                          f"text hidden_size {lm.width}")
    connector = ConnectorConfig(kind="patch_merger", scale_factor=vision.merge_size, layers=2, act="gelu", bias=True)
    model = Qwen25VLConfig(vision=vision, connector=connector, lm=lm, image_token="<|image_pad|>", tower=tower)
    return model, int(cfg.get("image_token_id", 151655))


def qwen2_5_vl_key_map(cfg: Qwen25VLConfig, vision: str = "visual.", lm: str = "model.",
                       head: str = "lm_head.weight") -> dict[str, str]:
    """vlmkit Qwen25VLModel parameter name -> transformers Qwen2_5_VLForConditionalGeneration tensor name."""
    table = {"encoder.patch_embed.weight": f"{vision}patch_embed.proj.weight",
             "connector.norm.weight": f"{vision}merger.ln_q.weight"}
    for i in range(cfg.vision.depth):
        ours, theirs = f"encoder.blocks.{i}.", f"{vision}blocks.{i}."
        table |= {f"{ours}{n}.weight": f"{theirs}{n}.weight" for n in ("norm1", "norm2")}  # RMSNorm: no bias
        for w in ("weight", "bias"):
            for name in ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                table[f"{ours}{name}.{w}"] = f"{theirs}{name}.{w}"
    for w in ("weight", "bias"):
        table[f"connector.mlp.fc1.{w}"] = f"{vision}merger.mlp.0.{w}"
        table[f"connector.mlp.fc2.{w}"] = f"{vision}merger.mlp.2.{w}"
    return table | {f"lm.{k}": v for k, v in lm_key_map(cfg.lm, lm, head).items()}


def load_qwen2_5_vl_folder(folder: Path):
    """(model, config, processor) of a Qwen2.5-VL folder; the processor gives Qwen2_5_VLProcessor's input_ids and
    pixel_values / image_grid_thw (Qwen2-VL's image processing)."""
    return load_qwen2_vl_folder(folder, "qwen2_5_vl", qwen2_5_vl_config_from_hf, qwen2_5_vl_key_map)


# ---------------------------------------------------------------------------------------------- export


def qwen2_5_vl_vision_config_to_hf(cfg: Qwen25VLConfig) -> dict:
    """The tower's config -> Qwen2_5_VLVisionConfig's ``vision_config`` with the keys of the Hub's configs
    (``in_chans`` and ``spatial_patch_size`` beside ``in_channels`` and ``patch_size``)."""
    v, problems = cfg.vision, []
    if v.arch != "qwen2_5_vl":
        problems.append(f"arch {v.arch!r} (Qwen2.5-VL's tower: arch 'qwen2_5_vl')")
    if v.norm != "rmsnorm":
        problems.append(f"norm {v.norm!r} (the tower's and merger's norms are RMSNorm: 'rmsnorm')")
    if abs(v.norm_eps - VISION_NORM_EPS) > 1e-12:
        problems.append(f"norm_eps {v.norm_eps} (transformers' tower and merger use {VISION_NORM_EPS})")
    if v.act not in HF_VISION_ACTS:
        problems.append(f"act {v.act!r} (exportable: {', '.join(HF_VISION_ACTS)})")
    if problems:
        raise ConfigError(f"vision: not a Qwen2.5-VL tower transformers can load: {'; '.join(problems)}")
    t = cfg.tower
    return {"depth": v.depth, "hidden_size": v.width, "out_hidden_size": cfg.lm.width,
            "hidden_act": HF_VISION_ACTS[v.act], "intermediate_size": v.mlp_dim, "num_heads": v.heads,
            "in_channels": v.channels, "in_chans": v.channels, "patch_size": v.patch_size,
            "spatial_patch_size": v.patch_size, "spatial_merge_size": v.merge_size,
            "temporal_patch_size": v.temporal_patch_size, "window_size": t.window_size,
            "fullatt_block_indexes": list(t.full_attention_blocks), "tokens_per_second": t.tokens_per_second,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}}


def qwen2_5_vl_config_to_hf(cfg: Qwen25VLConfig, token_ids: dict[str, int]) -> dict:
    """Qwen25VLConfig -> Qwen2_5_VLConfig's config.json in the Hub's flat layout (as Qwen/Qwen2.5-VL-*), which
    transformers 4 (>= 4.49) and 5 read."""
    return {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            **qwen2_vl_text_to_hf(cfg), "vision_config": qwen2_5_vl_vision_config_to_hf(cfg), **token_ids,
            "tie_word_embeddings": cfg.lm.tie_embeddings, "torch_dtype": "float32"}


def export_qwen2_5_vl(model: Qwen25VLModel, cfg: Qwen25VLConfig, processor: Processor, folder: Path) -> None:
    """A Qwen2.5-VL vlmkit model -> a folder that transformers' Qwen2_5_VLForConditionalGeneration and
    Qwen2_5_VLProcessor load, in the layout of the Hub's Qwen/Qwen2.5-VL-* folders (``visual.`` / ``model.`` /
    ``lm_head.`` tensors, the flat config.json, preprocessor_config.json)."""
    config = qwen2_5_vl_config_to_hf(cfg, qwen2_vl_token_ids(processor))
    write_folder(model, cfg, processor, folder, config, qwen2_5_vl_key_map(cfg), "Qwen2_5_VLProcessor")
