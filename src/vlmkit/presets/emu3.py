"""Presets of the Emu3 family: BAAI's Emu3-Chat / Emu3-Gen shape (one 8B Llama-like LM over a 184,622-token
vocabulary whose last 32,768 tokens are the VQ-VAE's codes). Emu3 is imported, not trained in vlmkit: no tiny
preset (a from-scratch model would need its VQ-VAE trained first)."""

from __future__ import annotations

from vlmkit.config import LanguageConfig
from vlmkit.models.emu3 import Emu3Config
from vlmkit.models.emu3_vq import Emu3VQConfig
from vlmkit.presets import PRESETS, Preset, whole
from vlmkit.processing.emu3 import Emu3ProcessorConfig

# the released vocabulary: Qwen's 151,643 tokens, <|endoftext|>, <|im_start|>, <|im_end|>, <|extra_0|> ...
# <|extra_204|> (151646-151850), <|image start|>, <|image end|>, <|image token|>, then the visual tokens
QWEN_EXTRA0, VISUAL0 = 151646, 151854


@PRESETS.register("emu3-8b", "Emu3 shapes (Emu3-Chat / Emu3-Gen): MoVQ VQ-VAE (32768 codes, factor 8) + an 8B "
                             "Llama-like LM over text and visual tokens")
def emu3_8b() -> Preset:
    lm = LanguageConfig(vocab_size=184622, width=4096, depth=32, heads=32, kv_heads=8, mlp_dim=14336, act="silu",
                        norm_eps=1e-5, rope_theta=1000000.0, max_seq_len=9216, tie_embeddings=False)
    model = Emu3Config(lm=lm, vq=Emu3VQConfig(), visual_token_offset=VISUAL0, eol_token_id=QWEN_EXTRA0 + 200,
                       eof_token_id=QWEN_EXTRA0 + 201, eoi_token_id=VISUAL0 - 2, eos_token_id=QWEN_EXTRA0 + 204)
    # the released image processor (BAAI/Emu3-VisionTokenizer): mean and std 0.5, 512^2 to 1024^2 pixels, factor 8
    proc = whole(Emu3ProcessorConfig, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), max_length=9216,
                 image_size=(720, 720),  # a generated image: 90 x 90 codes of 8 px
                 eos_token="<|extra_204|>", bos_token="<|extra_203|>", pad_token="<|endoftext|>")
    return Preset(model, proc, source="BAAI/Emu3-Chat-hf, BAAI/Emu3-Gen-hf")
