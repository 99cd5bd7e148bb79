"""Gemma 3 (``Gemma3ForConditionalGeneration``, model_type ``gemma3``) <-> vlmkit's Gemma 3 model: a SigLIP tower read
at its last layer through the post-layernorm, Gemma 3's projector (``multi_modal_projector``: average pooling to
``mm_tokens_per_image``, ``mm_soft_emb_norm``, ``mm_input_projection_weight`` [D_vision, D_lm], transposed into
vlmkit's Linear) and a Gemma 3 text decoder (``convert/hf/gemma_lm.py``) with bidirectional attention within each
image (:mod:`vlmkit.models.gemma3`). The processor lays prompts out as Gemma3Processor does
(:mod:`vlmkit.processing.gemma3`), pan-and-scan included.

Export writes transformers 5's layout ("model.vision_tower.vision_model.", "model.multi_modal_projector.",
"model.language_model.", "lm_head.weight" when untied) with Gemma3Processor's files (its tokenizer naming
``boi_token``, ``eoi_token`` and ``image_token``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from vlmkit.convert.hf.io import (
    export_table,
    find_prefix,
    load_state,
    read_checkpoint,
    read_json,
    write_hf_weights,
    write_json,
)
from vlmkit.convert.hf.lm import lm_config_from_hf, lm_config_to_hf, lm_key_map, untie_if_head_saved
from vlmkit.convert.hf.processor import (
    export_tokenizer,
    image_processor_from_hf,
    image_processor_to_hf,
    load_hf_processor,
    read_image_processor,
)
from vlmkit.convert.hf.processor import generation_settings
from vlmkit.convert.hf.vision import (
    export_vision_tensors,
    vision_config_from_hf,
    vision_config_to_hf,
    vision_tensors,
)
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models import build_model
from vlmkit.models.gemma3 import GEMMA3_CONNECTOR, Gemma3Config, Gemma3Model
from vlmkit.processing import Processor
from vlmkit.processing.gemma3 import Gemma3ProcessorConfig

PROJ = "mm_input_projection_weight"


def gemma3_config_from_hf(cfg: dict, where: str = "config.json") -> tuple[Gemma3Config, int]:
    """A Gemma3ForConditionalGeneration config -> (Gemma3Config, image token id)."""
    if cfg.get("model_type") != "gemma3":
        raise ConfigError(f"{where}: model_type {cfg.get('model_type')!r} is not 'gemma3'")
    text = {"model_type": "gemma3_text", **(cfg.get("text_config") or {})}
    if text["model_type"] != "gemma3_text":
        raise ConfigError(f"{where}: text_config.model_type {text['model_type']!r}; supported: gemma3_text")
    text["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))
    # Gemma3ForConditionalGeneration never soft-caps its logits (only Gemma3ForCausalLM reads the key)
    lm = dataclasses.replace(lm_config_from_hf(text, f"{where} (text_config)"), logit_softcap=None)
    vision_cfg = {"model_type": "siglip_vision_model", **(cfg.get("vision_config") or {})}
    if vision_cfg["model_type"] != "siglip_vision_model":
        raise ConfigError(f"{where}: vision_config.model_type {vision_cfg['model_type']!r} is not implemented for "
                          f"gemma3; supported: siglip_vision_model")
    vision = vision_config_from_hf(vision_cfg, -1, f"{where} (vision_config)")  # last_hidden_state
    token = cfg.get("image_token_id", cfg.get("image_token_index", 262_144))
    model = Gemma3Config(vision=vision, connector=GEMMA3_CONNECTOR, lm=lm,
                         mm_tokens_per_image=int(cfg.get("mm_tokens_per_image", 256)))
    return model, int(token)


def _load_gemma3(folder: str | Path) -> tuple[Gemma3Model, Gemma3Config]:
    ckpt = read_checkpoint(folder)
    cfg, image_token = gemma3_config_from_hf(ckpt.config, str(ckpt.folder / "config.json"))
    t = ckpt.tensors
    # transformers 5 saves "model.vision_tower.vision_model.", the Hub's 4.5x checkpoints "vision_tower.vision_model."
    vp = find_prefix(t, "model.vision_tower.", "vision_tower.")
    vp = find_prefix(t, vp + "vision_model.", vp)
    lp = find_prefix(t, "model.language_model.", "language_model.model.")
    head = find_prefix(t, "lm_head.", "language_model.lm_head.") + "weight"
    pp = find_prefix(t, "model.multi_modal_projector.", "multi_modal_projector.")
    cfg = untie_if_head_saved(cfg, t, head, lp + "embed_tokens.weight")
    model = build_model(cfg, image_token, init=False)
    table, tensors = vision_tensors(t, cfg.vision, vp, "encoder.")
    table |= {f"lm.{k}": v for k, v in lm_key_map(cfg.lm, lp, head).items()}
    table |= {"connector.norm.weight": f"{pp}mm_soft_emb_norm.weight", "connector.proj.weight": f"{pp}{PROJ} (T)"}
    if f"{pp}{PROJ}" in tensors:
        tensors[f"{pp}{PROJ} (T)"] = tensors.pop(f"{pp}{PROJ}").t()
    ignore = ("lm_head.weight",) if cfg.lm.tie_embeddings else ()
    load_state(model, tensors, table, str(ckpt.folder), ignore)
    if cfg.lm.tie_embeddings:
        model.lm.lm_head.weight = model.lm.embed_tokens.weight
    return model.eval(), cfg


def _special_tokens(folder: Path) -> dict:
    """boi_token / eoi_token of the tokenizer: top-level keys of tokenizer_config.json (the Hub's) or its
    ``extra_special_tokens`` (transformers 5)."""
    path = folder / "tokenizer_config.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    extra = data.get("extra_special_tokens") or {}
    extra = extra if isinstance(extra, dict) else {}
    out = {}
    for name in ("boi_token", "eoi_token"):
        value = data.get(name, extra.get(name))
        if isinstance(value, dict):
            value = value.get("content")
        if value:
            out[name] = value
    return out


# Gemma3Processor passes these to its image processor on every call unless the caller passes others, over the
# folder's own settings: an imported folder takes them (no crops), as transformers' processor(...) does. Crops are
# a processor setting (``do_pan_and_scan`` in a converted checkpoint's processor.json), exported as such.
PAN_AND_SCAN = {"do_pan_and_scan": False, "pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
                "pan_and_scan_min_ratio_to_activate": 1.2}


def load_gemma3_folder(folder: Path):
    """(model, config, processor) of a Gemma 3 folder; the processor gives Gemma3Processor's input_ids."""
    model, cfg = _load_gemma3(folder)
    settings, path = read_image_processor(folder)
    proc_path = Path(folder) / "processor_config.json"
    proc = read_json(proc_path)
    seq_len = proc.get("image_seq_length", settings.get("image_seq_length"))
    if seq_len is not None and int(seq_len) != model.image_seq_len:
        raise ConfigError(f"{proc_path}: image_seq_length {seq_len} does not match config.json's mm_tokens_per_image "
                          f"{model.image_seq_len}")
    processor = load_hf_processor(folder, "gemma3", model.image_token_id, model.image_seq_len, cfg.lm.max_seq_len,
                                  config=Gemma3ProcessorConfig, fixed_images=False,
                                  **image_processor_from_hf(settings, str(path)), **_special_tokens(Path(folder)),
                                  **PAN_AND_SCAN)
    for token in (processor.cfg.boi_token, processor.cfg.eoi_token):
        if processor.tokenizer.tok.token_to_id(token) is None:
            raise CheckpointError(f"{folder}: Gemma 3's {token!r} is not in tokenizer.json's vocabulary")
    return model, cfg, processor


# ---------------------------------------------------------------------------------------------- export


def gemma3_config_to_hf(cfg: Gemma3Config, image_token_id: int, boi_id: int, eoi_id: int) -> dict:
    """Gemma3Config -> Gemma3Config's config.json; what Gemma3ForConditionalGeneration cannot compute is refused by
    field (a CLIP-style tower, a tower without its final norm, an LM that is not Gemma 3's)."""
    if cfg.vision.class_token:
        raise ConfigError("vision.class_token: true: Gemma 3's tower is SigLIP (no class token)")
    vision = vision_config_to_hf(cfg.vision, "vision")
    if not cfg.vision.post_norm:
        raise ConfigError("vision.post_norm: false: Gemma 3 reads the tower's last_hidden_state, through its final "
                          "layernorm; set vision.post_norm: true")
    text = lm_config_to_hf(cfg.lm, "lm")
    if text["model_type"] != "gemma3_text" or cfg.lm.logit_softcap is not None:
        raise ConfigError(f"lm: exports as {text['model_type']} (logit_softcap {cfg.lm.logit_softcap}); Gemma 3's "
                          f"LM is gemma3_text (post_norms, qk_norm with qk_norm_kind rmsnorm) without logit_softcap")
    return {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "vision_config": vision,
            "text_config": text, "mm_tokens_per_image": cfg.mm_tokens_per_image, "image_token_id": image_token_id,
            "image_token_index": image_token_id, "boi_token_index": boi_id, "eoi_token_index": eoi_id,
            "tie_word_embeddings": cfg.lm.tie_embeddings, "torch_dtype": "float32"}


def export_gemma3(model: Gemma3Model, cfg: Gemma3Config, processor: Processor, folder: Path) -> None:
    """A Gemma 3 vlmkit model -> a folder that Gemma3ForConditionalGeneration and AutoProcessor (Gemma3Processor)
    load with the same numbers."""
    pcfg, tok = processor.cfg, processor.tokenizer
    if not isinstance(pcfg, Gemma3ProcessorConfig):
        raise ConfigError(f"processor family {pcfg.family!r}: a Gemma 3 folder needs Gemma3Processor's settings "
                          f"(boi_token, eoi_token)")
    ids = [tok.token_id(t) for t in (pcfg.boi_token, pcfg.eoi_token)]
    config = gemma3_config_to_hf(cfg, model.image_token_id, *ids)
    special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id}
    config["text_config"] |= special
    tensors = export_vision_tensors(model.encoder, cfg.vision, "model.vision_tower.vision_model.")
    head = "lm_head.weight"
    tensors |= export_table(model.lm, lm_key_map(cfg.lm, "model.language_model.", head))
    pp = "model.multi_modal_projector."
    tensors[f"{pp}mm_soft_emb_norm.weight"] = model.connector.norm.weight
    tensors[f"{pp}{PROJ}"] = model.connector.proj.weight.t()
    images = image_processor_to_hf(pcfg, "Gemma3ImageProcessor")
    if pcfg.shortest_edge:
        raise ConfigError(f"processor shortest_edge {pcfg.shortest_edge}: Gemma3ImageProcessor resizes straight to "
                          f"height x width; set shortest_edge: 0")
    del images["do_center_crop"]
    images |= {k: getattr(pcfg, k) for k in PAN_AND_SCAN}
    write_hf_weights(folder, tensors)
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json", generation_settings(special, processor))
    write_json(folder / "preprocessor_config.json", images)
    write_json(folder / "processor_config.json", {"processor_class": "Gemma3Processor",
                                                  "image_seq_length": model.image_seq_len})
    export_tokenizer(processor, folder)
    path = folder / "tokenizer_config.json"
    names = {"boi_token": pcfg.boi_token, "eoi_token": pcfg.eoi_token, "image_token": pcfg.image_token}
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | names | {"extra_special_tokens": names}, indent=2) + "\n")
