"""InternVL 2.5 / 3 (``InternVLForConditionalGeneration``, model_type "internvl") <-> vlmkit's internvl family.

config.json: ``vision_config`` (InternVLVisionConfig) -> VisionConfig(arch "internvit") + InternViTConfig;
``downsample_ratio`` 0.5 -> connector scale_factor 2; ``text_config`` through the shared LM reader (Qwen2 or
Llama); ``vision_feature_layer`` an integer, ``vision_feature_select_strategy`` "default" (the class token dropped).
Refused by name: a list of feature layers, "full" (transformers cannot reshape a grid with the class token in it),
``use_absolute_position_embeddings: false``, a mask token, a downsample ratio other than 1/n, non-square tiles.

Weights: either layout transformers reads (the legacy ``vision_tower.`` / ``multi_modal_projector.`` /
``language_model.model.`` one that transformers 5 writes, or ``model.``-prefixed); export writes the legacy one.
The processor: GotOcr2's tiling settings (``min_patches``, ``max_patches``, ``size``) from processor_config.json's
``image_processor`` (or preprocessor_config.json; its ``crop_to_patches`` is not read: InternVLProcessor always
passes ``crop_to_patches=True``, so only ``max_patches: 1`` gives one tile per image), ``image_seq_length`` from
processor_config.json, and the image tokens' names from tokenizer_config.json's ``extra_special_tokens``.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmkit.config import ConnectorConfig, VisionConfig
from vlmkit.convert.hf.io import (
    export_table,
    find_prefix,
    load_state,
    read_checkpoint,
    read_json,
    write_hf_weights,
    write_json,
)
from vlmkit.convert.hf.lm import lm_config_from_hf, lm_config_to_hf, lm_key_map, untie_if_head_saved
from vlmkit.convert.hf.processor import (
    PIL_CODES,
    export_tokenizer,
    image_processor_from_hf,
    load_hf_processor,
    read_image_processor,
)
from vlmkit.convert.hf.processor import generation_settings
from vlmkit.encoders.internvit import InternViTConfig
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models import build_model
from vlmkit.models.internvl import InternVLConfig
from vlmkit.processing import Processor
from vlmkit.processing.internvl import InternVLProcessorConfig, TilingConfig, check_tiling

# InternVLVisionConfig's defaults (InternViT-300M-448px), for keys a config.json leaves out
VISION_DEFAULTS = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "attention_bias": False,
                   "use_qk_norm": False, "intermediate_size": 4096, "hidden_act": "gelu", "norm_type": "layer_norm",
                   "layer_norm_eps": 1e-6, "image_size": [448, 448], "patch_size": [14, 14], "num_channels": 3,
                   "use_mask_token": False, "use_absolute_position_embeddings": True, "layer_scale_init_value": 0.1,
                   "use_mean_pooling": True}
NORMS = {"layer_norm": "layernorm", "rms_norm": "rmsnorm"}
ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "silu": "silu"}
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
VIDEO_TOKEN = "<video>"
IMAGE_SEQ_LEN_DEFAULT = 256  # InternVLProcessor's image_seq_length
# GotOcr2ImageProcessor's defaults; InternVLProcessor turns crop_to_patches on unless the settings say otherwise
IMAGE_DEFAULTS = {"size": {"height": 384, "width": 384}, "resample": 3, "image_mean": [0.48145466, 0.4578275,
                  0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711], "min_patches": 1, "max_patches": 12}


def _pair(v, name: str, where: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return int(v[0]), int(v[1])
    raise ConfigError(f"{where}: vision_config.{name} {v!r}: expected an integer or [height, width]")


def internvit_config_from_hf(v: dict, feature_layer, where: str) -> tuple[VisionConfig, InternViTConfig]:
    """InternVLVisionConfig -> (VisionConfig, InternViTConfig)."""
    v = {**VISION_DEFAULTS, **v}
    for key, ok in (("use_absolute_position_embeddings", True), ("use_mask_token", False)):
        if bool(v[key]) != ok:
            raise ConfigError(f"{where}: vision_config.{key} {v[key]!r} is not implemented (InternVL checkpoints "
                              f"have {str(ok).lower()})")
    if v["norm_type"] not in NORMS:
        raise ConfigError(f"{where}: vision_config.norm_type {v['norm_type']!r}; valid: {', '.join(NORMS)}")
    if v["hidden_act"] not in ACTS:
        raise ConfigError(f"{where}: vision_config.hidden_act {v['hidden_act']!r}; supported: {', '.join(ACTS)}")
    if not isinstance(feature_layer, int) or isinstance(feature_layer, bool):
        raise ConfigError(f"{where}: vision_feature_layer {feature_layer!r}: only one layer (an integer) is "
                          f"implemented")
    size, patch = _pair(v["image_size"], "image_size", where), _pair(v["patch_size"], "patch_size", where)
    if size[0] != size[1] or patch[0] != patch[1] or size[0] % patch[0]:
        raise ConfigError(f"{where}: vision_config image_size {list(size)} / patch_size {list(patch)}: InternVL's "
                          f"tiles are square and cut into whole patches")
    vision = VisionConfig(arch="internvit", image_size=size, patch_size=patch[0], channels=v["num_channels"],
                          width=v["hidden_size"], depth=v["num_hidden_layers"], heads=v["num_attention_heads"],
                          mlp_dim=v["intermediate_size"], act=ACTS[v["hidden_act"]], norm=NORMS[v["norm_type"]],
                          norm_eps=float(v["layer_norm_eps"]), class_token=True, pos_embed="learned",
                          post_norm=not v["use_mean_pooling"], qkv_bias=bool(v["attention_bias"]),
                          feature_layer=feature_layer, drop_class_token=True)
    return vision, InternViTConfig(qk_norm=bool(v["use_qk_norm"]), layer_scale_init=float(v["layer_scale_init_value"]))


def internvl_config_from_hf(cfg: dict, where: str = "config.json") -> tuple[InternVLConfig, int]:
    """An InternVLConfig's config.json -> (InternVLConfig, image token id)."""
    if cfg.get("model_type") != "internvl":
        raise ConfigError(f"{where}: model_type {cfg.get('model_type')!r} is not 'internvl'")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ConfigError(f"{where}: vision_feature_select_strategy {strategy!r}: only 'default' (the class token "
                          f"dropped) is implemented; with 'full' transformers cannot lay the features out as a grid")
    vision, extra = internvit_config_from_hf(cfg.get("vision_config") or {}, cfg.get("vision_feature_layer", -1),
                                             where)
    ratio = float(cfg.get("downsample_ratio", 0.5))
    scale = round(1 / ratio) if ratio > 0 else 0
    if scale < 1 or abs(ratio * scale - 1) > 1e-9 or vision.grid[0] % scale:
        raise ConfigError(f"{where}: downsample_ratio {ratio}: expected 1/n with n dividing the "
                          f"{vision.grid[0]}x{vision.grid[1]} patch grid (InternVL uses 0.5)")
    act = cfg.get("projector_hidden_act", "gelu")
    if act not in ACTS:
        raise ConfigError(f"{where}: projector_hidden_act {act!r}; supported: {', '.join(ACTS)}")
    # the head is tied by the top-level tie_word_embeddings
    text = {**(cfg.get("text_config") or {}), "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True))}
    lm = lm_config_from_hf(text, f"{where} (text_config)")
    connector = ConnectorConfig(kind="pixel_shuffle", scale_factor=scale, layers=2, act=ACTS[act], bias=True)
    model = InternVLConfig(vision=vision, connector=connector, lm=lm, internvit=extra)
    return model, int(cfg.get("image_token_id", 151667))


def vision_key_map(cfg: InternVLConfig, vp: str) -> dict[str, str]:
    """vlmkit InternViTEncoder name -> transformers InternVLVisionModel tensor name (under ``vp``)."""
    v = cfg.vision
    table = {"class_token": f"{vp}embeddings.cls_token", "pos_embed": f"{vp}embeddings.position_embeddings",
             "patch_embed.weight": f"{vp}embeddings.patch_embeddings.projection.weight",
             "patch_embed.bias": f"{vp}embeddings.patch_embeddings.projection.bias"}
    idx = v.feature_layer if v.feature_layer >= 0 else v.depth + 1 + v.feature_layer
    norms = ("weight", "bias") if v.norm == "layernorm" else ("weight",)
    for i in range(idx):
        ours, theirs = f"blocks.{i}.", f"{vp}encoder.layer.{i}."
        table |= {ours + "lambda_1": theirs + "lambda_1", ours + "lambda_2": theirs + "lambda_2"}
        for a, b in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            table |= {f"{ours}{a}.{p}": f"{theirs}{b}.{p}" for p in norms}
        for a, b, bias in (("q_proj", "q_proj", v.qkv_bias), ("k_proj", "k_proj", v.qkv_bias),
                           ("v_proj", "v_proj", v.qkv_bias), ("o_proj", "projection_layer", True)):
            table[f"{ours}attn.{a}.weight"] = f"{theirs}attention.{b}.weight"
            if bias:
                table[f"{ours}attn.{a}.bias"] = f"{theirs}attention.{b}.bias"
        if cfg.internvit.qk_norm:
            table |= {f"{ours}attn.{n}.weight": f"{theirs}attention.{n}.weight" for n in ("q_norm", "k_norm")}
        for fc in ("fc1", "fc2"):
            table |= {f"{ours}mlp.{fc}.{p}": f"{theirs}mlp.{fc}.{p}" for p in ("weight", "bias")}
    if v.post_norm and v.feature_layer == -1:
        table |= {f"post_norm.{p}": f"{vp}layernorm.{p}" for p in ("weight", "bias")}
    return table


def projector_key_map(pp: str) -> dict[str, str]:
    return {f"{ours}.{p}": f"{pp}{theirs}.{p}" for ours, theirs in
            (("norm", "layer_norm"), ("fc1", "linear_1"), ("fc2", "linear_2")) for p in ("weight", "bias")}


def skipped_vision_tensor(name: str, vp: str, cfg: InternVLConfig) -> bool:
    """Tower tensors vlmkit does not build: the layers after the feature layer, and the final norm unless read."""
    if not name.startswith(vp):
        return False
    rest = name[len(vp):]
    v = cfg.vision
    idx = v.feature_layer if v.feature_layer >= 0 else v.depth + 1 + v.feature_layer
    if rest.startswith("encoder.layer."):
        return int(rest.split(".")[2]) >= idx
    return rest.startswith("layernorm.") and v.feature_layer != -1


def load_internvl(folder: str | Path):
    """(model, its config) of an InternVL folder (fp32)."""
    ckpt = read_checkpoint(folder)
    cfg, image_token = internvl_config_from_hf(ckpt.config, str(ckpt.folder / "config.json"))
    t = ckpt.tensors
    vp = find_prefix(t, "vision_tower.", "model.vision_tower.")
    pp = find_prefix(t, "multi_modal_projector.", "model.multi_modal_projector.")
    lp = find_prefix(t, "language_model.model.", "model.language_model.")
    head = find_prefix(t, "language_model.lm_head.", "lm_head.") + "weight"
    cfg = untie_if_head_saved(cfg, t, head, f"{lp}embed_tokens.weight")
    model = build_model(cfg, image_token, init=False)
    table = {f"encoder.{k}": val for k, val in vision_key_map(cfg, vp).items()}
    table |= {f"connector.{k}": val for k, val in projector_key_map(pp).items()}
    table |= {f"lm.{k}": val for k, val in lm_key_map(cfg.lm, lp, head).items()}
    tensors = {k: val for k, val in t.items() if not skipped_vision_tensor(k, vp, cfg)}
    ignore = ("lm_head.weight",) if cfg.lm.tie_embeddings else ()
    load_state(model, tensors, table, str(ckpt.folder), ignore)
    if cfg.lm.tie_embeddings:
        model.lm.lm_head.weight = model.lm.embed_tokens.weight
    return model.eval(), cfg


def internvl_image_settings(cfg: dict, where: str) -> dict:
    """GotOcr2ImageProcessor settings (as InternVLProcessor calls it) -> InternVLProcessorConfig fields."""
    cfg = {**IMAGE_DEFAULTS, **cfg}
    size = cfg.get("size") or {}
    if set(size) != {"height", "width"} or size["height"] != size["width"]:
        raise ConfigError(f"{where}: size {size!r}: InternVL's tiles are square {{'height': N, 'width': N}}")
    if not cfg.get("do_resize", True):
        raise ConfigError(f"{where}: do_resize: false is not implemented (the tower takes tiles of its size)")
    fixed = image_processor_from_hf({**cfg, "do_center_crop": False}, where)
    # InternVLProcessor calls the image processor with crop_to_patches=True, whatever its own setting says
    tiling = TilingConfig(True, int(cfg["min_patches"]), int(cfg["max_patches"]))
    check_tiling(tiling, f"{where}: min_patches / max_patches")
    return {**fixed, "tiling": tiling}


def image_token_names(folder: Path) -> dict:
    """start / end / context image token strings of the tokenizer (the attributes InternVLProcessor reads), from
    tokenizer_config.json: top-level keys as transformers 5 writes them, or its ``extra_special_tokens``."""
    path = folder / "tokenizer_config.json"
    data = read_json(path)
    named = data.get("extra_special_tokens")
    named = {**(named if isinstance(named, dict) else {}), **{k: data[k] for k in IMAGE_TOKENS if k in data}}
    missing = [k for k in IMAGE_TOKENS if k not in named]
    if missing:
        raise ConfigError(f"{path}: the tokenizer does not name {missing}: InternVLProcessor reads the image tokens "
                          f"from these tokenizer attributes (the Hub's are {IMAGE_TOKENS})")
    return {k: str(named[k]) for k in IMAGE_TOKENS}


def load_internvl_processor(folder: Path, model, cfg: InternVLConfig) -> Processor:
    """The folder's processor as InternVLProcessor builds input_ids: each ``<IMG_CONTEXT>`` in the text becomes
    ``<img>`` + its tiles' context tokens + ``</img>``, the whole string tokenised."""
    image_cfg, path = read_image_processor(folder)
    settings = internvl_image_settings(image_cfg, str(path))
    if settings["image_size"][0] != cfg.vision.image_size[0]:
        raise ConfigError(f"{path}: size {settings['image_size'][0]} differs from config.json vision_config."
                          f"image_size {cfg.vision.image_size[0]}: InternVL's tiles are the tower's size (vlmkit does "
                          f"not interpolate the positions)")
    proc_path = folder / "processor_config.json"
    seq_len = read_json(proc_path).get("image_seq_length", IMAGE_SEQ_LEN_DEFAULT)
    if seq_len != model.image_seq_len:
        raise ConfigError(f"{proc_path}: image_seq_length {seq_len} differs from the model's {model.image_seq_len} "
                          f"((image_size // patch_size)^2 * downsample_ratio^2 from config.json)")
    names = image_token_names(folder)
    processor = load_hf_processor(folder, "internvl", model.image_token_id, model.image_seq_len, cfg.lm.max_seq_len,
                                  InternVLProcessorConfig, fixed_images=False,
                                  start_image_token=names["start_image_token"],
                                  end_image_token=names["end_image_token"], refused_placeholders=[VIDEO_TOKEN],
                                  **settings)
    if processor.cfg.image_token != names["context_image_token"]:
        raise ConfigError(f"{folder / 'config.json'}: image_token_id {model.image_token_id} is "
                          f"{processor.cfg.image_token!r} in tokenizer.json, but the tokenizer's context_image_token "
                          f"(InternVLProcessor's placeholder) is {names['context_image_token']!r}")
    for name in ("start_image_token", "end_image_token"):
        if processor.tokenizer.tok.token_to_id(names[name]) is None:
            raise CheckpointError(f"{folder / 'tokenizer.json'}: {name} {names[name]!r} is not in the vocabulary")
    return processor


def load_internvl_folder(folder: Path):
    """(model, config, processor) of an InternVL folder."""
    model, cfg = load_internvl(folder)
    return model, cfg, load_internvl_processor(Path(folder), model, cfg)


# ---------------------------------------------------------------------------------------------- export

HF_ACTS = {v: k for k, v in ACTS.items()}
HF_NORMS = {v: k for k, v in NORMS.items()}


def internvl_config_to_hf(cfg: InternVLConfig, image_token_id: int, image_seq_len: int) -> dict:
    """InternVLConfig -> InternVLConfig's config.json; the tower written with the layers vlmkit built."""
    v, c = cfg.vision, cfg.connector
    if v.arch != "internvit":
        raise ConfigError(f"vision.arch {v.arch!r}: an InternVL checkpoint's tower is InternViT (arch: internvit)")
    idx = v.feature_layer if v.feature_layer >= 0 else v.depth + 1 + v.feature_layer
    vision = {"model_type": "internvl_vision", "hidden_size": v.width, "num_hidden_layers": idx,
              "num_attention_heads": v.heads, "intermediate_size": v.mlp_dim, "hidden_act": HF_ACTS[v.act],
              "norm_type": HF_NORMS[v.norm], "layer_norm_eps": v.norm_eps, "image_size": list(v.image_size),
              "patch_size": [v.patch_size, v.patch_size], "num_channels": v.channels, "attention_bias": v.qkv_bias,
              "use_qk_norm": cfg.internvit.qk_norm, "layer_scale_init_value": cfg.internvit.layer_scale_init,
              "use_mean_pooling": not (v.post_norm and v.feature_layer == -1),
              "use_absolute_position_embeddings": True, "use_mask_token": False}
    return {"model_type": "internvl", "architectures": ["InternVLForConditionalGeneration"],
            "vision_config": vision, "text_config": lm_config_to_hf(cfg.lm, "lm"), "image_token_id": image_token_id,
            "image_seq_length": image_seq_len, "downsample_ratio": 1 / c.scale_factor,
            "projector_hidden_act": HF_ACTS[c.act], "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default", "tie_word_embeddings": cfg.lm.tie_embeddings,
            "torch_dtype": "float32"}


def internvl_image_processor_to_hf(pcfg: InternVLProcessorConfig) -> dict:
    t = pcfg.tiling
    return {"image_processor_type": "GotOcr2ImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"height": int(pcfg.image_size[0]), "width": int(pcfg.image_size[1])},
            "resample": PIL_CODES[pcfg.resample], "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(pcfg.mean), "image_std": list(pcfg.std), "crop_to_patches": True,
            # InternVLProcessor always tiles; tiling off is one tile at most
            "min_patches": t.min_tiles if t.enabled else 1, "max_patches": t.max_tiles if t.enabled else 1}


def export_internvl(model, cfg: InternVLConfig, processor: Processor, folder: Path) -> None:
    """An InternVL vlmkit model -> a folder that transformers' InternVLForConditionalGeneration and
    InternVLProcessor load, in the legacy tensor layout transformers 5 writes."""
    if processor.family.name != "internvl" or processor.cfg.text_mode != "whole":
        raise ConfigError(f"processor family {processor.family.name!r}, text_mode {processor.cfg.text_mode!r}: an "
                          f"InternVL checkpoint's processor tiles images and tokenises the whole prompt (family: "
                          f"internvl, text_mode: whole)")
    pcfg, tok = processor.cfg, processor.tokenizer
    if pcfg.image_seq_len != model.image_seq_len:
        raise ConfigError(f"processor image_seq_len {pcfg.image_seq_len} differs from the model's "
                          f"{model.image_seq_len} (tokens per tile after the pixel shuffle)")
    if tuple(pcfg.image_size) != tuple(cfg.vision.image_size):
        raise ConfigError(f"processor image_size {tuple(pcfg.image_size)} differs from the tower's "
                          f"{tuple(cfg.vision.image_size)}: InternVL's tiles are the tower's size")
    config = internvl_config_to_hf(cfg, model.image_token_id, model.image_seq_len)
    special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id}
    config["text_config"] |= special  # generation stops where vlmkit's does
    tensors = export_table(model.encoder, vision_key_map(cfg, "vision_tower."))
    tensors |= export_table(model.connector, projector_key_map("multi_modal_projector."))
    tensors |= export_table(model.lm, lm_key_map(cfg.lm, "language_model.model.", "language_model.lm_head.weight"))
    write_hf_weights(folder, tensors)
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation_settings(special, processor))
    write_json(folder / "processor_config.json", {"processor_class": "InternVLProcessor",
                                                  "image_seq_length": model.image_seq_len,
                                                  "image_processor": internvl_image_processor_to_hf(pcfg)})
    export_tokenizer(processor, folder)
    path = folder / "tokenizer_config.json"
    names = {"start_image_token": pcfg.start_image_token, "end_image_token": pcfg.end_image_token,
             "context_image_token": pcfg.image_token, "video_token": VIDEO_TOKEN}
    path.write_text(json.dumps({**json.loads(path.read_text()), **names}, indent=2) + "\n")  # as transformers 5
