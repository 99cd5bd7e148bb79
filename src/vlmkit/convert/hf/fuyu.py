"""Fuyu (``FuyuForCausalLM``) <-> vlmkit's Fuyu model (models/fuyu.py): a Persimmon LM (convert/hf/lm.py: its fused
``query_key_value`` split on import and fused again on export) and one Linear from patches to the LM's width
(``vision_embed_tokens``). The processor lays prompts out as FuyuProcessor does (processing/fuyu.py).

config.json comes in two layouts: transformers 5's, with the LM in ``text_config``, and the Hub's (adept/fuyu-8b:
the LM's keys at the top level; rope theta 25000 and partial rotary 0.5 unless given). Tensors come as transformers
5 saves them (``model.language_model.``, ``model.vision_embed_tokens.``, ``lm_head.``) or as the Hub's
(``language_model.model.``, ``language_model.lm_head.``, ``vision_embed_tokens.``). Export writes the Hub's layout,
which transformers 5 renames on load (its conversion mapping for ``fuyu``), with FuyuProcessor's files.
"""

from __future__ import annotations

from pathlib import Path

from vlmkit.config import apply_overrides
from vlmkit.convert.hf.io import (export_table, find_prefix, load_state, read_checkpoint, read_config, write_hf_weights,
                                  write_json)
from vlmkit.convert.hf.lm import (fuse_qkv, is_persimmon, lm_config_from_hf, lm_config_to_hf, lm_key_map,
                                  split_fused_qkv)
from vlmkit.convert.hf.processor import PIL_CODES, PIL_RESAMPLE, export_tokenizer, load_hf_processor, read_image_processor
from vlmkit.convert.hf.processor import generation_settings
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models import build_model
from vlmkit.models.fuyu import IMAGE_TOKEN, NEWLINE_TOKEN, FuyuConfig, FuyuModel
from vlmkit.processing import Processor
from vlmkit.processing.fuyu import FuyuProcessorConfig, max_patches

FUYU_THETA = 25000.0  # FuyuConfig's default rope theta (adept/fuyu-8b's)
# the Persimmon keys a Hub-layout (flat) config.json carries at its top level (FuyuConfig reads them so)
FLAT_TEXT_KEYS = ("vocab_size", "max_position_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "hidden_act", "layer_norm_eps", "qk_layernorm", "rope_theta", "rope_scaling",
                  "rope_parameters", "partial_rotary_factor")


def fuyu_config_from_hf(cfg: dict, where: str = "config.json",
                        image_size: tuple[int, int] | None = None) -> tuple[FuyuConfig, int]:
    """A FuyuConfig dict (either layout) -> (FuyuConfig, image token id); ``image_size``: the processor's target
    (FuyuConfig's default, Fuyu-8B's 1080x1920, when not given)."""
    if cfg.get("model_type") != "fuyu":
        raise ConfigError(f"{where}: model_type {cfg.get('model_type')!r} is not 'fuyu'")
    if isinstance(cfg.get("text_config"), dict):
        text = dict(cfg["text_config"])
        text.setdefault("model_type", "persimmon")
    else:  # the Hub's flat layout
        text = {k: cfg[k] for k in FLAT_TEXT_KEYS if k in cfg} | {"model_type": "persimmon"}
        if not any(k in text for k in ("rope_theta", "rope_parameters", "rope_scaling")):
            text["rope_theta"] = FUYU_THETA
    if text["model_type"] != "persimmon":
        raise ConfigError(f"{where}: text_config.model_type {text['model_type']!r} is not implemented for Fuyu; "
                          f"supported: persimmon")
    text["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    lm = lm_config_from_hf(text, f"{where} (text_config)")
    patch, channels = int(cfg.get("patch_size", 30)), int(cfg.get("num_channels", 3))
    token = cfg.get("image_token_id", 71011)
    size = {"image_size": tuple(image_size)} if image_size is not None else {}
    return FuyuConfig(lm=lm, patch_size=patch, num_channels=channels, **size), int(token)


def _load_fuyu(folder: str | Path, image_size: tuple[int, int] | None = None) -> tuple[FuyuModel, FuyuConfig]:
    """The model of a folder; ``image_size``: its processor's target (what the model's image_tower() cuts)."""
    ckpt = read_checkpoint(folder)
    cfg, image_token = fuyu_config_from_hf(ckpt.config, str(ckpt.folder / "config.json"), image_size)
    t = ckpt.tensors
    lp = find_prefix(t, "model.language_model.", "language_model.model.")
    head = find_prefix(t, "lm_head.", "language_model.lm_head.") + "weight"
    vp = find_prefix(t, "model.vision_embed_tokens.", "vision_embed_tokens.")
    model = build_model(cfg, image_token, init=False)
    table = {f"lm.{k}": v for k, v in lm_key_map(cfg.lm, lp, head).items()}
    table |= {"patch_embed.weight": f"{vp}weight", "patch_embed.bias": f"{vp}bias"}
    ignore = (head,) if cfg.lm.tie_embeddings else ()  # a tied checkpoint may still carry a copy of the head
    load_state(model, split_fused_qkv(cfg.lm, t, lp), table, str(ckpt.folder), ignore)
    if cfg.lm.tie_embeddings:
        model.lm.lm_head.weight = model.lm.embed_tokens.weight
    return model.eval(), cfg


def load_hf_fuyu(folder: str | Path) -> FuyuModel:
    """A transformers FuyuForCausalLM folder -> FuyuModel (eval mode)."""
    return _load_fuyu(folder)[0]


def _size(value, name: str, where: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if not isinstance(value, dict) or "height" not in value or "width" not in value:
        raise ConfigError(f"{where}: {name} {value!r}: expected {{'height': int, 'width': int}}")
    return int(value["height"]), int(value["width"])


def fuyu_image_settings(settings: dict, patch_size: int, where: str) -> dict:
    """FuyuImageProcessor's preprocessor_config.json -> FuyuProcessorConfig fields; what vlmkit's Fuyu image processor
    does not compute is refused by key."""
    for key, ok in (("do_resize", True), ("do_pad", True), ("do_rescale", True), ("padding_mode", "constant")):
        if settings.get(key, ok) != ok:
            raise ConfigError(f"{where}: {key} {settings[key]!r} is not implemented for fuyu; supported: {ok!r} (images "
                              f"fitted into the target and padded to whole patches)")
    if abs(float(settings.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        raise ConfigError(f"{where}: rescale_factor {settings['rescale_factor']}; supported: 1/255")
    ph, pw = _size(settings.get("patch_size", {"height": 30, "width": 30}), "patch_size", where)
    if ph != pw or ph != patch_size:
        raise ConfigError(f"{where}: patch_size {ph}x{pw} must be square and equal config.json's patch_size "
                          f"{patch_size} (the model's Linear reads patch_size x patch_size x channels values)")
    height, width = _size(settings.get("size", {"height": 1080, "width": 1920}), "size", where)
    resample = settings.get("resample", 2)
    if resample not in PIL_RESAMPLE:
        raise ConfigError(f"{where}: resample {resample!r}; supported: {sorted(PIL_RESAMPLE)} (PIL filters)")

    def triple(v):
        return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * 3

    mean, std = triple(settings.get("image_mean", 0.5)), triple(settings.get("image_std", 0.5))
    if not settings.get("do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return {"image_size": (height, width), "patch_size": ph, "resample": PIL_RESAMPLE[resample], "mean": mean,
            "std": std, "padding_value": float(settings.get("padding_value", 1.0))}


def load_fuyu_folder(folder: Path):
    """(model, config, processor) of a Fuyu folder; the processor gives FuyuProcessor's input_ids and patches."""
    settings, path = read_image_processor(folder)
    fields = fuyu_image_settings(settings, int(read_config(Path(folder)).get("patch_size", 30)), str(path))
    model, cfg = _load_fuyu(folder, fields["image_size"])
    pcfg = FuyuProcessorConfig(**fields)  # checks the target against the patches
    processor = load_hf_processor(folder, "fuyu", model.image_token_id, max_patches(pcfg), cfg.lm.max_seq_len,
                                  config=FuyuProcessorConfig, fixed_images=False, **fields)
    for token in (processor.cfg.newline_token, processor.cfg.image_end, processor.cfg.answer_token):
        if processor.tokenizer.tok.token_to_id(token) is None:
            raise CheckpointError(f"{folder}: FuyuProcessor writes {token!r}, which is not a token of tokenizer.json")
    if processor.cfg.image_token != IMAGE_TOKEN:
        raise CheckpointError(f"{folder}: config.json's image_token_id {model.image_token_id} is "
                              f"{processor.cfg.image_token!r} in tokenizer.json; FuyuProcessor's image token is "
                              f"{IMAGE_TOKEN!r}")
    model.newline_token_id = processor.tokenizer.token_id(processor.cfg.newline_token)
    cfg = apply_overrides(cfg, {"image_token": processor.cfg.image_token, "newline_token_id": model.newline_token_id})
    return model, cfg, processor


# ---------------------------------------------------------------------------------------------- export


def fuyu_config_to_hf(cfg: FuyuConfig, image_token_id: int) -> dict:
    """FuyuConfig -> FuyuForCausalLM's config.json (transformers 5's layout, the LM in text_config). Its LM is
    Persimmon: anything else is refused by field."""
    if not is_persimmon(cfg.lm):
        raise ConfigError(f"lm.norm {cfg.lm.norm!r}, lm.pos_embed {cfg.lm.pos_embed!r}: Fuyu's LM is Persimmon "
                          f"(norm: layernorm with pos_embed: rope)")
    text = lm_config_to_hf(cfg.lm, "lm")  # refuses what Persimmon cannot express
    return {"model_type": "fuyu", "architectures": ["FuyuForCausalLM"], "text_config": text,
            "patch_size": cfg.patch_size, "num_channels": cfg.num_channels, "image_token_id": image_token_id,
            "tie_word_embeddings": cfg.lm.tie_embeddings, "torch_dtype": "float32"}


def fuyu_processor_to_hf(processor: Processor) -> dict:
    """The processor's settings -> FuyuImageProcessor's preprocessor_config.json. Refused: a processor that
    FuyuProcessor would lay out differently."""
    pcfg = processor.cfg
    if processor.family.name != "fuyu" or pcfg.text_mode != "whole":
        raise ConfigError(f"processor family {processor.family.name!r}, text_mode {pcfg.text_mode!r}: FuyuProcessor's "
                          f"prompt layout is family 'fuyu' with text_mode 'whole' (a vlmkit-trained Fuyu's segment "
                          f"layout has no FuyuProcessor counterpart)")
    fixed = {"image_token": IMAGE_TOKEN, "newline_token": NEWLINE_TOKEN, "image_end": "<s>", "answer_token": "<0x04>"}
    for name, ok in fixed.items():
        if getattr(pcfg, name) != ok:
            raise ConfigError(f"processor {name} {getattr(pcfg, name)!r}: FuyuProcessor writes {ok!r}")
    h, w = pcfg.image_size
    p = pcfg.patch_size
    return {"image_processor_type": "FuyuImageProcessor", "do_resize": True, "size": {"height": h, "width": w},
            "resample": PIL_CODES[pcfg.resample], "do_pad": True, "padding_value": pcfg.padding_value,
            "padding_mode": "constant", "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(pcfg.mean), "image_std": list(pcfg.std), "patch_size": {"height": p, "width": p}}


def export_fuyu(model: FuyuModel, cfg: FuyuConfig, processor: Processor, folder: Path) -> None:
    """A Fuyu vlmkit model -> a folder that transformers' FuyuForCausalLM and FuyuProcessor load, tensors named as
    adept/fuyu-8b's (module docstring)."""
    config = fuyu_config_to_hf(cfg, model.image_token_id)
    images = fuyu_processor_to_hf(processor)
    if processor.cfg.patch_size != cfg.patch_size:
        raise ConfigError(f"processor patch_size {processor.cfg.patch_size} != the model's patch_size {cfg.patch_size}")
    tok = processor.tokenizer
    special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id}
    config["text_config"] |= special
    lp = "language_model.model."
    tensors = fuse_qkv(cfg.lm, export_table(model.lm, lm_key_map(cfg.lm, lp, "language_model.lm_head.weight")), lp)
    tensors["vision_embed_tokens.weight"] = model.patch_embed.weight
    tensors["vision_embed_tokens.bias"] = model.patch_embed.bias
    write_hf_weights(folder, tensors)
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation_settings(special, processor))
    write_json(folder / "processor_config.json", {"image_processor": images, "processor_class": "FuyuProcessor"})
    export_tokenizer(processor, folder)


__all__ = ["export_fuyu", "fuyu_config_from_hf", "fuyu_config_to_hf", "fuyu_image_settings", "load_fuyu_folder",
           "load_hf_fuyu"]
