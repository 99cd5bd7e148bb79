"""Mistral 3 / Pixtral (Mistral AI 2024-2025: Pixtral-12B's tower in Mistral Small 3.1 / 3.2): the Pixtral ViT (2D
RoPE, SwiGLU, RMSNorm, variable resolution, one attention block per image) and Mistral 3's projector with its 2x2
patch merger (encoders/pixtral.py), spliced into a Mistral LM (models/mistral3.py); each image at its own aspect
ratio, laid out in the text as rows of ``[IMG]`` closed by ``[IMG_BREAK]`` and the last by ``[IMG_END]``
(processing/mistral3.py), as PixtralProcessor does.

Pixtral-12B's Hub folders (``LlavaForConditionalGeneration`` with a Pixtral tower, LLaVA's projector and no merger)
are this family too, with ``connector.kind: mlp``: the LLaVA family's loader hands them over
(convert/hf/mistral3.py), and they export back as LlavaForConditionalGeneration.

The family decides: plain causal positions (``shared_prefix``: questions about one image can share a prefix); no
``tower_cache`` (images do not share one size, so a tower output per image is not a fixed tensor the frozen-tower
cache keeps); objective ``lm``.
"""

from __future__ import annotations

from vlmkit.convert.hf.mistral3 import export_mistral3, load_mistral3_folder
from vlmkit.family import Capabilities, HFMapping, VLMFamily, register
from vlmkit.models.mistral3 import build_mistral3
from vlmkit.processing.mistral3 import Mistral3ProcessorConfig, PixtralImageProcessor


@register
class Mistral3(VLMFamily):
    """Pixtral ViT (2D RoPE, variable resolution) + patch merger + Mistral LM (Mistral Small 3.1)"""

    name = "mistral3"
    ProcessorConfig = Mistral3ProcessorConfig
    objectives = ("lm",)
    capabilities = Capabilities(shared_prefix=True)
    hf = HFMapping(("mistral3",), load_mistral3_folder, export_mistral3, "Mistral3ForConditionalGeneration")

    def image_tokens(self, model) -> str:
        return "by size"

    def build(self, cfg, image_token_id, init=True):
        return build_mistral3(cfg, image_token_id, init)

    def image_processor(self, pcfg):
        return PixtralImageProcessor(pcfg)

    def export_class(self, cfg) -> str:
        """Pixtral-12B (LLaVA's projector, ``connector.kind: mlp``) exports as LlavaForConditionalGeneration."""
        return "LlavaForConditionalGeneration" if cfg.connector.kind == "mlp" else super().export_class(cfg)
