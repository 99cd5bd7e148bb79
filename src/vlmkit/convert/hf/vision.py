"""CLIP and SigLIP vision towers <-> vlmkit's ``ViTEncoder``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.config import VisionConfig
from vlmkit.convert.hf.io import find_prefix, load_state, read_checkpoint
from vlmkit.encoders.vit import ViTEncoder
from vlmkit.errors import ConfigError

VISION_TYPES = {"clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip", "siglip": "siglip"}
# towers of vision-language models that are SigLIP under another name (same tensors, same computation on
# unpadded images): Idefics3 / SmolVLM
VISION_TYPES |= {"idefics3_vision": "siglip", "smolvlm_vision": "siglip"}
VISION_ACTS = {"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def vision_config_from_hf(cfg: dict, feature_layer: int = -1, where: str = "config.json") -> VisionConfig:
    """A CLIP or SigLIP vision config (standalone, or the ``vision_config`` of a CLIPModel / SiglipModel)
    -> VisionConfig. CLIP: class token, pre-layernorm, and (as transformers' ``last_hidden_state``) no final
    norm on the patch features; SigLIP: no class token, final norm on the last layer's features."""
    kind = VISION_TYPES.get(cfg.get("model_type"))
    if kind is None:
        raise ConfigError(f"{where}: model_type {cfg.get('model_type')!r} is not a vision tower vlmkit imports; "
                          f"supported: {', '.join(VISION_TYPES)}")
    if cfg.get("model_type") in ("clip", "siglip"):
        cfg = {"model_type": f"{kind}_vision_model", **cfg.get("vision_config", {})}
    act = cfg.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh")
    if act not in VISION_ACTS:
        raise ConfigError(f"{where}: hidden_act {act!r} is not implemented; supported: {', '.join(VISION_ACTS)}")
    try:
        depth = int(cfg["num_hidden_layers"])
        return VisionConfig(
            arch="vit", image_size=_pair(cfg.get("image_size", 224)), patch_size=int(cfg["patch_size"]),
            channels=int(cfg.get("num_channels", 3)), width=int(cfg["hidden_size"]), depth=depth,
            heads=int(cfg["num_attention_heads"]), mlp_dim=int(cfg["intermediate_size"]), act=VISION_ACTS[act],
            norm="layernorm", norm_eps=float(cfg.get("layer_norm_eps", 1e-5)), class_token=kind == "clip",
            pos_embed="learned", pre_norm=kind == "clip",
            post_norm=kind == "siglip" and feature_layer in (-1, depth), patch_bias=kind == "siglip",
            qkv_bias=True, feature_layer=feature_layer, drop_class_token=False)
    except KeyError as e:
        raise ConfigError(f"{where}: missing key {e.args[0]!r} for a {kind} vision tower") from e


def vision_key_map(cfg: VisionConfig, prefix: str = "vision_model.") -> dict[str, str]:
    """vlmkit ViTEncoder parameter name -> transformers CLIP/SigLIP vision tensor name."""
    e = f"{prefix}embeddings."
    table = {"patch_embed.weight": f"{e}patch_embedding.weight", "pos_embed": f"{e}position_embedding.weight"}
    if cfg.patch_bias:
        table["patch_embed.bias"] = f"{e}patch_embedding.bias"
    if cfg.class_token:
        table["class_token"] = f"{e}class_embedding"
    if cfg.pre_norm:
        table |= {f"pre_norm.{w}": f"{prefix}pre_layrnorm.{w}" for w in ("weight", "bias")}
    if cfg.post_norm:
        table |= {f"post_norm.{w}": f"{prefix}post_layernorm.{w}" for w in ("weight", "bias")}
    for i in range(ViTEncoder._layers_to_run(cfg.depth, cfg.feature_layer)):
        table |= block_key_map(f"blocks.{i}.", f"{prefix}encoder.layers.{i}.")
    return table


def block_key_map(ours: str, theirs: str) -> dict[str, str]:
    """One vlmkit ViTBlock -> one CLIP / SigLIP encoder layer (vision and text towers alike)."""
    table = {}
    for w in ("weight", "bias"):
        table[f"{ours}norm1.{w}"] = f"{theirs}layer_norm1.{w}"
        table[f"{ours}norm2.{w}"] = f"{theirs}layer_norm2.{w}"
        for p, q in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "out")):
            table[f"{ours}attn.{p}_proj.{w}"] = f"{theirs}self_attn.{q}_proj.{w}"
        for fc in ("fc1", "fc2"):
            table[f"{ours}mlp.{fc}.{w}"] = f"{theirs}mlp.{fc}.{w}"
    return table


def load_hf_vision(folder: str | Path, feature_layer: int = -1) -> ViTEncoder:
    """A transformers CLIPVisionModel / SiglipVisionModel (or CLIPModel / SiglipModel) folder -> ViTEncoder
    returning the hidden states of ``feature_layer`` for every token (class token kept, as transformers'
    ``hidden_states``; LLaVA-style models drop it and read layer -2)."""
    ckpt = read_checkpoint(folder)
    where = str(ckpt.folder / "config.json")
    cfg = vision_config_from_hf(ckpt.config, feature_layer, where)
    enc = ViTEncoder(cfg)
    # transformers 4 saves a standalone tower under "vision_model.", 5 without it; a dual encoder always has it
    prefix = find_prefix(ckpt.tensors, "vision_model.", "")
    table, tensors = vision_tensors(ckpt.tensors, cfg, prefix)
    tensors = {k: v for k, v in tensors.items() if k.startswith(prefix)}  # not a dual encoder's text half
    load_state(enc, tensors, table, str(ckpt.folder))
    return enc.eval()


def vision_tensors(tensors: dict, cfg: VisionConfig, prefix: str, ours: str = "") -> tuple[dict, dict]:
    """(key table with ``ours`` before vlmkit's names, the tensors ready for load_state): the class token and
    positions reshaped to vlmkit's [1, 1, D] and [1, N, D] (transformers keeps [D] and [N, D]), and tower
    tensors that are known but unused dropped: layers after the feature layer (never built), a final norm
    the features do not pass through, SigLIP's pooling head, saved position ids."""
    table = {ours + k: v for k, v in vision_key_map(cfg, prefix).items()}
    out = dict(tensors)
    for name, dims in (("class_token", 1), ("pos_embed", 2)):
        t = out.get(table.get(ours + name, ""))
        if t is not None and t.ndim == dims:  # anything else fails load_state's shape check by name
            out[table[ours + name]] = t.reshape(1, -1, t.shape[-1])
    built, layers = ViTEncoder._layers_to_run(cfg.depth, cfg.feature_layer), f"{prefix}encoder.layers."
    mapped = set(table.values())
    for k in list(out):
        index = k[len(layers):].split(".")[0] if k.startswith(layers) else ""
        if k not in mapped and ((index.isdigit() and int(index) >= built) or k.startswith(
                (f"{prefix}post_layernorm.", f"{prefix}head.", f"{prefix}embeddings.position_ids"))):
            del out[k]
    return table, out


# ---------------------------------------------------------------------------------------------- export

HF_VISION_ACTS = {v: k for k, v in VISION_ACTS.items()}


def vision_config_to_hf(cfg: VisionConfig, where: str = "vision") -> dict:
    """A ViT VisionConfig that is a CLIP tower (class token, pre-layernorm, no patch bias) or a SigLIP tower
    (none of them) -> that tower's transformers config, with the layers vlmkit built (those up to the feature
    layer; the features are then the last hidden state before the final norm)."""
    clip = cfg.class_token
    problems = [f"{k} {v!r} (transformers has {ok!r})" for k, v, ok in (
        ("arch", cfg.arch, "vit"), ("stem", cfg.stem, "patch"), ("pos_embed", cfg.pos_embed, "learned"),
        ("norm", cfg.norm, "layernorm"), ("qkv_bias", cfg.qkv_bias, True), ("pos_scale", cfg.pos_scale, 1.0),
        ("pre_norm", cfg.pre_norm, clip), ("patch_bias", cfg.patch_bias, not clip)) if v != ok]
    if cfg.image_size[0] != cfg.image_size[1]:
        problems.append(f"image_size {tuple(cfg.image_size)} (CLIP and SigLIP towers are square)")
    if cfg.act not in HF_VISION_ACTS:
        problems.append(f"act {cfg.act!r} (exportable: {', '.join(HF_VISION_ACTS)})")
    if problems:
        raise ConfigError(f"{where}: not a {'CLIP' if clip else 'SigLIP'} tower transformers can load: "
                          f"{'; '.join(problems)}")
    layers = ViTEncoder._layers_to_run(cfg.depth, cfg.feature_layer)
    if layers == 0:
        raise ConfigError(f"{where}: feature_layer {cfg.feature_layer} reads the embeddings; a transformers tower "
                          f"needs at least one layer")
    out = {"model_type": "clip_vision_model" if clip else "siglip_vision_model", "hidden_size": cfg.width,
           "intermediate_size": cfg.mlp_dim, "num_hidden_layers": layers, "num_attention_heads": cfg.heads,
           "image_size": cfg.image_size[0], "patch_size": cfg.patch_size, "num_channels": cfg.channels,
           "hidden_act": HF_VISION_ACTS[cfg.act], "layer_norm_eps": cfg.norm_eps}
    if not clip:
        out["vision_use_head"] = False
    return out


def export_vision_tensors(encoder: ViTEncoder, cfg: VisionConfig, prefix: str) -> dict:
    """The tower's tensors under transformers' names (``prefix`` before them): class token and positions in
    transformers' shapes, and an identity final norm when vlmkit has none (transformers' tower always carries
    one; the features exported models read never pass through it)."""
    table = vision_key_map(cfg, prefix)
    params = dict(encoder.named_parameters())
    out = {theirs: params[name] for name, theirs in table.items()}
    for name, theirs in table.items():
        if name in ("class_token", "pos_embed"):
            out[theirs] = out[theirs].reshape(-1, cfg.width) if name == "pos_embed" else out[theirs].reshape(-1)
    if not cfg.post_norm:
        out[f"{prefix}post_layernorm.weight"] = torch.ones(cfg.width)
        out[f"{prefix}post_layernorm.bias"] = torch.zeros(cfg.width)
    return out
