"""BLIP-2 (``Blip2ForConditionalGeneration``) and InstructBLIP (``InstructBlipForConditionalGeneration``) <->
vlmkit's ``blip2`` / ``instructblip`` families (:mod:`vlmkit.models.blip2`): import and export.

- The tower (``Blip2VisionModel``: EVA-CLIP-g in the released checkpoints) is vlmkit's ``ViTEncoder`` with a class
  token, pre-norm blocks and the final norm on every token (``last_hidden_state``, which the Q-Former reads). Its
  attention is one fused ``qkv`` projection whose bias is [q_bias, 0, v_bias]: split into q, k and v, the k third
  goes to the k bias, where any value is exact (it adds the same score to every key of a query).
- The Q-Former, its query tokens and ``language_projection`` are the connector (``connectors/qformer.py``);
  InstructBLIP's reads the instruction through its own tokenizer (the folder's ``qformer_tokenizer/``).
- The LM is OPT (BLIP-2) or a Llama-family LM (InstructBLIP's Vicuna); encoder-decoder LMs (Flan-T5) are
  refused by name, as is BLIP-2's retrieval Q-Former (``use_qformer_text_input``).

The processor lays prompts out as Blip2Processor / InstructBlipProcessor do (``num_query_tokens`` image tokens,
then the prompt with its BOS; :mod:`vlmkit.processing.blip2`). The export writes the tensors under the names
transformers saves and the processor files its AutoProcessor reads back.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from vlmkit.config import ConnectorConfig, QFormerConfig, VisionConfig, VLMConfig
from vlmkit.connectors.qformer import qformer_key_map
from vlmkit.convert.hf.io import export_table, load_state, read_checkpoint, read_json, write_hf_weights, write_json
from vlmkit.convert.hf.lm import is_opt, lm_config_from_hf, lm_config_to_hf, lm_key_map, untie_if_head_saved
from vlmkit.convert.hf.processor import (export_tokenizer, image_processor_from_hf, image_processor_to_hf,
                                         load_hf_processor, read_image_processor)
from vlmkit.convert.hf.processor import generation_settings
from vlmkit.convert.hf.vision import HF_VISION_ACTS, VISION_ACTS, _pair
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models import build_model
from vlmkit.models.blip2 import QueryVisionLanguageModel
from vlmkit.processing import Processor
from vlmkit.processing.blip2 import QFORMER_TOKENIZER, InstructBlipProcessorConfig

FAMILIES = {"blip-2": "blip2", "instructblip": "instructblip"}
MODEL_TYPES = {v: k for k, v in FAMILIES.items()}
CLASSES = {"blip2": "Blip2ForConditionalGeneration", "instructblip": "InstructBlipForConditionalGeneration"}
PROCESSORS = {"blip2": "Blip2Processor", "instructblip": "InstructBlipProcessor"}
VISION_TYPES = {"blip2": "blip_2_vision_model", "instructblip": "instructblip_vision_model"}
QFORMER_TYPES = {"blip2": "blip_2_qformer", "instructblip": "instructblip_qformer"}
QFORMER_FOLDER = "qformer_tokenizer"  # where InstructBlipProcessor saves its second tokenizer


def qformer_config_from_hf(cfg: dict, where: str = "config.json") -> QFormerConfig:
    """A transformers ``Blip2Config`` / ``InstructBlipConfig`` dict (the top level of config.json, holding
    ``qformer_config`` and ``num_query_tokens``) -> QFormerConfig."""
    model_type = cfg.get("model_type")
    if model_type not in ("blip-2", "instructblip"):
        raise ConfigError(f"{where}: model_type {model_type!r} is not 'blip-2' or 'instructblip'")
    q = cfg.get("qformer_config") or {}
    act = q.get("hidden_act", "gelu")
    if act != "gelu":
        raise ConfigError(f"{where}: qformer_config.hidden_act {act!r} is not implemented; supported: gelu")
    if model_type == "blip-2" and q.get("use_qformer_text_input", False):
        raise ConfigError(f"{where}: qformer_config.use_qformer_text_input (BLIP-2 retrieval heads) is not "
                          f"supported; vlmkit's Q-Former takes text only in the InstructBLIP layout")
    text = model_type == "instructblip"
    return QFormerConfig(
        width=q.get("hidden_size", 768), depth=q.get("num_hidden_layers", 12),
        heads=q.get("num_attention_heads", 12), mlp_dim=q.get("intermediate_size", 3072),
        num_query_tokens=cfg.get("num_query_tokens", 32),
        cross_attention_frequency=q.get("cross_attention_frequency", 2),
        vision_width=q.get("encoder_hidden_size", (cfg.get("vision_config") or {}).get("hidden_size", 1408)),
        layer_norm_eps=q.get("layer_norm_eps", 1e-12), vocab_size=q.get("vocab_size", 30522) if text else 0,
        max_position_embeddings=q.get("max_position_embeddings", 512))


def blip2_vision_config_from_hf(cfg: dict, where: str) -> VisionConfig:
    """A ``Blip2VisionConfig`` / ``InstructBlipVisionConfig`` dict -> VisionConfig. Absent keys take transformers'
    defaults, EVA-CLIP-g's (the released configs write almost none)."""
    kind = cfg.get("model_type", "blip_2_vision_model")
    if kind not in VISION_TYPES.values():
        raise ConfigError(f"{where}: vision_config.model_type {kind!r}; supported: {', '.join(VISION_TYPES.values())}")
    act = cfg.get("hidden_act", "gelu")
    if act not in VISION_ACTS:
        raise ConfigError(f"{where}: vision_config.hidden_act {act!r} is not implemented; supported: "
                          f"{', '.join(VISION_ACTS)}")
    if not cfg.get("qkv_bias", True):
        raise ConfigError(f"{where}: vision_config.qkv_bias: false is not implemented (vlmkit's ViT blocks have "
                          f"q and v biases whenever the output projection has one, as BLIP-2's); supported: true")
    return VisionConfig(
        arch="vit", image_size=_pair(cfg.get("image_size", 224)), patch_size=int(cfg.get("patch_size", 14)),
        channels=3, width=int(cfg.get("hidden_size", 1408)), depth=int(cfg.get("num_hidden_layers", 39)),
        heads=int(cfg.get("num_attention_heads", 16)), mlp_dim=int(cfg.get("intermediate_size", 6144)),
        act=VISION_ACTS[act], norm="layernorm", norm_eps=float(cfg.get("layer_norm_eps", 1e-6)), class_token=True,
        pos_embed="learned", pre_norm=False, post_norm=True, patch_bias=True, qkv_bias=True, feature_layer=-1,
        drop_class_token=False)


def blip2_config_from_hf(cfg: dict, where: str = "config.json") -> tuple[VLMConfig, int]:
    """A Blip2Config / InstructBlipConfig dict -> (VLMConfig, image token id)."""
    family = FAMILIES.get(cfg.get("model_type"))
    if family is None:
        raise ConfigError(f"{where}: model_type {cfg.get('model_type')!r} is not 'blip-2' or 'instructblip'")
    text = dict(cfg.get("text_config") or {})
    text.setdefault("model_type", "opt")  # both configs' default LM
    if text["model_type"] in ("t5", "mt5", "umt5"):
        raise ConfigError(f"{where}: text_config.model_type {text['model_type']!r}: encoder-decoder LMs (BLIP-2 and "
                          f"InstructBLIP with Flan-T5) are not implemented in vlmkit; supported: decoder-only LMs "
                          f"(opt, llama, ...)")
    lm = lm_config_from_hf(text, f"{where} (text_config)")
    vision = blip2_vision_config_from_hf(cfg.get("vision_config") or {}, where)
    qformer = qformer_config_from_hf(cfg, where)
    # transformers sets the Q-Former's encoder_hidden_size to the tower's width whatever the file says
    qformer = dataclasses.replace(qformer, vision_width=vision.width)
    token = cfg.get("image_token_index", cfg.get("image_token_id"))
    if token is None:
        raise ConfigError(f"{where}: missing key 'image_token_index' (configs written before the processor expanded "
                          f"the query tokens in the text); set it to the tokenizer's '<image>' id")
    return VLMConfig(family=family, vision=vision, connector=ConnectorConfig(kind="qformer", qformer=qformer),
                       lm=lm), int(token)


def _lm_prefix(cfg: VLMConfig) -> str:
    return "language_model.model.decoder." if is_opt(cfg.lm) else "language_model.model."


def blip2_vision_tensors(tensors: dict, cfg: VisionConfig, prefix: str = "vision_model.",
                   ours: str = "encoder.") -> tuple[dict, dict]:
    """(key table, tensors for load_state) of a BLIP-2 tower: the fused ``qkv`` weight and bias of each layer split
    into three tensors named ``<key> (q)``, ``(k)``, ``(v)``; the shapes of what is split are checked here."""
    e, out = f"{prefix}embeddings.", dict(tensors)
    table = {f"{ours}patch_embed.{w}": f"{e}patch_embedding.{w}" for w in ("weight", "bias")}
    table |= {f"{ours}class_token": f"{e}class_embedding", f"{ours}pos_embed": f"{e}position_embedding"}
    table |= {f"{ours}post_norm.{w}": f"{prefix}post_layernorm.{w}" for w in ("weight", "bias")}
    for i in range(cfg.depth):
        mine, theirs = f"{ours}blocks.{i}.", f"{prefix}encoder.layers.{i}."
        for w in ("weight", "bias"):
            table[f"{mine}norm1.{w}"] = f"{theirs}layer_norm1.{w}"
            table[f"{mine}norm2.{w}"] = f"{theirs}layer_norm2.{w}"
            table[f"{mine}attn.o_proj.{w}"] = f"{theirs}self_attn.projection.{w}"
            table |= {f"{mine}mlp.{fc}.{w}": f"{theirs}mlp.{fc}.{w}" for fc in ("fc1", "fc2")}
            fused = f"{theirs}self_attn.qkv.{w}"
            if fused in out:
                t = out.pop(fused)
                if t.shape[0] != 3 * cfg.width:
                    raise CheckpointError(f"{fused} has shape {tuple(t.shape)}, the config implies "
                                          f"({3 * cfg.width}, ...) (q, k and v of width {cfg.width})")
                out |= {f"{fused} ({p})": part for p, part in zip("qkv", t.chunk(3))}
            table |= {f"{mine}attn.{p}_proj.{w}": f"{fused} ({p})" for p in "qkv"}
    return table, out


def _load(folder: str | Path) -> tuple[QueryVisionLanguageModel, VLMConfig]:
    ckpt = read_checkpoint(folder)
    cfg, image_token = blip2_config_from_hf(ckpt.config, str(ckpt.folder / "config.json"))
    t = {k: v for k, v in ckpt.tensors.items() if not k.endswith("position_ids")}  # buffers some versions saved
    head = "language_model.lm_head.weight"
    cfg = untie_if_head_saved(cfg, t, head, f"{_lm_prefix(cfg)}embed_tokens.weight")
    model = build_model(cfg, image_token, init=False)
    table, tensors = blip2_vision_tensors(t, cfg.vision)
    table |= qformer_key_map(model.connector.cfg, prefix="connector.")
    table |= {f"lm.{k}": v for k, v in lm_key_map(cfg.lm, _lm_prefix(cfg), head).items()}
    ignore = (head,) if cfg.lm.tie_embeddings else ()  # a tied checkpoint may still carry a copy
    load_state(model, tensors, table, str(ckpt.folder), ignore)
    if cfg.lm.tie_embeddings:
        model.lm.lm_head.weight = model.lm.embed_tokens.weight
    return model.eval(), cfg


def load_hf_blip2(folder: str | Path) -> QueryVisionLanguageModel:
    """A transformers Blip2ForConditionalGeneration or InstructBlipForConditionalGeneration folder -> model."""
    return _load(folder)[0]


def _qformer_tokenizer(folder: Path, vocab_size: int):
    """(InstructBLIP's Q-Former tokenizer, its pad token) from ``qformer_tokenizer/``."""
    from tokenizers import Tokenizer

    sub = folder / QFORMER_FOLDER
    path = sub / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: InstructBLIP's Q-Former reads the instruction through its own tokenizer, "
                              f"but {QFORMER_FOLDER}/tokenizer.json is missing")
    tok = Tokenizer.from_file(str(path))
    if tok.get_vocab_size() > vocab_size:
        raise CheckpointError(f"{path}: {tok.get_vocab_size()} tokens, more than the Q-Former's "
                              f"qformer_config.vocab_size {vocab_size} in config.json")
    special = read_json(sub / "special_tokens_map.json") | read_json(sub / "tokenizer_config.json")
    pad = special.get("pad_token", "[PAD]")
    return tok, pad.get("content") if isinstance(pad, dict) else pad


def load_blip2_folder(folder: Path):
    """(model, config, processor) of a BLIP-2 / InstructBLIP folder; the processor gives Blip2Processor's and
    InstructBlipProcessor's input_ids (and qformer_input_ids)."""
    model, cfg = _load(folder)
    settings, path = read_image_processor(folder)
    proc_path = folder / "processor_config.json"
    n_query = read_json(proc_path).get("num_query_tokens", settings.get("num_query_tokens"))
    if n_query is None:
        raise ConfigError(f"{proc_path}: no num_query_tokens: {PROCESSORS[cfg.family]} then writes no image tokens "
                          f"(a layout transformers 5 no longer runs); set it to config.json's num_query_tokens "
                          f"{model.image_seq_len}")
    if int(n_query) != model.image_seq_len:
        raise ConfigError(f"{proc_path}: num_query_tokens {n_query} does not match config.json's num_query_tokens "
                          f"{model.image_seq_len} (the Q-Former's queries per image)")
    images = image_processor_from_hf(settings, str(path))
    if cfg.family != "instructblip":
        processor = load_hf_processor(folder, "blip2", model.image_token_id, model.image_seq_len, cfg.lm.max_seq_len,
                                      fixed_images=False, **images)
        return model, cfg, processor
    q = cfg.connector.qformer
    qtok, pad = _qformer_tokenizer(folder, q.vocab_size)
    processor = load_hf_processor(folder, "instructblip", model.image_token_id, model.image_seq_len,
                                  cfg.lm.max_seq_len, InstructBlipProcessorConfig, fixed_images=False,
                                  files={QFORMER_TOKENIZER: qtok}, qformer_max_length=q.max_position_embeddings,
                                  qformer_pad_token=pad, **images)
    return model, cfg, processor


# ---------------------------------------------------------------------------------------------- export


def blip2_vision_config_to_hf(cfg: VisionConfig, family: str, where: str = "vision") -> dict:
    """A VisionConfig that is a BLIP-2 tower -> its transformers config; anything else is refused by field."""
    problems = [f"{k} {v!r} (BLIP-2 has {ok!r})" for k, v, ok in (
        ("arch", cfg.arch, "vit"), ("stem", cfg.stem, "patch"), ("pos_embed", cfg.pos_embed, "learned"),
        ("norm", cfg.norm, "layernorm"), ("class_token", cfg.class_token, True), ("pre_norm", cfg.pre_norm, False),
        ("post_norm", cfg.post_norm, True), ("patch_bias", cfg.patch_bias, True), ("qkv_bias", cfg.qkv_bias, True),
        ("feature_layer", cfg.feature_layer if cfg.feature_layer != cfg.depth else -1, -1),
        ("drop_class_token", cfg.drop_class_token, False), ("channels", cfg.channels, 3),
        ("pos_scale", cfg.pos_scale, 1.0)) if v != ok]
    if cfg.image_size[0] != cfg.image_size[1]:
        problems.append(f"image_size {tuple(cfg.image_size)} (BLIP-2's tower is square)")
    if cfg.act not in HF_VISION_ACTS:
        problems.append(f"act {cfg.act!r} (exportable: {', '.join(HF_VISION_ACTS)})")
    if problems:
        raise ConfigError(f"{where}: not a BLIP-2 tower transformers can load: {'; '.join(problems)}")
    return {"model_type": VISION_TYPES[family], "hidden_size": cfg.width, "intermediate_size": cfg.mlp_dim,
            "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads, "image_size": cfg.image_size[0],
            "patch_size": cfg.patch_size, "hidden_act": HF_VISION_ACTS[cfg.act], "layer_norm_eps": cfg.norm_eps,
            "qkv_bias": True}


def blip2_config_to_hf(cfg: VLMConfig, image_token_id: int) -> dict:
    """VLMConfig -> Blip2Config's / InstructBlipConfig's config.json."""
    if cfg.family not in MODEL_TYPES:
        raise ConfigError(f"family {cfg.family!r} is not blip2 or instructblip")
    if cfg.connector.kind != "qformer":
        raise ConfigError(f"connector.kind {cfg.connector.kind!r}: BLIP-2's connector is the Q-Former (qformer)")
    vision = blip2_vision_config_to_hf(cfg.vision, cfg.family)
    q = cfg.connector.qformer
    qformer = {"model_type": QFORMER_TYPES[cfg.family], "hidden_size": q.width, "num_hidden_layers": q.depth,
               "num_attention_heads": q.heads, "intermediate_size": q.mlp_dim, "hidden_act": "gelu",
               "layer_norm_eps": q.layer_norm_eps, "cross_attention_frequency": q.cross_attention_frequency,
               "encoder_hidden_size": cfg.vision.width, "max_position_embeddings": q.max_position_embeddings}
    qformer |= {"vocab_size": q.vocab_size} if cfg.family == "instructblip" else {"use_qformer_text_input": False}
    return {"model_type": MODEL_TYPES[cfg.family], "architectures": [CLASSES[cfg.family]], "vision_config": vision,
            "qformer_config": qformer, "text_config": lm_config_to_hf(cfg.lm, "lm"),
            "num_query_tokens": q.num_query_tokens, "image_token_index": image_token_id, "torch_dtype": "float32"}


def blip2_processor_to_hf(processor: Processor, family: str, num_query_tokens: int) -> dict:
    """The processor's settings -> processor_config.json (BlipImageProcessor nested, num_query_tokens). Refused:
    what Blip2Processor / InstructBlipProcessor would lay out or resize differently."""
    pcfg = processor.cfg
    if pcfg.text_mode != "whole":
        raise ConfigError(f"processor text_mode {pcfg.text_mode!r}: {PROCESSORS[family]}'s layout is text_mode "
                          f"'whole'")
    if pcfg.image_token != "<image>":
        raise ConfigError(f"processor image_token {pcfg.image_token!r}: {PROCESSORS[family]} writes the query tokens "
                          f"as the literal '<image>'")
    if pcfg.shortest_edge:
        raise ConfigError(f"processor shortest_edge {pcfg.shortest_edge}: BlipImageProcessor resizes straight to "
                          f"height x width (no centre crop); set shortest_edge: 0")
    if (family == "instructblip") != (QFORMER_TOKENIZER in processor.files):
        raise ConfigError(f"processor qformer_max_length {getattr(pcfg, 'qformer_max_length', 0)}: InstructBLIP's "
                          f"processor has a "
                          f"Q-Former tokenizer (> 0), BLIP-2's none (0)")
    images = image_processor_to_hf(pcfg, "BlipImageProcessor")
    del images["do_center_crop"]
    return {"image_processor": images, "num_query_tokens": num_query_tokens, "processor_class": PROCESSORS[family]}


def export_qformer_tokenizer(processor: Processor, folder: Path) -> None:
    """InstructBLIP's Q-Former tokenizer in ``qformer_tokenizer/``, where InstructBlipProcessor reads it."""
    sub = folder / QFORMER_FOLDER
    sub.mkdir()
    (sub / "tokenizer.json").write_text(processor.files[QFORMER_TOKENIZER].to_str())
    pad = processor.cfg.qformer_pad_token or processor.tokenizer.pad_token
    write_json(sub / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": pad,
                                               "model_max_length": processor.cfg.qformer_max_length,
                                               "clean_up_tokenization_spaces": False})


def export_tensors(model: QueryVisionLanguageModel, cfg: VLMConfig) -> dict[str, torch.Tensor]:
    """Tower (fused qkv), Q-Former and LM under the names transformers saves."""
    table, _ = blip2_vision_tensors({}, cfg.vision)
    params = dict(model.named_parameters(remove_duplicate=False))
    out = {theirs: params[ours] for ours, theirs in table.items() if not theirs.endswith(("(q)", "(k)", "(v)"))}
    for i in range(cfg.vision.depth):
        attn = model.encoder.blocks[i].attn
        for w in ("weight", "bias"):
            parts = [getattr(getattr(attn, f"{p}_proj"), w) for p in "qkv"]
            out[f"vision_model.encoder.layers.{i}.self_attn.qkv.{w}"] = torch.cat(parts)
    q = model.connector.cfg
    # BLIP-2's LM reads the queries alone: text embeddings a from-scratch Q-Former has for its stage-1 objectives
    # (and its stage-1 heads) are not part of Blip2ForConditionalGeneration
    out |= export_table(model.connector, qformer_key_map(q if cfg.family == "instructblip" else
                                                         dataclasses.replace(q, vocab_size=0, embed_dim=0,
                                                                             init_from="")))
    head = "language_model.lm_head.weight"
    out |= export_table(model.lm, lm_key_map(cfg.lm, _lm_prefix(cfg), head))
    return out


def export_blip2(model: QueryVisionLanguageModel, cfg: VLMConfig, processor: Processor, folder: Path) -> None:
    """A blip2 / instructblip vlmkit model -> a folder that transformers' Blip2ForConditionalGeneration /
    InstructBlipForConditionalGeneration and AutoProcessor load."""
    config = blip2_config_to_hf(cfg, model.image_token_id)
    proc = blip2_processor_to_hf(processor, cfg.family, model.image_seq_len)
    tok = processor.tokenizer
    special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id}
    config["text_config"] |= special  # generation stops where vlmkit's does
    write_hf_weights(folder, export_tensors(model, cfg))
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation_settings(special, processor))
    write_json(folder / "processor_config.json", proc)
    export_tokenizer(processor, folder)
    if QFORMER_TOKENIZER in processor.files:
        export_qformer_tokenizer(processor, folder)

