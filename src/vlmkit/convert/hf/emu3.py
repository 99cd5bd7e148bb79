"""Emu3 (``Emu3ForConditionalGeneration``) folders <-> vlmkit's Emu3Model (models/emu3.py).

config.json: ``text_config`` (a Llama decoder: RMSNorm, SwiGLU, rotary, grouped-query attention, no biases) ->
``lm``; ``vq_config`` -> ``vq`` (Emu3VQConfig keeps transformers' names); ``vocabulary_map`` -> the ids of the
placeholder ``<image>``, the row end ``<|extra_200|>``, ``<|extra_201|>``, ``<|image end|>`` and of
``<|visual token000000|>`` (the visual tokens must be one run of ids, code c at offset + c, as in the released
vocabulary; another map is refused by name). Weights, in the Hub's names that transformers saves
(``text_model.model.``, ``text_model.lm_head.weight``, ``vqmodel.``) or in its module names (``model.text_model.``,
``lm_head.weight``, ``model.vqmodel.``): the LM through the shared Llama table, the VQ-VAE key for key (its modules
keep transformers' names), BatchNorm running statistics included. The processor: Emu3ImageProcessor's settings
(processor_config.json's ``image_processor`` or preprocessor_config.json) and the tokenizer's named tokens
(``boi_token``, ``eoi_token``, ``image_wrapper_token``, ``eof_token``, ``image_token`` in tokenizer_config.json).

The export writes the same layout back (config.json with the vocabulary map of the tokenizer, processor_config.json
naming Emu3Processor, tokenizer_config.json with the named tokens), which transformers' Emu3 classes load.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmkit.config import to_dict
from vlmkit.convert.hf.io import export_table, find_prefix, load_state, read_checkpoint, write_hf_weights, write_json
from vlmkit.convert.hf.lm import lm_config_from_hf, lm_config_to_hf, lm_key_map
from vlmkit.convert.hf.processor import (PIL_CODES, PIL_RESAMPLE, export_tokenizer, generation_settings,
                                         load_hf_processor, read_image_processor)
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.emu3 import Emu3Config, Emu3Model, build_emu3
from vlmkit.models.emu3_vq import Emu3VQConfig
from vlmkit.processing import Processor
from vlmkit.processing.emu3 import Emu3ProcessorConfig

# the tensor layouts: the Hub's (transformers saves it) and transformers 5's module names
HUB_LAYOUT = ("text_model.model.", "vqmodel.", "text_model.lm_head.weight")
MODULE_LAYOUT = ("model.text_model.", "model.vqmodel.", "lm_head.weight")
# transformers' Emu3TextConfig defaults, for keys a config.json leaves out
TEXT_DEFAULTS = {"vocab_size": 184622, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
                 "max_position_embeddings": 9216, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0}
VISUAL = "<|visual token"
MARKUP = {"eol_token_id": "<|extra_200|>", "eof_token_id": "<|extra_201|>", "eoi_token_id": "<|image end|>"}
NAMED_TOKENS = ("boi_token", "eoi_token", "image_wrapper_token", "eof_token", "image_token")


def emu3_vq_config(vq: dict, where: str) -> Emu3VQConfig:
    if vq.get("double_latent"):
        raise ConfigError(f"{where}: double_latent: true is not implemented (Emu3's VQ-VAE has single latents)")
    known = {k: vq[k] for k in Emu3VQConfig.__dataclass_fields__ if k in vq}
    try:
        return Emu3VQConfig(**known)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


def visual_offset(vocab: dict[str, int], codebook_size: int, where: str) -> int:
    """The id of code 0, checked: ``<|visual tokenNNNNNN|>`` for every code, at consecutive ids."""
    try:
        ids = [int(vocab[f"{VISUAL}{c:06d}|>"]) for c in range(codebook_size)]
    except KeyError as e:
        raise ConfigError(f"{where}: vocabulary_map has no {e.args[0]!r}: Emu3's vocabulary holds one visual token "
                          f"per code of the VQ-VAE's {codebook_size}") from e
    if ids != list(range(ids[0], ids[0] + codebook_size)):
        raise ConfigError(f"{where}: the visual tokens of vocabulary_map are not one run of consecutive ids (code c "
                          f"at {VISUAL}000000|> + c); vlmkit maps codes to ids by that offset")
    return ids[0]


def emu3_config_from_hf(cfg: dict, where: str = "config.json") -> tuple[Emu3Config, int]:
    """An Emu3ForConditionalGeneration config.json -> (Emu3Config, the <image> placeholder's id)."""
    if cfg.get("model_type") != "emu3":
        raise ConfigError(f"{where}: model_type {cfg.get('model_type')!r} is not 'emu3'")
    text = {**TEXT_DEFAULTS, **(cfg.get("text_config") or {}), "model_type": "llama"}
    if text.get("attention_bias") or text.get("mlp_bias"):
        raise ConfigError(f"{where} (text_config): attention_bias / mlp_bias: Emu3's LM has no biases")
    text["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings")) or bool(text.get("tie_word_embeddings"))
    lm = lm_config_from_hf(text, f"{where} (text_config)")
    vq = emu3_vq_config(cfg.get("vq_config") or {}, f"{where} (vq_config)")
    vocab = cfg.get("vocabulary_map")
    if not isinstance(vocab, dict):
        raise ConfigError(f"{where}: no vocabulary_map (Emu3's config maps token names to ids: its image tokens)")
    missing = [t for t in ("<image>", *MARKUP.values()) if t not in vocab]
    if missing:
        raise ConfigError(f"{where}: vocabulary_map has no {', '.join(map(repr, missing))}")
    eos = text.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is None:
        raise ConfigError(f"{where} (text_config): no eos_token_id (image generation writes it after "
                          f"<|image end|>)")
    model = Emu3Config(lm=lm, vq=vq, visual_token_offset=visual_offset(vocab, vq.codebook_size, where),
                       eos_token_id=int(eos), **{k: int(vocab[t]) for k, t in MARKUP.items()})
    return model, int(vocab["<image>"])


def emu3_key_map(cfg: Emu3Config, vq_names: list[str], layout=HUB_LAYOUT) -> tuple[dict[str, str], dict[str, str]]:
    """(LM parameter -> tensor, VQ-VAE parameter or buffer -> tensor) in ``layout`` (lm prefix, vq prefix, head)."""
    lm, vq, head = layout
    return ({f"lm.{k}": v for k, v in lm_key_map(cfg.lm, lm, head).items()}, {name: f"{vq}{name}" for name in vq_names})


def vq_names(model: Emu3Model) -> list[str]:
    return [k for k in model.vq.state_dict() if not k.endswith("num_batches_tracked")]


def load_emu3(folder: str | Path) -> tuple[Emu3Model, Emu3Config]:
    ckpt = read_checkpoint(folder)
    where = str(ckpt.folder)
    cfg, image_token = emu3_config_from_hf(ckpt.config, str(ckpt.folder / "config.json"))
    model = build_emu3(cfg, image_token, init=False)
    t = ckpt.tensors
    layout = HUB_LAYOUT if find_prefix(t, HUB_LAYOUT[0], MODULE_LAYOUT[0]) == HUB_LAYOUT[0] else MODULE_LAYOUT
    lm_table, vq_table = emu3_key_map(cfg, vq_names(model), layout)
    vq_tensors = {k: v for k, v in t.items() if k.startswith(layout[1])}
    load_state(model, {k: v for k, v in t.items() if not k.startswith(layout[1])}, lm_table, where,
               ignore=(layout[2],) if cfg.lm.tie_embeddings else ())
    if cfg.lm.tie_embeddings:
        model.lm.lm_head.weight = model.lm.embed_tokens.weight
    wanted = set(vq_table.values())
    missing = sorted(wanted - set(vq_tensors))
    unexpected = sorted(k for k in set(vq_tensors) - wanted if not k.endswith("num_batches_tracked"))
    if missing or unexpected:
        raise CheckpointError(f"{where}: VQ-VAE weights do not match vq_config: missing {missing[:8]}, unexpected "
                              f"{unexpected[:8]}")
    state = model.vq.state_dict()
    for ours, theirs in vq_table.items():
        if vq_tensors[theirs].shape != state[ours].shape:
            raise CheckpointError(f"{where}: {theirs} has shape {tuple(vq_tensors[theirs].shape)}, vq_config implies "
                                  f"{tuple(state[ours].shape)}")
        state[ours].copy_(vq_tensors[theirs].to(state[ours].dtype))
    return model.eval(), cfg


def emu3_processor_settings(folder: Path, factor: int) -> dict:
    """Emu3ImageProcessor's settings -> Emu3ProcessorConfig fields, checked against the VQ-VAE's factor."""
    raw, path = read_image_processor(folder)
    size = raw.get("size") if isinstance(raw.get("size"), dict) else {}
    lo, hi = raw.get("min_pixels", size.get("min_pixels", 512 * 512)), raw.get("max_pixels",
                                                                              size.get("max_pixels", 1024 * 1024))
    spatial = raw.get("spatial_factor", 8)
    if spatial != factor:
        raise ConfigError(f"{path}: spatial_factor {spatial} is not the VQ-VAE's {factor} (2 ** (levels - 1)); "
                          f"images would not divide into whole codes")
    if not raw.get("do_resize", True) or not raw.get("do_rescale", True) \
            or abs(float(raw.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        raise ConfigError(f"{path}: only do_resize: true, do_rescale: true with rescale_factor 1/255 are supported")
    resample = raw.get("resample", 3)
    if resample not in PIL_RESAMPLE:
        raise ConfigError(f"{path}: resample {resample!r}; supported: {sorted(PIL_RESAMPLE)} (PIL filters)")
    out = {"min_pixels": int(lo), "max_pixels": int(hi), "spatial_factor": int(spatial),
           "resample": PIL_RESAMPLE[resample]}
    if raw.get("do_normalize", True):
        defaults = Emu3ProcessorConfig()
        out["mean"] = tuple(float(v) for v in raw.get("image_mean") or defaults.mean)
        out["std"] = tuple(float(v) for v in raw.get("image_std") or defaults.std)
    else:
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return out


def named_tokens(folder: Path) -> dict:
    """The tokenizer's named Emu3 tokens (tokenizer_config.json), where it names them."""
    path = folder / "tokenizer_config.json"
    raw = json.loads(path.read_text()) if path.is_file() else {}
    return {k: raw[k] for k in NAMED_TOKENS if isinstance(raw.get(k), str)}


def load_emu3_folder(folder: Path):
    """(model, config, processor) of an Emu3 folder; the processor gives Emu3Processor's input_ids."""
    folder = Path(folder)
    model, cfg = load_emu3(folder)
    settings = emu3_processor_settings(folder, cfg.vq.factor) | named_tokens(folder)
    settings.pop("image_token", None)  # the placeholder comes from config.json's vocabulary_map
    # the size of a generated image (the model's image_grid of codes): what shared code takes for the model's
    # native image size (the images API's "auto"); Emu3 reads images at their own size
    settings["image_size"] = tuple(n * cfg.vq.factor for n in cfg.image_grid)
    most = 2 * (settings["max_pixels"] // cfg.vq.factor ** 2)  # h * (w + 1) <= 2 h w
    processor = load_hf_processor(folder, "emu3", model.image_token_id, most, cfg.lm.max_seq_len,
                                  Emu3ProcessorConfig, fixed_images=False, **settings)
    return model, cfg, processor


# ---------------------------------------------------------------------------------------------- export


def emu3_vocabulary_map(cfg: Emu3Config, image_token_id: int) -> dict[str, int]:
    """The named tokens of an Emu3 model's vocabulary, from its config: what config.json's vocabulary_map must
    hold (an export writes the tokenizer's whole vocabulary)."""
    named = {"<image>": image_token_id, **{t: getattr(cfg, k) for k, t in MARKUP.items()}}
    return named | {f"{VISUAL}{c:06d}|>": cfg.visual_token_offset + c for c in range(cfg.vq.codebook_size)}


def emu3_config_to_hf(cfg: Emu3Config, vocabulary_map: dict[str, int], special: dict[str, int | None]) -> dict:
    """Emu3Config -> Emu3ForConditionalGeneration's config.json; ``special``: the tokenizer's bos / pad ids."""
    lm = cfg.lm
    if lm.qkv_bias or lm.bias or lm.norm != "rmsnorm" or lm.mlp != "gated" or lm.norm_offset or lm.embed_scale:
        raise ConfigError("lm: Emu3's LM is a Llama decoder (rmsnorm, gated MLP, no biases, no Gemma options)")
    text = lm_config_to_hf(lm, "lm")
    text |= {"model_type": "emu3_text_model", "eos_token_id": cfg.eos_token_id, "attention_dropout": 0.0,
             **{k: special[k] for k in ("bos_token_id", "pad_token_id") if special.get(k) is not None}}
    for key in ("architectures", "torch_dtype", "tie_word_embeddings"):
        text.pop(key, None)
    return {"model_type": "emu3", "architectures": ["Emu3ForConditionalGeneration"], "text_config": text,
            "vq_config": {"model_type": "emu3_vqgan", **to_dict(cfg.vq)}, "vocabulary_map": vocabulary_map,
            "image_token_id": vocabulary_map.get("<image>"), "tie_word_embeddings": lm.tie_embeddings}


def emu3_processor_to_hf(pcfg: Emu3ProcessorConfig) -> dict:
    images = {"image_processor_type": "Emu3ImageProcessor", "do_resize": True, "resample": PIL_CODES[pcfg.resample],
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(pcfg.mean),
              "image_std": list(pcfg.std), "do_convert_rgb": True, "min_pixels": pcfg.min_pixels,
              "max_pixels": pcfg.max_pixels, "spatial_factor": pcfg.spatial_factor,
              "size": {"min_pixels": pcfg.min_pixels, "max_pixels": pcfg.max_pixels}}
    return {"image_processor": images, "processor_class": "Emu3Processor"}


def export_emu3(model: Emu3Model, cfg: Emu3Config, processor: Processor, folder: Path) -> None:
    """An Emu3 vlmkit model -> a folder transformers' Emu3ForConditionalGeneration and Emu3Processor load."""
    folder = Path(folder)
    tok = processor.tokenizer
    special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id}
    vocab = tok.tok.get_vocab()
    named = emu3_vocabulary_map(cfg, model.image_token_id)
    wrong = [name for name, i in named.items() if vocab.get(name) != i]
    if wrong:
        raise ConfigError(f"processor tokenizer: {wrong[0]!r} is not at the model's id {named[wrong[0]]} (Emu3's "
                          f"config.json maps the tokenizer's names to the ids the model reads)")
    config = emu3_config_to_hf(cfg, vocab, special)
    if config["image_token_id"] != model.image_token_id:
        raise ConfigError(f"processor image_token {processor.cfg.image_token!r} is not the model's placeholder id "
                          f"{model.image_token_id}")
    lm_table, vq_table = emu3_key_map(cfg, vq_names(model))
    tensors = export_table(model, lm_table)
    tensors |= {theirs: model.vq.state_dict()[ours].detach().clone().contiguous() for ours, theirs in vq_table.items()}
    write_hf_weights(folder, tensors)
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation_settings(special, processor))
    write_json(folder / "processor_config.json", emu3_processor_to_hf(processor.cfg))
    export_tokenizer(processor, folder)
    path = folder / "tokenizer_config.json"
    pcfg = processor.cfg
    names = {"boi_token": pcfg.boi_token, "eoi_token": pcfg.eoi_token, "image_wrapper_token": pcfg.image_wrapper_token,
             "eof_token": pcfg.eof_token, "image_token": pcfg.image_token}
    path.write_text(json.dumps({**json.loads(path.read_text()), **names}, indent=2) + "\n")


__all__ = ["emu3_config_from_hf", "emu3_config_to_hf", "emu3_vocabulary_map", "export_emu3", "load_emu3",
           "load_emu3_folder"]
