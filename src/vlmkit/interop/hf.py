"""Hugging Face checkpoint folders: reading them safely, and importing the Llama-family text LMs.

A folder is ``config.json`` plus weights in ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Pickled weights (``*.bin``, ``*.pt``) are never loaded: unpickling runs
arbitrary code. Every weight mapping is an explicit table; keys the table does not expect, and keys it
expects but the folder lacks, are reported by name, as are shape mismatches.

This module is the first part of the interop issue: the text LMs vlmkit's ``DecoderLM`` covers
(Llama, Qwen2, Mistral, Gemma), the CLIP and SigLIP vision towers (``ViTEncoder``) and LLaVA-1.5's weights
(``VisionLanguageModel``), CLIP/SigLIP-style image processors (``ImageTransform``; both config layouts) and
``tokenizer.json`` tokenizers. The other composite families, chat templates, ``vlmkit.load`` on a folder,
``vlmkit convert`` and export build on it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlmkit.config import ConnectorConfig, LanguageConfig, ModelConfig, VisionConfig
from vlmkit.encoders.vit import ViTEncoder
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models import build_model
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.image import ImageTransform
from vlmkit.processing.tokenizer import TextTokenizer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
LM_TYPES = ("llama", "qwen2", "mistral", "gemma")
LM_ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass
class HFCheckpoint:
    folder: Path
    config: dict
    tensors: dict[str, torch.Tensor]


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a Hugging Face checkpoint folder: {path.name} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards its index lists; refuses pickled weights."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map' of tensor name -> shard file") from e
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            path = folder / shard
            if not path.is_file():
                raise CheckpointError(f"{index} lists shard {shard!r}, which is not in {folder}")
            tensors.update(load_file(str(path)))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index}: tensors listed but absent from their shards: {missing[:5]}")
        return tensors
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} has only pickled weights ({', '.join(pickles)}); vlmkit never unpickles (it can run "
            f"arbitrary code). Re-save them as safetensors, e.g. with transformers: "
            f"model.save_pretrained(out, safe_serialization=True)")
    raise CheckpointError(f"{folder} has no weights: expected model.safetensors or model.safetensors.index.json")


def read_checkpoint(folder: str | Path) -> HFCheckpoint:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    return HFCheckpoint(folder, read_config(folder), read_weights(folder))


def _rope_theta(cfg: dict, where: str) -> float:
    """rope theta from ``rope_parameters`` (transformers 5) or ``rope_theta`` (4.x); only unscaled RoPE."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise ConfigError(f"{where}: rope_type {kind!r} (RoPE scaling) is not implemented in vlmkit; "
                          f"supported: default")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def lm_config_from_hf(cfg: dict, where: str = "config.json") -> LanguageConfig:
    """config.json of a Llama / Qwen2 / Mistral / Gemma causal LM -> LanguageConfig."""
    kind = cfg.get("model_type")
    if kind not in LM_TYPES:
        raise ConfigError(f"{where}: model_type {kind!r} is not a text LM vlmkit imports; supported: "
                          f"{', '.join(LM_TYPES)}")
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
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=kind == "qwen2" or bool(cfg.get("attention_bias", False)),
            norm_offset=kind == "gemma", embed_scale=kind == "gemma")
    except KeyError as e:
        raise ConfigError(f"{where}: missing key {e.args[0]!r} for model_type {kind!r}") from e


def lm_key_map(cfg: LanguageConfig, prefix: str = "model.", head: str = "lm_head.weight") -> dict[str, str]:
    """vlmkit DecoderLM parameter name -> transformers *ForCausalLM tensor name (the explicit table)."""
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


def load_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], table: dict[str, str], where: str,
               ignore: tuple[str, ...] = ()) -> None:
    """Copy ``tensors`` into ``module`` through ``table``; missing, unexpected and mis-shaped keys are errors."""
    missing = sorted(theirs for theirs in table.values() if theirs not in tensors)
    unexpected = sorted(k for k in set(tensors) - set(table.values()) if not (ignore and k.endswith(ignore)))
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not match the config: missing {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                              f"{' ...' if len(unexpected) > 8 else ''}")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for ours, theirs in table.items():
            src, dst = tensors[theirs], params[ours]
            if src.shape != dst.shape:
                raise CheckpointError(f"{where}: {theirs} has shape {tuple(src.shape)}, the config implies "
                                      f"{tuple(dst.shape)}")
            dst.copy_(src.to(dst.dtype))


def load_hf_lm(folder: str | Path) -> DecoderLM:
    """A transformers Llama / Qwen2 / Mistral / Gemma ``*ForCausalLM`` folder -> DecoderLM (fp32)."""
    ckpt = read_checkpoint(folder)
    where = str(ckpt.folder / "config.json")
    cfg = lm_config_from_hf(ckpt.config, where)
    with torch.device("meta"):
        lm = DecoderLM(cfg)
    lm = lm.to_empty(device="cpu")
    lm.rotary = type(lm.rotary)(lm.head_dim, cfg.rope_theta)  # buffers are not weights: rebuild them
    if cfg.tie_embeddings:
        lm.lm_head.weight = lm.embed_tokens.weight
    # a tied checkpoint may still carry lm_head.weight (a copy of the embeddings): not an error
    load_state(lm, ckpt.tensors, lm_key_map(cfg), str(ckpt.folder),
               ignore=("lm_head.weight",) if cfg.tie_embeddings else ())
    return lm.eval()


# ---------------------------------------------------------------------------------------------- vision towers

VISION_TYPES = {"clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip", "siglip": "siglip"}
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
        ours, theirs = f"blocks.{i}.", f"{prefix}encoder.layers.{i}."
        for w in ("weight", "bias"):
            table[f"{ours}norm1.{w}"] = f"{theirs}layer_norm1.{w}"
            table[f"{ours}norm2.{w}"] = f"{theirs}layer_norm2.{w}"
            for p, q in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "out")):
                table[f"{ours}attn.{p}_proj.{w}"] = f"{theirs}self_attn.{q}_proj.{w}"
            for fc in ("fc1", "fc2"):
                table[f"{ours}mlp.{fc}.{w}"] = f"{theirs}mlp.{fc}.{w}"
    return table


def _prefix(tensors: dict, *candidates: str) -> str:
    """The first candidate prefix that some tensor name starts with (checkpoint layouts differ by version)."""
    return next((c for c in candidates if any(k.startswith(c) for k in tensors)), candidates[0])


def load_hf_vision(folder: str | Path, feature_layer: int = -1) -> ViTEncoder:
    """A transformers CLIPVisionModel / SiglipVisionModel (or CLIPModel / SiglipModel) folder -> ViTEncoder
    returning the hidden states of ``feature_layer`` for every token (class token kept, as transformers'
    ``hidden_states``; LLaVA-style models drop it and read layer -2)."""
    ckpt = read_checkpoint(folder)
    where = str(ckpt.folder / "config.json")
    cfg = vision_config_from_hf(ckpt.config, feature_layer, where)
    enc = ViTEncoder(cfg)
    # transformers 4 saves a standalone tower under "vision_model.", 5 without it; a dual encoder always has it
    prefix = _prefix(ckpt.tensors, "vision_model.", "")
    table, tensors = _vision_tensors(ckpt.tensors, cfg, prefix)
    tensors = {k: v for k, v in tensors.items() if k.startswith(prefix)}  # not a dual encoder's text half
    load_state(enc, tensors, table, str(ckpt.folder))
    return enc.eval()


def _vision_tensors(tensors: dict, cfg: VisionConfig, prefix: str, ours: str = "") -> tuple[dict, dict]:
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


# ---------------------------------------------------------------------------------------------- LLaVA(-1.5)


def llava_config_from_hf(cfg: dict, where: str = "config.json") -> tuple[ModelConfig, int]:
    """A LlavaForConditionalGeneration config -> (ModelConfig, image token id)."""
    if cfg.get("model_type") != "llava":
        raise ConfigError(f"{where}: model_type {cfg.get('model_type')!r} is not 'llava'")
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ConfigError(f"{where}: vision_feature_layer {layer!r}: concatenating several layers is not "
                          f"implemented; give one layer index")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConfigError(f"{where}: vision_feature_select_strategy {strategy!r}; supported: default, full")
    vision = vision_config_from_hf(cfg.get("vision_config") or {}, layer, f"{where} (vision_config)")
    if strategy == "default" and not vision.class_token:
        raise ConfigError(f"{where}: vision_feature_select_strategy 'default' drops a class token this tower "
                          f"does not have; use 'full'")
    vision = dataclasses.replace(vision, drop_class_token=strategy == "default")
    text = dict(cfg.get("text_config") or {})
    text.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
    lm = lm_config_from_hf(text, f"{where} (text_config)")
    act = cfg.get("projector_hidden_act", "gelu")
    if act not in ("gelu", "gelu_pytorch_tanh", "silu"):
        raise ConfigError(f"{where}: projector_hidden_act {act!r} is not implemented; supported: gelu, silu")
    connector = ConnectorConfig(kind="mlp", act={"gelu_pytorch_tanh": "gelu_tanh"}.get(act, act),
                                bias=bool(cfg.get("multimodal_projector_bias", True)))
    token = cfg.get("image_token_index", cfg.get("image_token_id"))
    if token is None:
        raise ConfigError(f"{where}: missing key 'image_token_index'")
    return ModelConfig(family="llava", vision=vision, connector=connector, lm=lm), int(token)


def load_hf_llava(folder: str | Path) -> VisionLanguageModel:
    """A transformers LlavaForConditionalGeneration folder (LLaVA-1.5 layout) -> VisionLanguageModel."""
    ckpt = read_checkpoint(folder)
    where = str(ckpt.folder / "config.json")
    cfg, image_token = llava_config_from_hf(ckpt.config, where)
    t = ckpt.tensors
    vp = _prefix(t, "vision_tower.", "model.vision_tower.")
    vp = _prefix(t, vp + "vision_model.", vp)
    lp = _prefix(t, "language_model.model.", "model.language_model.")
    head = _prefix(t, "language_model.lm_head.", "lm_head.") + "weight"
    pp = _prefix(t, "multi_modal_projector.", "model.multi_modal_projector.")
    model = build_model(cfg, image_token, init=False)
    table, tensors = _vision_tensors(t, cfg.vision, vp, "encoder.")
    table |= {f"lm.{k}": v for k, v in lm_key_map(cfg.lm, lp, head).items()}
    for ours, theirs in (("fc1", "linear_1"), ("fc2", "linear_2")):
        table[f"connector.{ours}.weight"] = f"{pp}{theirs}.weight"
        if cfg.connector.bias:
            table[f"connector.{ours}.bias"] = f"{pp}{theirs}.bias"
    ignore = ("lm_head.weight",) if cfg.lm.tie_embeddings else ()
    load_state(model, tensors, table, str(ckpt.folder), ignore)
    if cfg.lm.tie_embeddings:
        model.lm.lm_head.weight = model.lm.embed_tokens.weight
    return model.eval()


# ---------------------------------------------------------------------------------------------- image processors

PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def read_image_processor(folder: str | Path) -> tuple[dict, Path]:
    """The image-processor settings of a folder, from either layout found on the Hub: the classic
    ``preprocessor_config.json``, or ``processor_config.json`` with them nested under ``image_processor``."""
    folder = Path(folder)
    classic, nested = folder / "preprocessor_config.json", folder / "processor_config.json"
    for path in (classic, nested):
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}: not valid JSON ({e})") from e
            if path == nested:
                if not isinstance(data.get("image_processor"), dict):
                    continue
                data = data["image_processor"]
            return data, path
    raise CheckpointError(f"{folder} has no image-processor settings: expected preprocessor_config.json, or "
                          f"processor_config.json with an 'image_processor' section")


def image_processor_from_hf(cfg: dict, where: str = "preprocessor_config.json") -> dict:
    """CLIP / SigLIP-style image-processor settings -> ProcessorConfig fields (image_size, shortest_edge,
    resample, mean, std). Anything these do not express is refused by name."""
    size, crop = cfg.get("size") or {}, cfg.get("crop_size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    out: dict = {}
    resample = cfg.get("resample", 3)
    if resample not in PIL_RESAMPLE:
        raise ConfigError(f"{where}: resample {resample!r}; supported: {sorted(PIL_RESAMPLE)} (PIL filters)")
    out["resample"] = PIL_RESAMPLE[resample]
    if not cfg.get("do_resize", True):
        raise ConfigError(f"{where}: do_resize: false is not supported (vlmkit models take a fixed size)")
    if "shortest_edge" in size:
        if not cfg.get("do_center_crop", False):
            raise ConfigError(f"{where}: size.shortest_edge without do_center_crop gives images of varying size; "
                              f"not supported")
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if "height" not in crop or "width" not in crop:
            raise ConfigError(f"{where}: crop_size needs height and width, got {crop!r}")
        out["shortest_edge"] = int(size["shortest_edge"])
        out["image_size"] = (int(crop["height"]), int(crop["width"]))
    elif "height" in size and "width" in size:
        if cfg.get("do_center_crop") and crop and (crop.get("height"), crop.get("width")) != (size["height"], size["width"]):
            raise ConfigError(f"{where}: a center crop after a fixed-size resize is not supported")
        out["image_size"] = (int(size["height"]), int(size["width"]))
    else:
        raise ConfigError(f"{where}: size {size!r}: expected shortest_edge (with crop_size) or height and width")
    if cfg.get("do_rescale", True) and abs(float(cfg.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        raise ConfigError(f"{where}: rescale_factor {cfg.get('rescale_factor')} is not supported (only 1/255)")
    if not cfg.get("do_rescale", True):
        raise ConfigError(f"{where}: do_rescale: false is not supported")
    if cfg.get("do_normalize", True):
        out["mean"] = tuple(float(v) for v in cfg.get("image_mean", (0.5, 0.5, 0.5)))
        out["std"] = tuple(float(v) for v in cfg.get("image_std", (0.5, 0.5, 0.5)))
    else:
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return out


def load_hf_image_transform(folder: str | Path) -> ImageTransform:
    """The folder's image processor as a vlmkit ImageTransform (pixels equal transformers' PIL backend)."""
    cfg, path = read_image_processor(folder)
    f = image_processor_from_hf(cfg, str(path))
    return ImageTransform(f["image_size"], f["mean"], f["std"], f["resample"], f.get("shortest_edge", 0))


# ---------------------------------------------------------------------------------------------- tokenizers


def _token_str(v) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def load_hf_tokenizer(folder: str | Path) -> TextTokenizer:
    """``tokenizer.json`` (+ the special tokens named in ``tokenizer_config.json`` or
    ``special_tokens_map.json``) -> TextTokenizer. ``encode`` gives transformers' ids for the same text with
    ``add_special_tokens=False``; the BOS id is there for templates that start with it. Without a pad token
    the EOS token pads (right padding never reaches a loss or an attention key)."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        legacy = [p.name for p in folder.glob("*.model")] + [p.name for p in folder.glob("vocab.*")]
        hint = (f" (found {', '.join(sorted(legacy))}: re-save with transformers' fast tokenizer, "
                f"tokenizer.save_pretrained(out), which writes tokenizer.json)") if legacy else ""
        raise CheckpointError(f"{folder} has no tokenizer.json{hint}")
    special: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        p = folder / name
        if p.is_file():
            try:
                special |= {k: v for k, v in json.loads(p.read_text()).items() if k.endswith("_token")}
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{p}: not valid JSON ({e})") from e
    eos = _token_str(special.get("eos_token"))
    if eos is None:
        raise CheckpointError(f"{folder}: no eos_token in tokenizer_config.json or special_tokens_map.json")
    pad = _token_str(special.get("pad_token")) or eos
    return TextTokenizer.from_file(path, pad_token=pad, eos_token=eos, bos_token=_token_str(special.get("bos_token")))
