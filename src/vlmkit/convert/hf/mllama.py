"""Llama 3.2 Vision (``MllamaForConditionalGeneration``, model_type "mllama") <-> vlmkit's Mllama model
(:mod:`vlmkit.models.mllama`): the tiled tower (``vision_model.*``), the projector (``multi_modal_projector``), and
a text model whose decoder layers are self-attention layers with cross-attention layers among them
(``cross_attention_layers``). vlmkit's LM keeps the self-attention layers as a ``DecoderLM`` (layer s is the
s-th of them) and the j-th cross-attention layer, transformers' layer c_j, becomes the gated block before LM
layer c_j - j (``mllama.xattn_positions``). The token embedding has 8 rows more than the head (transformers'
``vocab_size + 8``). The processor is MllamaProcessor's (:mod:`vlmkit.processing.mllama`).

Export writes the tensors as transformers saves them (``vision_model.``, ``language_model.model.``,
``language_model.lm_head.``, ``multi_modal_projector.``) with MllamaProcessor's files. The LM's RoPE is read
with Llama 3's frequency scaling (rope_type "llama3", as the released checkpoints have it). Refused by name:
other RoPE scalings, a tied head, supported aspect ratios other than every layout of max_num_tiles tiles, a CNN
tower (export).
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmkit.config import ConnectorConfig, VisionConfig
from vlmkit.convert.hf.io import export_table, find_prefix, load_state, read_checkpoint, write_hf_weights, write_json
from vlmkit.convert.hf.lm import lm_config_from_hf, lm_config_to_hf, lm_key_map
from vlmkit.convert.hf.processor import (PIL_CODES, PIL_RESAMPLE, export_tokenizer, load_hf_processor,
                                         read_image_processor)
from vlmkit.convert.hf.processor import generation_settings
from vlmkit.convert.hf.vision import HF_VISION_ACTS, VISION_ACTS
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models import build_model
from vlmkit.models.mllama import MllamaConfig, MllamaFusionConfig, MllamaModel
from vlmkit.processing import Processor
from vlmkit.processing.mllama import MllamaProcessorConfig, aspect_ratios

# transformers' MllamaTextConfig / MllamaVisionConfig defaults, for keys a config.json leaves out
TEXT_DEFAULTS = {"vocab_size": 128256, "hidden_size": 4096, "hidden_act": "silu", "num_hidden_layers": 40,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                 "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "rope_theta": 500000.0,
                 "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38]}
VISION_DEFAULTS = {"hidden_size": 1280, "hidden_act": "gelu", "num_hidden_layers": 32, "num_global_layers": 8,
                   "attention_heads": 16, "num_channels": 3, "intermediate_size": 5120, "vision_output_dim": 7680,
                   "image_size": 448, "patch_size": 14, "norm_eps": 1e-5, "max_num_tiles": 4,
                   "intermediate_layers_indices": [3, 7, 15, 23, 30]}
EXTRA_EMBEDDINGS = 8  # MllamaTextModel's embed_tokens: vocab_size + 8 rows


def _sub_config(cfg: dict, key: str, model_type: str, defaults: dict, where: str) -> dict:
    sub = {"model_type": model_type, **(cfg.get(key) or {})}
    if sub["model_type"] != model_type:
        raise ConfigError(f"{where}: {key}.model_type {sub['model_type']!r} is not implemented for Mllama; "
                          f"supported: {model_type}")
    return {**defaults, **sub}


def _text_config(cfg: dict, where: str):
    """(LanguageConfig of the self-attention layers, xattn positions) from the text config."""
    text = _sub_config(cfg, "text_config", "mllama_text_model", TEXT_DEFAULTS, where)
    total, cross = int(text["num_hidden_layers"]), text["cross_attention_layers"]
    if not isinstance(cross, list) or any(not isinstance(c, int) or not 0 <= c < total for c in cross) \
            or sorted(set(cross)) != cross:
        raise ConfigError(f"{where}: text_config.cross_attention_layers {cross!r} must be increasing layer "
                          f"indices in 0..{total - 1} (num_hidden_layers {total})")
    if text.get("tie_word_embeddings") or cfg.get("tie_word_embeddings"):
        raise ConfigError(f"{where}: tie_word_embeddings: true: Mllama's token embedding has {EXTRA_EMBEDDINGS} "
                          f"rows more than its head, transformers never ties them; supported: false")
    llama = {**text, "model_type": "llama", "num_hidden_layers": total - len(cross), "tie_word_embeddings": False,
             "head_dim": None}
    lm = lm_config_from_hf(llama, f"{where} (text_config)")
    return lm, [c - j for j, c in enumerate(cross)]


def _vision_config(cfg: dict, where: str) -> tuple[VisionConfig, dict]:
    """(VisionConfig, the tower's Mllama settings) from the vision config."""
    v = _sub_config(cfg, "vision_config", "mllama_vision_model", VISION_DEFAULTS, where)
    heads = v.get("num_attention_heads", v["attention_heads"])
    act = v["hidden_act"]
    if act not in VISION_ACTS:
        raise ConfigError(f"{where}: vision_config.hidden_act {act!r} is not implemented; supported: "
                          f"{', '.join(VISION_ACTS)}")
    size, patch = v["image_size"], v["patch_size"]
    if not isinstance(size, int) or not isinstance(patch, int):
        raise ConfigError(f"{where}: vision_config.image_size {size!r} / patch_size {patch!r}: Mllama's tiles are "
                          f"square, both must be integers")
    width, depth, tiles = int(v["hidden_size"]), int(v["num_hidden_layers"]), int(v["max_num_tiles"])
    inter = list(v["intermediate_layers_indices"])
    if any(not isinstance(i, int) or not 0 <= i < depth for i in inter):
        raise ConfigError(f"{where}: vision_config.intermediate_layers_indices {inter!r} must be layers 0..{depth - 1}")
    if int(v["vision_output_dim"]) != width * (1 + len(inter)):
        raise ConfigError(f"{where}: vision_config.vision_output_dim {v['vision_output_dim']} must be hidden_size x "
                          f"(1 + {len(inter)} intermediate layers) = {width * (1 + len(inter))}")
    ratios = [list(r) for r in aspect_ratios(tiles)]
    if v.get("supported_aspect_ratios", ratios) != ratios:
        raise ConfigError(f"{where}: vision_config.supported_aspect_ratios {v['supported_aspect_ratios']!r}: the "
                          f"image processor uses every layout of max_num_tiles {tiles} tiles, {ratios}")
    vision = VisionConfig(arch="mllama", image_size=(size, size), patch_size=patch, channels=int(v["num_channels"]),
                          width=width, depth=depth, heads=int(heads), mlp_dim=int(v["intermediate_size"]),
                          act=VISION_ACTS[act], norm="layernorm", norm_eps=float(v["norm_eps"]), class_token=True,
                          pre_norm=True, post_norm=True, patch_bias=False, qkv_bias=False, drop_class_token=False)
    return vision, {"max_tiles": tiles, "global_depth": int(v["num_global_layers"]), "intermediate_layers": inter}


def mllama_config_from_hf(cfg: dict, where: str = "config.json") -> tuple[MllamaConfig, int]:
    """An MllamaConfig config.json -> (MllamaConfig, image token id)."""
    if cfg.get("model_type") != "mllama":
        raise ConfigError(f"{where}: model_type {cfg.get('model_type')!r} is not 'mllama'")
    try:
        lm, positions = _text_config(cfg, where)
        vision, tower = _vision_config(cfg, where)
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: a text_config / vision_config value is malformed ({e!r})") from e
    mllama = MllamaFusionConfig(xattn_positions=positions, extra_embeddings=EXTRA_EMBEDDINGS, **tower)
    token = int(cfg.get("image_token_index", cfg.get("image_token_id", 128256)))
    return MllamaConfig(family="mllama", vision=vision, connector=ConnectorConfig(kind="linear", bias=True), lm=lm,
                       image_token="<|image|>", mllama=mllama), token


def mllama_key_map(cfg: MllamaConfig, vp: str = "vision_model.", lp: str = "language_model.model.",
                   head: str = "language_model.lm_head.weight", pp: str = "multi_modal_projector.") -> dict[str, str]:
    """vlmkit MllamaModel parameter name -> transformers tensor name, each part with its prefix."""
    e = "encoder."
    table = {f"{e}patch_embed.weight": f"{vp}patch_embedding.weight", f"{e}class_embedding": f"{vp}class_embedding",
             f"{e}pos_embed": f"{vp}gated_positional_embedding.embedding",
             f"{e}pos_gate": f"{vp}gated_positional_embedding.gate",
             f"{e}tile_pos_embed.weight": f"{vp}gated_positional_embedding.tile_embedding.weight",
             "connector.proj.weight": f"{pp}weight", "connector.proj.bias": f"{pp}bias"}
    for ours, theirs in (("pre_tile_embed", "pre_tile_positional_embedding"),
                         ("post_tile_embed", "post_tile_positional_embedding")):
        table |= {f"{e}{ours}.embedding.weight": f"{vp}{theirs}.embedding.weight",
                  f"{e}{ours}.gate": f"{vp}{theirs}.gate"}
    for w in ("weight", "bias"):
        table |= {f"{e}pre_norm.{w}": f"{vp}layernorm_pre.{w}", f"{e}post_norm.{w}": f"{vp}layernorm_post.{w}"}
    for blocks, theirs, n in (("blocks", "transformer", cfg.vision.depth),
                              ("global_blocks", "global_transformer", cfg.mllama.global_depth)):
        for i in range(n):
            o, t = f"{e}{blocks}.{i}.", f"{vp}{theirs}.layers.{i}."
            table |= {f"{o}attn.{p}_proj.weight": f"{t}self_attn.{p}_proj.weight" for p in "qkvo"}
            for w in ("weight", "bias"):
                table |= {f"{o}norm1.{w}": f"{t}input_layernorm.{w}",
                          f"{o}norm2.{w}": f"{t}post_attention_layernorm.{w}",
                          f"{o}mlp.fc1.{w}": f"{t}mlp.fc1.{w}", f"{o}mlp.fc2.{w}": f"{t}mlp.fc2.{w}"}
            if blocks == "global_blocks":
                table |= {f"{o}gate_attn": f"{t}gate_attn", f"{o}gate_ffn": f"{t}gate_ffn"}
    positions = cfg.mllama.xattn_positions
    cross = [p + j for j, p in enumerate(positions)]  # transformers' layer index of each block
    self_layers = [i for i in range(cfg.lm.depth + len(cross)) if i not in cross]
    for ours, theirs in lm_key_map(cfg.lm, lp, head).items():
        if ours.startswith("layers."):  # renumber: LM layer s is transformers' s-th self-attention layer
            s = int(ours.split(".")[1])
            theirs = theirs.replace(f"{lp}layers.{s}.", f"{lp}layers.{self_layers[s]}.", 1)
        table[f"lm.lm.{ours}"] = theirs
    for j, c in enumerate(cross):
        o, t = f"lm.xattn.{j}.", f"{lp}layers.{c}."
        table |= {f"{o}attn.{p}_proj.weight": f"{t}cross_attn.{p}_proj.weight" for p in "qkvo"}
        table |= {f"{o}attn.q_norm.weight": f"{t}cross_attn.q_norm.weight",
                  f"{o}attn.k_norm.weight": f"{t}cross_attn.k_norm.weight",
                  f"{o}input_norm.weight": f"{t}input_layernorm.weight",
                  f"{o}post_attn_norm.weight": f"{t}post_attention_layernorm.weight",
                  f"{o}alpha_cross_attn": f"{t}cross_attn_attn_gate", f"{o}alpha_dense": f"{t}cross_attn_mlp_gate"}
        table |= {f"{o}mlp.{p}_proj.weight": f"{t}mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    return table


def load_hf_mllama(folder: str | Path) -> MllamaModel:
    """A transformers MllamaForConditionalGeneration folder -> MllamaModel (eval mode)."""
    return _load_mllama(folder)[0]


def _load_mllama(folder: str | Path) -> tuple[MllamaModel, MllamaConfig]:
    ckpt = read_checkpoint(folder)
    cfg, image_token = mllama_config_from_hf(ckpt.config, str(ckpt.folder / "config.json"))
    t = ckpt.tensors
    # transformers saves the layout of the Hub's checkpoints; its in-memory names start with "model." instead
    table = mllama_key_map(cfg, find_prefix(t, "vision_model.", "model.vision_model."),
                           find_prefix(t, "language_model.model.", "model.language_model."),
                           find_prefix(t, "language_model.lm_head.", "lm_head.") + "weight",
                           find_prefix(t, "multi_modal_projector.", "model.multi_modal_projector."))
    try:
        model = build_model(cfg, image_token, init=False)
    except ValueError as e:
        raise ConfigError(f"{ckpt.folder / 'config.json'}: {e}") from e
    load_state(model, t, table, str(ckpt.folder))
    return model.eval(), cfg


def mllama_image_processor_from_hf(settings: dict, where: str, cfg: MllamaConfig) -> dict:
    """MllamaImageProcessor's settings -> ProcessorConfig fields; what it would do otherwise is refused."""
    for key in ("do_resize", "do_pad", "do_rescale"):
        if not settings.get(key, True):
            raise ConfigError(f"{where}: {key}: false is not supported (MllamaImageProcessor itself refuses "
                              f"do_resize / do_pad false)")
    if abs(float(settings.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        raise ConfigError(f"{where}: rescale_factor {settings['rescale_factor']} is not supported (only 1/255)")
    size = settings.get("size") or {"height": 224, "width": 224}
    tile = cfg.vision.image_size[0]
    if (size.get("height"), size.get("width")) != (tile, tile):
        raise ConfigError(f"{where}: size {size!r} must be the tower's tile, height = width = "
                          f"vision_config.image_size {tile}")
    tiles = int(settings.get("max_image_tiles", 4))
    if tiles != cfg.mllama.max_tiles:
        raise ConfigError(f"{where}: max_image_tiles {tiles} must equal vision_config.max_num_tiles "
                          f"{cfg.mllama.max_tiles} (the tower's tile embeddings)")
    resample = settings.get("resample", 2)
    if resample not in PIL_RESAMPLE:
        raise ConfigError(f"{where}: resample {resample!r}; supported: {sorted(PIL_RESAMPLE)} (PIL filters)")
    normalize = settings.get("do_normalize", True)
    return {"image_size": (tile, tile), "max_image_tiles": tiles, "resample": PIL_RESAMPLE[resample],
            "mean": tuple(float(m) for m in settings.get("image_mean", (0.5,) * 3)) if normalize else (0.0,) * 3,
            "std": tuple(float(s) for s in settings.get("image_std", (0.5,) * 3)) if normalize else (1.0,) * 3}


def _processor_image_token(folder: Path) -> str:
    """The placeholder MllamaProcessor looks for: the tokenizer's ``image_token`` if it names one, else
    "<|image|>"."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    extra = config.get("extra_special_tokens")
    token = config.get("image_token") or (extra.get("image_token") if isinstance(extra, dict) else None)
    return token or "<|image|>"


def load_mllama_folder(folder: Path):
    """(model, config, processor) of an Mllama folder; the processor gives MllamaProcessor's input_ids and
    pixels (its cross_attention_mask the model computes from the ids)."""
    model, cfg = _load_mllama(folder)
    settings, path = read_image_processor(folder)
    fields = mllama_image_processor_from_hf(settings, str(path), cfg)
    processor = load_hf_processor(folder, "mllama", model.image_token_id, 1, cfg.lm.max_seq_len,
                                  MllamaProcessorConfig, fixed_images=False, **fields)
    expected = _processor_image_token(folder)
    if processor.cfg.image_token != expected:
        raise ConfigError(f"{folder / 'config.json'}: image_token_index {model.image_token_id} is "
                          f"{processor.cfg.image_token!r} in tokenizer.json, but MllamaProcessor marks images "
                          f"with {expected!r}")
    if not processor.cfg.bos_token:
        raise CheckpointError(f"{folder}: Mllama's prompts need a bos_token (MllamaProcessor puts one after the "
                              f"leading images); tokenizer_config.json (or special_tokens_map.json) names none")
    return model, cfg, processor


# ---------------------------------------------------------------------------------------------- export


def mllama_config_to_hf(cfg: MllamaConfig, image_token_id: int) -> dict:
    """MllamaConfig -> MllamaConfig's config.json. What MllamaForConditionalGeneration cannot compute is refused
    by field."""
    m, v = cfg.mllama, cfg.vision
    if v.arch != "mllama":
        raise ConfigError(f"vision.arch {v.arch!r}: only Mllama's own tiled tower (arch 'mllama') exports to "
                          f"transformers; a tiled CNN has no equivalent there")
    if m.extra_embeddings != EXTRA_EMBEDDINGS:
        raise ConfigError(f"mllama.extra_embeddings {m.extra_embeddings}: transformers' Mllama embedding has "
                          f"vocab_size + {EXTRA_EMBEDDINGS} rows")
    if cfg.connector.kind != "linear" or not cfg.connector.bias:
        raise ConfigError(f"connector.kind {cfg.connector.kind!r}, connector.bias {cfg.connector.bias}: Mllama's "
                          f"projector is one linear layer with bias (kind: linear, bias: true)")
    if v.act not in HF_VISION_ACTS:
        raise ConfigError(f"vision.act {v.act!r} has no transformers name; exportable: {', '.join(HF_VISION_ACTS)}")
    base = lm_config_to_hf(cfg.lm, "lm")  # refuses what no transformers LM computes
    if base["model_type"] != "llama" or cfg.lm.tie_embeddings:
        raise ConfigError(f"lm: an LM exported as {base['model_type']!r} (tied head: {cfg.lm.tie_embeddings}); "
                          f"Mllama's text model is Llama with an untied head")
    cross = [p + j for j, p in enumerate(m.xattn_positions)]
    text = {k: base[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                 "num_key_value_heads", "hidden_act", "rms_norm_eps", "rope_parameters",
                                 "max_position_embeddings")}
    text |= {"model_type": "mllama_text_model", "num_hidden_layers": cfg.lm.depth + len(cross),
             "cross_attention_layers": cross, "tie_word_embeddings": False}
    vision = {"model_type": "mllama_vision_model", "hidden_size": v.width, "hidden_act": HF_VISION_ACTS[v.act],
              "num_hidden_layers": v.depth, "num_global_layers": m.global_depth, "attention_heads": v.heads,
              "num_channels": v.channels, "intermediate_size": v.mlp_dim,
              "vision_output_dim": v.width * (1 + len(m.intermediate_layers)), "image_size": v.image_size[0],
              "patch_size": v.patch_size, "norm_eps": v.norm_eps, "max_num_tiles": m.max_tiles,
              "intermediate_layers_indices": list(m.intermediate_layers),
              "supported_aspect_ratios": [list(r) for r in aspect_ratios(m.max_tiles)]}
    return {"model_type": "mllama", "architectures": ["MllamaForConditionalGeneration"], "vision_config": vision,
            "text_config": text, "image_token_index": image_token_id, "torch_dtype": "float32"}


def mllama_processor_to_hf(processor: Processor) -> dict:
    """The processor's settings -> preprocessor_config.json (MllamaImageProcessor, for MllamaProcessor)."""
    pcfg = processor.cfg
    # the processor's family decides its images and layout (no image processor is named any more): another
    # family's (fixed-size images, no tiles) would export as MllamaProcessor while vlmkit prepares them otherwise
    if processor.family.name != "mllama":
        raise ConfigError(f"processor family {pcfg.family!r}: MllamaProcessor's tiled images and prompt layout are "
                          f"the mllama family's")
    if pcfg.text_mode != "whole":
        raise ConfigError(f"processor text_mode {pcfg.text_mode!r}: MllamaProcessor's layout is text_mode 'whole'")
    if pcfg.image_token != "<|image|>":
        raise ConfigError(f"processor image_token {pcfg.image_token!r}: MllamaProcessor finds images by the literal "
                          f"'<|image|>'")
    if not pcfg.bos_token:
        raise ConfigError("processor bos_token: MllamaProcessor puts BOS after a prompt's leading images")
    h, w = pcfg.image_size
    return {"image_processor_type": "MllamaImageProcessor", "processor_class": "MllamaProcessor",
            "do_convert_rgb": True, "do_resize": True, "size": {"height": h, "width": w},
            "resample": PIL_CODES[pcfg.resample], "do_pad": True, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(pcfg.mean), "image_std": list(pcfg.std),
            "max_image_tiles": pcfg.max_image_tiles}


def export_mllama(model: MllamaModel, cfg: MllamaConfig, processor: Processor, folder: Path) -> None:
    """An Mllama vlmkit model -> a folder that transformers' MllamaForConditionalGeneration and AutoProcessor
    (MllamaProcessor) load."""
    config = mllama_config_to_hf(cfg, model.image_token_id)
    preprocessor = mllama_processor_to_hf(processor)
    if processor.cfg.image_size != cfg.vision.image_size or processor.cfg.max_image_tiles != cfg.mllama.max_tiles:
        raise ConfigError(f"processor image_size {tuple(processor.cfg.image_size)} / max_image_tiles "
                          f"{processor.cfg.max_image_tiles} must be the tower's tile {tuple(cfg.vision.image_size)} "
                          f"and mllama.max_tiles {cfg.mllama.max_tiles}")
    tok = processor.tokenizer
    special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id}
    config["text_config"] |= special  # generation stops where vlmkit's does
    write_hf_weights(folder, export_table(model, mllama_key_map(cfg)))
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation_settings(special, processor))
    write_json(folder / "preprocessor_config.json", preprocessor)
    write_json(folder / "processor_config.json", {"processor_class": "MllamaProcessor"})
    export_tokenizer(processor, folder)


