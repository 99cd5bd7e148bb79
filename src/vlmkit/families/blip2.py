"""BLIP-2 and InstructBLIP (Li et al. 2023; Dai et al. 2023): an image tower -> a Q-Former whose learned queries
read the image -> the queries projected into a decoder LM (models/blip2.py). InstructBLIP's Q-Former also reads the
instruction, through its own tokenizer (processing/blip2.py: ``InstructionLayout``). BLIP-2's stage 1 (ITC, ITM,
ITG on the Q-Former) is the ``qformer`` objective."""

from __future__ import annotations

from vlmkit.config import apply_overrides
from vlmkit.convert.hf.blip2 import export_blip2, load_blip2_folder
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.family import Capabilities, HFMapping, VLMFamily, register
from vlmkit.models.blip2 import build_blip2, build_instructblip
from vlmkit.processing.blip2 import (QFORMER_TOKENIZER, ImagesFirstLayout, InstructBlipProcessorConfig,
                                     InstructionLayout)
from vlmkit.processing.layouts import SegmentLayout
from vlmkit.processing.processor import Processor


@register
class Blip2(VLMFamily):
    """image tower -> Q-Former (learned queries) -> LM, the queries spliced at the image tokens (BLIP-2)"""

    name = "blip2"
    capabilities = Capabilities(tower_cache=True)
    hf = HFMapping(("blip-2",), load_blip2_folder, export_blip2, "Blip2ForConditionalGeneration")

    def build(self, cfg, image_token_id, init=True):
        return build_blip2(cfg, image_token_id, init)

    def layout(self, pcfg, tokenizer, files):
        return (SegmentLayout if pcfg.text_mode == "segments" else ImagesFirstLayout)(pcfg, tokenizer)


@register
class InstructBlip(Blip2):
    """BLIP-2 whose Q-Former also reads the instruction (InstructBLIP)"""

    name = "instructblip"
    ProcessorConfig = InstructBlipProcessorConfig
    # an image's features depend on the question read with it: none is computed ahead, none shared by questions
    capabilities = Capabilities(tower_cache=False, shared_prefix=False)
    hf = HFMapping(("instructblip",), load_blip2_folder, export_blip2, "InstructBlipForConditionalGeneration")
    processor_files = (QFORMER_TOKENIZER,)

    def build(self, cfg, image_token_id, init=True):
        return build_instructblip(cfg, image_token_id, init)

    def layout(self, pcfg, tokenizer, files):
        if pcfg.qformer_max_length < 1:
            raise ConfigError(f"processor qformer_max_length {pcfg.qformer_max_length}: InstructBLIP's Q-Former reads "
                              f"the instruction, padded to this many tokens (> 0)")
        qformer = files.get(QFORMER_TOKENIZER, tokenizer.tok)  # without its own, the LM's tokenizer
        pad = pcfg.qformer_pad_token or tokenizer.pad_token
        pad_id = qformer.token_to_id(pad)
        if pad_id is None:
            # without its file the Q-Former reads the LM's tokenizer; a pad token of its own (an imported BERT's
            # [PAD]) says the file is missing, not that its tokenizer lacks the token: the message says which
            missing = "" if QFORMER_TOKENIZER in files else f" (the LM's: {QFORMER_TOKENIZER} is missing)"
            raise CheckpointError(f"processor qformer_pad_token {pad!r} is not in the Q-Former tokenizer's "
                                  f"vocabulary{missing}")
        return InstructionLayout(super().layout(pcfg, tokenizer, files), qformer, pad_id, pcfg.qformer_max_length)

    def new_processor(self, model, pcfg, tokenizer):
        """The instruction is padded to the Q-Former's text positions; a Q-Former started from a BERT reads the
        BERT's tokenizer (its [PAD] pads)."""
        from tokenizers import Tokenizer

        from vlmkit.connectors.qformer import resolve_bert_folder

        q = model.connector.cfg
        pcfg = apply_overrides(pcfg, {"image_seq_len": model.image_seq_len,
                                      "qformer_max_length": pcfg.qformer_max_length or q.max_position_embeddings})
        files = {}
        if q.init_from:
            files[QFORMER_TOKENIZER] = Tokenizer.from_file(str(resolve_bert_folder(q.init_from) / "tokenizer.json"))
            pcfg = apply_overrides(pcfg, {"qformer_pad_token": pcfg.qformer_pad_token or "[PAD]"})
        return Processor(pcfg, tokenizer, files)
