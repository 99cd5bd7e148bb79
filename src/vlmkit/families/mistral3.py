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

from vlmkit.config import apply_overrides
from vlmkit.convert.hf.mistral3 import export_mistral3, load_mistral3_folder
from vlmkit.family import Capabilities, HFMapping, VLMFamily, register
from vlmkit.models.mistral3 import build_mistral3
from vlmkit.processing.mistral3 import Mistral3ProcessorConfig, PixtralImageProcessor, max_image_tokens
from vlmkit.processing.processor import Processor
from vlmkit.processing.tokenizer import SPECIAL_TOKENS

# a from-scratch model's tokens: vlmkit's (its <image> is the image token, as the data writes it) and
# PixtralProcessor's row break and image end
MISTRAL3_SPECIAL_TOKENS = [*SPECIAL_TOKENS, "[IMG_BREAK]", "[IMG_END]"]


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

    def configure(self, cfg, pcfg, tokenizer):
        """The LM's vocabulary is the tokenizer's; the processor fits images into the tower's longest edge in its
        patch and merge units and writes its image token."""
        cfg = apply_overrides(cfg, {"lm.vocab_size": tokenizer.vocab_size})
        v = cfg.vision
        return cfg, apply_overrides(pcfg, {"longest_edge": max(v.image_size), "patch_size": v.patch_size,
                                           "merge_size": v.merge_size, "image_size": list(v.image_size),
                                           "image_token": cfg.image_token, "family": cfg.family})

    def new_processor(self, model, pcfg, tokenizer):
        """``image_seq_len``: the image tokens of a square image of the longest edge (smaller ones take fewer)."""
        return Processor(apply_overrides(pcfg, {"image_seq_len": max_image_tokens(pcfg)}), tokenizer)

    def new_tokenizer(self, texts, vocab_size):
        from vlmkit.processing.tokenizer import TextTokenizer, train_bpe

        return TextTokenizer(train_bpe(texts, vocab_size, MISTRAL3_SPECIAL_TOKENS))

    def export_class(self, cfg) -> str:
        """Pixtral-12B (LLaVA's projector, ``connector.kind: mlp``) exports as LlavaForConditionalGeneration."""
        return "LlavaForConditionalGeneration" if cfg.connector.kind == "mlp" else super().export_class(cfg)
