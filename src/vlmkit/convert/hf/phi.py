"""Phi LMs <-> vlmkit's ``DecoderLM``: Phi-1 / Phi-1.5 / Phi-2 (``PhiForCausalLM``) and Phi-3 (``Phi3ForCausalLM``),
config translation, key maps, and the fused projections of Phi-3. Beside convert/hf/lm.py (Llama, Qwen2, Mistral,
Gemma, OPT, Persimmon), which these build on.

Phi-1 / 1.5 / 2 is read as Persimmon's kind (``norm: layernorm``, ``mlp: plain``, ``bias``, partial rotary from
``partial_rotary_factor``, ``qk_norm`` from ``qk_layernorm``) with a parallel block (``parallel_block``: one
LayerNorm feeding attention and MLP, x + attn(ln(x)) + mlp(ln(x))) and an LM head with a bias (``head_bias``);
gelu_new is tanh-approximated GELU (``act: gelu_tanh``).

Phi-3 computes Llama's function (RMSNorm, SwiGLU, no biases), optionally with partial rotary (Phi-4-mini's 0.75),
but stores its attention as one fused ``qkv_proj`` ([q; k; v] rows) and its MLP as one ``gate_up_proj`` ([gate;
up] rows): split on import (:func:`split_phi3`), fused on export (:func:`fuse_phi3`). Its long-context RoPE
(``longrope``, 4.x's ``su`` / ``yarn``: the 128k variants) is refused by name; a ``sliding_window`` caps the
context at the window, within which sliding-window attention is causal attention (as Mistral's in lm.py).
"""

from __future__ import annotations

import dataclasses

import torch

from vlmkit.config import LanguageConfig
from vlmkit.convert.hf.lm import lm_config_from_hf, lm_config_to_hf, lm_key_map
from vlmkit.errors import CheckpointError, ConfigError

PHI_TYPES = ("phi", "phi3")
PHI_CLASSES = {"phi": "PhiForCausalLM", "phi3": "Phi3ForCausalLM"}
# transformers' ACT2FN names -> vlmkit's (gelu_new and gelu_pytorch_tanh are both tanh-approximated GELU)
PHI_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
            "silu": "silu"}
HF_PHI_ACTS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
PHI_ROTARY_FRACTION = 0.5  # PhiConfig's partial_rotary_factor when a config has none
QKV, GATE_UP = "self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"  # Phi-3's fused tensors, per layer


def _rope(cfg: dict, kind: str, default_fraction: float, where: str) -> tuple[float, float]:
    """(theta, partial rotary factor) from ``rope_parameters`` (transformers 5) or the top level (4.x); only
    unscaled RoPE."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope = params.get("rope_type", params.get("type", "default"))
    if rope != "default":
        extra = " (Phi-3's long-context RoPE of the 128k variants)" if rope in ("longrope", "su", "yarn") else ""
        raise ConfigError(f"{where}: rope_type {rope!r}{extra} is not implemented for {kind} in vlmkit; "
                          f"supported: default")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    return theta, float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", default_fraction)))


def _check_fraction(fraction: float, head_dim: int, where: str) -> None:
    rotated = int(head_dim * fraction)
    if not 0 < fraction <= 1 or rotated < 2 or rotated % 2:
        raise ConfigError(f"{where}: partial_rotary_factor {fraction} rotates {rotated} of the {head_dim} dims of "
                          f"each head; supported: a factor in (0, 1] that rotates an even number >= 2")


def phi_config_from_hf(cfg: dict, where: str = "config.json") -> LanguageConfig:
    """A PhiConfig (Phi-1 / 1.5 / 2) or Phi3Config dict -> LanguageConfig; what vlmkit does not compute is
    refused by key."""
    kind = cfg.get("model_type")
    if kind == "phi3":
        return _phi3_config_from_hf(cfg, where)
    if kind != "phi":
        raise ConfigError(f"{where}: model_type {kind!r} is not a Phi LM; supported: {', '.join(PHI_TYPES)}")
    try:
        width, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        if width % heads:
            raise ConfigError(f"{where}: hidden_size {width} is not a multiple of num_attention_heads {heads}")
        act = cfg.get("hidden_act", "gelu_new")
        if act not in PHI_ACTS:
            raise ConfigError(f"{where}: hidden_act {act!r} is not implemented for phi; supported: "
                              f"{', '.join(PHI_ACTS)}")
        theta, fraction = _rope(cfg, "phi", PHI_ROTARY_FRACTION, where)
        _check_fraction(fraction, width // heads, where)
        return LanguageConfig(
            vocab_size=int(cfg["vocab_size"]), width=width, depth=int(cfg["num_hidden_layers"]), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads), mlp_dim=int(cfg["intermediate_size"]),
            act=PHI_ACTS[act], norm_eps=float(cfg.get("layer_norm_eps", 1e-5)), rope_theta=theta,
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), norm="layernorm", mlp="plain", bias=True,
            qk_norm=bool(cfg.get("qk_layernorm", False)), rotary_fraction=fraction, parallel_block=True,
            head_bias=True)
    except KeyError as e:
        raise ConfigError(f"{where}: missing key {e.args[0]!r} for model_type 'phi'") from e


def _phi3_config_from_hf(cfg: dict, where: str) -> LanguageConfig:
    """Phi-3 as Llama's config (lm.py) with its partial rotary and sliding window."""
    theta, fraction = _rope(cfg, "phi3", 1.0, where)
    if "hidden_size" not in cfg or "num_attention_heads" not in cfg:
        raise ConfigError(f"{where}: missing key 'hidden_size' or 'num_attention_heads' for model_type 'phi3'")
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))
    _check_fraction(fraction, head_dim, where)
    llama = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "rope_scaling", "partial_rotary_factor")}
    llama |= {"model_type": "llama", "rope_theta": theta, "hidden_act": cfg.get("hidden_act", "silu")}
    window = cfg.get("sliding_window")
    if window not in (None, 0):  # within the window sliding-window attention is causal attention
        llama["max_position_embeddings"] = min(int(cfg.get("max_position_embeddings", 4096)), int(window))
    try:
        lm = lm_config_from_hf(llama, where)
    except ConfigError as e:
        raise ConfigError(str(e).replace("model_type 'llama'", "model_type 'phi3'").replace(" for llama",
                                                                                             " for phi3")) from e
    return dataclasses.replace(lm, rotary_fraction=fraction)


# ---------------------------------------------------------------------------------------------- key maps


def phi_key_map(cfg: LanguageConfig, kind: str, prefix: str = "model.",
                head: str = "lm_head.weight") -> dict[str, str]:
    """DecoderLM -> Phi / Phi-3 tensor names. Phi-3's q, k, v map to ``<qkv_proj> (q)``, ``(k)``, ``(v)`` and its
    gate and up to ``<gate_up_proj> (gate)``, ``(up)``: the parts :func:`split_phi3` cuts the fused ones into."""
    if kind == "phi3":
        table = lm_key_map(cfg, prefix, head)
        for i in range(cfg.depth):
            ours, theirs = f"layers.{i}.", f"{prefix}layers.{i}."
            table |= {f"{ours}attn.{p}_proj.weight": f"{theirs}{QKV} ({p})" for p in "qkv"}
            table |= {f"{ours}mlp.{p}_proj.weight": f"{theirs}{GATE_UP} ({p})" for p in ("gate", "up")}
        return table
    table = {"embed_tokens.weight": f"{prefix}embed_tokens.weight", "lm_head.bias": head[:-len("weight")] + "bias"}
    table |= {f"norm.{w}": f"{prefix}final_layernorm.{w}" for w in ("weight", "bias")}
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = head
    for i in range(cfg.depth):
        ours, theirs = f"layers.{i}.", f"{prefix}layers.{i}."
        for w in ("weight", "bias"):
            table[f"{ours}input_norm.{w}"] = f"{theirs}input_layernorm.{w}"
            table |= {f"{ours}attn.{p}_proj.{w}": f"{theirs}self_attn.{p}_proj.{w}" for p in "qkv"}
            table[f"{ours}attn.o_proj.{w}"] = f"{theirs}self_attn.dense.{w}"
            if cfg.qk_norm:
                table[f"{ours}attn.q_norm.{w}"] = f"{theirs}self_attn.q_layernorm.{w}"
                table[f"{ours}attn.k_norm.{w}"] = f"{theirs}self_attn.k_layernorm.{w}"
            table |= {f"{ours}mlp.{fc}.{w}": f"{theirs}mlp.{fc}.{w}" for fc in ("fc1", "fc2")}
    return table


def _phi3_parts(cfg: LanguageConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Phi-3's fused tensors: their parts and each part's rows."""
    hd = cfg.head_dim or cfg.width // cfg.heads
    return {QKV: (("q", "k", "v"), (cfg.heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd)),
            GATE_UP: (("gate", "up"), (cfg.mlp_dim, cfg.mlp_dim))}


def split_phi3(cfg: LanguageConfig, tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``tensors`` with each Phi-3 layer's fused ``qkv_proj`` ([q; k; v] rows) and ``gate_up_proj`` ([gate; up]
    rows) replaced by the parts :func:`phi_key_map` names."""
    out = dict(tensors)
    for i in range(cfg.depth):
        for name, (parts, rows) in _phi3_parts(cfg).items():
            fused = f"{prefix}layers.{i}.{name}"
            if fused not in out:
                continue  # load_state names what is missing
            t = out.pop(fused)
            if t.shape[0] != sum(rows):
                raise CheckpointError(f"{fused} has shape {tuple(t.shape)}, the config implies ({sum(rows)}, ...) "
                                      f"({' + '.join(f'{p} {r}' for p, r in zip(parts, rows))})")
            out |= {f"{fused} ({p})": part for p, part in zip(parts, t.split(rows))}
    return out


def fuse_phi3(cfg: LanguageConfig, tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`split_phi3` on an export's tensors."""
    out = dict(tensors)
    for i in range(cfg.depth):
        for name, (parts, _) in _phi3_parts(cfg).items():
            fused = f"{prefix}layers.{i}.{name}"
            out[fused] = torch.cat([out.pop(f"{fused} ({p})").detach() for p in parts])
    return out


# ---------------------------------------------------------------------------------------------- export


def phi_config_to_hf(cfg: LanguageConfig, kind: str, where: str = "lm") -> dict:
    """LanguageConfig -> PhiConfig's (``kind`` "phi") or Phi3Config's dict; what the class cannot express is
    refused by field."""
    if kind == "phi3":
        out = lm_config_to_hf(dataclasses.replace(cfg, rotary_fraction=1.0), where)  # refuses what Llama cannot
        if out["model_type"] != "llama" or cfg.rope_scaling.kind or cfg.mrope_section:
            raise ConfigError(f"{where}: Phi-3 is Llama's block with plain RoPE: qkv_bias, Gemma's norms, RoPE "
                              f"scaling and mrope_section cannot be expressed")
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.rotary_fraction}
        for key in ("attention_bias", "mlp_bias"):
            out.pop(key)
        return out | {"model_type": "phi3", "architectures": [PHI_CLASSES["phi3"]], "rope_parameters": rope,
                      "partial_rotary_factor": cfg.rotary_fraction, "sliding_window": None,
                      "original_max_position_embeddings": cfg.max_seq_len}
    problems = [f"{k} {v!r} (Phi has {ok!r})" for k, v, ok in (
        ("norm", cfg.norm, "layernorm"), ("mlp", cfg.mlp, "plain"), ("bias", cfg.bias, True),
        ("parallel_block", cfg.parallel_block, True), ("head_bias", cfg.head_bias, True),
        ("pos_embed", cfg.pos_embed, "rope"), ("head_dim", cfg.head_dim or cfg.width // cfg.heads,
                                               cfg.width // cfg.heads),
        ("embed_scale", cfg.embed_scale, False), ("mrope_section", cfg.mrope_section, ()),
        ("rope_scaling.kind", cfg.rope_scaling.kind, "")) if v != ok]
    if cfg.act not in HF_PHI_ACTS:
        problems.append(f"act {cfg.act!r} (exportable: {', '.join(HF_PHI_ACTS)})")
    if problems:
        raise ConfigError(f"{where}: PhiForCausalLM cannot express: {'; '.join(problems)}")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.rotary_fraction}
    return {"model_type": "phi", "architectures": [PHI_CLASSES["phi"]], "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.width, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.depth,
            "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads, "hidden_act": HF_PHI_ACTS[cfg.act],
            "layer_norm_eps": cfg.norm_eps, "qk_layernorm": cfg.qk_norm, "rope_parameters": rope,
            "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.rotary_fraction,
            "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0, "torch_dtype": "float32"}


__all__ = ["PHI_CLASSES", "PHI_TYPES", "fuse_phi3", "phi_config_from_hf", "phi_config_to_hf", "phi_key_map",
           "split_phi3"]
