"""Hugging Face checkpoint folders <-> vlmkit: per-family explicit key tables, import and export.

Safetensors only; every imported family is checked against transformers' own implementation in tests. Which
family reads a folder is its ``Family.hf`` mapping (vlmkit/family.py); each family's converter is its own module
here (``convert/hf/<family>.py``), built on the shared parts re-exported below: the folder entry points, the
language model and vision tower tables, the tokenizer and image-processor readers.
"""

from vlmkit.convert.hf.families import convert_from_hf, convert_to_hf, is_hf_folder, load_hf
from vlmkit.convert.hf.io import HFCheckpoint, load_state, read_checkpoint, read_config, read_weights
from vlmkit.convert.hf.lm import export_hf_lm, lm_config_from_hf, lm_config_to_hf, lm_key_map, load_hf_lm
from vlmkit.convert.hf.processor import (image_processor_from_hf, load_hf_image_transform, load_hf_processor,
                                         load_hf_text_tokenizer, load_hf_tokenizer, read_chat_template,
                                         read_image_processor, siglip_tokenizer_from_sentencepiece)
from vlmkit.convert.hf.vision import load_hf_vision, vision_config_from_hf, vision_key_map

__all__ = [
    "HFCheckpoint", "convert_from_hf", "convert_to_hf", "export_hf_lm", "image_processor_from_hf", "is_hf_folder",
    "lm_config_from_hf", "lm_config_to_hf", "lm_key_map", "load_hf", "load_hf_image_transform", "load_hf_lm",
    "load_hf_processor", "load_hf_text_tokenizer", "load_hf_tokenizer", "load_hf_vision", "load_state",
    "read_chat_template", "read_checkpoint", "read_config", "read_image_processor", "read_weights",
    "siglip_tokenizer_from_sentencepiece", "vision_config_from_hf", "vision_key_map",
]
