"""Contrastive dual encoders, CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023): an image tower and a text
tower meeting in a joint space (models/dual_encoder.py), trained with the ``contrastive`` objective; they embed
images and texts, they do not generate."""

from __future__ import annotations

from tokenizers import processors

from vlmkit.config import apply_overrides
from vlmkit.convert.hf.dual_encoder import export_dual_encoder, load_dual_encoder_folder
from vlmkit.family import Capabilities, Family, HFMapping, register
from vlmkit.models.dual_encoder import DualEncoderConfig, build_dual_encoder
from vlmkit.processing.image import ImageProcessor
from vlmkit.processing.processor import Processor
from vlmkit.processing.text import TextLayout, TextProcessorConfig
from vlmkit.processing.tokenizer import TextTokenizer, train_bpe

# A caption tokenizer's special tokens. End-of-text is not id 2: transformers reads a CLIP text config whose
# eos_token_id is 2 as a legacy one and pools the highest id instead, so an export would pool the wrong token.
CAPTION_SPECIAL_TOKENS = ["<pad>", "</s>", "<s>"]


def train_caption_tokenizer(captions: list[str], vocab_size: int) -> TextTokenizer:
    """A byte-level BPE on the captions that brackets every text with ``<s>`` ... ``</s>`` (as CLIP's tokenizer
    does with its start- and end-of-text tokens), padding with ``<pad>``."""
    tok = train_bpe(captions, vocab_size, special_tokens=CAPTION_SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    return TextTokenizer(tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


@register
class Clip(Family):
    """contrastive dual encoder: image tower + causal text transformer, softmax (InfoNCE) loss (CLIP)"""

    name = "clip"
    Config = DualEncoderConfig
    ProcessorConfig = TextProcessorConfig
    capabilities = Capabilities(generate=False, embed=True, shared_prefix=False)
    objectives = ("contrastive", "cell_labels")
    hf = HFMapping(("clip",), load_dual_encoder_folder, export_dual_encoder, "CLIPModel")

    def build(self, cfg, image_token_id=None, init=True):
        return build_dual_encoder(cfg, None, init)

    def export_class(self, cfg) -> str:
        """vlmkit's CNN tower has no transformers counterpart: such models do not export."""
        return "" if cfg.vision.arch == "cnn" else super().export_class(cfg)

    def image_processor(self, pcfg):
        return ImageProcessor(pcfg)

    def layout(self, pcfg, tokenizer, files):
        return TextLayout(pcfg, tokenizer)

    def new_tokenizer(self, texts, vocab_size):
        return train_caption_tokenizer(texts, vocab_size)

    def configure(self, cfg, pcfg, tokenizer):
        """The text tower sized to the tokenizer and pooling its end-of-text token; the processor's context and image
        size the towers'."""
        cfg = apply_overrides(cfg, {"text.vocab_size": tokenizer.vocab_size, "text.eos_token_id": tokenizer.eos_id})
        pcfg = apply_overrides(pcfg, {"family": cfg.family, "image_size": list(cfg.vision.image_size),
                                      "max_length": cfg.text.context_length, "pad_token": tokenizer.pad_token,
                                      "eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token or ""})
        return cfg, pcfg

    def new_processor(self, model, pcfg, tokenizer):
        return Processor(pcfg, tokenizer)


@register
class Siglip(Clip):
    """contrastive dual encoder: image tower with attention pooling + bidirectional text transformer, sigmoid loss
    (SigLIP)"""

    name = "siglip"
    hf = HFMapping(("siglip",), load_dual_encoder_folder, export_dual_encoder, "SiglipModel")
