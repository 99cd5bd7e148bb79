"""Idefics2 (``Idefics2ForConditionalGeneration``) <-> vlmkit's idefics2 family: a SigLIP-like NaViT tower
(post-layernorm output, images at their own size: models/idefics2.py), the perceiver connector (a SwiGLU
``modality_projection`` then ``Idefics2PerceiverResampler``: connectors/perceiver.py) and a Mistral LM.

transformers builds the perceiver at the text model's width: a ``perceiver_config`` whose ``hidden_size``
differs is overridden with the text's width and ``rms_norm_eps`` (``Idefics2Config.__post_init__``); vlmkit
reads it the same way. The resampler's MLP is 4 x that width with the perceiver's ``hidden_act``; the projection
is the text's ``intermediate_size`` with the text's ``hidden_act``.
"""

from __future__ import annotations

from pathlib import Path

from vlmkit.config import ConnectorConfig, ResamplerConfig, VLMConfig
from vlmkit.connectors.perceiver import idefics2_connector_key_map
from vlmkit.convert.hf.io import export_table, load_state, read_checkpoint, read_json, write_hf_weights, write_json
from vlmkit.convert.hf.lm import (
    HF_ACTS,
    LM_ACTS,
    lm_config_from_hf,
    lm_config_to_hf,
    lm_key_map,
    untie_if_head_saved,
)
from vlmkit.convert.hf.processor import (
    PIL_CODES,
    export_tokenizer,
    image_processor_from_hf,
    load_hf_processor,
    read_image_processor,
)
from vlmkit.convert.hf.processor import generation_settings
from vlmkit.convert.hf.vision import (
    export_vision_tensors,
    vision_config_from_hf,
    vision_config_to_hf,
    vision_tensors,
)
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.idefics2 import Idefics2Model, build_idefics2
from vlmkit.processing import Processor
from vlmkit.processing.idefics2 import FAKE_IMAGE_TOKEN, Idefics2ProcessorConfig

MODEL_TYPE, TRANSFORMERS_CLASS = "idefics2", "Idefics2ForConditionalGeneration"
# Idefics2VisionConfig's / Idefics2PerceiverConfig's defaults, for keys a config.json leaves out
VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "gelu_pytorch_tanh",
                   "layer_norm_eps": 1e-6}
PERCEIVER_DEFAULTS = {"hidden_act": "silu", "hidden_size": 4096, "rms_norm_eps": 1e-6, "resampler_n_latents": 64,
                      "resampler_depth": 3, "resampler_n_heads": 16, "resampler_head_dim": 96,
                      "num_key_value_heads": 4}
# Idefics2Config's text_config defaults (a Mistral), and Idefics2ImageProcessor's
TEXT_DEFAULTS = {"model_type": "mistral", "max_position_embeddings": 4096 * 8, "rms_norm_eps": 1e-5}
IMAGE_DEFAULTS = {"size": {"shortest_edge": 378, "longest_edge": 980}, "resample": 2, "do_image_splitting": False,
                  "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
IMAGE_SEQ_LEN_DEFAULT = 64
IMAGE_TOKEN, END_OF_UTTERANCE = "<image>", "<end_of_utterance>"
VISION_PREFIX, TEXT_PREFIX, HEAD = "model.vision_model.", "model.text_model.", "lm_head.weight"


def idefics2_config_from_hf(cfg: dict, where: str = "config.json") -> tuple[VLMConfig, int]:
    """An Idefics2Config -> (VLMConfig, image token id)."""
    if cfg.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"{where}: model_type {cfg.get('model_type')!r} is not {MODEL_TYPE!r}")
    vcfg = {**VISION_DEFAULTS, **(cfg.get("vision_config") or {}), "model_type": "idefics3_vision"}  # same tower
    vision = vision_config_from_hf(vcfg, -1, f"{where} (vision_config)")
    if vision.image_size[0] != vision.image_size[1]:
        raise ConfigError(f"{where}: vision_config.image_size {list(vision.image_size)}: Idefics2's position table "
                          f"is square; give one integer")
    text = {**TEXT_DEFAULTS, **(cfg.get("text_config") or {}),
            "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False))}
    lm = lm_config_from_hf(text, f"{where} (text_config)")
    p = {**PERCEIVER_DEFAULTS, **(cfg.get("perceiver_config") or {})}
    if int(p["hidden_size"]) != lm.width:  # Idefics2Config.__post_init__ overrides both with the text's
        p["rms_norm_eps"] = text["rms_norm_eps"]
    if p["hidden_act"] not in LM_ACTS:
        raise ConfigError(f"{where}: perceiver_config.hidden_act {p['hidden_act']!r}; supported: "
                          f"{', '.join(LM_ACTS)}")
    if int(p["resampler_n_heads"]) % int(p["num_key_value_heads"]):
        raise ConfigError(f"{where}: perceiver_config resampler_n_heads {p['resampler_n_heads']} is not a multiple "
                          f"of num_key_value_heads {p['num_key_value_heads']}")
    resampler = ResamplerConfig(n_latents=int(p["resampler_n_latents"]), depth=int(p["resampler_depth"]),
                                heads=int(p["resampler_n_heads"]), head_dim=int(p["resampler_head_dim"]),
                                kv_heads=int(p["num_key_value_heads"]), norm_eps=float(p["rms_norm_eps"]),
                                act=LM_ACTS[p["hidden_act"]], proj_dim=lm.mlp_dim)
    connector = ConnectorConfig(kind="perceiver", act=lm.act, bias=False, perceiver=resampler)
    token = cfg.get("image_token_id", 32001)  # Idefics2Config's default
    return VLMConfig(family="idefics2", vision=vision, connector=connector, lm=lm), int(token)


def _load_idefics2(folder: str | Path) -> tuple[Idefics2Model, VLMConfig]:
    ckpt = read_checkpoint(folder)
    cfg, image_token = idefics2_config_from_hf(ckpt.config, str(ckpt.folder / "config.json"))
    t = ckpt.tensors
    cfg = untie_if_head_saved(cfg, t, HEAD, f"{TEXT_PREFIX}embed_tokens.weight")
    model = build_idefics2(cfg, image_token, init=False)
    table, tensors = vision_tensors(t, cfg.vision, VISION_PREFIX, "encoder.")
    table |= {f"lm.{k}": v for k, v in lm_key_map(cfg.lm, TEXT_PREFIX, HEAD).items()}
    table |= {f"connector.{k}": v for k, v in idefics2_connector_key_map(cfg.connector.perceiver.depth).items()}
    load_state(model, tensors, table, str(ckpt.folder), (HEAD,) if cfg.lm.tie_embeddings else ())
    if cfg.lm.tie_embeddings:
        model.lm.lm_head.weight = model.lm.embed_tokens.weight
    return model.eval(), cfg


def load_hf_idefics2(folder: str | Path) -> Idefics2Model:
    """A transformers Idefics2 folder -> vlmkit's model (fp32)."""
    return _load_idefics2(folder)[0]


def idefics2_image_settings(cfg: dict, where: str = "preprocessor_config.json") -> dict:
    """Idefics2ImageProcessor settings -> Idefics2ProcessorConfig fields."""
    cfg = {**IMAGE_DEFAULTS, **cfg}
    size = cfg.get("size") or {}
    min_edge = max_edge = 0
    if cfg.get("do_resize", True):
        if not isinstance(size.get("shortest_edge"), int) or not isinstance(size.get("longest_edge"), int):
            raise ConfigError(f"{where}: size {size!r}: only {{'shortest_edge': N, 'longest_edge': M}} is "
                              f"supported (a fixed height and width is not implemented)")
        min_edge, max_edge = size["shortest_edge"], size["longest_edge"]
    # rescale, normalisation and the PIL filter are read as for every family; the size is Idefics2's own
    shared = image_processor_from_hf({**cfg, "do_resize": True, "do_center_crop": False,
                                      "size": {"height": 1, "width": 1}}, where)
    del shared["image_size"]
    return {**shared, "min_edge": min_edge, "max_edge": max_edge, "split": bool(cfg.get("do_image_splitting"))}


def load_idefics2_processor(folder: Path, model: Idefics2Model, cfg: VLMConfig) -> Processor:
    """The folder's processor as Idefics2Processor builds input_ids and pixels."""
    image_cfg, path = read_image_processor(folder)
    settings = idefics2_image_settings(image_cfg, str(path))
    proc_path = folder / "processor_config.json"
    seq_len = read_json(proc_path).get("image_seq_len", IMAGE_SEQ_LEN_DEFAULT)
    if seq_len != model.image_seq_len:
        raise ConfigError(f"{proc_path}: image_seq_len {seq_len} differs from the model's {model.image_seq_len} "
                          f"(perceiver_config.resampler_n_latents in config.json)")
    named = read_json(folder / "tokenizer_config.json").get("extra_special_tokens")
    named = named if isinstance(named, dict) else {}
    for key, default in (("image_token", IMAGE_TOKEN), ("image_boundary_token", FAKE_IMAGE_TOKEN)):
        if named.get(key, default) != default:  # Idefics2Processor then takes these names from the tokenizer
            raise ConfigError(f"{folder / 'tokenizer_config.json'}: extra_special_tokens.{key} {named[key]!r}: "
                              f"vlmkit writes Idefics2's {default!r}")
    processor = load_hf_processor(folder, "idefics2", model.image_token_id, model.image_seq_len, cfg.lm.max_seq_len,
                                  Idefics2ProcessorConfig, fixed_images=False, patch_size=cfg.vision.patch_size,
                                  **settings)
    if processor.cfg.image_token != IMAGE_TOKEN:
        raise ConfigError(f"{folder / 'config.json'}: image_token_id {model.image_token_id} is "
                          f"{processor.cfg.image_token!r} in tokenizer.json; Idefics2Processor writes {IMAGE_TOKEN!r}")
    missing = [s for s in (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE)
               if processor.tokenizer.tok.token_to_id(s) is None]
    if missing:
        raise CheckpointError(f"{folder / 'tokenizer.json'}: special tokens {missing} are missing; "
                              f"Idefics2Processor would add them with ids the model's embeddings do not have")
    return processor


def load_idefics2_folder(folder: Path):
    """(model, config, processor) of an Idefics2 folder."""
    model, cfg = _load_idefics2(folder)
    return model, cfg, load_idefics2_processor(Path(folder), model, cfg)


# ---------------------------------------------------------------------------------------------- export


def idefics2_config_to_hf(cfg: VLMConfig, image_token_id: int) -> dict:
    """VLMConfig -> Idefics2Config's config.json; what Idefics2 cannot compute the same way is refused by name."""
    v, c = cfg.vision, cfg.connector
    if v.class_token or not v.post_norm or v.feature_layer != -1:
        raise ConfigError("vision: Idefics2's tower has no class token and gives its last layer after the final "
                          "layernorm (class_token: false, post_norm: true, feature_layer: -1)")
    vision = vision_config_to_hf(v, "vision")
    del vision["vision_use_head"]
    vision["model_type"] = "idefics2_vision"
    if c.kind != "perceiver":
        raise ConfigError(f"connector.kind {c.kind!r}: Idefics2's connector is the perceiver (kind: perceiver)")
    p = c.perceiver
    text = lm_config_to_hf(cfg.lm, "lm")
    if c.act != cfg.lm.act or (p.proj_dim or 4 * cfg.lm.width) != cfg.lm.mlp_dim:
        raise ConfigError(f"connector: act {c.act!r} and perceiver.proj_dim {p.proj_dim} must be the LM's act "
                          f"{cfg.lm.act!r} and mlp_dim {cfg.lm.mlp_dim}: Idefics2's projection takes them from "
                          f"text_config")
    if p.act not in HF_ACTS:
        raise ConfigError(f"connector.perceiver.act {p.act!r}; exportable: {', '.join(HF_ACTS)}")
    perceiver = {"hidden_size": cfg.lm.width, "hidden_act": HF_ACTS[p.act], "rms_norm_eps": p.norm_eps,
                 "resampler_n_latents": p.n_latents, "resampler_depth": p.depth, "resampler_n_heads": p.heads,
                 "resampler_head_dim": p.head_dim, "num_key_value_heads": p.kv_heads}
    return {"model_type": MODEL_TYPE, "architectures": [TRANSFORMERS_CLASS], "vision_config": vision,
            "perceiver_config": perceiver, "text_config": text, "image_token_id": image_token_id,
            "tie_word_embeddings": cfg.lm.tie_embeddings, "torch_dtype": "float32"}


def idefics2_image_processor_to_hf(pcfg) -> dict:
    """An Idefics2ProcessorConfig -> Idefics2ImageProcessor settings (:func:`idefics2_image_settings` inverted)."""
    return {"image_processor_type": "Idefics2ImageProcessor", "do_convert_rgb": True,
            "do_resize": bool(pcfg.max_edge), "size": {"shortest_edge": pcfg.min_edge,
                                                       "longest_edge": pcfg.max_edge or 980},
            "resample": PIL_CODES[pcfg.resample], "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(pcfg.mean), "image_std": list(pcfg.std), "do_pad": True,
            "do_image_splitting": pcfg.split}


def export_idefics2(model: Idefics2Model, cfg: VLMConfig, processor: Processor, folder: Path) -> None:
    """An idefics2 model -> a folder transformers' Idefics2ForConditionalGeneration and Idefics2Processor load."""
    config = idefics2_config_to_hf(cfg, model.image_token_id)
    pcfg, tok = processor.cfg, processor.tokenizer
    if processor.family.name != "idefics2":
        raise ConfigError(f"processor family {processor.family.name!r}: an Idefics2 checkpoint's processor is "
                          f"Idefics2's (family: idefics2)")
    if pcfg.text_mode != "whole":
        raise ConfigError(f"processor text_mode {pcfg.text_mode!r}: Idefics2Processor tokenises the whole prompt "
                          f"(text_mode: whole)")
    if pcfg.image_seq_len != model.image_seq_len or pcfg.image_token != IMAGE_TOKEN:
        raise ConfigError(f"processor image_seq_len {pcfg.image_seq_len} / image_token {pcfg.image_token!r}: "
                          f"Idefics2Processor writes {IMAGE_TOKEN!r} x {model.image_seq_len} (n_latents)")
    if pcfg.patch_size != cfg.vision.patch_size:
        raise ConfigError(f"processor patch_size {pcfg.patch_size} differs from vision.patch_size "
                          f"{cfg.vision.patch_size}")
    missing = [s for s in (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE) if tok.tok.token_to_id(s) is None]
    if missing:
        raise ConfigError(f"tokenizer: special tokens {missing} are missing; Idefics2Processor would add them with "
                          f"ids the model's embeddings do not have (train the tokenizer with them)")
    special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id}
    config["text_config"] |= special
    tensors = export_vision_tensors(model.encoder, cfg.vision, VISION_PREFIX)
    tensors |= export_table(model.lm, lm_key_map(cfg.lm, TEXT_PREFIX, HEAD))
    tensors |= export_table(model.connector, idefics2_connector_key_map(cfg.connector.perceiver.depth))
    write_hf_weights(folder, tensors)
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation_settings(special, processor))
    write_json(folder / "preprocessor_config.json", {**idefics2_image_processor_to_hf(pcfg),
                                                     "processor_class": "Idefics2Processor"})
    write_json(folder / "processor_config.json", {"processor_class": "Idefics2Processor",
                                                  "image_seq_len": model.image_seq_len})
    export_tokenizer(processor, folder)
