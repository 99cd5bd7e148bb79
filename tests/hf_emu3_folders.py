"""The tiny Emu3 Hugging Face folder (``build_emu3``), registered in :data:`hf_folders.BUILDERS` on import.

Emu3 (BAAI): a Llama-like LM whose vocabulary holds the VQ-VAE's codes as ``<|visual tokenNNNNNN|>`` tokens. The
tokenizer here is byte-level BPE like the released one (no BOS post-processor: Emu3Processor writes BOS into the
text itself) with its named special tokens: ``<image>`` (the placeholder), ``<|image start|>``, ``<|image end|>``,
``<|image token|>``, ``<|extra_200|>`` (row end), ``<|extra_201|>`` (end of frame), ``<|extra_203|>`` (BOS),
``<|extra_204|>`` (EOS), ``<|endoftext|>`` (padding). The VQ-VAE is non-default and small: 32 base channels over
4 levels (spatial factor 8), one residual block per level, attention at the last level, 64 codes of 4 dimensions,
temporal factor 4; its BatchNorms carry random running statistics.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hf_folders
from hf_fixtures import byte_level_tokenizer, perturb_

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

EMU3_CODES = 64
EMU3_SPECIAL = ["<|extra_203|>", "<|extra_204|>", "<image>", "<|image start|>", "<|image end|>", "<|image token|>",
                "<|extra_200|>", "<|extra_201|>"] + [f"<|visual token{i:06d}|>" for i in range(EMU3_CODES)]
EMU3_TOKENS = {"image_token": "<image>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
               "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>"}
# Emu3-Chat's template (its {% generation %} markers left out): roles in capitals, a message's images first
EMU3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}"
    "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
EMU3_VQ = dict(codebook_size=EMU3_CODES, embed_dim=4, latent_channels=4, base_channels=32,
               channel_multiplier=[1, 2, 2, 2], num_res_blocks=1, attn_resolutions=[3], hidden_size=64,
               num_attention_heads=2, temporal_downsample_factor=4)


def emu3_tokenizer():
    tok = byte_level_tokenizer(EMU3_SPECIAL, vocab_size=400)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|extra_203|>",
                                                eos_token="<|extra_204|>", pad_token="<|endoftext|>",
                                                extra_special_tokens=EMU3_TOKENS, chat_template=EMU3_TEMPLATE)


def wake_vq_(model: torch.nn.Module, seed: int = 2) -> None:
    """Random running statistics in the VQ-VAE's BatchNorms (a checkpoint's), so that a missing buffer shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def build_emu3(folder: Path):
    """Emu3: the tokenizer and VQ-VAE of the module docstring, a 2-layer GQA LM (theta 20000, eps 3e-6), images
    resized to 16^2..48^2 pixels (multiples of 8: 2x2 to 6x6 codes)."""
    tok = emu3_tokenizer()
    ids = tok.get_vocab()
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=3e-6, max_position_embeddings=1024, initializer_range=0.1,
                rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
                bos_token_id=ids["<|extra_203|>"], eos_token_id=ids["<|extra_204|>"], pad_token_id=tok.pad_token_id)
    cfg = transformers.Emu3Config(vq_config=EMU3_VQ, text_config=text, vocabulary_map=ids)
    model = transformers.Emu3ForConditionalGeneration(cfg).eval()
    perturb_(model)
    wake_vq_(model)
    model.save_pretrained(folder)
    images = transformers.Emu3ImageProcessor(min_pixels=16 * 16, max_pixels=48 * 48, spatial_factor=8,
                                             image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
    transformers.Emu3Processor(images, tok, chat_template=EMU3_TEMPLATE).save_pretrained(folder)
    return model, transformers.AutoProcessor.from_pretrained(folder)


hf_folders.BUILDERS.setdefault("emu3", build_emu3)
