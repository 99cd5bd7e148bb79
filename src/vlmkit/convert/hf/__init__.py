"""Hugging Face checkpoint folders <-> vlmkit: per-family explicit key tables, import and export.

Safetensors only; every imported family is checked against transformers' own implementation in tests.
"""

from vlmkit.convert.hf.families import (HF_FAMILIES, HFFamily, convert_from_hf, convert_to_hf, family_by_name,
                                        is_hf_folder, load_hf, register_family)
from vlmkit.convert.hf.io import HFCheckpoint, load_state, read_checkpoint, read_config, read_weights
from vlmkit.convert.hf.llava import export_llava, llava_config_from_hf, load_hf_llava
from vlmkit.convert.hf.lm import export_hf_lm, lm_config_from_hf, lm_config_to_hf, lm_key_map, load_hf_lm
from vlmkit.convert.hf.processor import (image_processor_from_hf, load_hf_image_transform, load_hf_processor,
                                         load_hf_tokenizer, read_chat_template, read_image_processor)
from vlmkit.convert.hf.vision import load_hf_vision, vision_config_from_hf, vision_key_map

__all__ = [
    "HF_FAMILIES", "HFFamily", "convert_from_hf", "convert_to_hf", "family_by_name", "is_hf_folder", "load_hf", "load_hf_processor",
    "read_chat_template", "register_family",
    "export_hf_lm", "export_llava", "lm_config_to_hf",
    "HFCheckpoint", "image_processor_from_hf", "llava_config_from_hf", "lm_config_from_hf", "lm_key_map",
    "load_hf_image_transform", "load_hf_llava", "load_hf_lm", "load_hf_tokenizer", "load_hf_vision",
    "load_state", "read_checkpoint", "read_config", "read_image_processor", "read_weights",
    "vision_config_from_hf", "vision_key_map",
]
