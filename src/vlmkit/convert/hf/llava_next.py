"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``) and LLaVA-OneVision
(``LlavaOnevisionForConditionalGeneration``) -> ``LlavaNextModel`` (models/llava_next.py).

Both are LLaVA checkpoints (tower, two-layer MLP projector, LM: read with the LLaVA loader's config reader
and key tables) plus AnyRes tiling: ``image_grid_pinpoints``, a learned ``image_newline`` and, for
OneVision, ``vision_aspect_ratio`` "anyres_max_N". NeXT: CLIP tower read at layer -2 without its class token,
Llama / Mistral LM. OneVision: SigLIP tower read at layer -1 ("full"), Qwen2 LM; images only (a prompt with
its ``<video>`` placeholder is refused). The processor checks (transformers' processor settings that would
count image tokens differently from the model are refused by file and key) keep input_ids and image
features in step, token for token.

The export writes the same layout back (``export_llava_next``): LLaVA's files with ``image_newline``, the
grid pinpoints and OneVision's ``vision_aspect_ratio``, and the processor settings that count image tokens.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from vlmkit.convert.hf.io import find_prefix, read_checkpoint, write_hf_weights, write_json
from vlmkit.convert.hf.llava import export_llava_tensors, llava_config_from_hf, llava_config_to_hf, load_llava_weights
from vlmkit.convert.hf.processor import (export_tokenizer, image_processor_from_hf, image_processor_to_hf,
                                         load_hf_processor, read_image_processor)
from vlmkit.convert.hf.processor import generation_settings
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models import build_model
from vlmkit.models.llava_next import LlavaNextConfig
from vlmkit.processing import Processor
from vlmkit.processing.llava_next import AnyResConfig, AnyResProcessorConfig, check_anyres

NEXT, ONEVISION = "llava_next", "llava_onevision"
# transformers' defaults (config classes and image processors) when a file leaves the key out
DEFAULT_PINPOINTS = {NEXT: [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                     ONEVISION: [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]}
DEFAULTS = {NEXT: {"layer": -2, "strategy": "default"}, ONEVISION: {"layer": -1, "strategy": "full"}}


def max_tiles_from_hf(value, where: str) -> int:
    """OneVision's ``vision_aspect_ratio`` "anyres_max_N" -> N (the only form transformers reads)."""
    m = re.fullmatch(r"anyres_max_(\d+)", str(value))
    if m is None or int(m.group(1)) < 1:
        raise ConfigError(f"{where}: vision_aspect_ratio {value!r} is not implemented; supported: "
                          f"'anyres_max_N' with N >= 1 (e.g. 'anyres_max_9')")
    return int(m.group(1))


def llava_next_config_from_hf(cfg: dict, where: str = "config.json") -> tuple[LlavaNextConfig, int]:
    """A LlavaNextConfig / LlavaOnevisionConfig -> (LlavaNextConfig, image token id)."""
    kind = cfg.get("model_type")
    if kind not in (NEXT, ONEVISION):
        raise ConfigError(f"{where}: model_type {kind!r} is not {NEXT!r} or {ONEVISION!r}")
    base, token = llava_config_from_hf(cfg, where, kind, DEFAULTS[kind]["layer"], DEFAULTS[kind]["strategy"])
    if base.vision.class_token and not base.vision.drop_class_token:
        raise ConfigError(f"{where}: vision_feature_select_strategy 'full' keeps the tower's class token, and "
                          f"AnyRes cannot reassemble tiles with it (transformers fails on it too); use 'default'")
    pinpoints = cfg.get("image_grid_pinpoints") or DEFAULT_PINPOINTS[kind]
    check_anyres(pinpoints, base.vision.image_size[0], where)
    max_tiles = max_tiles_from_hf(cfg.get("vision_aspect_ratio", "anyres_max_9"), where) if kind == ONEVISION else 0
    # OneVision takes a prompt's several images untiled (squares), as its processor does for a prompt's images
    # (a nested list: what apply_chat_template passes); "tile" is the flat-list call, set by hand
    anyres = AnyResConfig(grid_pinpoints=[(int(h), int(w)) for h, w in pinpoints], max_tiles=max_tiles,
                          multi_image="square" if kind == ONEVISION else "tile")
    return LlavaNextConfig(family=kind, vision=base.vision, connector=base.connector, lm=base.lm,
                           image_token=base.image_token, anyres=anyres), token


def _processor_settings(folder: Path) -> tuple[dict, Path]:
    """The top-level settings of processor_config.json (patch_size, num_image_tokens, ...); {} without it."""
    path = folder / "processor_config.json"
    if not path.is_file():
        return {}, path
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    return {k: v for k, v in data.items() if k != "image_processor"}, path


def check_processor(folder: Path, cfg: LlavaNextConfig) -> dict:
    """The folder's image-processor settings as ProcessorConfig fields, refusing any that would tile or count
    image tokens differently from the model (each would make transformers' own model fail too). Keys
    processor_config.json leaves out take transformers' defaults."""
    images, path = read_image_processor(folder)
    settings = image_processor_from_hf(images, str(path))
    tile = cfg.vision.image_size
    if tuple(settings["image_size"]) != tuple(tile):
        raise ConfigError(f"{path}: crop_size/size {settings['image_size']} (height, width) is not the tower's "
                          f"image_size {tuple(tile)}: AnyRes tiles are the tower's input")
    pins = images.get("image_grid_pinpoints") or DEFAULT_PINPOINTS[cfg.family]
    if [list(p) for p in pins] != [list(p) for p in cfg.anyres.grid_pinpoints]:
        raise ConfigError(f"{path}: image_grid_pinpoints {pins} differ from config.json's "
                          f"{[list(p) for p in cfg.anyres.grid_pinpoints]}: images would be tiled differently "
                          f"from how the model reassembles them")
    proc, ppath = _processor_settings(folder)
    if not ppath.is_file():  # nothing to disagree with: vlmkit counts image tokens from the model's geometry
        return settings
    side = cfg.vision.grid[0]
    strategy = proc.get("vision_feature_select_strategy")  # the processor's own; unset: nothing subtracted
    minus = 1 if strategy == "default" else 0
    if cfg.family == NEXT:
        patch = proc.get("patch_size")
        if patch is not None and int(patch) != cfg.vision.patch_size:
            raise ConfigError(f"{ppath}: patch_size {patch} is not the tower's patch_size {cfg.vision.patch_size}")
        extra = int(proc.get("num_additional_image_tokens", 0) or 0)
        if extra - minus != 0:
            raise ConfigError(f"{ppath}: num_additional_image_tokens {extra} with vision_feature_select_strategy "
                              f"{strategy!r} counts {extra - minus:+d} "
                              f"tokens per image beyond the tower's patches; the model gives none (use 1 with "
                              f"'default' for a CLIP tower, 0 with 'full')")
    else:
        n = proc.get("num_image_tokens")
        if n is None or int(n) - minus != side * side:
            raise ConfigError(f"{ppath}: num_image_tokens {n!r} does not give the tower's {side * side} patch "
                              f"features per tile (vision_config image_size / patch_size = {side}, squared)")
        ratio = proc.get("vision_aspect_ratio", "anyres_max_9")
        if max_tiles_from_hf(ratio, str(ppath)) != cfg.anyres.max_tiles:
            raise ConfigError(f"{ppath}: vision_aspect_ratio {ratio!r} differs from config.json's "
                              f"'anyres_max_{cfg.anyres.max_tiles}'")
    return settings


def load_llava_next_folder(folder: Path):
    """(model, config, processor) of a LLaVA-NeXT or LLaVA-OneVision folder; the processor gives the family's
    transformers processor's input_ids and (unpadded) pixel_values for a flat list of images."""
    ckpt = read_checkpoint(folder)
    where = str(ckpt.folder / "config.json")
    cfg, image_token = llava_next_config_from_hf(ckpt.config, where)
    model = build_model(cfg, image_token, init=False)
    # beside the projector: "image_newline" (the llava-hf layout transformers 5 still saves) or "model.image_newline"
    projector = find_prefix(ckpt.tensors, "multi_modal_projector.", "model.multi_modal_projector.")
    newline = projector.replace("multi_modal_projector.", "image_newline")
    load_llava_weights(model, ckpt.tensors, cfg, str(ckpt.folder), {"image_newline": newline})
    settings = check_processor(ckpt.folder, cfg)
    processor = load_hf_processor(ckpt.folder, cfg.family, image_token, model.image_seq_len, cfg.lm.max_seq_len,
                                  AnyResProcessorConfig, fixed_images=False, anyres=dataclasses.replace(cfg.anyres),
                                  **settings)
    video = ckpt.config.get("video_token_index", ckpt.config.get("video_token_id"))
    video_token = processor.tokenizer.tok.id_to_token(int(video)) if video is not None else None
    if cfg.family == ONEVISION and video_token:
        processor = Processor(dataclasses.replace(processor.cfg, refused_placeholders=[video_token]),
                              processor.tokenizer)
    return model.eval(), cfg, processor


# ---------------------------------------------------------------------------------------------- export

CLASSES = {NEXT: ("LlavaNextForConditionalGeneration", "LlavaNextProcessor", "LlavaNextImageProcessor"),
           ONEVISION: ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor",
                       "LlavaOnevisionImageProcessor")}


def llava_next_config_to_hf(cfg: LlavaNextConfig, image_token_id: int, image_seq_len: int,
                            video_token_id: int | None = None) -> dict:
    """LlavaNextConfig (family llava_next or llava_onevision) -> LlavaNextConfig / LlavaOnevisionConfig's
    config.json: LLaVA's keys (the tower with the layers vlmkit built, read at -1) plus the AnyRes ones,
    ``image_grid_pinpoints`` and, for OneVision, ``vision_aspect_ratio`` "anyres_max_N"."""
    kind = cfg.family
    if kind not in CLASSES:
        raise ConfigError(f"family {kind!r}: the LLaVA-NeXT exporter writes {NEXT!r} or {ONEVISION!r}")
    config = llava_config_to_hf(cfg, image_token_id, image_seq_len)
    pins = [[int(h), int(w)] for h, w in cfg.anyres.grid_pinpoints]
    check_anyres(pins, cfg.vision.image_size[0], "anyres.grid_pinpoints")
    config |= {"model_type": kind, "architectures": [CLASSES[kind][0]], "image_grid_pinpoints": pins}
    if kind == NEXT:
        if cfg.anyres.max_tiles:
            raise ConfigError(f"anyres.max_tiles {cfg.anyres.max_tiles}: LLaVA-NeXT never reduces tile features "
                              f"(transformers has no such setting); use 0, or family {ONEVISION!r}")
        return config
    if cfg.anyres.max_tiles < 1:
        raise ConfigError(f"anyres.max_tiles {cfg.anyres.max_tiles}: LLaVA-OneVision reduces grids beyond N tiles "
                          f"('anyres_max_N' with N >= 1); 0 (never) is LLaVA-NeXT's")
    del config["image_seq_length"]  # not a LlavaOnevisionConfig key
    config["vision_aspect_ratio"] = f"anyres_max_{cfg.anyres.max_tiles}"
    if video_token_id is not None:
        config["video_token_index"] = video_token_id
    return config


def check_export_processor(pcfg, cfg: LlavaNextConfig, image_seq_len: int) -> None:
    """Refuse a processor whose tiling or token counts a transformers folder could not carry beside this model
    (its image processor takes the grid pinpoints and tile size from the files written with the model's)."""
    # the family decides its image processor, but a checkpoint's processor.json may name another family's (fixed
    # size images, no ``anyres`` section): refused by name, as transformers' processor tiles (it used to fail below
    # with an AttributeError on ``pcfg.anyres``)
    if not isinstance(pcfg, AnyResProcessorConfig):
        raise ConfigError(f"processor family {pcfg.family!r} does not tile images: {cfg.family} tiles them "
                          f"(AnyRes), and transformers' processor would")
    if tuple(pcfg.image_size) != tuple(cfg.vision.image_size):
        raise ConfigError(f"processor image_size {tuple(pcfg.image_size)} is not the tower's image_size "
                          f"{tuple(cfg.vision.image_size)}: AnyRes tiles are the tower's input")
    pins = [list(p) for p in pcfg.anyres.grid_pinpoints]
    if pins != [list(p) for p in cfg.anyres.grid_pinpoints]:
        raise ConfigError(f"processor anyres.grid_pinpoints {pins} differ from the model's "
                          f"{[list(p) for p in cfg.anyres.grid_pinpoints]}: transformers' processor and model read "
                          f"one image_grid_pinpoints")
    if pcfg.anyres.max_tiles != cfg.anyres.max_tiles:
        raise ConfigError(f"processor anyres.max_tiles {pcfg.anyres.max_tiles} differs from the model's "
                          f"{cfg.anyres.max_tiles}: transformers' processor and model read one vision_aspect_ratio")
    if pcfg.image_seq_len != image_seq_len:
        raise ConfigError(f"processor image_seq_len {pcfg.image_seq_len} is not the model's {image_seq_len} "
                          f"features per tile")


def export_llava_next(model, cfg: LlavaNextConfig, processor: Processor, folder: Path) -> None:
    """A LLaVA-NeXT / OneVision vlmkit model -> a folder that transformers' LlavaNextForConditionalGeneration /
    LlavaOnevisionForConditionalGeneration and their processors load: LLaVA's files (the Hub's llava-hf tensor
    layout, which transformers 4 and 5, vLLM and SGLang read) plus ``image_newline`` beside the projector, the
    grid pinpoints in config.json and preprocessor_config.json, and the processor's token-count settings.
    OneVision's multi-image mode is not a setting there (transformers' processor chooses it by how the images
    are nested), so ``anyres.multi_image`` is not written."""
    pcfg = processor.cfg
    tok = processor.tokenizer
    video = next(iter(pcfg.refused_placeholders), None) if cfg.family == ONEVISION else None
    video_id = tok.tok.token_to_id(video) if video else None
    config = llava_next_config_to_hf(cfg, model.image_token_id, model.image_seq_len, video_id)
    check_export_processor(pcfg, cfg, model.image_seq_len)
    special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id}
    config["text_config"] |= special  # generation stops where vlmkit's does
    tensors = export_llava_tensors(model, cfg)
    tensors["image_newline"] = model.image_newline  # llava-hf's top-level name (transformers 5 still saves it)
    _, processor_class, image_class = CLASSES[cfg.family]
    # the anyres settings are a CLIP/SigLIP image processor's (the tiles and the base image go through its
    # transform) plus the candidate resolutions
    images = image_processor_to_hf(pcfg, image_class)
    images |= {"image_grid_pinpoints": config["image_grid_pinpoints"], "do_pad": True,
               "processor_class": processor_class}
    strategy = config["vision_feature_select_strategy"]
    settings = {"processor_class": processor_class, "image_token": pcfg.image_token,
                "vision_feature_select_strategy": strategy}
    extra = 1 if cfg.vision.class_token else 0  # tokens the tower gives beyond its patches ('default' drops it)
    if cfg.family == NEXT:
        settings |= {"patch_size": cfg.vision.patch_size, "num_additional_image_tokens": extra}
    else:
        settings |= {"num_image_tokens": model.image_seq_len + extra,
                     "vision_aspect_ratio": config["vision_aspect_ratio"]}
        if video:
            settings["video_token"] = video
    write_hf_weights(folder, tensors)
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation_settings(special, processor))
    write_json(folder / "preprocessor_config.json", images)
    write_json(folder / "processor_config.json", settings)
    export_tokenizer(processor, folder)


