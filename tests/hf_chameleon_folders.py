"""The tiny Chameleon folders of the parity tests (tests/hf_folders.py's conventions; this module adds its builders
to ``hf_folders.BUILDERS`` when imported, which tests/families/cases.py does).

``build_chameleon``: ChameleonForConditionalGeneration with a Llama-style LM (grouped-query attention, rope theta
50000, rms eps 1e-6, per-head QK LayerNorms perturbed off 1 / 0), a VQ-GAN encoder (16-px images -> 4x4 codes of 48,
attention in mid and at 8 px), the codebook set near the encoder's outputs on the test images (a random codebook
gives every patch one code), a SentencePiece-style tokenizer whose post-processor adds ``<s>`` and which holds
Chameleon's ``<image>``, ``<racm3:break>``, ``<eoss>``, sep ``<reserved08706>`` and the IMGIMG code tokens;
ChameleonImageProcessor (PIL backend: torchvision is absent) with shortest edge 18 and a 16-px crop.
``build_chameleon_swin``: the same with ``swin_norm`` (chameleon-30b's block)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hf_folders
from hf_fixtures import perturb_, real_images, sentencepiece_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

CODES = 48
# the form of facebook/chameleon-7b's processor template: ROLE: , the turn's images first, then its text
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% if message['role'] == "
    "'assistant' %}{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}{% else %}{{ content['text'] + ' ' }}"
    "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
SPECIAL = ["<image>", "<racm3:break>", "<eoss>", "<reserved08706>"]


def code_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def chameleon_tokenizer():
    tok = sentencepiece_tokenizer(SPECIAL)
    tok.add_tokens([code_name(c) for c in range(CODES)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>", sep_token="<reserved08706>")


def fit_codebook_(model, pixels: torch.Tensor, seed: int = 0) -> None:
    """The VQ codebook set to the encoder's outputs on ``pixels`` plus noise: distinct images get distinct codes."""
    vq = model.model.vqmodel
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = vq.quant_conv(vq.encoder(pixels)).permute(0, 2, 3, 1).reshape(-1, vq.quantize.embedding_dim)
        rows = torch.randint(0, z.shape[0], (vq.quantize.num_embeddings,), generator=g)
        noise = torch.randn(z[rows].shape, generator=g)
        vq.quantize.embedding.weight.copy_(z[rows] + 0.3 * z.std() * noise)


def wake_vq_(model, seed: int = 3) -> None:
    """The VQ's convolutions at a scale where every block changes its input (transformers' init leaves them tiny)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.model.vqmodel.named_parameters():
            if p.ndim == 4:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p[0].numel() ** 0.5))


def fit_images() -> list:
    """The real test images and a few ShapesWorld scenes, whose encoder outputs the codebook is set near."""
    import random

    from vlmkit.data.shapes import render_scene, sample_scene

    rng = random.Random(1)
    return real_images() + [render_scene(sample_scene(rng, w, h, min_objects=1, max_objects=2))
                            for w, h in ((96, 32), (48, 40), (64, 64))]


def build_chameleon(folder: Path, swin: bool = False):
    tok = chameleon_tokenizer()
    vq = transformers.ChameleonVQVAEConfig(embed_dim=16, num_embeddings=CODES, latent_channels=32, resolution=16,
                                           base_channels=32, channel_multiplier=[1, 1, 2], num_res_blocks=2,
                                           attn_resolutions=[8])
    cfg = transformers.ChameleonConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, swin_norm=swin, vq_config=vq.to_dict(),
        vocabulary_map=tok.get_vocab(), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, initializer_range=0.1)
    torch.manual_seed(0)
    model = transformers.ChameleonForConditionalGeneration(cfg).eval()
    perturb_(model)
    wake_vq_(model)
    images = transformers.ChameleonImageProcessorPil(size={"shortest_edge": 18},
                                                     crop_size={"height": 16, "width": 16})
    processor = transformers.ChameleonProcessor(image_processor=images, tokenizer=tok, image_seq_length=16)
    processor.chat_template = CHAT_TEMPLATE  # ChameleonProcessor's __init__ takes none
    fit_codebook_(model, images(fit_images(), return_tensors="pt")["pixel_values"])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, transformers.AutoProcessor.from_pretrained(folder)


def build_chameleon_swin(folder: Path):
    return build_chameleon(folder, swin=True)


hf_folders.BUILDERS |= {"chameleon": build_chameleon, "chameleon_swin": build_chameleon_swin}
