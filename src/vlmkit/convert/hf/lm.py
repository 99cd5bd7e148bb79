"""Llama-family text LMs (Llama, Qwen2, Mistral, Gemma), OPT and Persimmon <-> vlmkit's ``DecoderLM``: import and
export.

OPT (BLIP-2's LM) is read as ``norm: layernorm``, ``mlp: plain``, ``bias``, ``pos_embed: learned`` with OPT's
``pos_offset`` 2. Its variants with a projected embedding (``word_embed_proj_dim`` != ``hidden_size``, opt-350m's
project_in / project_out) or post-norm layers (``do_layer_norm_before: false``) are refused by name.

Persimmon (Fuyu's LM) is read as ``norm: layernorm``, ``mlp: plain``, ``bias`` with rotary positions, ``qk_norm``
(qk_layernorm) and ``rotary_fraction`` (partial_rotary_factor). Its attention is one fused ``query_key_value``
projection, split into q, k and v on import (:func:`split_fused_qkv`) and fused again on export
(:func:`fuse_qkv`). Which family a LanguageConfig is: :func:`is_opt` (learned positions), :func:`is_persimmon`
(rotary with LayerNorms), else Llama's.

Gemma 2 and Gemma 3's text decoder (``gemma2``, ``gemma3_text``) are Gemma's with the fields that
:mod:`vlmkit.convert.hf.gemma_lm` reads and writes (sandwich norms, sliding layers, soft-capping, QK-norm...).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from vlmkit.config import LanguageConfig, RopeScalingConfig
from vlmkit.convert.hf.gemma_lm import GEMMA_CLASSES, gemma_config_to_hf, gemma_fields
from vlmkit.convert.hf.io import export_table, load_state, read_checkpoint, write_hf_weights, write_json
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.lm.decoder import DecoderLM, local_rotary_embedding, rotary_embedding

LM_TYPES = ("llama", "qwen2", "mistral", "gemma", "opt", "persimmon", "gemma2", "gemma3_text")
LM_ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
OPT_ACTS = {"relu": "relu", "gelu": "gelu"}
OPT_POS_OFFSET = 2  # OPTLearnedPositionalEmbedding: position p is row p + 2
# transformers' ACT2FN names of the activations vlmkit computes the same way; Persimmon's own is relu2
PERSIMMON_ACTS = {"relu2": "relu2", "relu": "relu", "gelu": "gelu", "silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
PERSIMMON_ROTARY_FRACTION = 0.5  # PersimmonConfig's partial_rotary_factor when a config has none
FUSED_QKV = "self_attn.query_key_value"  # Persimmon's fused q, k, v projection, under each layer's prefix


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
    """config.json of a Llama / Qwen2 / Mistral / Gemma / OPT / Persimmon causal LM -> LanguageConfig."""
    kind = cfg.get("model_type")
    if kind not in LM_TYPES:
        raise ConfigError(f"{where}: model_type {kind!r} is not a text LM vlmkit imports; supported: "
                          f"{', '.join(LM_TYPES)}")
    if kind == "opt":
        return _opt_config_from_hf(cfg, where)
    if kind == "persimmon":
        return _persimmon_config_from_hf(cfg, where)
    if kind in GEMMA_CLASSES:
        base, extra = gemma_fields(cfg, where)
        return dataclasses.replace(lm_config_from_hf(base, where), **extra)
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


def _persimmon_rope(cfg: dict, where: str) -> tuple[float, float]:
    """(theta, partial rotary factor) of a PersimmonConfig dict: in ``rope_parameters`` (transformers 5) or at the
    top level (4.x, as Fuyu-8B's config.json). Only unscaled RoPE."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"{where}: rope_type {kind!r} (RoPE scaling) is not implemented for persimmon; "
                          f"supported: default")
    fraction = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", PERSIMMON_ROTARY_FRACTION))
    return _rope_theta(cfg, where), float(fraction)


def _persimmon_config_from_hf(cfg: dict, where: str) -> LanguageConfig:
    """A PersimmonConfig dict -> LanguageConfig: OPT's block with rotary positions, per-head q/k LayerNorms and
    partial rotary; what vlmkit's DecoderLM does not compute is refused by key."""
    try:
        width, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        if width % heads:
            raise ConfigError(f"{where}: hidden_size {width} is not a multiple of num_attention_heads {heads}")
        act = cfg.get("hidden_act", "relu2")
        if act not in PERSIMMON_ACTS:
            raise ConfigError(f"{where}: hidden_act {act!r} is not implemented for persimmon; supported: "
                              f"{', '.join(PERSIMMON_ACTS)}")
        theta, fraction = _persimmon_rope(cfg, where)
        rotated = int(width // heads * fraction)  # PersimmonAttention.rotary_ndims
        if not 0 < fraction <= 1 or rotated < 2 or rotated % 2:
            raise ConfigError(f"{where}: partial_rotary_factor {fraction} rotates {rotated} of the {width // heads} "
                              f"dims of each head; supported: a factor in (0, 1] that rotates an even number >= 2")
        return LanguageConfig(
            vocab_size=int(cfg["vocab_size"]), width=width, depth=int(cfg["num_hidden_layers"]), heads=heads,
            kv_heads=heads, mlp_dim=int(cfg["intermediate_size"]), act=PERSIMMON_ACTS[act],
            norm_eps=float(cfg.get("layer_norm_eps", 1e-5)), rope_theta=theta,
            max_seq_len=int(cfg.get("max_position_embeddings", 16384)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), norm="layernorm", mlp="plain", bias=True,
            qk_norm=bool(cfg.get("qk_layernorm", True)), rotary_fraction=fraction)
    except KeyError as e:
        raise ConfigError(f"{where}: missing key {e.args[0]!r} for model_type 'persimmon'") from e


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


def _persimmon_key_map(cfg: LanguageConfig, prefix: str, head: str) -> dict[str, str]:
    """DecoderLM -> PersimmonForCausalLM names. q, k and v map to ``<query_key_value> (q)``, ``(k)``, ``(v)``:
    the parts :func:`split_fused_qkv` cuts the fused projection into."""
    table = {"embed_tokens.weight": f"{prefix}embed_tokens.weight"}
    table |= {f"norm.{w}": f"{prefix}final_layernorm.{w}" for w in ("weight", "bias")}
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = head
    for i in range(cfg.depth):
        ours, theirs = f"layers.{i}.", f"{prefix}layers.{i}."
        for w in ("weight", "bias"):
            table[f"{ours}input_norm.{w}"] = f"{theirs}input_layernorm.{w}"
            table[f"{ours}post_attn_norm.{w}"] = f"{theirs}post_attention_layernorm.{w}"
            table |= {f"{ours}attn.{p}_proj.{w}": f"{theirs}{FUSED_QKV}.{w} ({p})" for p in "qkv"}
            table[f"{ours}attn.o_proj.{w}"] = f"{theirs}self_attn.dense.{w}"
            if cfg.qk_norm:
                table[f"{ours}attn.q_norm.{w}"] = f"{theirs}self_attn.q_layernorm.{w}"
                table[f"{ours}attn.k_norm.{w}"] = f"{theirs}self_attn.k_layernorm.{w}"
            table[f"{ours}mlp.fc1.{w}"] = f"{theirs}mlp.dense_h_to_4h.{w}"
            table[f"{ours}mlp.fc2.{w}"] = f"{theirs}mlp.dense_4h_to_h.{w}"
    return table


def split_fused_qkv(cfg: LanguageConfig, tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``tensors`` with each Persimmon layer's fused ``query_key_value`` weight and bias replaced by the three
    parts :func:`lm_key_map` names ``<key> (q)``, ``(k)``, ``(v)``; other layouts are returned as they are.

    The fused rows are not [q; k; v]: transformers views the projection as [..., heads, 3, head_dim]
    (PersimmonAttention._split_heads), so they run head by head, each head's q, k and v rows in turn."""
    if not is_persimmon(cfg):
        return tensors
    out, hd = dict(tensors), cfg.width // cfg.heads
    for i in range(cfg.depth):
        for w in ("weight", "bias"):
            fused = f"{prefix}layers.{i}.{FUSED_QKV}.{w}"
            if fused not in out:
                continue  # load_state names what is missing
            t = out.pop(fused)
            if t.shape[0] != 3 * cfg.width:
                raise CheckpointError(f"{fused} has shape {tuple(t.shape)}, the config implies ({3 * cfg.width}, "
                                      f"...) (q, k and v of {cfg.heads} heads of {hd})")
            parts = t.unflatten(0, (cfg.heads, 3, hd)).unbind(1)  # q, k, v: [heads, hd, ...]
            out |= {f"{fused} ({p})": part.flatten(0, 1) for p, part in zip("qkv", parts)}
    return out


def fuse_qkv(cfg: LanguageConfig, tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`split_fused_qkv` on an export's tensors: Persimmon's q, k and v parts interleaved
    head by head into one ``query_key_value`` weight and bias per layer."""
    if not is_persimmon(cfg):
        return tensors
    out, hd = dict(tensors), cfg.width // cfg.heads
    for i in range(cfg.depth):
        for w in ("weight", "bias"):
            fused = f"{prefix}layers.{i}.{FUSED_QKV}.{w}"
            parts = [out.pop(f"{fused} ({p})").detach().unflatten(0, (cfg.heads, hd)) for p in "qkv"]
            out[fused] = torch.stack(parts, 1).flatten(0, 2)  # [heads, 3, hd, ...] -> rows
    return out


def is_opt(cfg: LanguageConfig) -> bool:
    """An LM laid out as OPT (learned positions): its tensors carry OPT's names."""
    return cfg.pos_embed == "learned"


def is_persimmon(cfg: LanguageConfig) -> bool:
    """An LM laid out as Persimmon (rotary positions with LayerNorms): its tensors carry Persimmon's names."""
    return cfg.pos_embed == "rope" and cfg.norm == "layernorm"


def lm_prefix(cfg: LanguageConfig) -> str:
    """Prefix of the decoder's tensors in a *ForCausalLM checkpoint: "model.decoder." for OPT, else "model."."""
    return "model.decoder." if is_opt(cfg) else "model."


def lm_key_map(cfg: LanguageConfig, prefix: str = "model.", head: str = "lm_head.weight") -> dict[str, str]:
    """vlmkit DecoderLM parameter name -> transformers *ForCausalLM tensor name (the explicit table). An OPT
    layout (:func:`is_opt`) takes the decoder's prefix ("model.decoder." in OPTForCausalLM). A Persimmon layout
    names the parts of its fused q, k, v projection: load through :func:`split_fused_qkv`, export through
    :func:`fuse_qkv`."""
    if is_opt(cfg):
        return _opt_key_map(cfg, prefix, head)
    if is_persimmon(cfg):
        return _persimmon_key_map(cfg, prefix, head)
    table = {"embed_tokens.weight": f"{prefix}embed_tokens.weight", "norm.weight": f"{prefix}norm.weight"}
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = head
    for i in range(cfg.depth):
        ours, theirs = f"layers.{i}.", f"{prefix}layers.{i}."
        table[ours + "input_norm.weight"] = theirs + "input_layernorm.weight"
        if cfg.post_norms:  # Gemma 2 / 3: post_attention_layernorm norms the attention's output
            table[ours + "attn_out_norm.weight"] = theirs + "post_attention_layernorm.weight"
            table[ours + "post_attn_norm.weight"] = theirs + "pre_feedforward_layernorm.weight"
            table[ours + "mlp_out_norm.weight"] = theirs + "post_feedforward_layernorm.weight"
        else:
            table[ours + "post_attn_norm.weight"] = theirs + "post_attention_layernorm.weight"
        if cfg.qk_norm:  # Gemma 3: an RMSNorm over each head's queries and keys (Chameleon: a LayerNorm per head)
            for w in ("weight", "bias") if cfg.qk_norm_kind == "head_layernorm" else ("weight",):
                table[f"{ours}attn.q_norm.{w}"] = f"{theirs}self_attn.q_norm.{w}"
                table[f"{ours}attn.k_norm.{w}"] = f"{theirs}self_attn.k_norm.{w}"
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
    """A transformers Llama / Qwen2 / Mistral / Gemma / OPT / Persimmon ``*ForCausalLM`` folder -> DecoderLM
    (fp32)."""
    ckpt = read_checkpoint(folder)
    where = str(ckpt.folder / "config.json")
    cfg = lm_config_from_hf(ckpt.config, where)
    with torch.device("meta"):
        lm = DecoderLM(cfg)
    lm = lm.to_empty(device="cpu")
    if lm.rotary is not None:  # buffers are not weights: rebuild
        lm.rotary = rotary_embedding(cfg)
    lm.rotary_local = local_rotary_embedding(cfg)
    if cfg.tie_embeddings:
        lm.lm_head.weight = lm.embed_tokens.weight
    # a tied checkpoint may still carry lm_head.weight (a copy of the embeddings): not an error
    prefix = lm_prefix(cfg)
    load_state(lm, split_fused_qkv(cfg, ckpt.tensors, prefix), lm_key_map(cfg, prefix), str(ckpt.folder),
               ignore=("lm_head.weight",) if cfg.tie_embeddings else ())
    return lm.eval()


# ---------------------------------------------------------------------------------------------- export

HF_ACTS = {v: k for k, v in LM_ACTS.items()}
HF_PERSIMMON_ACTS = {v: k for k, v in PERSIMMON_ACTS.items()}
LM_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM",
              "opt": "OPTForCausalLM", "persimmon": "PersimmonForCausalLM", **GEMMA_CLASSES}


def lm_config_to_hf(cfg: LanguageConfig, where: str = "lm") -> dict:
    """LanguageConfig -> the config.json of the transformers family that computes the same function: OPT
    (learned positions), Persimmon (rotary with LayerNorms), Gemma (norm offset + embedding scale), Qwen2 (bias
    on q, k, v only), else Llama."""
    if is_opt(cfg):
        return _opt_config_to_hf(cfg, where)
    if is_persimmon(cfg):
        return _persimmon_config_to_hf(cfg, where)
    not_llama = [f"{k} {v!r}" for k, v, ok in (("mlp", cfg.mlp, "gated"), ("bias", cfg.bias, False),
                                                ("qk_norm", cfg.qk_norm and not cfg.post_norms, False),
                                                ("rotary_fraction", cfg.rotary_fraction, 1.0),
                                                ("parallel_block", cfg.parallel_block, False),
                                                ("head_bias", cfg.head_bias, False),
                                                ("swin_norm", cfg.swin_norm, False)) if v != ok]
    if not_llama:
        raise ConfigError(f"{where}: {', '.join(not_llama)}: with RMSNorms no transformers family computes this LM "
                          f"(a plain-MLP / biased LM exports as OPT with pos_embed: learned, or as Persimmon with "
                          f"norm: layernorm)")
    if cfg.norm_offset != cfg.embed_scale:
        raise ConfigError(f"{where}: norm_offset and embed_scale are both Gemma's; a model with only one of them "
                          f"is no transformers family")
    if cfg.act not in HF_ACTS:
        raise ConfigError(f"{where}.act {cfg.act!r} has no transformers name; exportable: {', '.join(HF_ACTS)}")
    if cfg.post_norms:
        return gemma_config_to_hf(cfg, HF_ACTS[cfg.act], where)
    gemma2 = [f"{k} {v!r}" for k, v in (("attn_softcap", cfg.attn_softcap), ("logit_softcap", cfg.logit_softcap),
                                         ("attn_scalar", cfg.attn_scalar), ("local_rope_theta", cfg.local_rope_theta),
                                         ("layer_types", cfg.layer_types or None)) if v is not None]
    if gemma2 or cfg.rope_scaling.kind == "linear":
        raise ConfigError(f"{where}: {', '.join(gemma2 or ['rope_scaling.kind linear'])}: only Gemma 2 / 3 "
                          f"express these (with post_norms: true, norm_offset and embed_scale)")
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
        ("embed_scale", cfg.embed_scale, False), ("norm_offset", cfg.norm_offset, False),
        ("qk_norm", cfg.qk_norm, False), ("parallel_block", cfg.parallel_block, False),
        ("head_bias", cfg.head_bias, False))
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


def _persimmon_config_to_hf(cfg: LanguageConfig, where: str) -> dict:
    """A Persimmon-layout LanguageConfig -> PersimmonConfig's dict; what Persimmon cannot express is refused by
    field. The rope keys are written both as transformers 5's rope_parameters and 4.x's top-level keys."""
    problems = [f"{k} {v!r} (Persimmon has {ok!r})" for k, v, ok in (
        ("mlp", cfg.mlp, "plain"), ("bias", cfg.bias, True), ("kv_heads", cfg.kv_heads, cfg.heads),
        ("head_dim", cfg.head_dim or cfg.width // cfg.heads, cfg.width // cfg.heads),
        ("embed_scale", cfg.embed_scale, False), ("mrope_section", cfg.mrope_section, ()),
        ("rope_scaling.kind", cfg.rope_scaling.kind, ""), ("parallel_block", cfg.parallel_block, False),
        ("head_bias", cfg.head_bias, False),
        ("qk_norm_kind", cfg.qk_norm_kind, "layernorm"), ("post_norms", cfg.post_norms, False),
        ("layer_types", cfg.layer_types, ())) if v != ok]
    if cfg.act not in HF_PERSIMMON_ACTS:
        problems.append(f"act {cfg.act!r} (exportable: {', '.join(HF_PERSIMMON_ACTS)})")
    if problems:
        raise ConfigError(f"{where}: rotary positions with LayerNorms export as Persimmon, which cannot express: "
                          f"{'; '.join(problems)}")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.rotary_fraction}
    return {"model_type": "persimmon", "architectures": [LM_CLASSES["persimmon"]], "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.width, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.depth,
            "num_attention_heads": cfg.heads, "hidden_act": HF_PERSIMMON_ACTS[cfg.act],
            "layer_norm_eps": cfg.norm_eps, "qk_layernorm": cfg.qk_norm, "rope_parameters": rope,
            "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.rotary_fraction,
            "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
            "hidden_dropout": 0.0, "attention_dropout": 0.0, "torch_dtype": "float32"}


def export_hf_lm(lm: DecoderLM, folder: str | Path) -> None:
    """A DecoderLM -> config.json + model.safetensors that transformers' ``AutoModelForCausalLM`` loads. The
    config is built first, so an LM no transformers family expresses leaves no weights behind."""
    config = lm_config_to_hf(lm.cfg)
    folder, prefix = Path(folder), lm_prefix(lm.cfg)
    folder.mkdir(parents=True, exist_ok=True)
    write_hf_weights(folder, fuse_qkv(lm.cfg, export_table(lm, lm_key_map(lm.cfg, prefix)), prefix))
    write_json(folder / "config.json", config)
