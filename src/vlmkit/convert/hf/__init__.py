"""Hugging Face checkpoint folders <-> vlmkit: per-family explicit key tables, import and export.

Safetensors only; every imported family is checked against transformers' own implementation in tests. Which
family reads a folder is its ``Family.hf`` mapping (vlmkit/family.py).
"""

from vlmkit.convert.hf.families import convert_from_hf, convert_to_hf, is_hf_folder, load_hf
from vlmkit.convert.hf.blip2 import blip2_config_from_hf, blip2_config_to_hf, export_blip2, load_hf_blip2
from vlmkit.convert.hf.dual_encoder import (dual_encoder_config_from_hf, dual_encoder_config_to_hf,
                                            export_dual_encoder, load_hf_dual_encoder)
from vlmkit.convert.hf.idefics import export_idefics, idefics_config_from_hf, idefics_config_to_hf
from vlmkit.convert.hf.idefics3 import export_idefics3, idefics3_config_from_hf, load_hf_idefics3
from vlmkit.convert.hf.io import HFCheckpoint, load_state, read_checkpoint, read_config, read_weights
from vlmkit.convert.hf.llava import export_llava, llava_config_from_hf, load_hf_llava
from vlmkit.convert.hf.llava_next import export_llava_next, llava_next_config_from_hf
from vlmkit.convert.hf.mllama import export_mllama, load_hf_mllama, mllama_config_from_hf
from vlmkit.convert.hf.lm import export_hf_lm, lm_config_from_hf, lm_config_to_hf, lm_key_map, load_hf_lm
from vlmkit.convert.hf.paligemma import export_paligemma, load_hf_paligemma, paligemma_config_from_hf
from vlmkit.convert.hf.processor import (image_processor_from_hf, load_hf_image_transform, load_hf_processor,
                                         load_hf_text_tokenizer, load_hf_tokenizer, read_chat_template,
                                         read_image_processor, siglip_tokenizer_from_sentencepiece)
from vlmkit.convert.hf.qwen2_vl import export_qwen2_vl, load_hf_qwen2_vl, qwen2_vl_config_from_hf
from vlmkit.convert.hf.vision import load_hf_vision, vision_config_from_hf, vision_key_map

__all__ = [
    "HFCheckpoint", "convert_from_hf", "convert_to_hf",
    "blip2_config_from_hf", "blip2_config_to_hf", "export_blip2", "load_hf_blip2",
    "dual_encoder_config_from_hf", "dual_encoder_config_to_hf", "export_dual_encoder", "export_hf_lm",
    "export_idefics", "export_idefics3", "export_llava", "export_llava_next", "export_paligemma",
    "export_qwen2_vl", "idefics_config_from_hf", "idefics_config_to_hf", "idefics3_config_from_hf",
    "image_processor_from_hf", "is_hf_folder",
    "llava_config_from_hf", "llava_next_config_from_hf", "lm_config_from_hf", "lm_config_to_hf", "lm_key_map",
    "load_hf", "load_hf_dual_encoder", "load_hf_idefics3", "load_hf_image_transform", "load_hf_llava",
    "load_hf_lm", "load_hf_paligemma", "load_hf_processor", "load_hf_qwen2_vl", "load_hf_text_tokenizer",
    "load_hf_tokenizer", "load_hf_vision", "load_state", "paligemma_config_from_hf",
    "qwen2_vl_config_from_hf", "read_chat_template", "read_checkpoint", "read_config", "read_image_processor",
    "read_weights", "siglip_tokenizer_from_sentencepiece", "vision_config_from_hf",
    "vision_key_map",
    "export_mllama", "load_hf_mllama", "mllama_config_from_hf",
]
