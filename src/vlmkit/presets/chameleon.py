"""Presets of the Chameleon family: Meta's chameleon-7b shape."""

from __future__ import annotations

from vlmkit.models.chameleon import ChameleonConfig, chameleon_lm, chameleon_vq
from vlmkit.presets import PRESETS, Preset, whole
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
