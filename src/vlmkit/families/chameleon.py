"""Chameleon (Chameleon Team 2024; Meta's chameleon-7b / -30b): early fusion. A VQ-GAN encoder turns each image into
a grid of codes, each code a token of the LM's one vocabulary (models/chameleon.py); images prepared and prompts
laid out as ChameleonImageProcessor and ChameleonProcessor do (processing/chameleon.py).

What the family decides:

- capabilities: text generation and scoring (image-code tokens suppressed in the text head, as transformers);
  ``generate_images`` and ``image_codes``: the model writes an image's codes after ``<racm3:break>``
  (``image_plan``, ``code_ids``, ``forward(head="image")``) and encodes images to codes. Decoding codes to pixels
  needs a VQ decoder, which the released checkpoints lack: ``decode_codes`` refuses it by name;
  no ``tower_cache`` (the codes are the features; they are cheap and exact), ``shared_prefix`` (plain causal
  attention at plain positions);
- objectives: ``lm`` and ``unified`` (text-to-image pairs: the caption's image prompt, then the image's code tokens
  and ``<eoss>``); the codes are discrete: no gradient reaches the VQ encoder;
- models come from transformers' folders (``ChameleonForConditionalGeneration``); there is no from-scratch preset.
"""

from __future__ import annotations

from vlmkit.convert.hf.chameleon import export_chameleon, load_chameleon_folder
from vlmkit.family import Capabilities, Family, HFMapping, register
from vlmkit.models.chameleon import ChameleonConfig, build_chameleon
from vlmkit.processing.chameleon import ChameleonImageProcessor, ChameleonLayout, ChameleonProcessorConfig


@register
class Chameleon(Family):
    """VQ-GAN image codes as vocabulary tokens of a Llama-style LM with per-head QK-norm (Chameleon-7B / 30B)"""

    name = "chameleon"
    Config = ChameleonConfig
    ProcessorConfig = ChameleonProcessorConfig
    capabilities = Capabilities(generate=True, generate_images=True, image_codes=True, tower_cache=False,
                                shared_prefix=True)
    objectives = ("lm", "unified")
    image_groups = ("vision",)
    hf = HFMapping(("chameleon",), load_chameleon_folder, export_chameleon, "ChameleonForConditionalGeneration")

    def build(self, cfg, image_token_id, init=True):
        return build_chameleon(cfg, image_token_id, init)

    def image_processor(self, pcfg):
        return ChameleonImageProcessor(pcfg)

    def layout(self, pcfg, tokenizer, files):
        return ChameleonLayout(pcfg, tokenizer)

    def image_tokens(self, model) -> str:
        h, w = model.image_grid
        return f"{h * w} ({h}x{w} codes) + 2"
