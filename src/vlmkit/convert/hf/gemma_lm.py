"""Gemma 2 and Gemma 3's text decoder (``gemma2``, ``gemma3_text``) <-> the fields they add to a Gemma
``LanguageConfig``; :mod:`vlmkit.convert.hf.lm` reads and writes the rest as Gemma's.

Their post_attention_layernorm norms the attention's output (vlmkit's ``attn_out_norm``; the MLP's pre-norm is
pre_feedforward_layernorm), the attention scale is query_pre_attn_scalar ** -0.5, ``layer_types`` marks the sliding
layers (default: sliding_window_pattern, every 2nd / 6th layer full), and final_logit_softcapping caps the logits.
Gemma 2 caps attention scores (attn_logit_softcapping); Gemma 3 norms each head's queries and keys and rotates its
sliding layers with a theta of their own (``rope_parameters.sliding_attention``, 4.x's rope_local_base_freq), its full
layers with ``rope_parameters.full_attention`` (4.x's rope_theta and rope_scaling; linear scaling included).
transformers' Gemma 3 attention ignores attn_logit_softcapping, and so does the import. Bidirectional Gemma
(use_bidirectional_attention: EmbeddingGemma) is refused by name.
"""

from __future__ import annotations

from vlmkit.config import LanguageConfig, RopeScalingConfig
from vlmkit.errors import ConfigError

GEMMA_CLASSES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


GEMMA_LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}
GEMMA_PATTERN = {"gemma2": 2, "gemma3_text": 6}  # sliding_window_pattern when a config has no layer_types


def _gemma_layer_types(cfg: dict, kind: str, where: str) -> tuple[str, ...]:
    depth = int(cfg["num_hidden_layers"])
    theirs = cfg.get("layer_types")
    if theirs is None:
        pattern = int(cfg.get("sliding_window_pattern", GEMMA_PATTERN[kind]))
        theirs = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(depth)]
    bad = [t for t in theirs if t not in GEMMA_LAYER_TYPES]
    if bad or len(theirs) != depth:
        raise ConfigError(f"{where}: layer_types {theirs!r}: one of {', '.join(GEMMA_LAYER_TYPES)} per layer "
                          f"({depth} layers)")
    return tuple(GEMMA_LAYER_TYPES[t] for t in theirs)


def _gemma3_rope(cfg: dict, where: str) -> tuple[float, float, RopeScalingConfig]:
    """(full theta, sliding theta, full layers' scaling) of a Gemma3TextConfig dict: transformers 5's
    rope_parameters per layer type, or 4.x's rope_theta, rope_local_base_freq and rope_scaling."""
    params = cfg.get("rope_parameters") or {}
    full = dict(params.get("full_attention") or cfg.get("rope_scaling") or {})
    local = dict(params.get("sliding_attention") or {})
    full.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", cfg.get("rope_local_base_freq", 10_000.0))
    kinds = (full.get("rope_type", full.get("type", "default")), local.get("rope_type", local.get("type", "default")))
    if kinds[0] not in ("default", "linear") or kinds[1] != "default":
        raise ConfigError(f"{where}: rope types {kinds[0]!r} (full layers), {kinds[1]!r} (sliding layers) are not "
                          f"implemented for gemma3_text; supported: default or linear, default")
    scaling = RopeScalingConfig(kind="linear", factor=float(full["factor"])) if kinds[0] == "linear" \
        else RopeScalingConfig()
    return float(full["rope_theta"]), float(local["rope_theta"]), scaling


def _int_if_whole(v: float) -> int | float:
    """transformers' Gemma configs type query_pre_attn_scalar as int: a whole number is written as one."""
    return int(v) if float(v).is_integer() else v


def _number(v) -> float | None:
    return None if v is None else float(v)


def gemma_fields(cfg: dict, where: str) -> tuple[dict, dict]:
    """A Gemma2Config / Gemma3TextConfig dict -> (the Gemma 1 config dict that the shared reader turns into the base
    LanguageConfig, the fields Gemma 2 / 3 add to it). Keys a config leaves out take transformers' defaults."""
    kind = cfg["model_type"]
    if cfg.get("use_bidirectional_attention"):
        raise ConfigError(f"{where}: use_bidirectional_attention: true (bidirectional {kind}, as EmbeddingGemma) is "
                          f"not implemented in vlmkit; supported: false")
    try:
        base = {"head_dim": 256, "tie_word_embeddings": True, "max_position_embeddings": 8192,
                "hidden_activation": "gelu_pytorch_tanh", **cfg, "model_type": "gemma", "rope_scaling": None}
        extra = {"post_norms": True, "attn_scalar": float(cfg.get("query_pre_attn_scalar", 256)),
                 "sliding_window": int(cfg.get("sliding_window") or 4096),
                 "layer_types": _gemma_layer_types(cfg, kind, where)}
        if kind == "gemma3_text":
            theta, local, scaling = _gemma3_rope(cfg, where)
            base["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
            # transformers' Gemma 3 attention never reads attn_logit_softcapping
            return base, extra | {"qk_norm": True, "qk_norm_kind": "rmsnorm", "local_rope_theta": local,
                                  "rope_scaling": scaling, "attn_softcap": None,
                                  "logit_softcap": _number(cfg.get("final_logit_softcapping"))}
        return base, extra | {"attn_softcap": _number(cfg.get("attn_logit_softcapping", 50.0)),
                              "logit_softcap": _number(cfg.get("final_logit_softcapping", 30.0))}
    except KeyError as e:
        raise ConfigError(f"{where}: missing key {e.args[0]!r} for model_type {kind!r}") from e


def gemma_config_to_hf(cfg: LanguageConfig, hf_act: str, where: str) -> dict:
    """A LanguageConfig with sandwich norms -> Gemma2Config's dict, or Gemma3TextConfig's with qk_norm
    (``hf_act``: its activation's transformers name)."""
    kind = "gemma3_text" if cfg.qk_norm else "gemma2"
    problems = [f"{k} {v!r}" for k, v, ok in (("qk_norm_kind", cfg.qk_norm_kind, "rmsnorm" if cfg.qk_norm else
                                                cfg.qk_norm_kind),
        ("norm_offset", cfg.norm_offset, True), ("embed_scale", cfg.embed_scale, True), ("qkv_bias", cfg.qkv_bias, False),
        ("mrope_section", cfg.mrope_section, ()), ("head_bias", cfg.head_bias, False)) if v != ok]
    if kind == "gemma2":
        problems += [f"{k} {v!r}" for k, v, ok in (("local_rope_theta", cfg.local_rope_theta, None),
                                                    ("rope_scaling.kind", cfg.rope_scaling.kind, "")) if v != ok]
    else:
        if cfg.attn_softcap is not None:
            problems.append(f"attn_softcap {cfg.attn_softcap!r} (Gemma 3 does not cap attention scores)")
        if cfg.rope_scaling.kind not in ("", "linear"):
            problems.append(f"rope_scaling.kind {cfg.rope_scaling.kind!r} (Gemma 3 has linear or none)")
    if problems:
        raise ConfigError(f"{where}: post_norms: true exports as {kind}, which cannot express: {'; '.join(problems)}")
    hd = cfg.head_dim or cfg.width // cfg.heads
    types = [{"sliding": "sliding_attention", "full": "full_attention"}[cfg.layer_kind(i)] for i in range(cfg.depth)]
    out = {"model_type": kind, "architectures": [GEMMA_CLASSES[kind]], "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.width, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.depth,
           "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads, "head_dim": hd,
           "hidden_activation": hf_act, "hidden_act": hf_act, "rms_norm_eps": cfg.norm_eps,
           "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
           "attention_bias": False, "query_pre_attn_scalar": _int_if_whole(cfg.attn_scalar or hd),
           "sliding_window": cfg.sliding_window or cfg.max_seq_len, "layer_types": types,
           "attn_logit_softcapping": cfg.attn_softcap, "final_logit_softcapping": cfg.logit_softcap,
           "rope_theta": cfg.rope_theta, "torch_dtype": "float32"}
    if kind == "gemma2":
        return out | {"rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    full = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling.kind == "linear":
        full |= {"rope_type": "linear", "factor": cfg.rope_scaling.factor}
        out["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_scaling.factor}
    local = cfg.local_rope_theta if cfg.local_rope_theta is not None else cfg.rope_theta
    return out | {"rope_local_base_freq": local, "rope_parameters": {
        "full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": local}}}
