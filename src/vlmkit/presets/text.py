"""Presets of the text family: released text-only LMs' shapes (counted against transformers' classes in
tests/convert/test_hf_presets.py), for parameter counts and from-scratch builds."""

from __future__ import annotations

from vlmkit.config import LanguageConfig, RopeScalingConfig
from vlmkit.models.text import TextLMConfig
from vlmkit.presets import PRESETS, Preset, whole
from vlmkit.processing.text_lm import TextLMProcessorConfig


def _preset(kind: str, lm: LanguageConfig, source: str, **tokens) -> Preset:
    return Preset(TextLMConfig(lm=lm, hf_model_type=kind),
                  whole(TextLMProcessorConfig, max_length=lm.max_seq_len, **tokens), source=source)


@PRESETS.register("qwen2.5-0.5b", "Qwen2.5-0.5B shapes: 24 layers, 896 wide, 14 heads over 2 KV heads, q/k/v "
                                  "biases, tied embeddings")
def qwen25_05b() -> Preset:
    lm = LanguageConfig(vocab_size=151936, width=896, depth=24, heads=14, kv_heads=2, mlp_dim=4864, norm_eps=1e-6,
                        rope_theta=1e6, max_seq_len=32768, tie_embeddings=True, qkv_bias=True)
    return _preset("qwen2", lm, "Qwen/Qwen2.5-0.5B", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@PRESETS.register("llama-3.2-1b", "Llama 3.2 1B shapes: 16 layers, 2048 wide, 32 heads over 8 KV heads, Llama 3's "
                                  "RoPE scaling, tied embeddings")
def llama32_1b() -> Preset:
    lm = LanguageConfig(vocab_size=128256, width=2048, depth=16, heads=32, kv_heads=8, head_dim=64, mlp_dim=8192,
                        norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True,
                        rope_scaling=RopeScalingConfig(kind="llama3", factor=32.0, low_freq_factor=1.0,
                                                       high_freq_factor=4.0, original_max_len=8192))
    return _preset("llama", lm, "meta-llama/Llama-3.2-1B", eos_token="<|end_of_text|>", pad_token="<|end_of_text|>",
                   bos_token="<|begin_of_text|>")


@PRESETS.register("phi-2", "Phi-2 shapes: 32 parallel attention + MLP blocks, 2560 wide, rotary on 40% of each "
                           "head, biased LM head")
def phi_2() -> Preset:
    lm = LanguageConfig(vocab_size=51200, width=2560, depth=32, heads=32, kv_heads=32, mlp_dim=10240,
                        act="gelu_tanh", norm_eps=1e-5, max_seq_len=2048, norm="layernorm", mlp="plain", bias=True,
                        rotary_fraction=0.4, parallel_block=True, head_bias=True)
    return _preset("phi", lm, "microsoft/phi-2", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@PRESETS.register("phi-3-mini-4k", "Phi-3-mini-4k shapes: 32 layers, 3072 wide, fused q/k/v and gate/up "
                                   "projections, a 2047-token sliding window (the context here)")
def phi3_mini() -> Preset:
    lm = LanguageConfig(vocab_size=32064, width=3072, depth=32, heads=32, kv_heads=32, mlp_dim=8192, norm_eps=1e-5,
                        max_seq_len=2047)
    return _preset("phi3", lm, "microsoft/Phi-3-mini-4k-instruct", eos_token="<|endoftext|>",
                   pad_token="<|endoftext|>", bos_token="<s>")
