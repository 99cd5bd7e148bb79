"""Janus / Janus-Pro (``JanusForConditionalGeneration``, model_type "janus") <-> vlmkit's ``JanusModel``.

What transformers' Janus computes, in vlmkit's parts:

- the tower (``JanusVisionModel``) is SigLIP's shape: no class token, learned positions, pre-norm blocks, the
  final norm on the last layer's features (``last_hidden_state``, which the aligner reads); its attention output
  is named ``projection_layer`` and its MLP is ``hidden_size * mlp_ratio`` wide -> ``ViTEncoder`` with SigLIP's
  flags and the key map renamed; ``use_qk_norm`` and attention without bias are refused by name;
- the understanding aligner (``JanusVisionAlignerMLP``: fc1, then (activation, Linear) per further layer) of
  depth 2 is the mlp connector (``fc1``, activation, ``fc2`` = ``hidden_layers.0``);
- the LM is a Llama (convert/hf/lm.py); the VQ is ``JanusVQVAE`` (convert/hf/vq.py);
- ``generation_embeddings`` / ``generation_aligner`` / ``generation_head`` keep transformers' names in vlmkit.

The processor is JanusProcessor's (processing/janus.py: ``JanusImageTransform``, ``JanusLayout``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from vlmkit.config import ConnectorConfig, VisionConfig
from vlmkit.convert.hf.io import export_table, load_state, read_checkpoint, read_json, write_hf_weights, write_json
from vlmkit.convert.hf.lm import lm_config_from_hf, lm_config_to_hf, lm_key_map
from vlmkit.convert.hf.processor import export_tokenizer, generation_settings, image_processor_from_hf
from vlmkit.convert.hf.processor import load_hf_processor, read_image_processor
from vlmkit.convert.hf.vision import HF_VISION_ACTS, VISION_ACTS, export_vision_tensors, vision_tensors
from vlmkit.convert.hf.vq import vq_config_from_hf, vq_key_map
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.janus import JanusConfig, JanusGenConfig, JanusModel, build_janus
from vlmkit.processing import Processor
from vlmkit.processing.janus import JanusProcessorConfig

GEN_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "quick_gelu": "quick_gelu"}
TOWER = "model.vision_model."


def janus_vision_from_hf(v: dict, where: str) -> VisionConfig:
    """A JanusVisionConfig -> the ViTEncoder flags that compute it (module docstring)."""
    if v.get("use_qk_norm"):
        raise ConfigError(f"{where}: use_qk_norm true is not implemented (no released Janus uses it)")
    if not v.get("attention_bias", True):
        raise ConfigError(f"{where}: attention_bias false (q/k/v without bias, the output projection with one) is "
                          f"not implemented; vlmkit's tower gives both or neither")
    act = v.get("hidden_act", "gelu")
    if act not in VISION_ACTS:
        raise ConfigError(f"{where}: hidden_act {act!r} is not implemented; supported: {', '.join(VISION_ACTS)}")
    size, patch = v.get("image_size", 384), v.get("patch_size", 16)
    if not isinstance(size, int) or not isinstance(patch, int):
        raise ConfigError(f"{where}: image_size {size!r} / patch_size {patch!r}: square sizes (integers) only")
    width = int(v.get("hidden_size", 1024))
    return VisionConfig(
        arch="vit", image_size=(size, size), patch_size=patch, channels=int(v.get("num_channels", 3)), width=width,
        depth=int(v.get("num_hidden_layers", 24)), heads=int(v.get("num_attention_heads", 16)),
        mlp_dim=int(width * float(v.get("mlp_ratio", 4.0))), act=VISION_ACTS[act], norm="layernorm",
        norm_eps=float(v.get("layer_norm_eps", 1e-6)), class_token=False, pos_embed="learned", pre_norm=False,
        post_norm=True, patch_bias=True, qkv_bias=True, feature_layer=-1, drop_class_token=False)


def _check_widths(v: dict, q: dict, width: int, where: str) -> None:
    """The aligners write the LM's width and the generation head reads it."""
    for key, value in (("vision_config.projection_dim", v.get("projection_dim", 2048)),
                       ("vq_config.projection_dim", q.get("projection_dim", 2048)),
                       ("vq_config.image_token_embed_dim", q.get("image_token_embed_dim", 2048))):
        if int(value) != width:
            raise ConfigError(f"{where}: {key} {value} must equal text_config.hidden_size {width} (the aligners "
                              f"write the LM's width, the generation head reads it)")
    if int(v.get("depth", 2)) != 2:
        raise ConfigError(f"{where}: vision_config.depth {v.get('depth')}: the understanding aligner is imported "
                          f"as the 2-layer mlp connector; depth 2 only (Janus' and Janus-Pro's)")


def janus_config_from_hf(cfg: dict, where: str = "config.json") -> tuple[JanusConfig, int]:
    """A JanusConfig's config.json -> (vlmkit JanusConfig, image token id)."""
    if cfg.get("model_type") != "janus":
        raise ConfigError(f"{where}: model_type {cfg.get('model_type')!r} is not 'janus'")
    v, q = cfg.get("vision_config") or {}, cfg.get("vq_config") or {}
    text = dict(cfg.get("text_config") or {"model_type": "llama"})
    text["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", True))  # JanusForConditionalGeneration's
    lm = lm_config_from_hf(text, f"{where} (text_config)")
    _check_widths(v, q, lm.width, where)
    vision = janus_vision_from_hf(v, f"{where} (vision_config)")
    grid = vision.image_size[0] // vision.patch_size
    if int(q.get("num_patches", grid)) != grid:
        raise ConfigError(f"{where}: vq_config.num_patches {q.get('num_patches')} is not the tower's patch grid "
                          f"{grid} (JanusConfig sets it from vision_config)")
    vq = vq_config_from_hf({**q, "num_patches": grid}, "janus_vqgan", f"{where} vq_config")
    act = q.get("hidden_act", "gelu")
    if act not in GEN_ACTS or v.get("hidden_act", "gelu") not in GEN_ACTS:
        raise ConfigError(f"{where}: hidden_act {act!r} of the aligners; supported: {', '.join(GEN_ACTS)}")
    gen = JanusGenConfig(vq=vq, embed_dim=int(q.get("embed_dim", 8)), aligner_depth=int(q.get("num_hidden_layers", 2)),
                         projection_dim=lm.width, act=GEN_ACTS[act])
    connector = ConnectorConfig(kind="mlp", act=GEN_ACTS[v.get("hidden_act", "gelu")], bias=True)
    token = cfg.get("image_token_id", cfg.get("image_token_index"))
    if token is None:
        raise ConfigError(f"{where}: missing key 'image_token_id'")
    return JanusConfig(family="janus", vision=vision, connector=connector, lm=lm, gen=gen), int(token)


def janus_key_map(model: JanusModel, cfg: JanusConfig) -> dict[str, str]:
    """vlmkit JanusModel parameter name -> transformers tensor name, the tower's excepted (:func:`_tower`)."""
    table = {f"lm.{k}": v for k, v in lm_key_map(cfg.lm, "model.language_model.", "lm_head.weight").items()}
    table |= {f"vqmodel.{k}": v for k, v in vq_key_map(model.vqmodel, cfg.gen.vq, "model.vqmodel.").items()}
    for ours, theirs in (("fc1", "fc1"), ("fc2", "hidden_layers.0")):
        for w in ("weight", "bias"):
            table[f"connector.{ours}.{w}"] = f"model.aligner.{theirs}.{w}"
    for name, _ in model.named_parameters():
        if name.startswith(("generation_embeddings.", "generation_aligner.", "generation_head.")):
            table[name] = f"model.{name}"
    return table


def _tower(tensors: dict, cfg: VisionConfig) -> tuple[dict, dict]:
    """(the tower's key table under ``encoder.``, the tensors reshaped for it): SigLIP's, with Janus' name of the
    attention output."""
    table, tensors = vision_tensors(tensors, cfg, TOWER, "encoder.")
    return {k: v.replace(".self_attn.out_proj.", ".self_attn.projection_layer.") for k, v in table.items()}, tensors


def load_janus(folder: str | Path) -> tuple[JanusModel, JanusConfig]:
    ckpt = read_checkpoint(folder)
    where = str(ckpt.folder / "config.json")
    cfg, image_token = janus_config_from_hf(ckpt.config, where)
    head, embed = ckpt.tensors.get("lm_head.weight"), ckpt.tensors.get("model.language_model.embed_tokens.weight")
    if cfg.lm.tie_embeddings and head is not None and embed is not None and not torch.equal(head, embed):
        # transformers 5 ties only a head the checkpoint does not hold apart (JanusConfig ties by default, so a
        # folder that never says tie_word_embeddings may still carry its own head, which transformers then uses)
        cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, tie_embeddings=False))
    model = build_janus(cfg, image_token, init=False)
    table, tensors = _tower(ckpt.tensors, cfg.vision)
    table |= janus_key_map(model, cfg)
    ignore = ("lm_head.weight",) if cfg.lm.tie_embeddings else ()  # lm_key_map has no head when it is tied
    load_state(model, tensors, table, str(ckpt.folder), ignore)
    if cfg.lm.tie_embeddings:
        model.lm.lm_head.weight = model.lm.embed_tokens.weight
    return model.eval(), cfg


def _processor_settings(folder: Path, image_seq_len: int) -> dict:
    """JanusImageProcessor's and JanusProcessor's settings as JanusProcessorConfig fields."""
    images, path = read_image_processor(folder)
    if not images.get("do_pad", True):
        raise ConfigError(f"{path}: do_pad false is not implemented (JanusImageProcessor pads to a square)")
    size = images.get("size") or {}
    if "height" not in size or size.get("height") != size.get("width"):
        raise ConfigError(f"{path}: size {size!r}: JanusImageProcessor needs equal height and width")
    settings = image_processor_from_hf(images, str(path))
    mean = images.get("image_mean")
    background = images.get("background_color") or (
        [int(x * 255) for x in mean] if mean is not None else [127, 127, 127])
    proc_path = folder / "processor_config.json"
    proc = read_json(proc_path)
    if proc.get("use_default_system_prompt"):
        raise ConfigError(f"{proc_path}: use_default_system_prompt true is not implemented; put the system prompt "
                          f"in the text")
    n = int(proc.get("num_image_tokens", image_seq_len))
    if n != image_seq_len:
        raise ConfigError(f"{proc_path}: num_image_tokens {n} is not the tower's {image_seq_len} patches")
    tokens = _special_tokens(folder)
    return {**settings, **tokens, "pad_square": True, "min_size": int(images.get("min_size", 14)),
            "background": tuple(int(c) for c in background)}


def _special_tokens(folder: Path) -> dict:
    """boi_token / eoi_token of the tokenizer (JanusProcessor reads ``tokenizer.boi_token`` / ``eoi_token``)."""
    data = read_json(folder / "tokenizer_config.json")
    extra = data.get("extra_special_tokens") or {}
    extra = extra if isinstance(extra, dict) else {}
    out = {}
    for name in ("boi_token", "eoi_token"):
        value = data.get(name, extra.get(name))
        value = value.get("content") if isinstance(value, dict) else value
        if value:
            out[name] = value
    return out


def load_janus_folder(folder: Path):
    """(model, config, processor) of a Janus folder; the processor gives JanusProcessor's input_ids."""
    folder = Path(folder)
    model, cfg = load_janus(folder)
    settings = _processor_settings(folder, model.image_seq_len)
    processor = load_hf_processor(folder, "janus", model.image_token_id, model.image_seq_len, cfg.lm.max_seq_len,
                                  config=JanusProcessorConfig, fixed_images=False, **settings)
    for token in (processor.cfg.boi_token, processor.cfg.eoi_token):
        if processor.tokenizer.tok.token_to_id(token) is None:
            raise CheckpointError(f"{folder}: Janus' {token!r} is not in tokenizer.json's vocabulary")
    return model, cfg, processor


# ---------------------------------------------------------------------------------------------- export


def janus_config_to_hf(cfg: JanusConfig, image_token_id: int) -> dict:
    """JanusConfig -> JanusConfig's config.json (refusing what transformers' Janus does not compute)."""
    v, q, g = cfg.vision, cfg.gen.vq, cfg.gen
    flags = {"arch": "vit", "pos_embed": "learned", "norm": "layernorm", "class_token": False, "pre_norm": False,
             "post_norm": True, "patch_bias": True, "qkv_bias": True, "stem": "patch"}
    problems = [f"vision.{k} {getattr(v, k)!r} (Janus: {ok!r})" for k, ok in flags.items() if getattr(v, k) != ok]
    if v.feature_layer not in (-1, v.depth) or v.image_size[0] != v.image_size[1]:
        problems.append("vision.feature_layer must be the last layer and images square")
    if cfg.connector.kind != "mlp" or not cfg.connector.bias:
        problems.append(f"connector {cfg.connector.kind!r} (Janus: the mlp connector with bias)")
    if v.act not in HF_VISION_ACTS or cfg.connector.act != v.act or g.act not in GEN_ACTS.values():
        problems.append(f"activations vision {v.act!r}, connector {cfg.connector.act!r}, gen {g.act!r} (Janus: the "
                        f"connector's is the tower's)")
    if (g.projection_dim or cfg.lm.width) != cfg.lm.width or not q.decode_l2_norm or not q.mid_attn:
        problems.append("gen.projection_dim must be the LM's width and the VQ Janus' (mid_attn, decode_l2_norm)")
    if g.pos_embed != "none" or q.encoder != "conv":
        problems.append(f"gen.pos_embed {g.pos_embed!r} / gen.vq.encoder {q.encoder!r} (Janus: 'none', 'conv')")
    if problems:
        raise ConfigError(f"not expressible as a transformers Janus checkpoint: {'; '.join(problems)}")
    acts = {b: a for a, b in GEN_ACTS.items()}
    vision = {"model_type": "janus_vision_model", "hidden_size": v.width, "num_hidden_layers": v.depth,
              "num_attention_heads": v.heads, "num_channels": v.channels, "image_size": v.image_size[0],
              "patch_size": v.patch_size, "hidden_act": HF_VISION_ACTS[v.act], "layer_norm_eps": v.norm_eps,
              "mlp_ratio": v.mlp_dim / v.width, "projection_dim": cfg.lm.width, "depth": 2,
              "num_image_tokens": v.num_patches}
    vq = {"model_type": "janus_vqgan", "embed_dim": g.embed_dim or q.code_dim, "num_embeddings": q.codebook_size,
          "latent_channels": q.z_channels, "base_channels": q.channels, "channel_multiplier": list(q.channel_mult),
          "num_res_blocks": q.res_blocks, "num_patches": v.image_size[0] // v.patch_size,
          "projection_dim": cfg.lm.width, "num_hidden_layers": g.aligner_depth, "hidden_act": acts[g.act],
          "image_token_embed_dim": cfg.lm.width}
    return {"model_type": "janus", "architectures": ["JanusForConditionalGeneration"], "vision_config": vision,
            "text_config": lm_config_to_hf(cfg.lm, "lm"), "vq_config": vq, "image_token_id": image_token_id,
            "tie_word_embeddings": cfg.lm.tie_embeddings, "torch_dtype": "float32"}


def export_janus(model: JanusModel, cfg: JanusConfig, processor: Processor, folder: Path) -> None:
    """A Janus vlmkit model -> a folder that JanusForConditionalGeneration and AutoProcessor (JanusProcessor) load
    with the same numbers."""
    pcfg, tok = processor.cfg, processor.tokenizer
    if not isinstance(pcfg, JanusProcessorConfig) or not pcfg.pad_square:
        raise ConfigError("processor: a Janus folder needs JanusProcessor's settings (pad_square: true, boi_token, "
                          "eoi_token); this model's processor resizes images as vlmkit's own models do")
    config = janus_config_to_hf(cfg, model.image_token_id)
    special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id}
    config["text_config"] |= special
    tensors = export_vision_tensors(model.encoder, cfg.vision, TOWER)
    tensors = {k.replace(".self_attn.out_proj.", ".self_attn.projection_layer."): t for k, t in tensors.items()}
    tensors |= export_table(model, janus_key_map(model, cfg))
    write_hf_weights(folder, tensors)
    write_json(folder / "config.json", config)
    boi = tok.token_id(pcfg.boi_token)
    write_json(folder / "generation_config.json",
               generation_settings(special, processor) | {"generation_kwargs": {"boi_token_id": boi}})
    h, _ = pcfg.image_size
    images = {"image_processor_type": "JanusImageProcessor", "do_resize": True, "size": {"height": h, "width": h},
              "min_size": pcfg.min_size, "resample": {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}[
                  pcfg.resample], "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": list(pcfg.mean), "image_std": list(pcfg.std), "do_pad": True,
              "background_color": list(pcfg.background)}
    write_json(folder / "processor_config.json", {
        "processor_class": "JanusProcessor", "image_processor": images, "num_image_tokens": model.image_seq_len,
        "use_default_system_prompt": False})
    export_tokenizer(processor, folder)
    path = folder / "tokenizer_config.json"
    names = {"boi_token": pcfg.boi_token, "eoi_token": pcfg.eoi_token, "image_token": pcfg.image_token}
    data = read_json(path)
    write_json(path, data | {"extra_special_tokens": {**(data.get("extra_special_tokens") or {}), **names}})


__all__ = ["export_janus", "janus_config_from_hf", "janus_config_to_hf", "janus_key_map", "load_janus",
           "load_janus_folder"]
