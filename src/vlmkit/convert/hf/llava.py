"""LLaVA-1.5 (``LlavaForConditionalGeneration``) <-> ``VisionLanguageModel``: CLIP tower read at layer -2
without its class token, two-layer MLP projector, Llama-family LM.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vlmkit.config import ConnectorConfig, VLMConfig
from vlmkit.convert.hf.io import export_table, find_prefix, load_state, read_checkpoint, write_hf_weights, write_json
from vlmkit.convert.hf.lm import lm_config_from_hf, lm_config_to_hf, lm_key_map
from vlmkit.convert.hf.processor import export_tokenizer, image_processor_to_hf, load_hf_processor
from vlmkit.convert.hf.processor import generation_settings
from vlmkit.convert.hf.vision import export_vision_tensors, vision_config_from_hf, vision_config_to_hf, vision_tensors
from vlmkit.errors import ConfigError
from vlmkit.models import build_model
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing import Processor


def llava_config_from_hf(cfg: dict, where: str = "config.json", model_type: str = "llava", default_layer: int = -2,
                         default_strategy: str = "default") -> tuple[VLMConfig, int]:
    """A LlavaForConditionalGeneration config -> (VLMConfig, image token id). LLaVA-NeXT / OneVision configs
    share these keys: they pass their ``model_type`` and their defaults for the feature layer and strategy."""
    if cfg.get("model_type") != model_type:
        raise ConfigError(f"{where}: model_type {cfg.get('model_type')!r} is not {model_type!r}")
    layer = cfg.get("vision_feature_layer", default_layer)
    if not isinstance(layer, int):
        raise ConfigError(f"{where}: vision_feature_layer {layer!r}: concatenating several layers is not "
                          f"implemented; give one layer index")
    strategy = cfg.get("vision_feature_select_strategy", default_strategy)
    if strategy not in ("default", "full"):
        raise ConfigError(f"{where}: vision_feature_select_strategy {strategy!r}; supported: default, full")
    if (cfg.get("vision_config") or {}).get("model_type") == "pixtral":
        raise ConfigError(f"{where}: vision_config.model_type 'pixtral' (Pixtral-12B's layout: a Pixtral tower at "
                          f"each image's own resolution, read with PixtralProcessor) is not a {model_type} tower; "
                          f"load the folder with vlmkit.load, which reads a LLaVA folder with a Pixtral tower as "
                          f"family mistral3")
    vision = vision_config_from_hf(cfg.get("vision_config") or {}, layer, f"{where} (vision_config)")
    if strategy == "default" and not vision.class_token:
        raise ConfigError(f"{where}: vision_feature_select_strategy 'default' drops a class token this tower "
                          f"does not have; use 'full'")
    # LLaVA reads the tower's hidden_states, which never pass through the final norm (even at layer -1;
    # last_hidden_state would)
    vision = dataclasses.replace(vision, drop_class_token=strategy == "default", post_norm=False)
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
    return VLMConfig(family="llava", vision=vision, connector=connector, lm=lm), int(token)


def load_hf_llava(folder: str | Path) -> VisionLanguageModel:
    """A transformers LlavaForConditionalGeneration folder (LLaVA-1.5 layout) -> VisionLanguageModel."""
    return _load_llava(folder)[0]


def _load_llava(folder: str | Path) -> tuple[VisionLanguageModel, VLMConfig]:
    ckpt = read_checkpoint(folder)
    where = str(ckpt.folder / "config.json")
    cfg, image_token = llava_config_from_hf(ckpt.config, where)
    model = build_model(cfg, image_token, init=False)
    load_llava_weights(model, ckpt.tensors, cfg, str(ckpt.folder))
    return model.eval(), cfg


def load_llava_weights(model, t: dict, cfg: VLMConfig, where: str, extra: dict[str, str] | None = None) -> None:
    """Load a LLaVA-layout checkpoint's tower, projector and LM (either transformers layout) into ``model``;
    ``extra`` adds a family's own tensors to the key table (LLaVA-NeXT's ``image_newline``)."""
    vp = find_prefix(t, "vision_tower.", "model.vision_tower.")
    vp = find_prefix(t, vp + "vision_model.", vp)
    lp = find_prefix(t, "language_model.model.", "model.language_model.")
    head = find_prefix(t, "language_model.lm_head.", "lm_head.") + "weight"
    pp = find_prefix(t, "multi_modal_projector.", "model.multi_modal_projector.")
    table, tensors = vision_tensors(t, cfg.vision, vp, "encoder.")
    table |= extra or {}
    table |= {f"lm.{k}": v for k, v in lm_key_map(cfg.lm, lp, head).items()}
    for ours, theirs in (("fc1", "linear_1"), ("fc2", "linear_2")):
        table[f"connector.{ours}.weight"] = f"{pp}{theirs}.weight"
        if cfg.connector.bias:
            table[f"connector.{ours}.bias"] = f"{pp}{theirs}.bias"
    ignore = ("lm_head.weight",) if cfg.lm.tie_embeddings else ()
    load_state(model, tensors, table, where, ignore)
    if cfg.lm.tie_embeddings:
        model.lm.lm_head.weight = model.lm.embed_tokens.weight


def load_llava_folder(folder: Path):
    """(model, config, processor) of a LLaVA-1.5 folder; the processor gives LlavaProcessor's input_ids. A folder
    whose tower is Pixtral's (Pixtral-12B) is read by the mistral3 family's reader, which owns that tower and
    PixtralProcessor's processing (convert/hf/mistral3.py)."""
    from vlmkit.convert.hf.io import read_config

    if (read_config(Path(folder)).get("vision_config") or {}).get("model_type") == "pixtral":
        from vlmkit.convert.hf.mistral3 import load_pixtral_llava_folder

        return load_pixtral_llava_folder(folder)
    model, cfg = _load_llava(folder)
    processor = load_hf_processor(folder, "llava", model.image_token_id, model.image_seq_len, cfg.lm.max_seq_len)
    return model, cfg, processor



# ---------------------------------------------------------------------------------------------- export


def llava_config_to_hf(cfg: VLMConfig, image_token_id: int, image_seq_len: int) -> dict:
    """VLMConfig -> LlavaConfig's config.json. The tower is written with the layers vlmkit built and read at
    its last hidden state (the same features as the original depth read at ``feature_layer``)."""
    vision = vision_config_to_hf(cfg.vision, "vision")
    if cfg.vision.post_norm:
        raise ConfigError("vision.post_norm: true: LLaVA reads the tower's hidden states, which never pass its "
                          "final norm; this model is not expressible as a LLaVA checkpoint")
    if cfg.connector.kind != "mlp":
        raise ConfigError(f"connector.kind {cfg.connector.kind!r}: a LLaVA checkpoint has the two-layer MLP "
                          f"projector (kind: mlp)")
    acts = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}
    if cfg.connector.act not in acts:
        raise ConfigError(f"connector.act {cfg.connector.act!r}; LLaVA exports: {', '.join(acts)}")
    strategy = "default" if cfg.vision.class_token and cfg.vision.drop_class_token else "full"
    return {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "vision_config": vision,
            "text_config": lm_config_to_hf(cfg.lm, "lm"), "image_token_index": image_token_id,
            "vision_feature_layer": -1, "vision_feature_select_strategy": strategy,
            "projector_hidden_act": acts[cfg.connector.act], "multimodal_projector_bias": cfg.connector.bias,
            "image_seq_length": image_seq_len, "tie_word_embeddings": cfg.lm.tie_embeddings,
            "torch_dtype": "float32"}


def export_llava_tensors(model: VisionLanguageModel, cfg: VLMConfig) -> dict:
    """Tower, projector and LM under the Hub's llava-hf names (``vision_tower.vision_model.``,
    ``multi_modal_projector.``, ``language_model.model.`` / ``language_model.lm_head.``); LLaVA-NeXT and
    OneVision add their ``image_newline`` to these."""
    tensors = export_vision_tensors(model.encoder, cfg.vision, "vision_tower.vision_model.")
    tensors |= export_table(model.lm, lm_key_map(cfg.lm, "language_model.model.", "language_model.lm_head.weight"))
    for ours, theirs in (("fc1", "linear_1"), ("fc2", "linear_2")):
        tensors[f"multi_modal_projector.{theirs}.weight"] = getattr(model.connector, ours).weight
        if cfg.connector.bias:
            tensors[f"multi_modal_projector.{theirs}.bias"] = getattr(model.connector, ours).bias
    return tensors


def export_llava(model: VisionLanguageModel, cfg: VLMConfig, processor: Processor, folder: Path) -> None:
    """A LLaVA-layout vlmkit model -> a folder that transformers' LlavaForConditionalGeneration and
    AutoProcessor load (the Hub's llava-hf tensor layout, which transformers 4 and 5, vLLM and SGLang read)."""
    config = llava_config_to_hf(cfg, model.image_token_id, model.image_seq_len)
    tok = processor.tokenizer
    special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id}
    config["text_config"] |= special  # generation stops where vlmkit's does
    tensors = export_llava_tensors(model, cfg)
    write_hf_weights(folder, tensors)
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation_settings(special, processor))
    images = image_processor_to_hf(processor.cfg)
    write_json(folder / "preprocessor_config.json", {**images, "processor_class": "LlavaProcessor"})
    write_json(folder / "processor_config.json", {
        "processor_class": "LlavaProcessor", "patch_size": cfg.vision.patch_size, "image_token": processor.cfg.image_token,
        "vision_feature_select_strategy": config["vision_feature_select_strategy"],
        "num_additional_image_tokens": 1 if cfg.vision.class_token else 0})
    export_tokenizer(processor, folder)


