"""Presets of the Chameleon family: Meta's chameleon-7b shape, and vlmkit's from-scratch tiny-chameleon."""

from __future__ import annotations

from vlmkit.models.chameleon import ChameleonConfig, chameleon_lm, chameleon_vq
from vlmkit.presets import PRESETS, Preset, whole
from vlmkit.presets.vq import tiny_vq
from vlmkit.processing.chameleon import ChameleonProcessorConfig

# chameleon-7b's vocabulary: its 8192 code tokens (IMGIMG...) are ids 4..8195 in code order; a loaded folder reads the
# map from its config.json's vocabulary_map, this shape only needs one of the right size
CODE_TOKENS_7B = tuple(range(4, 4 + 8192))


@PRESETS.register("chameleon-7b", "Chameleon-7B shapes: a VQ-GAN encoder (512 px -> 32x32 codes of 8192) whose codes "
                                  "are tokens of a Llama-7B-size LM with per-head QK-norm")
def chameleon_7b() -> Preset:
    lm = chameleon_lm(vocab_size=65536, width=4096, depth=32, heads=32, kv_heads=32, mlp_dim=11008, norm_eps=1e-5,
                      rope_theta=10000.0, max_seq_len=4096)
    model = ChameleonConfig(lm=lm, vq=chameleon_vq(), code_token_ids=CODE_TOKENS_7B)
    proc = whole(ChameleonProcessorConfig, image_size=(512, 512), shortest_edge=512, image_seq_len=1024,
                 max_length=4096, eos_token="</s>", bos_token="<s>", pad_token="<pad>")
    return Preset(model, proc, source="facebook/chameleon-7b",
                  notes=["code token ids 4..8195 assumed for the shape; imports read the folder's vocabulary_map"])


@PRESETS.register("tiny-chameleon", "from-scratch Chameleon for ShapesWorld: tiny-vq's codes (16x16 of 512) as "
                                    "vocabulary tokens of tiny-llava's 3-layer LM with per-head QK LayerNorm; reads "
                                    "and draws 64x64 images")
def tiny_chameleon() -> Preset:
    # tiny-llava's LM shape (untied head initialised large) with Chameleon's per-head QK LayerNorm; the VQ is
    # tiny-vq's (decoder kept: the model draws); a recipe points model.vq_from at a trained one. The vocabulary and
    # the code token ids come from the recipe's tokenizer (families/chameleon.py configure): these are placeholders
    # of the right size (1024 text tokens, then 512 code tokens)
    vq = tiny_vq()
    lm = chameleon_lm(vocab_size=1024 + vq.model.codebook_size, width=128, depth=3, heads=4, kv_heads=2,
                      mlp_dim=384, max_seq_len=512, tie_embeddings=False, head_init_std=0.25, rope_theta=10000.0)
    model = ChameleonConfig(lm=lm, vq=vq.model, code_token_ids=tuple(range(1024, 1024 + vq.model.codebook_size)))
    # tiny-vq's processor: 64 px, [-1, 1] (rescale 1/255 as vlmkit's ImageTransform: the same floats)
    proc = ChameleonProcessorConfig(family="chameleon", image_size=(64, 64), shortest_edge=0, resample="bicubic",
                                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), rescale_factor=1 / 255,
                                    text_mode="segments", image_seq_len=vq.model.grid[0] * vq.model.grid[1])
    return Preset(model, proc, source="Chameleon Team 2024 (architecture only: early fusion, QK-norm); tiny-llava's "
                                      "LM scale, tiny-vq's codes")
