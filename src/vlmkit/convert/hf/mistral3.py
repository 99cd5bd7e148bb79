"""Mistral 3 (``Mistral3ForConditionalGeneration``, model_type "mistral3": Mistral Small 3.1 / 3.2) <-> vlmkit's
Mistral3Model: the Pixtral tower and the projector with its patch merger (:mod:`vlmkit.encoders.pixtral`), a Mistral
LM (:mod:`vlmkit.convert.hf.lm`), and PixtralProcessor's processing (:mod:`vlmkit.processing.mistral3`).

Both weight layouts are read: the Hub's (``vision_tower.``, ``multi_modal_projector.``, ``language_model.model.``,
``language_model.lm_head.weight``), which the export writes and transformers 4 and 5 both load, and transformers 5's
(``model.vision_tower.``, ``model.multi_modal_projector.``, ``model.language_model.``, ``lm_head.weight``).

Pixtral-12B's Hub format (``LlavaForConditionalGeneration`` with a Pixtral ``vision_config``: LLaVA's projector,
no merger) is read here too, handed over by the LLaVA family's loader (:func:`load_pixtral_llava_folder`): it is
imported as family mistral3 with ``connector.kind: mlp`` (its tower and PixtralProcessor's processing are this
family's) and exported back as ``LlavaForConditionalGeneration``.

Refused by name: a ``vision_feature_layer`` list (features of several layers concatenated), a tower whose
``model_type`` is not "pixtral", a processor whose patch or merge size differs from the model's (transformers would
lay out a number of image tokens the model cannot fill), image-processor settings vlmkit does not compute.
"""

from __future__ import annotations

from pathlib import Path

from vlmkit.config import ConnectorConfig, VisionConfig, VLMConfig
from vlmkit.convert.hf.io import export_table, find_prefix, load_state, read_checkpoint, write_hf_weights, write_json
from vlmkit.convert.hf.lm import lm_config_from_hf, lm_config_to_hf, lm_key_map, untie_if_head_saved
from vlmkit.convert.hf.processor import (PIL_CODES, PIL_RESAMPLE, export_tokenizer, load_hf_processor,
                                         read_image_processor)
from vlmkit.convert.hf.processor import generation_settings
from vlmkit.encoders.pixtral import PIXTRAL_NORM_EPS
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models import build_model
from vlmkit.models.mistral3 import Mistral3Model
from vlmkit.processing import Processor
from vlmkit.processing.mistral3 import Mistral3ProcessorConfig, max_image_tokens

VISION_ACTS = {"gelu": "gelu", "silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}
PROJECTOR_ACTS = {"gelu": "gelu", "silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
# transformers' defaults where a config leaves a key out (Mistral3Config's and PixtralVisionConfig's)
DEFAULT_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "num_channels": 3, "image_size": 1024, "patch_size": 16, "hidden_act": "gelu"}
DEFAULT_TOP = {"image_token_index": 10, "projector_hidden_act": "gelu", "vision_feature_layer": -1,
               "multimodal_projector_bias": False, "spatial_merge_size": 2}
# PixtralProcessor's defaults (a processor_config.json without them lays images out so)
DEFAULT_PROCESSOR = {"patch_size": 16, "spatial_merge_size": 1, "image_token": "[IMG]",
                     "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
PIXTRAL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXTRAL_STD = (0.26862954, 0.26130258, 0.27577711)


def _int(value, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: {key} {value!r} must be an integer (vlmkit implements square patches)")
    return value


def pixtral_vision_config(cfg: dict, merge: int, feature_layer, where: str) -> VisionConfig:
    """A PixtralVisionConfig (``vision_config``) -> VisionConfig of arch "pixtral"."""
    if cfg.get("model_type", "pixtral") != "pixtral":
        raise ConfigError(f"{where}: model_type {cfg['model_type']!r} is not implemented as Mistral 3's tower; "
                          f"supported: pixtral")
    v = {**DEFAULT_VISION, **cfg}
    act = v["hidden_act"]
    if act not in VISION_ACTS:
        raise ConfigError(f"{where}: hidden_act {act!r} is not implemented; supported: {', '.join(VISION_ACTS)}")
    rope = dict(cfg.get("rope_parameters") or {})
    if rope.get("rope_type", "axial") != "axial":
        raise ConfigError(f"{where}: rope_parameters.rope_type {rope['rope_type']!r}; supported: axial")
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    width, heads = _int(v["hidden_size"], "hidden_size", where), _int(v["num_attention_heads"], "num_attention_heads",
                                                                      where)
    if width % heads or (width // heads) % 4:
        raise ConfigError(f"{where}: hidden_size {width} / num_attention_heads {heads} must be a head size "
                          f"divisible by 4 (2D rotary embeddings)")
    if cfg.get("head_dim") not in (None, width // heads):
        raise ConfigError(f"{where}: head_dim {cfg['head_dim']} differs from hidden_size / num_attention_heads = "
                          f"{width // heads}, which Pixtral's attention uses")
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise ConfigError(f"{where}: vision_feature_layer {feature_layer!r}: only one layer (an integer) is "
                          f"implemented; the concatenated features of several layers are not")
    size = v["image_size"]
    size = _int(size, "image_size", where) if not isinstance(size, (list, tuple)) else int(max(size))
    return VisionConfig(
        arch="pixtral", image_size=(size, size), patch_size=_int(v["patch_size"], "patch_size", where),
        channels=_int(v["num_channels"], "num_channels", where), width=width,
        depth=_int(v["num_hidden_layers"], "num_hidden_layers", where), heads=heads,
        mlp_dim=_int(v["intermediate_size"], "intermediate_size", where), act=VISION_ACTS[act], norm="rmsnorm",
        norm_eps=PIXTRAL_NORM_EPS, class_token=False, pos_embed="rope2d", rope_theta=theta, pre_norm=True,
        post_norm=False, patch_bias=False, qkv_bias=False, feature_layer=feature_layer, drop_class_token=False,
        merge_size=merge)


def mistral3_config_from_hf(cfg: dict, where: str = "config.json") -> tuple[VLMConfig, int]:
    """A Mistral3Config -> (VLMConfig, image token id)."""
    if cfg.get("model_type") != "mistral3":
        raise ConfigError(f"{where}: model_type {cfg.get('model_type')!r} is not 'mistral3'")
    top = {**DEFAULT_TOP, **{k: v for k, v in cfg.items() if v is not None}}
    if "image_token_id" in cfg and "image_token_index" not in cfg:
        top["image_token_index"] = cfg["image_token_id"]
    text = dict(cfg.get("text_config") or {})
    text.setdefault("model_type", "mistral")
    if text["model_type"] not in ("mistral", "llama"):
        raise ConfigError(f"{where}: text_config.model_type {text['model_type']!r} is not implemented for Mistral 3; "
                          f"supported: mistral, llama")
    # transformers 5 reads tie_word_embeddings at the top (Mistral3Config's default: true)
    text["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", True))
    lm = lm_config_from_hf(text, f"{where} (text_config)")
    merge = _int(top["spatial_merge_size"], "spatial_merge_size", where)
    vision = pixtral_vision_config(cfg.get("vision_config") or {}, merge, top["vision_feature_layer"],
                                   f"{where} (vision_config)")
    act = top["projector_hidden_act"]
    if act not in PROJECTOR_ACTS:
        raise ConfigError(f"{where}: projector_hidden_act {act!r}; supported: {', '.join(PROJECTOR_ACTS)}")
    connector = ConnectorConfig(kind="patch_merger", scale_factor=merge, layers=2, act=PROJECTOR_ACTS[act],
                                bias=bool(top["multimodal_projector_bias"]))
    return VLMConfig(family="mistral3", vision=vision, connector=connector, lm=lm, image_token="[IMG]"), \
        int(top["image_token_index"])


def pixtral_llava_config_from_hf(cfg: dict, where: str = "config.json") -> tuple[VLMConfig, int]:
    """Pixtral-12B's Hub format, a LlavaConfig with a Pixtral ``vision_config`` -> (VLMConfig of family mistral3
    with connector.kind "mlp" and no merger, image token id). The LLaVA family's loader hands such folders here."""
    if cfg.get("model_type") != "llava" or (cfg.get("vision_config") or {}).get("model_type") != "pixtral":
        raise ConfigError(f"{where}: not a LLaVA config with a Pixtral tower (model_type 'llava', "
                          f"vision_config.model_type 'pixtral')")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy != "full":
        raise ConfigError(f"{where}: vision_feature_select_strategy {strategy!r}: a Pixtral tower has no class "
                          f"token to drop ('default' drops every image's first patch); supported: full")
    text = dict(cfg.get("text_config") or {})
    text.setdefault("model_type", "mistral")
    if text["model_type"] not in ("mistral", "llama"):
        raise ConfigError(f"{where}: text_config.model_type {text['model_type']!r} is not implemented for "
                          f"Pixtral; supported: mistral, llama")
    text.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
    lm = lm_config_from_hf(text, f"{where} (text_config)")
    vision = pixtral_vision_config(cfg["vision_config"], 1, cfg.get("vision_feature_layer", -2),
                                   f"{where} (vision_config)")
    act = cfg.get("projector_hidden_act", "gelu")
    if act not in PROJECTOR_ACTS:
        raise ConfigError(f"{where}: projector_hidden_act {act!r}; supported: {', '.join(PROJECTOR_ACTS)}")
    connector = ConnectorConfig(kind="mlp", layers=2, act=PROJECTOR_ACTS[act],
                                bias=bool(cfg.get("multimodal_projector_bias", True)))
    token = cfg.get("image_token_index", cfg.get("image_token_id"))
    if token is None:
        raise ConfigError(f"{where}: missing key 'image_token_index'")
    return VLMConfig(family="mistral3", vision=vision, connector=connector, lm=lm, image_token="[IMG]"), int(token)


def mistral3_key_map(cfg: VLMConfig, vision: str = "vision_tower.", projector: str = "multi_modal_projector.",
                     lm: str = "language_model.model.", head: str = "language_model.lm_head.weight") -> dict[str, str]:
    """vlmkit Mistral3Model parameter name -> transformers Mistral3ForConditionalGeneration tensor name."""
    table = {"encoder.patch_conv.weight": f"{vision}patch_conv.weight", "encoder.ln_pre.weight": f"{vision}ln_pre.weight"}
    for i in range(cfg.vision.depth):
        ours, theirs = f"encoder.blocks.{i}.", f"{vision}transformer.layers.{i}."
        names = ["attention_norm", "ffn_norm"] + [f"attention.{p}_proj" for p in "qkvo"] \
            + [f"feed_forward.{p}_proj" for p in ("gate", "up", "down")]
        table |= {f"{ours}{n}.weight": f"{theirs}{n}.weight" for n in names}
    if cfg.connector.kind == "patch_merger":
        table |= {"connector.norm.weight": f"{projector}norm.weight",
                  "connector.patch_merger.merging_layer.weight": f"{projector}patch_merger.merging_layer.weight"}
    for name in ("linear_1", "linear_2"):
        for w in ("weight", "bias") if cfg.connector.bias else ("weight",):
            table[f"connector.{name}.{w}"] = f"{projector}{name}.{w}"
    return table | {f"lm.{k}": v for k, v in lm_key_map(cfg.lm, lm, head).items()}


def _load(folder: str | Path, read=mistral3_config_from_hf) -> tuple[Mistral3Model, VLMConfig]:
    ckpt = read_checkpoint(folder)
    cfg, image_token = read(ckpt.config, str(ckpt.folder / "config.json"))
    t = ckpt.tensors
    vp = find_prefix(t, "model.vision_tower.", "vision_tower.")
    pp = find_prefix(t, "model.multi_modal_projector.", "multi_modal_projector.")
    lp = find_prefix(t, "model.language_model.", "language_model.model.")
    head = find_prefix(t, "lm_head.", "language_model.lm_head.") + "weight"
    cfg = untie_if_head_saved(cfg, t, head, f"{lp}embed_tokens.weight")
    model = build_model(cfg, image_token, init=False)
    ignore = (head,) if cfg.lm.tie_embeddings else ()  # a tied checkpoint may still carry a copy of the head
    load_state(model, t, mistral3_key_map(cfg, vp, pp, lp, head), str(ckpt.folder), ignore)
    if cfg.lm.tie_embeddings:
        model.lm.lm_head.weight = model.lm.embed_tokens.weight
    return model.eval(), cfg


def load_hf_mistral3(folder: str | Path) -> Mistral3Model:
    """A transformers Mistral3ForConditionalGeneration folder -> Mistral3Model (eval mode)."""
    return _load(folder)[0]


def _processor_files(folder: Path) -> dict:
    """processor_config.json's PixtralProcessor settings (its defaults where a key is missing)."""
    import json

    path = folder / "processor_config.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    return {**DEFAULT_PROCESSOR, **{k: data[k] for k in DEFAULT_PROCESSOR if k in data}}


def mistral3_processor_settings(folder: Path, vision: VisionConfig) -> dict:
    """The folder's PixtralProcessor and PixtralImageProcessor settings -> Mistral3ProcessorConfig fields, checked
    against the model's patch and merge sizes."""
    raw, path = read_image_processor(folder)
    proc = _processor_files(folder)
    for key, ok in (("do_resize", True), ("do_rescale", True), ("do_convert_rgb", True)):
        if raw.get(key, ok) != ok:
            raise ConfigError(f"{path}: {key} {raw[key]!r} is not implemented for mistral3; supported: {ok!r}")
    if abs(float(raw.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        raise ConfigError(f"{path}: rescale_factor {raw['rescale_factor']}; supported: 1/255")
    size = raw.get("size") or {"longest_edge": 1024}
    if not isinstance(size, dict) or not isinstance(size.get("longest_edge"), int) or size["longest_edge"] <= 0:
        raise ConfigError(f"{path}: size {size!r}: expected {{'longest_edge': int}} (PixtralImageProcessor fits the "
                          f"longer side of each image to it)")
    resample = raw.get("resample", 3)
    if resample not in PIL_RESAMPLE:
        raise ConfigError(f"{path}: resample {resample!r}; supported: {sorted(PIL_RESAMPLE)} (PIL filters)")
    for key, ours in (("patch_size", vision.patch_size), ("spatial_merge_size", vision.merge_size)):
        if proc[key] != ours:
            raise ConfigError(f"{folder / 'processor_config.json'}: {key} {proc[key]!r} (PixtralProcessor's "
                              f"{DEFAULT_PROCESSOR[key]} when absent) does not match config.json's {ours}: the "
                              f"processor would lay out a number of image tokens the model does not produce")
    edge = size["longest_edge"]
    out = {"longest_edge": edge, "image_size": (edge, edge), "patch_size": vision.patch_size,
           "merge_size": vision.merge_size,
           "resample": PIL_RESAMPLE[resample], "image_break_token": proc["image_break_token"],
           "image_end_token": proc["image_end_token"]}
    if raw.get("do_normalize", True):
        out["mean"] = tuple(float(v) for v in raw.get("image_mean", PIXTRAL_MEAN))
        out["std"] = tuple(float(v) for v in raw.get("image_std", PIXTRAL_STD))
    else:
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return out


def load_mistral3_folder(folder: Path, read=mistral3_config_from_hf):
    """(model, config, processor) of a Mistral 3 folder (or, with ``read`` :func:`pixtral_llava_config_from_hf`, a
    Pixtral-12B one); the processor gives PixtralProcessor's input_ids and each image's patches."""
    folder = Path(folder)
    model, cfg = _load(folder, read)
    settings = mistral3_processor_settings(folder, cfg.vision)
    most = max_image_tokens(Mistral3ProcessorConfig(**settings))
    processor = load_hf_processor(folder, "mistral3", model.image_token_id, most, cfg.lm.max_seq_len,
                                  Mistral3ProcessorConfig, fixed_images=False, **settings)
    expected = _processor_files(folder)["image_token"]
    if processor.cfg.image_token != expected:
        raise CheckpointError(f"{folder}: config.json's image_token_index {model.image_token_id} is "
                              f"{processor.cfg.image_token!r} in tokenizer.json; PixtralProcessor's image token is "
                              f"{expected!r}")
    for token in (processor.cfg.image_break_token, processor.cfg.image_end_token):
        if processor.tokenizer.tok.token_to_id(token) is None:
            raise CheckpointError(f"{folder}: PixtralProcessor writes {token!r}, which is not a token of "
                                  f"tokenizer.json")
    return model, cfg, processor


def load_pixtral_llava_folder(folder: Path):
    """(model, config, processor) of a Pixtral-12B folder (``LlavaForConditionalGeneration`` with a Pixtral tower):
    family mistral3 with LLaVA's projector, exported back as LlavaForConditionalGeneration."""
    return load_mistral3_folder(folder, pixtral_llava_config_from_hf)


# ---------------------------------------------------------------------------------------------- export

HF_VISION_ACTS = {v: k for k, v in VISION_ACTS.items()}
HF_PROJECTOR_ACTS = {v: k for k, v in PROJECTOR_ACTS.items()}
# the text keys a MistralConfig takes, as lm_config_to_hf names them
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta", "rope_parameters",
             "max_position_embeddings", "tie_word_embeddings")


def pixtral_vision_config_to_hf(cfg: VisionConfig) -> dict:
    """A vision config of arch "pixtral" -> PixtralVisionConfig's dict; what it cannot express is refused by field."""
    problems = [f"{k} {v!r} ({why})" for k, v, ok, why in (
        ("arch", cfg.arch, cfg.arch == "pixtral", "Mistral 3's tower is Pixtral's: arch 'pixtral'"),
        ("norm", cfg.norm, cfg.norm == "rmsnorm", "Pixtral's norms are RMSNorm"),
        ("norm_eps", cfg.norm_eps, abs(cfg.norm_eps - PIXTRAL_NORM_EPS) < 1e-12,
         f"transformers hard-codes {PIXTRAL_NORM_EPS}"),
        ("act", cfg.act, cfg.act in HF_VISION_ACTS, f"exportable: {', '.join(HF_VISION_ACTS)}")) if not ok]
    if problems:
        raise ConfigError(f"vision: not a Pixtral tower transformers can load: {'; '.join(problems)}")
    return {"model_type": "pixtral", "hidden_size": cfg.width, "intermediate_size": cfg.mlp_dim,
            "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads, "num_channels": cfg.channels,
            "image_size": max(cfg.image_size), "patch_size": cfg.patch_size, "hidden_act": HF_VISION_ACTS[cfg.act],
            "head_dim": cfg.width // cfg.heads, "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "axial", "rope_theta": cfg.rope_theta}}


def mistral3_config_to_hf(cfg: VLMConfig, image_token_id: int) -> dict:
    """VLMConfig -> Mistral3Config's config.json (nested text_config and vision_config, as the Hub's); with LLaVA's
    projector (connector.kind "mlp"), Pixtral-12B's LlavaConfig."""
    lm = cfg.lm
    if cfg.connector.kind not in ("patch_merger", "mlp") or cfg.connector.act not in HF_PROJECTOR_ACTS:
        raise ConfigError(f"connector.kind {cfg.connector.kind!r}, connector.act {cfg.connector.act!r}: Mistral 3's "
                          f"projector is kind patch_merger (Pixtral-12B's: mlp) with act one of "
                          f"{', '.join(HF_PROJECTOR_ACTS)}")
    if lm.norm_offset or lm.embed_scale or lm.qkv_bias:
        raise ConfigError("lm: Mistral 3's LM is Mistral's (no norm_offset, embed_scale or qkv_bias)")
    text = lm_config_to_hf(lm, "lm")  # refuses what a Llama-kind LM cannot express
    text = {k: text[k] for k in TEXT_KEYS} | {"model_type": "mistral", "sliding_window": None,
                                              "attention_dropout": 0.0}
    if cfg.connector.kind == "mlp":
        return {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "text_config": text,
                "vision_config": pixtral_vision_config_to_hf(cfg.vision), "image_token_index": image_token_id,
                "projector_hidden_act": HF_PROJECTOR_ACTS[cfg.connector.act],
                "vision_feature_layer": cfg.vision.feature_layer, "vision_feature_select_strategy": "full",
                "multimodal_projector_bias": cfg.connector.bias, "image_seq_length": 1,
                "tie_word_embeddings": lm.tie_embeddings, "torch_dtype": "float32"}
    return {"model_type": "mistral3", "architectures": ["Mistral3ForConditionalGeneration"], "text_config": text,
            "vision_config": pixtral_vision_config_to_hf(cfg.vision), "image_token_index": image_token_id,
            "projector_hidden_act": HF_PROJECTOR_ACTS[cfg.connector.act],
            "vision_feature_layer": cfg.vision.feature_layer, "multimodal_projector_bias": cfg.connector.bias,
            "spatial_merge_size": cfg.vision.merge_size, "tie_word_embeddings": lm.tie_embeddings,
            "torch_dtype": "float32"}


def mistral3_processor_to_hf(pcfg: Mistral3ProcessorConfig, vision: VisionConfig) -> tuple[dict, dict]:
    """(preprocessor_config.json, processor_config.json) of the processor's settings. Refused: settings
    PixtralProcessor would lay out differently."""
    if pcfg.text_mode != "whole":
        raise ConfigError(f"processor text_mode {pcfg.text_mode!r}: PixtralProcessor's layout is text_mode 'whole'")
    if (pcfg.patch_size, pcfg.merge_size) != (vision.patch_size, vision.merge_size):
        raise ConfigError(f"processor patch_size {pcfg.patch_size}, merge_size {pcfg.merge_size} are not the tower's "
                          f"({vision.patch_size}, {vision.merge_size})")
    p = pcfg.patch_size
    images = {"image_processor_type": "PixtralImageProcessor", "do_resize": True,
              "size": {"longest_edge": pcfg.longest_edge}, "patch_size": {"height": p, "width": p},
              "resample": PIL_CODES[pcfg.resample], "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "image_mean": list(pcfg.mean), "image_std": list(pcfg.std),
              "do_convert_rgb": True}
    processor = {"processor_class": "PixtralProcessor", "patch_size": p, "spatial_merge_size": pcfg.merge_size,
                 "image_token": pcfg.image_token, "image_break_token": pcfg.image_break_token,
                 "image_end_token": pcfg.image_end_token}
    return images, processor


def export_mistral3(model: Mistral3Model, cfg: VLMConfig, processor: Processor, folder: Path) -> None:
    """A Mistral 3 vlmkit model -> a folder that transformers' Mistral3ForConditionalGeneration and PixtralProcessor
    load, in the Hub's tensor layout (module docstring)."""
    config = mistral3_config_to_hf(cfg, model.image_token_id)
    images, proc = mistral3_processor_to_hf(processor.cfg, cfg.vision)
    tok = processor.tokenizer
    if tok.token_id(processor.cfg.image_token) != model.image_token_id:
        raise ConfigError(f"processor image_token {processor.cfg.image_token!r} is not the model's image token id "
                          f"{model.image_token_id}")
    special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id}
    config["text_config"] |= special
    write_hf_weights(folder, export_table(model, mistral3_key_map(cfg)))
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation_settings(special, processor))
    write_json(folder / "preprocessor_config.json", images)
    write_json(folder / "processor_config.json", proc)
    export_tokenizer(processor, folder)


__all__ = ["export_mistral3", "load_hf_mistral3", "load_mistral3_folder", "load_pixtral_llava_folder",
           "mistral3_config_from_hf", "mistral3_config_to_hf", "mistral3_key_map", "mistral3_processor_settings",
           "pixtral_llava_config_from_hf"]
