"""Qwen2-VL (``Qwen2VLForConditionalGeneration``) -> vlmkit's Qwen2VLModel: Qwen2-VL's own vision tower and
patch merger (:mod:`vlmkit.encoders.qwen2_vl`), a Qwen2 LM with multimodal RoPE (:mod:`vlmkit.models.qwen2_vl`),
and the dynamic-resolution image processor (:mod:`vlmkit.processing.qwen2_vl`).

Both config layouts are read: transformers 5's nested ``text_config`` (rope settings in ``rope_parameters``)
and the Hub's 4.x flat one (text keys at the top level, ``rope_scaling: {"type": "mrope", ...}``); both weight
layouts too (``visual.`` / ``model.`` as transformers 5 still saves them, or ``model.visual.`` /
``model.language_model.``). The export (:func:`export_qwen2_vl`) writes the Hub's layouts (flat config, ``visual.`` /
``model.`` / ``lm_head.`` tensors), which transformers 4 and 5 both read.

Not implemented, and refused by name: videos (the ``<|video_pad|>`` placeholder in a prompt), sliding-window
attention and RoPE scaling in the LM. Qwen2.5-VL (model_type ``qwen2_5_vl``) is its own family
(convert/hf/qwen2_5_vl.py), which reads its folders with the helpers here.
"""

from __future__ import annotations

from pathlib import Path

from vlmkit.config import ConnectorConfig, LanguageConfig, ProcessorConfig, VisionConfig, VLMConfig
from vlmkit.convert.hf.io import export_table, find_prefix, load_state, read_checkpoint, write_hf_weights, write_json
from vlmkit.convert.hf.lm import lm_config_from_hf, lm_config_to_hf, lm_key_map, untie_if_head_saved
from vlmkit.convert.hf.processor import (PIL_CODES, PIL_RESAMPLE, export_tokenizer, load_hf_processor,
                                         load_hf_tokenizer, read_image_processor)
from vlmkit.convert.hf.processor import generation_settings
from vlmkit.errors import ConfigError
from vlmkit.models import build_model
from vlmkit.processing.qwen2_vl import NativeResolutionConfig, Qwen2VLProcessorConfig
from vlmkit.models.qwen2_vl import Qwen2VLModel
from vlmkit.processing import Processor

VISION_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}
# transformers' defaults where a config leaves a key out
DEFAULT_MROPE_SECTION = [16, 24, 24]
DEFAULT_TEXT_ROPE_THETA = 1000000.0
DEFAULT_VISION = {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "hidden_act": "quick_gelu", "mlp_ratio": 4,
                  "num_heads": 16, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2,
                  "temporal_patch_size": 2}
DEFAULT_SIZE = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
DEFAULT_IMAGE_PROCESSOR = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
                           "image_mean": (0.48145466, 0.4578275, 0.40821073),
                           "image_std": (0.26862954, 0.26130258, 0.27577711)}
# top-level keys of a 4.x flat config that are not the text model's
NOT_TEXT_KEYS = ("vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
                 "vision_end_token_id", "architectures", "model_type", "text_config")


def _int(value, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: {key} {value!r} must be an integer (vlmkit implements square patches and "
                          f"one temporal patch size)")
    return value


def qwen2_vl_vision_config(cfg: dict, where: str) -> VisionConfig:
    """A Qwen2VLVisionConfig (``vision_config``) -> VisionConfig of arch "qwen2_vl"."""
    if cfg.get("model_type") not in (None, "qwen2_vl_vision", "qwen2_vl"):
        raise ConfigError(f"{where}: model_type {cfg['model_type']!r} is not Qwen2-VL's tower (qwen2_vl_vision)")
    v = {**DEFAULT_VISION, **cfg}
    if "in_chans" in cfg and "in_channels" not in cfg:  # 4.x Hub configs
        v["in_channels"] = cfg["in_chans"]
    act = v["hidden_act"]
    if act not in VISION_ACTS:
        raise ConfigError(f"{where}: hidden_act {act!r} is not implemented; supported: {', '.join(VISION_ACTS)}")
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ConfigError(f"{where}: rope_parameters.rope_type {rope['rope_type']!r} is not implemented for the "
                          f"Qwen2-VL tower; supported: axial")
    width, heads = _int(v["embed_dim"], "embed_dim", where), _int(v["num_heads"], "num_heads", where)
    if width % heads or (width // heads) % 4:
        raise ConfigError(f"{where}: embed_dim {width} / num_heads {heads} must be a head size divisible by 4 "
                          f"(2D rotary embeddings)")
    merge = _int(v["spatial_merge_size"], "spatial_merge_size", where)
    return VisionConfig(
        arch="qwen2_vl", patch_size=_int(v["patch_size"], "patch_size", where),
        channels=_int(v["in_channels"], "in_channels", where), width=width,
        depth=_int(v["depth"], "depth", where), heads=heads, mlp_dim=int(width * v["mlp_ratio"]), act=VISION_ACTS[act],
        norm="layernorm", norm_eps=1e-6, class_token=False, pos_embed="rope2d",
        rope_theta=float(rope.get("rope_theta", 10000.0)), pre_norm=False, post_norm=False, patch_bias=False,
        qkv_bias=True, drop_class_token=False,
        temporal_patch_size=_int(v["temporal_patch_size"], "temporal_patch_size", where), merge_size=merge)


def qwen2_vl_config_from_hf(cfg: dict, where: str = "config.json") -> tuple[VLMConfig, int]:
    """A Qwen2VLForConditionalGeneration config -> (VLMConfig, image token id)."""
    kind = cfg.get("model_type")
    if kind != "qwen2_vl":
        raise ConfigError(f"{where}: model_type {kind!r} is not 'qwen2_vl'")
    lm = qwen2_vl_lm_config(cfg, where)
    vision = qwen2_vl_vision_config(cfg.get("vision_config") or {}, f"{where} (vision_config)")
    out = int((cfg.get("vision_config") or {}).get("hidden_size", DEFAULT_VISION["hidden_size"]))
    if out != lm.width:
        raise ConfigError(f"{where}: vision_config.hidden_size {out} (the patch merger's output) must equal the "
                          f"text hidden_size {lm.width}")
    connector = ConnectorConfig(kind="patch_merger", scale_factor=vision.merge_size, layers=2, act="gelu", bias=True)
    token = cfg.get("image_token_id", 151655)
    return VLMConfig(family="qwen2_vl", vision=vision, connector=connector, lm=lm,
                       image_token="<|image_pad|>"), int(token)


def qwen2_vl_lm_config(cfg: dict, where: str) -> LanguageConfig:
    """The LM of a Qwen2-VL or Qwen2.5-VL config.json (its text_config, or the 4.x flat keys): a Qwen2 decoder
    with M-RoPE sections."""
    nested = isinstance(cfg.get("text_config"), dict)
    text = dict(cfg["text_config"]) if nested else {k: v for k, v in cfg.items() if k not in NOT_TEXT_KEYS}
    text_where = f"{where} (text_config)" if nested else where
    try:
        width, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
    except KeyError as e:
        raise ConfigError(f"{text_where}: missing key {e.args[0]!r}") from e
    if text.get("head_dim") not in (None, width // heads):
        raise ConfigError(f"{text_where}: head_dim {text['head_dim']} differs from hidden_size / num_attention_heads "
                          f"= {width // heads}, which Qwen2-VL's attention uses; not supported")
    # as transformers' Qwen2VLTextConfig: rope_scaling (4.x) or rope_parameters, theta 1e6 and M-RoPE sections
    # [16, 24, 24] unless given
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    rope.setdefault("rope_theta", text.get("rope_theta", DEFAULT_TEXT_ROPE_THETA))
    rope.setdefault("mrope_section", DEFAULT_MROPE_SECTION)
    rope["rope_type"] = rope.pop("type", rope.get("rope_type", "default"))
    text.update(model_type="qwen2", rope_parameters=rope, head_dim=None, rope_scaling=None,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings")) or bool(text.get("tie_word_embeddings")))
    return lm_config_from_hf(text, text_where)


def qwen2_vl_key_map(cfg: VLMConfig, vision: str = "visual.", lm: str = "model.",
                     head: str = "lm_head.weight") -> dict[str, str]:
    """vlmkit Qwen2VLModel parameter name -> transformers Qwen2VLForConditionalGeneration tensor name."""
    table = {"encoder.patch_embed.weight": f"{vision}patch_embed.proj.weight"}
    for i in range(cfg.vision.depth):
        ours, theirs = f"encoder.blocks.{i}.", f"{vision}blocks.{i}."
        for w in ("weight", "bias"):
            for name in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
                table[f"{ours}{name}.{w}"] = f"{theirs}{name}.{w}"
    for w in ("weight", "bias"):
        table[f"connector.norm.{w}"] = f"{vision}merger.ln_q.{w}"
        table[f"connector.mlp.fc1.{w}"] = f"{vision}merger.mlp.0.{w}"
        table[f"connector.mlp.fc2.{w}"] = f"{vision}merger.mlp.2.{w}"
    return table | {f"lm.{k}": v for k, v in lm_key_map(cfg.lm, lm, head).items()}


def load_hf_qwen2_vl(folder: str | Path) -> Qwen2VLModel:
    """A transformers Qwen2VLForConditionalGeneration folder -> Qwen2VLModel (eval mode)."""
    return _load(folder)[0]


def _load(folder: str | Path, read_config=None, key_map=None) -> tuple[Qwen2VLModel, VLMConfig, dict]:
    """(model, config, config.json) of a folder; ``read_config`` / ``key_map``: Qwen2-VL's unless given
    (Qwen2.5-VL's, convert/hf/qwen2_5_vl.py)."""
    ckpt = read_checkpoint(folder)
    cfg, image_token = (read_config or qwen2_vl_config_from_hf)(ckpt.config, str(ckpt.folder / "config.json"))
    t = ckpt.tensors
    lm_prefix = find_prefix(t, "model.language_model.", "model.")
    cfg = untie_if_head_saved(cfg, t, "lm_head.weight", f"{lm_prefix}embed_tokens.weight")
    table = (key_map or qwen2_vl_key_map)(cfg, find_prefix(t, "model.visual.", "visual."), lm_prefix,
                                          "lm_head.weight")
    model = build_model(cfg, image_token, init=False)
    # a tied checkpoint may still carry lm_head.weight (a copy of the embeddings): not an error
    load_state(model, t, table, str(ckpt.folder), ignore=("lm_head.weight",) if cfg.lm.tie_embeddings else ())
    if cfg.lm.tie_embeddings:
        model.lm.lm_head.weight = model.lm.embed_tokens.weight
    return model.eval(), cfg, ckpt.config


def qwen2_vl_processor_settings(folder: Path, vision: VisionConfig) -> dict:
    """The folder's Qwen2VLImageProcessor settings -> ProcessorConfig fields of the "qwen2_vl" image processor,
    checked against the tower (patch, temporal patch and merge sizes)."""
    raw, path = read_image_processor(folder)
    cfg = {**DEFAULT_IMAGE_PROCESSOR, **raw}
    # as Qwen2VLImageProcessor.__init__: size (shortest_edge / longest_edge: the least and most pixels), which the
    # Hub's min_pixels / max_pixels keys override
    size = dict(raw["size"]) if isinstance(raw.get("size"), dict) else dict(DEFAULT_SIZE)
    if "min_pixels" in raw:
        size["shortest_edge"] = raw["min_pixels"]
    if "max_pixels" in raw:
        size["longest_edge"] = raw["max_pixels"]
    min_pixels, max_pixels = size.get("shortest_edge"), size.get("longest_edge")
    if not isinstance(min_pixels, int) or not isinstance(max_pixels, int) or not 0 < min_pixels <= max_pixels:
        raise ConfigError(f"{path}: size {size!r} must give shortest_edge <= longest_edge, the least and most pixels "
                          f"of a resized image (or give min_pixels and max_pixels)")
    if not cfg.get("do_resize", True):
        raise ConfigError(f"{path}: do_resize: false is not supported (images are resized to multiples of "
                          f"patch_size * merge_size)")
    if not cfg.get("do_rescale", True) or abs(float(cfg.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        raise ConfigError(f"{path}: only do_rescale: true with rescale_factor 1/255 is supported")
    resample = cfg.get("resample", 3)
    if resample not in PIL_RESAMPLE:
        raise ConfigError(f"{path}: resample {resample!r}; supported: {sorted(PIL_RESAMPLE)} (PIL filters)")
    native = {"min_pixels": int(min_pixels), "max_pixels": int(max_pixels)}
    for key, model_value in (("patch_size", vision.patch_size), ("temporal_patch_size", vision.temporal_patch_size),
                             ("merge_size", vision.merge_size)):  # vision_config's spatial_merge_size
        if cfg[key] != model_value:
            raise ConfigError(f"{path}: {key} {cfg[key]!r} does not match config.json's vision_config ({model_value})")
        native[key] = model_value
    out = {"native": NativeResolutionConfig(**native), "resample": PIL_RESAMPLE[resample]}
    if cfg.get("do_normalize", True):
        out["mean"] = tuple(float(v) for v in cfg["image_mean"])
        out["std"] = tuple(float(v) for v in cfg["image_std"])
    else:
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return out


def load_qwen2_vl_folder(folder: Path, family: str = "qwen2_vl", read_config=None, key_map=None):
    """(model, config, processor) of a Qwen2-VL folder; the processor gives Qwen2VLProcessor's input_ids and
    pixel_values / image_grid_thw. ``family``, ``read_config``, ``key_map``: Qwen2.5-VL's for its folders, whose
    processor is Qwen2-VL's."""
    model, cfg, hf_config = _load(folder, read_config, key_map)
    settings = qwen2_vl_processor_settings(Path(folder), cfg.vision)
    # the processor's image_seq_len is the most tokens an image can fill (each fills its own number)
    n = settings["native"]
    most = max(1, n.max_pixels // (n.patch_size * n.merge_size) ** 2)
    # videos are not implemented: a prompt with the video placeholder is refused instead of read as text
    video = load_hf_tokenizer(folder).tok.id_to_token(int(hf_config.get("video_token_id", 151656)))
    refused = [video or "<|video_pad|>"]
    processor = load_hf_processor(folder, family, model.image_token_id, most, cfg.lm.max_seq_len,
                                  Qwen2VLProcessorConfig, fixed_images=False, refused_placeholders=refused, **settings)
    return model, cfg, processor


# ---------------------------------------------------------------------------------------------- export

HF_VISION_ACTS = {v: k for k, v in VISION_ACTS.items()}
# Qwen2-VL's placeholder and markup tokens: Qwen2VLProcessor expands "<|image_pad|>" (transformers 4 always, 5
# unless the tokenizer names another image_token); config.json carries the ids of all of them
HUB_IMAGE_TOKEN, HUB_VIDEO_TOKEN, HUB_VISION_PAD = "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>"
MARKUP_TOKENS = {"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
VISION_NORM_EPS = 1e-6  # transformers' Qwen2-VL tower and patch merger hard-code their LayerNorms' eps
# the text keys of a Hub (4.x flat) config.json, as lm_config_to_hf names them; head_dim, attention_bias and
# mlp_bias are left out (Qwen2-VL's attention has head size hidden_size / num_attention_heads and q, k, v biases)
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "hidden_act", "rms_norm_eps", "rope_theta", "max_position_embeddings",
             "use_sliding_window", "max_window_layers")


def qwen2_vl_vision_config_to_hf(cfg: VisionConfig, out_width: int) -> dict:
    """A vision config of arch "qwen2_vl" -> Qwen2VLVisionConfig's ``vision_config`` with the keys of the Hub's
    configs (``in_chans`` and ``spatial_patch_size`` beside transformers' ``in_channels`` and ``patch_size``).

    The tower's rotary theta is written as transformers 5 reads it (``rope_parameters``); transformers 4, vLLM
    and SGLang use 10000 whatever the config says, as every Qwen2-VL checkpoint does."""
    problems = []
    if cfg.arch != "qwen2_vl":
        problems.append(f"arch {cfg.arch!r} (Qwen2-VL's tower is its own ViT: arch 'qwen2_vl')")
    if cfg.norm != "layernorm":
        problems.append(f"norm {cfg.norm!r} (the tower's norms are LayerNorm: 'layernorm')")
    if abs(cfg.norm_eps - VISION_NORM_EPS) > 1e-12:
        problems.append(f"norm_eps {cfg.norm_eps} (transformers' tower and merger use {VISION_NORM_EPS})")
    if cfg.act not in HF_VISION_ACTS:
        problems.append(f"act {cfg.act!r} (exportable: {', '.join(HF_VISION_ACTS)})")
    if cfg.mlp_dim % cfg.width:
        problems.append(f"mlp_dim {cfg.mlp_dim} (Qwen2VLVisionConfig writes it as an integer mlp_ratio times "
                        f"width {cfg.width})")
    if problems:
        raise ConfigError(f"vision: not a Qwen2-VL tower transformers can load: {'; '.join(problems)}")
    return {"depth": cfg.depth, "embed_dim": cfg.width, "hidden_size": out_width, "hidden_act": HF_VISION_ACTS[cfg.act],
            "mlp_ratio": cfg.mlp_dim // cfg.width, "num_heads": cfg.heads, "in_channels": cfg.channels,
            "in_chans": cfg.channels, "patch_size": cfg.patch_size, "spatial_patch_size": cfg.patch_size,
            "spatial_merge_size": cfg.merge_size, "temporal_patch_size": cfg.temporal_patch_size,
            "rope_parameters": {"rope_type": "axial", "rope_theta": cfg.rope_theta}}


def qwen2_vl_config_to_hf(cfg: VLMConfig, token_ids: dict[str, int]) -> dict:
    """VLMConfig -> Qwen2VLConfig's config.json in the Hub's flat layout (text keys at the top level, M-RoPE as
    ``rope_scaling: {"type": "mrope", "mrope_section": ...}``), which transformers 4 (>= 4.45) and 5 both read;
    a nested ``text_config`` would be ignored by the 4.x releases before the nested configs. ``token_ids``: the
    image / video / markup token ids (:func:`qwen2_vl_token_ids`)."""
    return {"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"], **qwen2_vl_text_to_hf(cfg),
            "vision_config": qwen2_vl_vision_config_to_hf(cfg.vision, cfg.lm.width), **token_ids,
            "tie_word_embeddings": cfg.lm.tie_embeddings, "torch_dtype": "float32"}


def qwen2_vl_text_to_hf(cfg: VLMConfig) -> dict:
    """The LM's (and the merger's checked) top-level keys of a Qwen2-VL or Qwen2.5-VL config.json (flat layout)."""
    lm = cfg.lm
    if cfg.connector.kind != "patch_merger" or cfg.connector.act != "gelu":
        raise ConfigError(f"connector.kind {cfg.connector.kind!r}, connector.act {cfg.connector.act!r}: Qwen2-VL's "
                          f"patch merger is LayerNorm -> Linear -> GELU (exact) -> Linear (kind: patch_merger, "
                          f"act: gelu)")
    if lm.norm_offset or lm.embed_scale:
        raise ConfigError(f"lm.norm_offset {lm.norm_offset}, lm.embed_scale {lm.embed_scale}: those are Gemma's; "
                          f"Qwen2-VL's LM is Qwen2 (both false)")
    if not lm.qkv_bias:
        raise ConfigError("lm.qkv_bias: false: Qwen2-VL's attention has biases on q, k and v (qkv_bias: true)")
    if lm.head_dim not in (None, lm.width // lm.heads):
        raise ConfigError(f"lm.head_dim {lm.head_dim}: Qwen2-VL's attention heads have width / heads = "
                          f"{lm.width // lm.heads} dimensions (head_dim: null)")
    if not lm.mrope_section:
        raise ConfigError("lm.mrope_section: empty: Qwen2-VL's LM rotates with multimodal RoPE sections")
    text = lm_config_to_hf(lm, "lm")  # refuses an activation without a transformers name
    return {**{k: text[k] for k in TEXT_KEYS}, "attention_dropout": 0.0,
            "rope_scaling": {"type": "mrope", "mrope_section": list(lm.mrope_section)}}


def qwen2_vl_token_ids(processor: Processor) -> dict[str, int]:
    """The ids config.json names, looked up in the processor's tokenizer: the image placeholder, the video
    placeholder (the one vlmkit refuses in prompts), ``<|vision_start|>`` / ``<|vision_end|>`` (transformers 4's
    get_rope_index finds an image by the token after vision_start) and ``<|vision_pad|>`` when there is one."""
    pcfg = processor.cfg
    if pcfg.image_token != HUB_IMAGE_TOKEN:
        raise ConfigError(f"processor image_token {pcfg.image_token!r}: Qwen2VLProcessor expands the literal "
                          f"{HUB_IMAGE_TOKEN!r} (transformers 4 always)")
    tok = processor.tokenizer.tok
    names = {"image_token_id": pcfg.image_token, "video_token_id": next(iter(pcfg.refused_placeholders),
                                                                       HUB_VIDEO_TOKEN), **MARKUP_TOKENS}
    ids = {key: tok.token_to_id(name) for key, name in names.items()}
    missing = [names[key] for key, i in ids.items() if i is None]
    if missing:
        raise ConfigError(f"processor tokenizer: no token {', '.join(map(repr, missing))}: a Qwen2-VL config.json "
                          f"names the ids of its image markup <|vision_start|><|image_pad|><|vision_end|> and of "
                          f"its video placeholder")
    if tok.token_to_id(HUB_VISION_PAD) is not None:
        ids["vision_token_id"] = tok.token_to_id(HUB_VISION_PAD)
    return ids


def qwen2_vl_processor_to_hf(pcfg: ProcessorConfig, vision: VisionConfig) -> dict:
    """The "qwen2_vl" image-processor settings -> preprocessor_config.json as the Hub's Qwen2-VL folders write it
    (``min_pixels`` / ``max_pixels``, which transformers 4 reads) plus the ``size`` transformers 5 writes (the same
    bounds as shortest_edge / longest_edge). Refused: settings Qwen2VLProcessor would lay out differently."""
    if pcfg.text_mode != "whole":
        raise ConfigError(f"processor text_mode {pcfg.text_mode!r}: Qwen2VLProcessor's layout is text_mode 'whole'")
    n = pcfg.native
    for key, value in (("patch_size", vision.patch_size), ("temporal_patch_size", vision.temporal_patch_size),
                       ("merge_size", vision.merge_size)):
        if getattr(n, key) != value:
            raise ConfigError(f"processor native.{key} {getattr(n, key)} is not the tower's vision.{key} {value}: "
                              f"transformers' image processor and model read them from different files, which "
                              f"must agree")
    return {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
            "do_resize": True, "resample": PIL_CODES[pcfg.resample], "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(pcfg.mean), "image_std": list(pcfg.std), "do_convert_rgb": True,
            "min_pixels": n.min_pixels, "max_pixels": n.max_pixels,
            "size": {"shortest_edge": n.min_pixels, "longest_edge": n.max_pixels},
            "patch_size": n.patch_size, "temporal_patch_size": n.temporal_patch_size, "merge_size": n.merge_size}


def export_qwen2_vl(model: Qwen2VLModel, cfg: VLMConfig, processor: Processor, folder: Path) -> None:
    """A Qwen2-VL vlmkit model -> a folder that transformers' Qwen2VLForConditionalGeneration and Qwen2VLProcessor
    load, in the layout of the Hub's Qwen/Qwen2-VL-* folders, which transformers 4 and 5, vLLM and SGLang read:
    tensors ``visual.`` (tower and merger), ``model.`` (the LM), ``lm_head.weight`` (absent when tied), the flat
    config.json, preprocessor_config.json. Video settings are not written (vlmkit has no video processor): the
    video processor transformers builds from this folder has its defaults."""
    config = qwen2_vl_config_to_hf(cfg, qwen2_vl_token_ids(processor))
    write_folder(model, cfg, processor, folder, config, qwen2_vl_key_map(cfg), "Qwen2VLProcessor")


def write_folder(model: Qwen2VLModel, cfg: VLMConfig, processor: Processor, folder: Path, config: dict,
                 table: dict[str, str], processor_class: str) -> None:
    """Write a Qwen2-VL or Qwen2.5-VL export: weights through ``table``, ``config`` with the tokenizer's special
    ids, the image processor's settings for ``processor_class``, the tokenizer and its template."""
    images = qwen2_vl_processor_to_hf(processor.cfg, cfg.vision) | {"processor_class": processor_class}
    if config["image_token_id"] != model.image_token_id:
        raise ConfigError(f"processor image_token {processor.cfg.image_token!r} has id {config['image_token_id']}, "
                          f"the model splices images at {model.image_token_id}")
    tok = processor.tokenizer
    special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id}
    config |= special  # generation stops where vlmkit's does (and transformers' default Qwen ids are not used)
    write_hf_weights(folder, export_table(model, table))
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation_settings(special, processor))
    write_json(folder / "preprocessor_config.json", images)
    write_json(folder / "processor_config.json", {"processor_class": processor_class})
    export_tokenizer(processor, folder)


