"""Presets of the Show-o family (models/showo.py): vlmkit's from-scratch tiny-showo for ShapesWorld."""

from __future__ import annotations

from vlmkit.models.showo import ShowoConfig, ShowoGenConfig
from vlmkit.presets import PRESETS, Preset
from vlmkit.presets.splice import tiny_llava
from vlmkit.presets.vq import tiny_vq
from vlmkit.processing.showo import ShowoProcessorConfig


@PRESETS.register("tiny-showo", "from-scratch Show-o for ShapesWorld: tiny-vq's 16x16 codes (of 512) and a [MASK] id "
                                "in the vocabulary of tiny-llava's 3-layer LM with omni-attention; reads images as "
                                "codes, draws them by mask-predict in 12 steps")
def tiny_showo() -> Preset:
    # tiny-llava's LM (as tiny-janus' and tiny-chameleon's), so the three early-fusion families compare at one LM
    # size; the VQ is tiny-vq's (a recipe points model.gen.vq_from at a trained one). The vocabulary is filled in
    # from the recipe's tokenizer (families/showo.py configure): this one is a placeholder of the right shape
    # (1024 text ids, 512 codes, [MASK])
    vq = tiny_vq()
    k = vq.model.codebook_size
    lm = tiny_llava().model.lm
    lm.vocab_size = 1024 + k + 1
    model = ShowoConfig(lm=lm, gen=ShowoGenConfig(vq=vq.model, steps=12), text_vocab=1024)
    h, w = vq.model.grid
    proc = ShowoProcessorConfig(family="showo", image_size=tuple(vq.model.image_size), mean=vq.processor.mean,
                                std=vq.processor.std, resample="bicubic", image_seq_len=h * w)
    return Preset(model, proc, source="Xie et al. 2024, Show-o (architecture only: one transformer, omni-attention, "
                                      "mask-predict over VQ codes); tiny-llava's LM scale, tiny-vq's codes")
