"""Emu3 (BAAI, Wang et al. 2024): one Llama-like LM over text and the codes of a frozen VQ-VAE (models/emu3.py,
models/emu3_vq.py); images at about their own size (processing/emu3.py).

Decisions, in the family interface's terms:

- capabilities: it chats about images (``generate``) and writes them (``generate_images``: the layout's
  ``image_prompt``, the model's ``image_plan`` / ``code_ids`` / ``forward(head="image")``), and its VQ-VAE turns
  images into codes and back (``image_codes``); ``tower_cache`` is off (the VQ-VAE is cheap next to the LM and its
  output is tokens, not features to cache) and ``shared_prefix`` is on (plain causal positions);
- objectives: ``lm`` only; the VQ-VAE is frozen (no gradient reaches it) and there is no tower for a cell-label
  stage;
- imported only: vlmkit reads and writes Emu3ForConditionalGeneration folders; there is no from-scratch preset.
"""

from __future__ import annotations

from vlmkit.convert.hf.emu3 import export_emu3, load_emu3_folder
from vlmkit.family import Capabilities, Family, HFMapping, register
from vlmkit.models.emu3 import Emu3Config, build_emu3
from vlmkit.processing.emu3 import Emu3ImageProcessor, Emu3Layout, Emu3ProcessorConfig


@register
class Emu3(Family):
    """VQ-VAE codes as tokens of one Llama LM: image understanding and generation (Emu3)"""

    name = "emu3"
    Config = Emu3Config
    ProcessorConfig = Emu3ProcessorConfig
    capabilities = Capabilities(generate=True, generate_images=True, image_codes=True, tower_cache=False,
                                shared_prefix=True)
    objectives = ("lm",)
    image_groups = ()
    hf = HFMapping(("emu3",), load_emu3_folder, export_emu3, "Emu3ForConditionalGeneration")

    def build(self, cfg, image_token_id, init=True):
        return build_emu3(cfg, image_token_id, init)

    def image_processor(self, pcfg):
        return Emu3ImageProcessor(pcfg)

    def layout(self, pcfg, tokenizer, files):
        return Emu3Layout(pcfg, tokenizer)

    def image_tokens(self, model) -> str:
        return "by size"
