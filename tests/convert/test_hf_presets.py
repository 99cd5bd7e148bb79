"""The presets of the imported families are the released checkpoints' shapes, and vlmkit builds the same
architecture as transformers from them: written as the family's transformers config (the exporter's), the
model transformers builds has vlmkit's parameter count (both on the meta device, no memory used), and the
totals equal the published sizes where those are known."""

from __future__ import annotations

import pytest
import torch

from vlmkit.convert.hf.blip2 import blip2_config_to_hf
from vlmkit.convert.hf.chameleon import chameleon_config_to_hf, image_vocabulary
from vlmkit.convert.hf.dual_encoder import dual_encoder_config_to_hf
from vlmkit.convert.hf.emu3 import emu3_config_to_hf, emu3_vocabulary_map
from vlmkit.convert.hf.fuyu import fuyu_config_to_hf
from vlmkit.convert.hf.gemma3 import gemma3_config_to_hf
from vlmkit.convert.hf.idefics import idefics_config_to_hf
from vlmkit.convert.hf.idefics2 import idefics2_config_to_hf
from vlmkit.convert.hf.idefics3 import idefics3_config_to_hf
from vlmkit.convert.hf.internvl import internvl_config_to_hf
from vlmkit.convert.hf.janus import janus_config_to_hf
from vlmkit.convert.hf.llava import llava_config_to_hf
from vlmkit.convert.hf.llava_next import llava_next_config_to_hf
from vlmkit.convert.hf.mistral3 import mistral3_config_to_hf
from vlmkit.convert.hf.mllama import mllama_config_to_hf
from vlmkit.convert.hf.paligemma import paligemma_config_to_hf
from vlmkit.convert.hf.qwen2_5_vl import qwen2_5_vl_config_to_hf
from vlmkit.convert.hf.qwen2_vl import qwen2_vl_config_to_hf
from vlmkit.convert.hf.text import text_config_to_hf
from vlmkit.family import FAMILIES, family_of
from vlmkit.models import build_model, count_parameters
from vlmkit.presets import get_preset

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

QWEN_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653}


def hf_config(preset) -> dict:
    cfg = preset.model
    if cfg.family == "llava":
        return llava_config_to_hf(cfg, 32000, 576)
    if cfg.family in ("llava_next", "llava_onevision"):
        return llava_next_config_to_hf(cfg, 32000, 576)
    if cfg.family == "paligemma":
        return paligemma_config_to_hf(cfg, 257152, 256)
    if cfg.family == "qwen2_vl":
        return qwen2_vl_config_to_hf(cfg, QWEN_IDS)
    if cfg.family == "idefics3":
        return idefics3_config_to_hf(cfg, 128257)
    if cfg.family == "flamingo":
        return idefics_config_to_hf(cfg, cfg.xattn.reset_token_id)
    if cfg.family == "mllama":
        return mllama_config_to_hf(cfg, 128256)
    if cfg.family in ("blip2", "instructblip"):
        return blip2_config_to_hf(cfg, cfg.lm.vocab_size - 1)
    if cfg.family in ("clip", "siglip"):
        return dual_encoder_config_to_hf(cfg)
    if cfg.family == "fuyu":
        return fuyu_config_to_hf(cfg, 71011)
    if cfg.family == "qwen2_5_vl":
        return qwen2_5_vl_config_to_hf(cfg, QWEN_IDS)
    if cfg.family == "idefics2":
        return idefics2_config_to_hf(cfg, 32001)
    if cfg.family == "internvl":
        return internvl_config_to_hf(cfg, 151667, 256)
    if cfg.family == "mistral3":
        return mistral3_config_to_hf(cfg, 10)
    if cfg.family == "text":
        return text_config_to_hf(cfg)
    if cfg.family == "gemma3":
        return gemma3_config_to_hf(cfg, 262144, 255999, 256000)
    if cfg.family == "chameleon":
        return chameleon_config_to_hf(cfg, image_vocabulary(cfg.code_token_ids, 8711), {})
    if cfg.family == "emu3":
        return emu3_config_to_hf(cfg, emu3_vocabulary_map(cfg, 151646), {"bos_token_id": 151849, "pad_token_id": 151643})
    if cfg.family == "janus":
        return janus_config_to_hf(cfg, 100581)
    raise AssertionError(cfg.family)


def transformers_count(preset) -> int:
    """The parameters of the model transformers builds from the preset's exported config, in the class the
    preset's family exports to (and whose model_type the family reads back)."""
    family = family_of(preset.model)
    config = hf_config(preset)
    assert config["model_type"] in family.hf.model_types, (config["model_type"], family.name)
    transformers_class = family.export_class(preset.model)
    assert transformers_class, f"{family.name}: {preset.model} does not export"
    config_class = transformers.AutoConfig.for_model(config.pop("model_type")).__class__
    with torch.device("meta"):
        model = getattr(transformers, transformers_class)(config_class(**config))
    return sum(p.numel() for p in model.parameters())


def vlmkit_count(preset) -> int:
    with torch.device("meta"):
        return count_parameters(build_model(preset.model, image_token_id=0))


# (preset, published parameter count of the released checkpoint or None, parameters vlmkit does not build:
#  LLaVA's tower layer after the feature layer and the final norm it never reads)
CLIP_L_LAYER, CLIP_L_NORM = 12_596_224, 2 * 1024
PRESETS = [
    ("llava-1.5-7b", 7_063_427_072, CLIP_L_LAYER + CLIP_L_NORM),
    ("llava-next-mistral-7b", 7_566_747_648, CLIP_L_LAYER + CLIP_L_NORM),
    ("llava-onevision-0.5b", None, 0),
    ("paligemma-3b-224", 2_923_466_480, 0),
    ("paligemma2-3b-224", None, 0),
    ("qwen2-vl-2b", 2_208_985_600, 0),
    ("idefics3-8b", None, 0),
    ("smolvlm-256m", None, 0),
    ("idefics-9b", None, 0),
    ("llama-3.2-11b-vision", 10_670_220_835, 0),  # the Hub's 10.67B (safetensors total)
    ("blip2-opt-2.7b", None, 0),
    ("instructblip-vicuna-7b", None, 0),
    ("tiny-llava-vit", None, 0),
    ("clip-vit-b-16", 149_620_737, 0),
    ("siglip-b-16", None, 0),
    ("fuyu-8b", None, 0),
    ("qwen2.5-vl-3b", 3_754_622_976, 0),  # the Hub's safetensors total (3.75B)
    ("idefics2-8b", None, 0),
    ("internvl3-1b", None, 0),
    ("mistral-small-3.1-24b", None, 0),
    ("qwen2.5-0.5b", 494_032_768, 0),
    ("llama-3.2-1b", 1_235_814_400, 0),
    ("phi-2", 2_779_683_840, 0),
    ("phi-3-mini-4k", 3_821_079_552, 0),
    ("gemma-3-4b-it", 4_300_079_472, 0),
    ("chameleon-7b", None, 0),
    ("emu3-8b", None, 0),
    ("janus-pro-1b", None, 0),
]


@pytest.mark.parametrize("name, published, unbuilt", PRESETS)
def test_preset_has_transformers_parameter_count(name, published, unbuilt):
    preset = get_preset(name)
    family = family_of(preset.model)  # the preset is read through its family's own config types
    assert isinstance(preset.model, family.Config) and isinstance(preset.processor, family.ProcessorConfig)
    ours = vlmkit_count(preset)
    # an exported LLaVA-family or IDEFICS tower carries an identity final norm (transformers' tower always has one)
    identity_norm = 2 * preset.model.vision.width if preset.model.family.startswith(("llava", "flamingo")) else 0
    assert transformers_count(preset) == ours + identity_norm
    if published is not None:
        assert ours + unbuilt == published


def test_every_imported_family_has_a_preset():
    families = {f.name for f in FAMILIES.all() if f.hf is not None}
    presets = {get_preset(name).model.family for name, _, _ in PRESETS}
    assert families <= presets, families - presets


def test_every_full_size_preset_is_counted():
    """A full-size preset added later is counted against transformers here too (the tiny ones train from scratch;
    tiny-llava-vit is counted as the one whose tower has transformers' layout)."""
    from vlmkit.presets import PRESETS as REGISTRY

    full_size = {name for name in REGISTRY.names() if not name.startswith("tiny-")}
    counted = {name for name, _, _ in PRESETS}
    assert full_size <= counted, full_size - counted
