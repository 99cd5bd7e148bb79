"""PaliGemma (``PaliGemmaForConditionalGeneration``) -> vlmkit's PaliGemma model: SigLIP tower read at its last
layer with the post-layernorm (transformers' ``last_hidden_state``; the pooling head is unused), a linear
projector with bias (``multi_modal_projector.linear``), and a Gemma LM with prefix-LM attention
(:mod:`vlmkit.models.paligemma`). The processor lays prompts out as PaliGemmaProcessor does
(:mod:`vlmkit.processing.paligemma`).

PaliGemma 2 is the same with a Gemma 2 LM (``text_config.model_type`` "gemma2": sandwich norms, soft-capped
attention scores and logits, query_pre_attn_scalar, sliding-window layers; read by
:mod:`vlmkit.convert.hf.gemma_lm`). PaliGemmaForConditionalGeneration caps the logits itself
(final_logit_softcapping, as Gemma2ForCausalLM does), and its sliding layers' mask is causal AND window, OR the
prefix: the prompt sees all of itself on every layer (:mod:`vlmkit.models.paligemma`).

Export (:func:`export_paligemma`) writes the folder back in the Hub's layout (google/paligemma-*: the tensors
transformers 4 saved, which transformers 5, vLLM and SGLang read) with PaliGemmaProcessor's files.
"""

from __future__ import annotations

from pathlib import Path

from vlmkit.config import ConnectorConfig, VLMConfig
from vlmkit.convert.hf.io import export_table, find_prefix, load_state, read_checkpoint, write_hf_weights, write_json
from vlmkit.convert.hf.lm import lm_config_from_hf, lm_config_to_hf, lm_key_map
from vlmkit.convert.hf.processor import (export_tokenizer, image_processor_from_hf, image_processor_to_hf,
                                         load_hf_processor, read_image_processor)
from vlmkit.convert.hf.processor import generation_settings
from vlmkit.convert.hf.vision import export_vision_tensors, vision_config_from_hf, vision_config_to_hf, vision_tensors
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models import build_model
from vlmkit.models.paligemma import PaliGemmaModel
from vlmkit.processing import Processor


def paligemma_config_from_hf(cfg: dict, where: str = "config.json") -> tuple[VLMConfig, int]:
    """A PaliGemmaForConditionalGeneration config -> (VLMConfig, image token id). Sub-configs without a
    ``model_type`` are transformers' defaults (SigLIP, Gemma)."""
    if cfg.get("model_type") != "paligemma":
        raise ConfigError(f"{where}: model_type {cfg.get('model_type')!r} is not 'paligemma'")
    text = dict(cfg.get("text_config") or {})
    text.setdefault("model_type", "gemma")
    if text["model_type"] not in ("gemma", "gemma2"):
        raise ConfigError(f"{where}: text_config.model_type {text['model_type']!r} is not implemented for PaliGemma; "
                          f"supported: gemma (PaliGemma 1), gemma2 (PaliGemma 2)")
    if text["model_type"] == "gemma2" and "sliding_window" in text and text["sliding_window"] is None:
        # transformers then gives every layer the full mask, which no Gemma 2 LanguageConfig expresses
        raise ConfigError(f"{where}: text_config.sliding_window null: PaliGemma 2 without sliding-window layers is "
                          f"not implemented in vlmkit; supported: a window > 0")
    # PaliGemmaConfig sets it true by default, but the model hands the LM its own masks (prefix-LM), so it only
    # turns off the LM's causal fast path; it is no bidirectional Gemma (EmbeddingGemma)
    text.pop("use_bidirectional_attention", None)
    if text["model_type"] == "gemma" and text.get("final_logit_softcapping") is not None:
        raise ConfigError(f"{where}: text_config.final_logit_softcapping {text['final_logit_softcapping']!r}: logit "
                          f"soft-capping is not implemented in vlmkit; supported: null")
    # transformers ties PaliGemma's head by the top-level flag (default true), whatever text_config says
    text["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", True))
    lm = lm_config_from_hf(text, f"{where} (text_config)")
    vision_cfg = {"model_type": "siglip_vision_model", **(cfg.get("vision_config") or {})}
    if vision_cfg["model_type"] != "siglip_vision_model":
        raise ConfigError(f"{where}: vision_config.model_type {vision_cfg['model_type']!r} is not implemented for "
                          f"PaliGemma; supported: siglip_vision_model")
    vision = vision_config_from_hf(vision_cfg, -1, f"{where} (vision_config)")  # last layer + post-layernorm
    projection = int(cfg.get("projection_dim", lm.width))
    if projection != lm.width:
        raise ConfigError(f"{where}: projection_dim {projection} must equal text_config.hidden_size {lm.width} "
                          f"(the projector writes LM embeddings)")
    token = cfg.get("image_token_index", cfg.get("image_token_id"))
    if token is None:
        raise ConfigError(f"{where}: missing key 'image_token_index'")
    return VLMConfig(family="paligemma", vision=vision, connector=ConnectorConfig(kind="linear", bias=True),
                       lm=lm), int(token)


def load_hf_paligemma(folder: str | Path) -> PaliGemmaModel:
    """A transformers PaliGemmaForConditionalGeneration folder -> PaliGemmaModel (eval mode)."""
    return _load_paligemma(folder)[0]


def _load_paligemma(folder: str | Path) -> tuple[PaliGemmaModel, VLMConfig]:
    ckpt = read_checkpoint(folder)
    cfg, image_token = paligemma_config_from_hf(ckpt.config, str(ckpt.folder / "config.json"))
    t = ckpt.tensors
    # saved layouts differ by version: "vision_tower.vision_model." (4.x) or "vision_tower." (5.x), and "model.*"
    vp = find_prefix(t, "vision_tower.", "model.vision_tower.")
    vp = find_prefix(t, vp + "vision_model.", vp)
    lp = find_prefix(t, "language_model.model.", "model.language_model.")
    head = find_prefix(t, "language_model.lm_head.", "lm_head.") + "weight"
    pp = find_prefix(t, "multi_modal_projector.", "model.multi_modal_projector.")
    model = build_model(cfg, image_token, init=False)
    table, tensors = vision_tensors(t, cfg.vision, vp, "encoder.")
    table |= {f"lm.{k}": v for k, v in lm_key_map(cfg.lm, lp, head).items()}
    table |= {"connector.proj.weight": f"{pp}linear.weight", "connector.proj.bias": f"{pp}linear.bias"}
    ignore = ("lm_head.weight",) if cfg.lm.tie_embeddings else ()  # a tied checkpoint may still carry a copy
    load_state(model, tensors, table, str(ckpt.folder), ignore)
    if cfg.lm.tie_embeddings:
        model.lm.lm_head.weight = model.lm.embed_tokens.weight
    return model.eval(), cfg


def load_paligemma_folder(folder: Path):
    """(model, config, processor) of a PaliGemma folder; the processor gives PaliGemmaProcessor's input_ids."""
    model, cfg = _load_paligemma(folder)
    settings, path = read_image_processor(folder)
    seq_len = settings.get("image_seq_length")
    if seq_len is not None and int(seq_len) != model.image_seq_len:
        raise ConfigError(f"{path}: image_seq_length {seq_len} does not match the model's {model.image_seq_len} "
                          f"tokens per image ((vision_config.image_size / patch_size) ** 2 in config.json)")
    processor = load_hf_processor(folder, "paligemma", model.image_token_id, model.image_seq_len, cfg.lm.max_seq_len,
                                  fixed_images=False, **image_processor_from_hf(settings, str(path)))
    for name in ("bos_token", "eos_token"):  # both are written into PaliGemma's texts
        if not getattr(processor.cfg, name):
            raise CheckpointError(f"{folder}: PaliGemma's prompts need a {name}; tokenizer_config.json (or "
                                  f"special_tokens_map.json) names none")
    return model, cfg, processor


# ---------------------------------------------------------------------------------------------- export


def paligemma_config_to_hf(cfg: VLMConfig, image_token_id: int, image_seq_len: int) -> dict:
    """VLMConfig -> PaliGemmaConfig's config.json. What PaliGemmaForConditionalGeneration cannot compute is
    refused by field: its tower is SigLIP read at ``last_hidden_state`` (through the post-layernorm), its
    projector one linear layer with bias, its LM Gemma or (``post_norms``: PaliGemma 2) Gemma 2."""
    if cfg.vision.arch == "vit" and cfg.vision.class_token:
        raise ConfigError("vision.class_token: true: PaliGemma's tower is SigLIP (no class token); a CLIP-style "
                          "tower is not expressible as a PaliGemma checkpoint")
    vision = vision_config_to_hf(cfg.vision, "vision")  # refuses a CNN tower and other non-SigLIP settings
    if not cfg.vision.post_norm:
        raise ConfigError("vision.post_norm: false: PaliGemma reads the tower's last_hidden_state, which always "
                          "passes its final layernorm; set vision.post_norm: true (as an imported PaliGemma has)")
    if cfg.connector.kind != "linear" or not cfg.connector.bias:
        raise ConfigError(f"connector.kind {cfg.connector.kind!r}, connector.bias {cfg.connector.bias}: "
                          f"PaliGemma's projector is one linear layer with bias (kind: linear, bias: true)")
    if not (cfg.lm.norm_offset and cfg.lm.embed_scale):
        raise ConfigError(f"lm.norm_offset {cfg.lm.norm_offset}, lm.embed_scale {cfg.lm.embed_scale}: PaliGemma's "
                          f"LM is Gemma (both true); vlmkit's PaliGemma import reads no other")
    if cfg.lm.qk_norm:  # post_norms with qk_norm export as gemma3_text
        raise ConfigError("lm.qk_norm: true: PaliGemma's LM is Gemma or Gemma 2 (no QK-norm); vlmkit's PaliGemma "
                          "import reads no Gemma 3 LM")
    text = lm_config_to_hf(cfg.lm, "lm") | {"num_image_tokens": image_seq_len}
    return {"model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"],
            "vision_config": vision, "text_config": text, "image_token_index": image_token_id,
            "projection_dim": cfg.lm.width, "hidden_size": cfg.lm.width, "vocab_size": cfg.lm.vocab_size,
            "tie_word_embeddings": cfg.lm.tie_embeddings, "torch_dtype": "float32"}


def paligemma_processor_to_hf(processor: Processor, image_seq_len: int) -> dict:
    """The processor's settings -> preprocessor_config.json (SiglipImageProcessor with ``image_seq_length``,
    which PaliGemmaProcessor requires). Refused: what PaliGemmaProcessor would lay out or resize differently."""
    pcfg = processor.cfg
    # processor.json names the family whose layout the processor uses, and nothing makes it the model's: a processor
    # of another family (a llava one lays prompts out without PaliGemma's BOS and "\n") would be exported as a
    # PaliGemmaProcessor that lays them out differently (before the family interface: image_processor 'paligemma')
    if processor.family.name != "paligemma" or pcfg.text_mode != "whole":
        raise ConfigError(f"processor family {processor.family.name!r}, text_mode {pcfg.text_mode!r}: "
                          f"PaliGemmaProcessor's prompt layout is family 'paligemma' with text_mode 'whole'")
    if pcfg.image_token != "<image>":
        raise ConfigError(f"processor image_token {pcfg.image_token!r}: PaliGemmaProcessor finds placeholders "
                          f"by the literal '<image>'")
    if not pcfg.bos_token or not pcfg.eos_token:
        raise ConfigError("processor bos_token / eos_token: PaliGemma's prompts need both (BOS after the images, "
                          "EOS after a suffix)")
    if pcfg.shortest_edge:
        raise ConfigError(f"processor shortest_edge {pcfg.shortest_edge}: SiglipImageProcessor resizes straight to "
                          f"height x width (no centre crop); set shortest_edge: 0")
    # the "fixed" settings are the pixels of the paligemma image processor (it adds only text hooks)
    images = image_processor_to_hf(pcfg, "SiglipImageProcessor")
    del images["do_center_crop"]
    return {**images, "image_seq_length": image_seq_len, "processor_class": "PaliGemmaProcessor"}


def export_paligemma(model: PaliGemmaModel, cfg: VLMConfig, processor: Processor, folder: Path) -> None:
    """A PaliGemma vlmkit model -> a folder that transformers' PaliGemmaForConditionalGeneration and
    AutoProcessor (PaliGemmaProcessor) load, tensors named as the Hub's google/paligemma-* checkpoints
    ("vision_tower.vision_model.", "multi_modal_projector.linear.", "language_model.model."; no head when tied)."""
    config = paligemma_config_to_hf(cfg, model.image_token_id, model.image_seq_len)
    preprocessor = paligemma_processor_to_hf(processor, model.image_seq_len)
    tok = processor.tokenizer
    special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id}
    config["text_config"] |= special  # generation stops where vlmkit's does
    tensors = export_vision_tensors(model.encoder, cfg.vision, "vision_tower.vision_model.")
    tensors |= export_table(model.lm, lm_key_map(cfg.lm, "language_model.model.", "language_model.lm_head.weight"))
    tensors["multi_modal_projector.linear.weight"] = model.connector.proj.weight
    tensors["multi_modal_projector.linear.bias"] = model.connector.proj.bias
    write_hf_weights(folder, tensors)
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation_settings(special, processor))
    write_json(folder / "preprocessor_config.json", preprocessor)
    write_json(folder / "processor_config.json", {"processor_class": "PaliGemmaProcessor"})
    export_tokenizer(processor, folder)


