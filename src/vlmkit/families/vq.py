"""VQ image tokenizers (VQ-VAE / VQGAN, models/vq.py): images -> a grid of discrete codes -> images. The codes are
the image tokens that early-fusion families (Chameleon, Emu3, Janus) read and generate.

Decisions such a model forces, in the family interface's terms:

- capabilities: it neither generates text nor embeds (``generate=False``, ``embed=False``); it has a codebook
  (``image_codes=True``), so ``Pipeline.encode_codes`` / ``decode_codes`` call the model's ``encode_codes`` /
  ``decode_codes``;
- objectives: ``vq`` alone (reconstruction + commitment, objectives/vq.py);
- text: none. The checkpoint format and the Processor keep a tokenizer, so ``new_tokenizer`` gives the smallest one
  (the pad and end tokens: processing/vq.py ``empty_tokenizer``), trained on nothing, and the layout refuses every
  prompt by name;
- images: the base ``ImageProcessor`` (resize to the model's size, normalise to [-1, 1]).
"""

from __future__ import annotations

from vlmkit.config import apply_overrides
from vlmkit.family import Capabilities, Family, register
from vlmkit.models.vq import VQConfig, build_vq
from vlmkit.processing.image import ImageProcessor
from vlmkit.processing.vq import ImageOnlyLayout, VQProcessorConfig, empty_tokenizer


@register
class VQ(Family):
    """VQ image tokenizer: conv encoder, vector quantiser (EMA or straight-through), conv decoder (VQ-VAE / VQGAN)"""

    name = "vq"
    Config = VQConfig
    ProcessorConfig = VQProcessorConfig
    capabilities = Capabilities(generate=False, embed=False, shared_prefix=False, image_codes=True)
    objectives = ("vq",)
    image_groups = ("encoder",)

    def build(self, cfg, image_token_id=None, init=True):
        return build_vq(cfg, init)

    def image_processor(self, pcfg):
        return ImageProcessor(pcfg)

    def layout(self, pcfg, tokenizer, files):
        return ImageOnlyLayout(pcfg, tokenizer)

    def new_tokenizer(self, texts, vocab_size):
        """No text: the two special tokens a checkpoint's tokenizer.json needs (``texts`` is empty)."""
        return empty_tokenizer()

    def configure(self, cfg, pcfg, tokenizer):
        """The processor's images are the model's size; its special tokens the tokenizer's."""
        return cfg, apply_overrides(pcfg, {"family": cfg.family, "image_size": list(cfg.image_size),
                                           "pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token})

    def image_tokens(self, model) -> str:
        h, w = model.grid
        return f"{h * w} ({h}x{w} codes)"
