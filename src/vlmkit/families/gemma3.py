"""Gemma 3 (Gemma Team 2025): SigLIP tower -> average pooling, RMSNorm and a projection -> Gemma 3 LM (sliding-window
layers, QK-norm), each image's tokens attending to each other both ways (models/gemma3.py), and Gemma3Processor's
layout (processing/gemma3.py)."""

from __future__ import annotations

from vlmkit.convert.hf.gemma3 import export_gemma3, load_gemma3_folder
from vlmkit.family import Capabilities, HFMapping, VLMFamily, register
from vlmkit.models.gemma3 import Gemma3Config, build_gemma3
from vlmkit.processing.gemma3 import Gemma3ImageProcessor, Gemma3Layout, Gemma3ProcessorConfig

BOI, EOI = Gemma3ProcessorConfig.boi_token, Gemma3ProcessorConfig.eoi_token
from vlmkit.processing.layouts import SegmentLayout


@register
class Gemma3(VLMFamily):
    """SigLIP ViT -> pooled, normed projection -> Gemma 3 LM, bidirectional attention within each image"""

    name = "gemma3"
    Config = Gemma3Config
    ProcessorConfig = Gemma3ProcessorConfig
    # questions grouped after a shared prefix keep its positions: the sliding window counts in positions
    capabilities = Capabilities(tower_cache=True, shared_prefix=True)
    objectives = ("lm", "cell_labels")
    hf = HFMapping(("gemma3",), load_gemma3_folder, export_gemma3, "Gemma3ForConditionalGeneration")

    def build(self, cfg, image_token_id, init=True):
        return build_gemma3(cfg, image_token_id, init)

    def image_processor(self, pcfg):
        return Gemma3ImageProcessor(pcfg)

    def layout(self, pcfg, tokenizer, files):
        return (SegmentLayout if pcfg.text_mode == "segments" else Gemma3Layout)(pcfg, tokenizer)

    def new_tokenizer(self, texts, vocab_size):
        """vlmkit's special tokens and the two that open and close an image."""
        from vlmkit.processing.tokenizer import SPECIAL_TOKENS, TextTokenizer, train_bpe

        return TextTokenizer(train_bpe(texts, vocab_size, [*SPECIAL_TOKENS, BOI, EOI]))
