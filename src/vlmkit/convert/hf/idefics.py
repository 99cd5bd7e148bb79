"""IDEFICS (``IdeficsForVisionText2Text``, HuggingFaceM4/idefics-9b / -80b) <-> vlmkit's flamingo family
(:mod:`vlmkit.models.flamingo`): a CLIP-style tower read at its last hidden state (class token kept, no final
norm), a perceiver resampler, and a LLaMA LM with a gated cross-attention block before every
``cross_layer_interval``-th layer. The processor lays prompts out as IdeficsProcessor does
(:mod:`vlmkit.processing.idefics`) and the media mask follows its rule (the most recent image; nothing after an
EOS until the next image).

IDEFICS' decoupled embeddings (``additional_vocab_size`` rows of its added tokens, in ``additional_embedding`` and
``lm_head.additional_fc``) become one larger embedding and head in vlmkit (the same numbers:
transformers concatenates them); the export splits them off again (``xattn.decoupled_vocab``).

Missing config keys take transformers' IdeficsConfig defaults, as transformers reads them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.connectors.perceiver import idefics_perceiver_key_map
from vlmkit.convert.hf.io import export_table, load_state, read_checkpoint, write_hf_weights, write_json
from vlmkit.convert.hf.lm import lm_config_from_hf, lm_config_to_hf, lm_key_map
from vlmkit.convert.hf.processor import (export_tokenizer, image_processor_from_hf, image_processor_to_hf,
                                         load_hf_processor, load_hf_tokenizer, read_image_processor)
from vlmkit.convert.hf.processor import generation_settings
from vlmkit.convert.hf.vision import export_vision_tensors, vision_config_from_hf, vision_config_to_hf, vision_tensors
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.fusion.cross_attention import idefics_gated_xattn_key_map
from vlmkit.models import build_model
from vlmkit.models.flamingo import CrossAttentionConfig, FlamingoConfig, FlamingoModel, PerceiverConfig
from vlmkit.processing import Processor

# transformers' IdeficsConfig / IdeficsVisionConfig / IdeficsPerceiverConfig defaults (configuration_idefics.py)
DEFAULTS = {"vocab_size": 32000, "additional_vocab_size": 0, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "max_position_embeddings": 2048, "tie_word_embeddings": False, "cross_layer_interval": 1,
            "qk_layer_norms": False, "alpha_type": "float", "use_resampler": False}
VISION_DEFAULTS = {"embed_dim": 768, "image_size": 224, "intermediate_size": 5120, "patch_size": 14,
                   "num_hidden_layers": 32, "num_attention_heads": 16, "num_channels": 3, "hidden_act": "gelu",
                   "layer_norm_eps": 1e-5}
PERCEIVER_DEFAULTS = {"resampler_n_latents": 64, "resampler_depth": 6, "resampler_n_heads": 16,
                      "resampler_head_dim": 96, "qk_layer_norms_perceiver": False}
IMAGE_TOKEN = "<image>"  # IdeficsProcessor's literal placeholder


def idefics_config_from_hf(cfg: dict, where: str = "config.json", reset_token_id: int = -1) -> FlamingoConfig:
    """An IdeficsForVisionText2Text config -> FlamingoConfig of family ``flamingo``. ``reset_token_id``: the
    tokenizer's EOS id, after which IdeficsProcessor lets no token see an image until the next one."""
    if cfg.get("model_type") != "idefics":
        raise ConfigError(f"{where}: model_type {cfg.get('model_type')!r} is not 'idefics'")
    c = {**DEFAULTS, **cfg}
    depth, every = int(c["num_hidden_layers"]), int(c["cross_layer_interval"])
    if every < 1 or depth % every:
        raise ConfigError(f"{where}: cross_layer_interval {every} must divide num_hidden_layers {depth} (IDEFICS "
                          f"builds num_hidden_layers // cross_layer_interval gated layers and reads one before every "
                          f"interval-th layer)")
    if c["alpha_type"] not in ("float", "vector"):
        raise ConfigError(f"{where}: alpha_type {c['alpha_type']!r}; supported: float, vector")
    extra = int(c["additional_vocab_size"])
    text = {key: c[key] for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                    "hidden_act", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")}
    text |= {k: cfg[k] for k in ("rope_parameters", "rope_scaling", "rope_theta") if k in cfg}
    lm = lm_config_from_hf({"model_type": "llama", **text, "vocab_size": int(c["vocab_size"]) + extra},
                           f"{where} (the LLaMA LM)")
    v = {**VISION_DEFAULTS, **(cfg.get("vision_config") or {})}
    vision = vision_config_from_hf({**v, "model_type": "clip_vision_model", "hidden_size": v["embed_dim"]}, -1,
                                   f"{where} (vision_config)")  # CLIP's layout; last_hidden_state, no final norm
    p = {**PERCEIVER_DEFAULTS, **(cfg.get("perceiver_config") or {})}
    perceiver = PerceiverConfig(depth=int(p["resampler_depth"]), heads=int(p["resampler_n_heads"]),
                                head_dim=int(p["resampler_head_dim"]), n_latents=int(p["resampler_n_latents"]),
                                qk_norm=bool(p["qk_layer_norms_perceiver"]))
    xattn = CrossAttentionConfig(every=every, qk_norm=bool(c["qk_layer_norms"]), alpha_type=c["alpha_type"],
                                 only_last=True, reset_token_id=reset_token_id, use_resampler=bool(c["use_resampler"]),
                                 perceiver=perceiver, decoupled_vocab=extra)
    return FlamingoConfig(family="flamingo", vision=vision, lm=lm, image_token=IMAGE_TOKEN, xattn=xattn)


def idefics_key_map(cfg: FlamingoConfig) -> dict[str, str]:
    """vlmkit FlamingoModel parameter name -> IdeficsForVisionText2Text tensor name (tower excepted: see
    :func:`~vlmkit.convert.hf.vision.vision_tensors`), embeddings and head as the concatenated tensors."""
    table = {f"lm.lm.{k}": v for k, v in lm_key_map(cfg.lm, "model.", "lm_head.weight").items()}
    for i in range(cfg.lm.depth // cfg.xattn.every):
        table |= idefics_gated_xattn_key_map(cfg.xattn.qk_norm, f"lm.xattn.{i}.", f"model.gated_cross_attn_layers.{i}.")
    if cfg.xattn.use_resampler:
        perceiver = idefics_perceiver_key_map(cfg.xattn.perceiver.depth, cfg.xattn.perceiver.qk_norm,
                                              "model.perceiver_resampler.")
        table |= {f"connector.{k}": v for k, v in perceiver.items()}
    return table


# transformers' decoupled tensors: (the base tensor, its additional rows)
DECOUPLED = (("model.embed_tokens.weight", "model.embed_tokens.additional_embedding.weight"),
             ("lm_head.weight", "lm_head.additional_fc.weight"))


def join_decoupled(tensors: dict, cfg: FlamingoConfig, where: str) -> dict:
    """The tensors with each decoupled pair concatenated into its base name (the rows transformers' lookup and
    head give). A tied checkpoint's head, when saved, is dropped (the embedding is the head)."""
    out = dict(tensors)
    if cfg.lm.tie_embeddings:
        for name in DECOUPLED[1]:
            out.pop(name, None)
    for base, additional in DECOUPLED:
        if base not in out:
            continue  # reported by load_state as missing
        if cfg.xattn.decoupled_vocab:
            if additional not in out:
                raise CheckpointError(f"{where}: additional_vocab_size {cfg.xattn.decoupled_vocab} in config.json "
                                      f"but the weights have no {additional}")
            out[base] = torch.cat([out[base], out.pop(additional)])
    return out


def load_idefics_folder(folder: Path):
    """(model, config, processor) of an IDEFICS folder; the processor gives IdeficsProcessor's input_ids."""
    ckpt = read_checkpoint(folder)
    where = str(ckpt.folder / "config.json")
    tok = load_hf_tokenizer(folder)
    for name in ("bos_token", "eos_token"):
        if not getattr(tok, name):
            raise CheckpointError(f"{folder}: IDEFICS' prompts need a {name}; tokenizer_config.json (or "
                                  f"special_tokens_map.json) names none")
    image_token = tok.tok.token_to_id(IMAGE_TOKEN)
    if image_token is None:
        raise CheckpointError(f"{folder}/tokenizer.json has no token {IMAGE_TOKEN!r}, which IdeficsProcessor puts "
                              f"for every image")
    cfg = idefics_config_from_hf(ckpt.config, where, reset_token_id=tok.eos_id)
    if cfg.lm.vocab_size < tok.vocab_size:
        raise ConfigError(f"{where}: vocab_size + additional_vocab_size = {cfg.lm.vocab_size} rows, but the "
                          f"tokenizer has {tok.vocab_size} tokens")
    model = build_model(cfg, image_token, init=False)
    table, tensors = vision_tensors(join_decoupled(ckpt.tensors, cfg, str(ckpt.folder)), cfg.vision,
                                    "model.vision_model.", "encoder.")
    table |= idefics_key_map(cfg)
    load_state(model, tensors, table, str(ckpt.folder))
    if cfg.lm.tie_embeddings:
        model.lm.lm.lm_head.weight = model.lm.lm.embed_tokens.weight
    settings, path = read_image_processor(folder)
    if "size" not in settings and "image_size" in settings:  # the Hub's IdeficsImageProcessor settings
        settings = {**settings, "size": {"height": settings["image_size"], "width": settings["image_size"]}}
    images = image_processor_from_hf(settings, str(path))
    if tuple(images["image_size"]) != tuple(cfg.vision.image_size):
        raise ConfigError(f"{path}: images of {tuple(images['image_size'])} pixels, but the tower of config.json "
                          f"takes {tuple(cfg.vision.image_size)} (vision_config.image_size)")
    processor = load_hf_processor(folder, "flamingo", image_token, model.image_seq_len, cfg.lm.max_seq_len,
                                  fixed_images=False, **images)
    return model.eval(), cfg, processor


# ---------------------------------------------------------------------------------------------- export


def idefics_config_to_hf(cfg: FlamingoConfig, reset_token_id: int) -> dict:
    """FlamingoConfig -> IdeficsConfig's config.json. What IdeficsForVisionText2Text (with IdeficsProcessor) cannot
    compute is refused by field."""
    x, v = cfg.xattn, cfg.vision
    if v.arch == "vit" and not (v.class_token and not v.drop_class_token and not v.post_norm):
        raise ConfigError(f"vision.class_token {v.class_token}, drop_class_token {v.drop_class_token}, post_norm "
                          f"{v.post_norm}: IDEFICS reads every token of its CLIP-style tower's last hidden state "
                          f"(class_token: true, drop_class_token: false, post_norm: false)")
    vision = vision_config_to_hf(v, "vision")  # refuses a CNN tower and what is not a CLIP tower
    text = lm_config_to_hf(cfg.lm, "lm")
    problems = [f"{k} {val!r} (IDEFICS has {ok!r})" for k, val, ok in (
        ("lm.qkv_bias, norm_offset or embed_scale (its LLaMA)", text["model_type"], "llama"),
        ("lm.kv_heads", cfg.lm.kv_heads, cfg.lm.heads),
        ("lm.head_dim", cfg.lm.head_dim or cfg.lm.width // cfg.lm.heads, cfg.lm.width // cfg.lm.heads),
        ("lm.mrope_section", tuple(cfg.lm.mrope_section), ()), ("xattn.heads", x.heads or cfg.lm.heads, cfg.lm.heads),
        ("xattn.mlp_dim", x.mlp_dim or cfg.lm.mlp_dim, cfg.lm.mlp_dim), ("xattn.only_last", x.only_last, True),
        ("xattn.image_index_embed", x.image_index_embed, 0),
        ("xattn.reset_token_id (the tokenizer's EOS id)", x.reset_token_id, reset_token_id),
        ("xattn.perceiver.mlp_dim", x.perceiver.mlp_dim or 4 * v.width, 4 * v.width)) if val != ok]
    if problems:
        raise ConfigError(f"not expressible as an IDEFICS checkpoint: {'; '.join(problems)}")
    if not 0 <= x.decoupled_vocab < cfg.lm.vocab_size:
        raise ConfigError(f"xattn.decoupled_vocab {x.decoupled_vocab} must be below lm.vocab_size {cfg.lm.vocab_size}")
    p = x.perceiver
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
            "rms_norm_eps", "rope_parameters", "max_position_embeddings", "tie_word_embeddings")
    return {"model_type": "idefics", "architectures": ["IdeficsForVisionText2Text"], **{k: text[k] for k in keys},
            "vocab_size": cfg.lm.vocab_size - x.decoupled_vocab, "additional_vocab_size": x.decoupled_vocab,
            "cross_layer_interval": x.every, "qk_layer_norms": x.qk_norm, "alpha_type": x.alpha_type,
            "alpha_initializer": "zeros", "use_resampler": x.use_resampler,
            "perceiver_config": {"use_resampler": x.use_resampler, "resampler_n_latents": p.n_latents,
                                 "resampler_depth": p.depth, "resampler_n_heads": p.heads,
                                 "resampler_head_dim": p.head_dim, "qk_layer_norms_perceiver": p.qk_norm},
            "vision_config": {"embed_dim": vision["hidden_size"], "image_size": vision["image_size"],
                              "intermediate_size": vision["intermediate_size"], "patch_size": vision["patch_size"],
                              "num_hidden_layers": vision["num_hidden_layers"],
                              "num_attention_heads": vision["num_attention_heads"],
                              "num_channels": vision["num_channels"], "hidden_act": vision["hidden_act"],
                              "layer_norm_eps": vision["layer_norm_eps"]},
            "freeze_text_layers": False, "freeze_vision_layers": False, "torch_dtype": "float32"}


def idefics_processor_to_hf(processor: Processor, cfg: FlamingoConfig) -> dict:
    """The processor's settings -> preprocessor_config.json (IdeficsImageProcessor). Refused: what IdeficsProcessor
    would lay out or resize differently."""
    pcfg = processor.cfg
    # the processor's family decides its images and layout (no image processor is named any more): another
    # family's would export as IdeficsProcessor while vlmkit lays its prompts out otherwise
    if processor.family.name != cfg.family:
        raise ConfigError(f"processor family {pcfg.family!r}: IdeficsProcessor's images and prompt layout are the "
                          f"{cfg.family} family's")
    if pcfg.text_mode != "whole":
        raise ConfigError(f"processor text_mode {pcfg.text_mode!r}: IdeficsProcessor's prompt layout is text_mode "
                          f"'whole'")
    if pcfg.image_token != IMAGE_TOKEN or not pcfg.bos_token:
        raise ConfigError(f"processor image_token {pcfg.image_token!r}, bos_token {pcfg.bos_token!r}: "
                          f"IdeficsProcessor writes the literal {IMAGE_TOKEN!r} and a BOS in front of every prompt")
    if pcfg.shortest_edge or tuple(pcfg.image_size) != tuple(cfg.vision.image_size):
        raise ConfigError(f"processor image_size {tuple(pcfg.image_size)}, shortest_edge {pcfg.shortest_edge}: "
                          f"IdeficsImageProcessor resizes to the tower's {tuple(cfg.vision.image_size)} (no crop)")
    images = image_processor_to_hf(pcfg, "IdeficsImageProcessor")
    del images["do_center_crop"]
    return {**images, "image_size": pcfg.image_size[0], "image_num_channels": cfg.vision.channels}


def export_idefics(model: FlamingoModel, cfg: FlamingoConfig, processor: Processor, folder: Path) -> None:
    """A flamingo vlmkit model -> a folder that transformers' IdeficsForVisionText2Text and AutoProcessor
    (IdeficsProcessor) load, tensors named as the Hub's HuggingFaceM4/idefics-* checkpoints."""
    tok = processor.tokenizer
    config = idefics_config_to_hf(cfg, tok.eos_id)
    preprocessor = idefics_processor_to_hf(processor, cfg)
    special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id}
    config |= special  # generation stops where vlmkit's does
    tensors = export_vision_tensors(model.encoder, cfg.vision, "model.vision_model.")
    table = {k: v for k, v in idefics_key_map(cfg).items() if not k.startswith("connector.")}
    tensors |= export_table(model, table)
    if cfg.xattn.use_resampler:
        perceiver = idefics_perceiver_key_map(cfg.xattn.perceiver.depth, cfg.xattn.perceiver.qk_norm,
                                              "model.perceiver_resampler.")
        tensors |= export_table(model.connector, perceiver)
    split = cfg.lm.vocab_size - cfg.xattn.decoupled_vocab
    for base, additional in DECOUPLED:
        if base in tensors and cfg.xattn.decoupled_vocab:
            whole = tensors.pop(base)
            tensors[base], tensors[additional] = whole[:split], whole[split:]
    write_hf_weights(folder, tensors)
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation_settings(special, processor))
    write_json(folder / "processor_config.json", {"processor_class": "IdeficsProcessor",
                                                  "image_size": cfg.vision.image_size[0],
                                                  "image_processor": preprocessor})
    export_tokenizer(processor, folder)


