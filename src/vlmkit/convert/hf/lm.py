"""Llama-family text LMs (Llama, Qwen2, Mistral, Gemma) and OPT <-> vlmkit's ``DecoderLM``: import and export.

OPT (BLIP-2's LM) is read as ``norm: layernorm``, ``mlp: plain``, ``bias``, ``pos_embed: learned`` with OPT's
``pos_offset`` 2. Its variants with a projected embedding (``word_embed_proj_dim`` != ``hidden_size``, opt-350m's
project_in / project_out) or post-norm layers (``do_layer_norm_before: false``) are refused by name.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from vlmkit.config import LanguageConfig, RopeScalingConfig
from vlmkit.convert.hf.io import export_table, load_state, read_checkpoint, write_hf_weights, write_json
from vlmkit.errors import ConfigError
from vlmkit.lm.decoder import DecoderLM

LM_TYPES = ("llama", "qwen2", "mistral", "gemma", "opt")
LM_ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
OPT_ACTS = {"relu": "relu", "gelu": "gelu"}
OPT_POS_OFFSET = 2  # OPTLearnedPositionalEmbedding: position p is row p + 2


def _rope_theta(cfg: dict, where: str) -> float:
    """rope theta from ``rope_parameters`` (transformers 5) or ``rope_theta`` (4.x); only unscaled RoPE, which
    includes Qwen2-VL's multimodal RoPE (4.x writes rope_scaling type "mrope", 5 type "default" with an
    ``mrope_section``: the same frequencies, split over three position axes; see :func:`_mrope_section`)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in ("default", "mrope", "llama3"):
        raise ConfigError(f"{where}: rope_type {kind!r} (RoPE scaling) is not implemented in vlmkit; "
                          f"supported: default, mrope, llama3")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


LLAMA3_KEYS = {"factor": "factor", "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
               "original_max_len": "original_max_position_embeddings"}


def _rope_scaling(cfg: dict, where: str) -> RopeScalingConfig:
    """Llama 3's frequency scaling (rope_type "llama3", in rope_parameters or 4.x's rope_scaling), every key
    required as transformers requires it; none for other rope types."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if params.get("rope_type", params.get("type")) != "llama3":
        return RopeScalingConfig()
    missing = [theirs for theirs in LLAMA3_KEYS.values() if theirs not in params]
    if missing:
        raise ConfigError(f"{where}: rope_type 'llama3' without {missing[0]!r}")
    try:
        return RopeScalingConfig(kind="llama3", **{ours: type(getattr(RopeScalingConfig, ours))(params[theirs])
                                                   for ours, theirs in LLAMA3_KEYS.items()})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: rope_type 'llama3' parameters {params!r}: {e}") from e


def _mrope_section(cfg: dict, head_dim: int, where: str) -> tuple[int, ...]:
    """Qwen2-VL's ``mrope_section`` (in rope_parameters, or 4.x's rope_scaling), checked to sum to head_dim / 2;
    () for plain RoPE. A rope_type "mrope" without one is refused (transformers would silently use its default)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    section = params.get("mrope_section")
    if section is None:
        if params.get("rope_type", params.get("type")) == "mrope":
            raise ConfigError(f"{where}: rope type 'mrope' without an mrope_section")
        return ()
    if not isinstance(section, (list, tuple)) or not all(isinstance(v, int) and v > 0 for v in section) \
            or sum(section) != head_dim // 2:
        raise ConfigError(f"{where}: mrope_section {section!r} must be positive integers summing to head_dim / 2 "
                          f"= {head_dim // 2}")
    return tuple(section)


def lm_config_from_hf(cfg: dict, where: str = "config.json") -> LanguageConfig:
    """config.json of a Llama / Qwen2 / Mistral / Gemma / OPT causal LM -> LanguageConfig."""
    kind = cfg.get("model_type")
    if kind not in LM_TYPES:
        raise ConfigError(f"{where}: model_type {kind!r} is not a text LM vlmkit imports; supported: "
                          f"{', '.join(LM_TYPES)}")
    if kind == "opt":
        return _opt_config_from_hf(cfg, where)
    try:
        width, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        act = cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")  # Gemma 1 writes both
        if act not in LM_ACTS:
            raise ConfigError(f"{where}: hidden_act {act!r} is not implemented for {kind}; supported: "
                              f"{', '.join(LM_ACTS)}")
        if cfg.get("mlp_bias"):
            raise ConfigError(f"{where}: mlp_bias: true is not implemented in vlmkit's SwiGLU")
        if kind == "mistral" and cfg.get("sliding_window") not in (None, 0):
            # within the window sliding-window attention is full causal attention: cap the length there
            max_len = min(int(cfg.get("max_position_embeddings", 4096)), int(cfg["sliding_window"]))
        else:
            max_len = int(cfg.get("max_position_embeddings", 4096))
        if kind == "qwen2" and cfg.get("use_sliding_window"):
            raise ConfigError(f"{where}: use_sliding_window: true is not implemented for qwen2")
        return LanguageConfig(
            vocab_size=int(cfg["vocab_size"]), width=width, depth=int(cfg["num_hidden_layers"]), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=cfg.get("head_dim") or None,
            mlp_dim=int(cfg["intermediate_size"]), act=LM_ACTS[act], norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(cfg, where), max_seq_len=max_len,
            mrope_section=_mrope_section(cfg, int(cfg.get("head_dim") or width // heads), where),
            rope_scaling=_rope_scaling(cfg, where),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=kind == "qwen2" or bool(cfg.get("attention_bias", False)),
            norm_offset=kind == "gemma", embed_scale=kind == "gemma")
    except KeyError as e:
        raise ConfigError(f"{where}: missing key {e.args[0]!r} for model_type {kind!r}") from e


def _opt_config_from_hf(cfg: dict, where: str) -> LanguageConfig:
    """An OPTConfig dict -> LanguageConfig; what vlmkit's DecoderLM does not compute is refused by key."""
    try:
        width, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        proj = cfg.get("word_embed_proj_dim")
        if proj not in (None, width):
            raise ConfigError(f"{where}: word_embed_proj_dim {proj} != hidden_size {width} (OPT's project_in / "
                              f"project_out, as opt-350m) is not implemented in vlmkit")
        for key, ok in (("do_layer_norm_before", True), ("_remove_final_layer_norm", False),
                        ("layer_norm_elementwise_affine", True)):
            if cfg.get(key, ok) != ok:
                raise ConfigError(f"{where}: {key}: {str(cfg[key]).lower()} is not implemented for opt; supported: "
                                  f"{str(ok).lower()} (pre-norm layers with affine LayerNorms and a final norm)")
        act = cfg.get("activation_function", "relu")
        if act not in OPT_ACTS:
            raise ConfigError(f"{where}: activation_function {act!r} is not implemented for opt; supported: "
                              f"{', '.join(OPT_ACTS)}")
        return LanguageConfig(
            vocab_size=int(cfg["vocab_size"]), width=width, depth=int(cfg["num_hidden_layers"]), heads=heads,
            kv_heads=heads, mlp_dim=int(cfg["ffn_dim"]), act=OPT_ACTS[act], norm_eps=1e-5,  # nn.LayerNorm's default
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", True)), norm="layernorm", mlp="plain",
            bias=bool(cfg.get("enable_bias", True)), pos_embed="learned", pos_offset=OPT_POS_OFFSET)
    except KeyError as e:
        raise ConfigError(f"{where}: missing key {e.args[0]!r} for model_type 'opt'") from e


def _opt_key_map(cfg: LanguageConfig, prefix: str, head: str) -> dict[str, str]:
    """DecoderLM -> OPTForCausalLM names (``prefix`` is the decoder's, "model.decoder." in OPTForCausalLM)."""
    table = {"embed_tokens.weight": f"{prefix}embed_tokens.weight",
             "embed_positions.weight": f"{prefix}embed_positions.weight"}
    table |= {f"norm.{w}": f"{prefix}final_layer_norm.{w}" for w in ("weight", "bias")}
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = head
    params = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.depth):
        ours, theirs = f"layers.{i}.", f"{prefix}layers.{i}."
        for w in ("weight", "bias"):
            table[f"{ours}input_norm.{w}"] = f"{theirs}self_attn_layer_norm.{w}"
            table[f"{ours}post_attn_norm.{w}"] = f"{theirs}final_layer_norm.{w}"
        for w in params:
            for p, q in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "out")):
                table[f"{ours}attn.{p}_proj.{w}"] = f"{theirs}self_attn.{q}_proj.{w}"
            for fc in ("fc1", "fc2"):
                table[f"{ours}mlp.{fc}.{w}"] = f"{theirs}{fc}.{w}"
    return table


def is_opt(cfg: LanguageConfig) -> bool:
    """An LM laid out as OPT (learned positions): its tensors carry OPT's names."""
    return cfg.pos_embed == "learned"


def lm_key_map(cfg: LanguageConfig, prefix: str = "model.", head: str = "lm_head.weight") -> dict[str, str]:
    """vlmkit DecoderLM parameter name -> transformers *ForCausalLM tensor name (the explicit table). An OPT
    layout (:func:`is_opt`) takes the decoder's prefix ("model.decoder." in OPTForCausalLM)."""
    if is_opt(cfg):
        return _opt_key_map(cfg, prefix, head)
    table = {"embed_tokens.weight": f"{prefix}embed_tokens.weight", "norm.weight": f"{prefix}norm.weight"}
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = head
    for i in range(cfg.depth):
        ours, theirs = f"layers.{i}.", f"{prefix}layers.{i}."
        table[ours + "input_norm.weight"] = theirs + "input_layernorm.weight"
        table[ours + "post_attn_norm.weight"] = theirs + "post_attention_layernorm.weight"
        for p in ("q", "k", "v", "o"):
            table[f"{ours}attn.{p}_proj.weight"] = f"{theirs}self_attn.{p}_proj.weight"
            if cfg.qkv_bias and p != "o":
                table[f"{ours}attn.{p}_proj.bias"] = f"{theirs}self_attn.{p}_proj.bias"
        for p in ("gate", "up", "down"):
            table[f"{ours}mlp.{p}_proj.weight"] = f"{theirs}mlp.{p}_proj.weight"
    return table


def untie_if_head_saved(cfg, tensors, head: str, embed: str):
    """``cfg`` (a ModelConfig) with ``lm.tie_embeddings`` off when the checkpoint saves a head ``head`` whose
    values differ from the embeddings ``embed``: transformers 5 then uses that head, untied."""
    h, e = tensors.get(head), tensors.get(embed)
    if cfg.lm.tie_embeddings and h is not None and not (e is not None and torch.equal(h, e)):
        return dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, tie_embeddings=False))
    return cfg


def load_hf_lm(folder: str | Path) -> DecoderLM:
    """A transformers Llama / Qwen2 / Mistral / Gemma / OPT ``*ForCausalLM`` folder -> DecoderLM (fp32)."""
    ckpt = read_checkpoint(folder)
    where = str(ckpt.folder / "config.json")
    cfg = lm_config_from_hf(ckpt.config, where)
    with torch.device("meta"):
        lm = DecoderLM(cfg)
    lm = lm.to_empty(device="cpu")
    if lm.rotary is not None:  # buffers are not weights: rebuild
        lm.rotary = type(lm.rotary)(lm.head_dim, cfg.rope_theta, cfg.mrope_section, cfg.rope_scaling)
    if cfg.tie_embeddings:
        lm.lm_head.weight = lm.embed_tokens.weight
    # a tied checkpoint may still carry lm_head.weight (a copy of the embeddings): not an error
    load_state(lm, ckpt.tensors, lm_key_map(cfg, "model.decoder." if is_opt(cfg) else "model."), str(ckpt.folder),
               ignore=("lm_head.weight",) if cfg.tie_embeddings else ())
    return lm.eval()


# ---------------------------------------------------------------------------------------------- export

HF_ACTS = {v: k for k, v in LM_ACTS.items()}
LM_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM",
              "opt": "OPTForCausalLM"}


def lm_config_to_hf(cfg: LanguageConfig, where: str = "lm") -> dict:
    """LanguageConfig -> the config.json of the transformers family that computes the same function: OPT
    (learned positions), Gemma (norm offset + embedding scale), Qwen2 (bias on q, k, v only), else Llama."""
    if is_opt(cfg):
        return _opt_config_to_hf(cfg, where)
    opt_only = [f"{k} {v!r}" for k, v, ok in (("norm", cfg.norm, "rmsnorm"), ("mlp", cfg.mlp, "gated"),
                                               ("bias", cfg.bias, False)) if v != ok]
    if opt_only:
        raise ConfigError(f"{where}: {', '.join(opt_only)}: with rotary positions no transformers family computes "
                          f"this LM (a layernorm / plain-MLP / biased LM exports as OPT, with pos_embed: learned)")
    if cfg.norm_offset != cfg.embed_scale:
        raise ConfigError(f"{where}: norm_offset and embed_scale are both Gemma's; a model with only one of them "
                          f"is no transformers family")
    if cfg.act not in HF_ACTS:
        raise ConfigError(f"{where}.act {cfg.act!r} has no transformers name; exportable: {', '.join(HF_ACTS)}")
    kind = "gemma" if cfg.norm_offset else "qwen2" if cfg.qkv_bias else "llama"
    if kind == "gemma" and cfg.qkv_bias:
        raise ConfigError(f"{where}: Gemma has no attention biases (qkv_bias: true)")
    out = {"model_type": kind, "architectures": [LM_CLASSES[kind]], "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.width, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.depth,
           "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
           "head_dim": cfg.head_dim or cfg.width // cfg.heads, "hidden_act": HF_ACTS[cfg.act],
           "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
           "rope_parameters": _rope_parameters(cfg),
           "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
           "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}
    if kind == "gemma":
        out["hidden_activation"] = HF_ACTS[cfg.act]
    if kind == "qwen2":
        out |= {"use_sliding_window": False, "max_window_layers": cfg.depth}
    return out


def _rope_parameters(cfg: LanguageConfig) -> dict:
    """transformers 5's rope_parameters of ``cfg``: plain, or Llama 3's scaling."""
    if cfg.rope_scaling.kind == "llama3":
        return {"rope_type": "llama3", "rope_theta": cfg.rope_theta,
                **{theirs: getattr(cfg.rope_scaling, ours) for ours, theirs in LLAMA3_KEYS.items()}}
    return {"rope_type": "default", "rope_theta": cfg.rope_theta}


def _opt_config_to_hf(cfg: LanguageConfig, where: str) -> dict:
    """An OPT-layout LanguageConfig -> OPTConfig's dict; what OPT cannot express is refused by field."""
    problems = [f"{k} {v!r} (OPT has {ok!r})" for k, v, ok in (
        ("norm", cfg.norm, "layernorm"), ("mlp", cfg.mlp, "plain"), ("pos_offset", cfg.pos_offset, OPT_POS_OFFSET),
        ("kv_heads", cfg.kv_heads, cfg.heads), ("head_dim", cfg.head_dim or cfg.width // cfg.heads,
                                                 cfg.width // cfg.heads),
        ("norm_eps", cfg.norm_eps, 1e-5), ("qkv_bias", cfg.qkv_bias and not cfg.bias, False),
        ("embed_scale", cfg.embed_scale, False), ("norm_offset", cfg.norm_offset, False))
        if v != ok]
    if cfg.act not in OPT_ACTS:
        problems.append(f"act {cfg.act!r} (exportable: {', '.join(OPT_ACTS)})")
    if problems:
        raise ConfigError(f"{where}: learned positions export as OPT, which cannot express: {'; '.join(problems)}")
    return {"model_type": "opt", "architectures": [LM_CLASSES["opt"]], "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.width, "word_embed_proj_dim": cfg.width, "ffn_dim": cfg.mlp_dim,
            "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads, "activation_function": cfg.act,
            "max_position_embeddings": cfg.max_seq_len, "do_layer_norm_before": True, "enable_bias": cfg.bias,
            "layer_norm_elementwise_affine": True, "tie_word_embeddings": cfg.tie_embeddings, "dropout": 0.0,
            "attention_dropout": 0.0, "torch_dtype": "float32"}


def export_hf_lm(lm: DecoderLM, folder: str | Path) -> None:
    """A DecoderLM -> config.json + model.safetensors that transformers' ``AutoModelForCausalLM`` loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_hf_weights(folder, export_table(lm, lm_key_map(lm.cfg, "model.decoder." if is_opt(lm.cfg) else "model.")))
    write_json(folder / "config.json", lm_config_to_hf(lm.cfg))
