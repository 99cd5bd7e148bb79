"""Chameleon (``ChameleonForConditionalGeneration``) <-> vlmkit's Chameleon model (models/chameleon.py).

- config.json: the LM's keys at the top level (read as a Llama config, plus ``qk_norm_kind: head_layernorm`` and
  ``swin_norm``), ``vq_config`` (convert/hf/vq.py, encoder only) and ``vocabulary_map`` (the tokenizer's vocabulary:
  the ``IMGIMG...`` tokens give each code its token id, ``<image>`` is the image placeholder);
- tensors: ``model.embed_tokens``, ``model.layers.*`` (``self_attn.q_norm`` / ``k_norm`` with weight and bias of
  shape [heads, head_dim]), ``model.norm``, ``lm_head``, ``model.vqmodel.*`` (taming names);
- processor: ChameleonImageProcessor's settings (shortest edge, crop, LANCZOS, rescale 0.0078, mean = std = 1),
  ChameleonProcessor's ``image_seq_length`` (must be the VQ grid's codes) and the tokenizer's ``sep_token``.

Export writes the same layout, the tokenizer's whole vocabulary as ``vocabulary_map`` (as the released folders); a
VQ decoder trained in vlmkit has no place in it and is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from vlmkit.convert.hf.io import export_table, load_state, read_checkpoint, read_json, write_hf_weights, write_json
from vlmkit.convert.hf.lm import lm_config_from_hf, lm_config_to_hf, lm_key_map
from vlmkit.convert.hf.processor import (PIL_CODES, export_tokenizer, generation_settings, image_processor_from_hf,
                                         load_hf_processor, read_image_processor)
from vlmkit.convert.hf.vq import vq_config_from_hf, vq_key_map
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.chameleon import IMAGE_END, IMAGE_START, IMAGE_TOKEN, ChameleonConfig, ChameleonModel, build_chameleon
from vlmkit.processing import Processor
from vlmkit.processing.chameleon import ChameleonProcessorConfig

LETTERS = {chr(ord("A") + i): str(i) for i in range(10)}  # the code's digits as the IMGIMG token names write them


def code_token_ids(vocabulary_map: dict, codebook_size: int, where: str) -> list[int]:
    """``IMGIMG<digits as A-J><one more character>`` token -> id, as code -> token id (ChameleonImageVocabularyMapping's
    img2bpe); every code of the codebook needs one."""
    ids: dict[int, int] = {}
    for name, token_id in vocabulary_map.items():
        if name.startswith("IMGIMG"):
            digits = "".join(LETTERS.get(c, c) for c in name[len("IMGIMG"):-1])
            if digits.isdigit():
                ids[int(digits)] = int(token_id)
    missing = [c for c in range(codebook_size) if c not in ids]
    if missing:
        raise ConfigError(f"{where}: vocabulary_map has no IMGIMG token for codes {missing[:5]} (of the VQ codebook's "
                          f"{codebook_size}); each code is read and written as its token")
    return [ids[c] for c in range(codebook_size)]


def code_token_name(code: int) -> str:
    """The vocabulary's name of code ``code``'s token: IMGIMG, its digits as letters A-J, then Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def image_vocabulary(code_ids: list[int] | tuple[int, ...], image_token_id: int) -> dict[str, int]:
    """The part of a vocabulary_map transformers reads: each code's token and ``<image>``."""
    return {code_token_name(c): int(i) for c, i in enumerate(code_ids)} | {IMAGE_TOKEN: int(image_token_id)}


def chameleon_config_from_hf(cfg: dict, where: str = "config.json",
                             image_size: int | None = None) -> tuple[ChameleonConfig, int]:
    """ChameleonConfig's dict -> (ChameleonConfig, the ``<image>`` token id); ``image_size``: the processor's crop."""
    if cfg.get("model_type") != "chameleon":
        raise ConfigError(f"{where}: model_type {cfg.get('model_type')!r} is not 'chameleon'")
    if cfg.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias: true is not implemented for chameleon (vlmkit's decoder has "
                          f"no o_proj bias without MLP biases)")
    vocab = cfg.get("vocabulary_map")
    if not isinstance(vocab, dict) or IMAGE_TOKEN not in vocab:
        raise ConfigError(f"{where}: vocabulary_map (the tokenizer's vocabulary, with {IMAGE_TOKEN!r} and the IMGIMG "
                          f"code tokens) is missing")
    lm = lm_config_from_hf({k: v for k, v in cfg.items() if k not in ("vq_config", "vocabulary_map")} |
                           {"model_type": "llama"}, where)
    lm = dataclasses.replace(lm, qk_norm=True, qk_norm_kind="head_layernorm", swin_norm=bool(cfg.get("swin_norm")))
    vq = vq_config_from_hf(cfg.get("vq_config") or {}, "chameleon_vqgan", f"{where} vq_config", image_size)
    codes = code_token_ids(vocab, vq.codebook_size, where)
    return ChameleonConfig(lm=lm, vq=vq, code_token_ids=tuple(codes)), int(vocab[IMAGE_TOKEN])


def chameleon_image_settings(settings: dict, where: str) -> dict:
    """ChameleonImageProcessor's settings -> ChameleonProcessorConfig fields (its rescale factor is its own)."""
    rescale = float(settings.get("rescale_factor", 0.0078)) if settings.get("do_rescale", True) else 1.0
    fields = image_processor_from_hf({**settings, "rescale_factor": 1 / 255, "do_rescale": True,
                                      "resample": settings.get("resample", 1)}, where)
    return fields | {"rescale_factor": rescale}


def _load_model(folder: Path, image_size: int) -> tuple[ChameleonModel, ChameleonConfig, int]:
    ckpt = read_checkpoint(folder)
    cfg, image_token_id = chameleon_config_from_hf(ckpt.config, str(ckpt.folder / "config.json"), image_size)
    model = build_chameleon(cfg, image_token_id, init=False)
    table = {f"lm.{k}": v for k, v in lm_key_map(cfg.lm, "model.", "lm_head.weight").items()}
    table |= {f"vq.{k}": v for k, v in vq_key_map(model.vq, cfg.vq, "model.vqmodel.").items()}
    load_state(model, ckpt.tensors, table, str(ckpt.folder), ("lm_head.weight",) if cfg.lm.tie_embeddings else ())
    if cfg.lm.tie_embeddings:
        model.lm.lm_head.weight = model.lm.embed_tokens.weight
    return model.eval(), cfg, image_token_id


def load_chameleon_folder(folder: Path):
    """(model, config, processor) of a Chameleon folder (module docstring)."""
    folder = Path(folder)
    settings, path = read_image_processor(folder)
    fields = chameleon_image_settings(settings, str(path))
    if fields["image_size"][0] != fields["image_size"][1]:
        raise ConfigError(f"{path}: crop_size {fields['image_size']}: Chameleon's VQ reads square images")
    model, cfg, image_token_id = _load_model(folder, fields["image_size"][0])
    h, w = cfg.vq.grid
    proc_cfg = read_json(folder / "processor_config.json")
    seq = int(proc_cfg.get("image_seq_length", h * w))
    if seq != h * w:
        raise ConfigError(f"{folder / 'processor_config.json'}: image_seq_length {seq}, but the VQ encoder gives "
                          f"{h}x{w} = {h * w} codes per {fields['image_size'][0]}-px image")
    tok_cfg = read_json(folder / "tokenizer_config.json")
    tokens = {"image_start": tok_cfg.get("boi_token", IMAGE_START), "image_end": tok_cfg.get("eoi_token", IMAGE_END),
              "sep_token": tok_cfg.get("sep_token") or "<reserved08706>"}
    processor = load_hf_processor(folder, "chameleon", image_token_id, h * w, cfg.lm.max_seq_len,
                                  config=ChameleonProcessorConfig, fixed_images=False, **fields, **tokens)
    for name, token in tokens.items():
        if processor.tokenizer.tok.token_to_id(token) is None:
            raise CheckpointError(f"{folder}: ChameleonProcessor writes {token!r} ({name}), which is not a token of "
                                  f"tokenizer.json")
    model.image_end_token_id = processor.tokenizer.token_id(tokens["image_end"])
    cfg = dataclasses.replace(cfg, image_token=processor.cfg.image_token, image_end_token_id=model.image_end_token_id)
    return model, cfg, processor


# ---------------------------------------------------------------------------------------------- export


def chameleon_config_to_hf(cfg: ChameleonConfig, vocab: dict, special: dict) -> dict:
    """ChameleonConfig -> config.json; ``vocab``: the tokenizer's vocabulary (vocabulary_map)."""
    if cfg.lm.qk_norm_kind != "head_layernorm" or not cfg.lm.qk_norm:
        raise ConfigError("lm.qk_norm_kind must be head_layernorm (with qk_norm): Chameleon's query / key norms")
    if cfg.vq.decoder:
        raise ConfigError("model.vq.decoder: true: transformers' ChameleonVQVAE has no decoder to hold it")
    if code_token_ids(vocab, cfg.vq.codebook_size, "the tokenizer") != list(cfg.code_token_ids):
        raise ConfigError("the tokenizer's IMGIMG tokens do not give the model's code_token_ids")
    text = lm_config_to_hf(dataclasses.replace(cfg.lm, qk_norm=False, qk_norm_kind="layernorm", swin_norm=False))
    if text["model_type"] != "llama":
        raise ConfigError(f"lm: {text['model_type']}'s options; Chameleon's LM is Llama's")
    v = cfg.vq
    mult = v.channel_mult
    vq = {"model_type": "chameleon_vqgan", "embed_dim": v.code_dim, "num_embeddings": v.codebook_size,
          "double_latent": False, "latent_channels": v.z_channels, "resolution": v.image_size[0], "in_channels": 3,
          "base_channels": v.channels, "channel_multiplier": list(mult), "num_res_blocks": v.res_blocks,
          "attn_resolutions": [v.image_size[0] // 2 ** i for i in v.attn_levels], "dropout": 0.0,
          "attn_type": "vanilla" if v.mid_attn else "none"}
    if v.norm_groups != 32 or v.image_size[0] != v.image_size[1] or v.decode_l2_norm or v.l2_norm or \
            v.encoder != "conv":
        raise ConfigError("model.vq: Chameleon's VQ has norm_groups 32, square images, no L2-normalised codes and "
                          "taming's conv encoder")
    if not v.mid_attn and v.attn_levels:
        raise ConfigError("model.vq.attn_levels without mid_attn: ChameleonVQVAE puts attention at both or neither")
    drop = ("head_dim", "architectures", "torch_dtype", "model_type")
    return {"model_type": "chameleon", "architectures": ["ChameleonForConditionalGeneration"],
            **{k: x for k, x in text.items() if k not in drop}, "swin_norm": cfg.lm.swin_norm,
            "model_parallel_size": 1, "vq_config": vq, "vocabulary_map": vocab, **special, "torch_dtype": "float32"}


def chameleon_processor_to_hf(pcfg: ChameleonProcessorConfig) -> dict:
    h, w = pcfg.image_size
    return {"image_processor_type": "ChameleonImageProcessor", "do_resize": True,
            "size": {"shortest_edge": pcfg.shortest_edge}, "resample": PIL_CODES[pcfg.resample],
            "do_center_crop": True, "crop_size": {"height": h, "width": w}, "do_rescale": True,
            "rescale_factor": pcfg.rescale_factor, "do_normalize": True, "image_mean": list(pcfg.mean),
            "image_std": list(pcfg.std), "do_convert_rgb": True}


def export_chameleon(model: ChameleonModel, cfg: ChameleonConfig, processor: Processor, folder: Path) -> None:
    """A Chameleon vlmkit model -> a folder ChameleonForConditionalGeneration and ChameleonProcessor load."""
    pcfg = processor.cfg
    if processor.family.name != "chameleon" or pcfg.text_mode != "whole" or not pcfg.shortest_edge:
        raise ConfigError("processor: ChameleonProcessor's layout is family chameleon, text_mode whole, with a "
                          "shortest_edge resize and a centre crop")
    tok = processor.tokenizer
    special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id}
    config = chameleon_config_to_hf(cfg, tok.tok.get_vocab(), special)
    tensors = export_table(model.lm, lm_key_map(cfg.lm, "model.", "lm_head.weight"))
    tensors |= export_table(model.vq, vq_key_map(model.vq, cfg.vq, "model.vqmodel."))
    write_hf_weights(folder, tensors)
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation_settings(special, processor))
    write_json(folder / "processor_config.json", {"image_processor": chameleon_processor_to_hf(pcfg),
                                                  "image_seq_length": pcfg.image_seq_len,
                                                  "image_token": pcfg.image_token,
                                                  "processor_class": "ChameleonProcessor"})
    export_tokenizer(processor, folder)
    tok_cfg = folder / "tokenizer_config.json"
    data = json.loads(tok_cfg.read_text())
    write_json(tok_cfg, data | {"sep_token": pcfg.sep_token})


__all__ = ["chameleon_config_from_hf", "chameleon_config_to_hf", "chameleon_image_settings", "code_token_ids",
           "code_token_name", "export_chameleon", "image_vocabulary", "load_chameleon_folder"]
