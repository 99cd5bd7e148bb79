"""The tiny Hugging Face Janus folder (``JanusForConditionalGeneration``) the Janus parity tests hold vlmkit
against, registered in :data:`hf_folders.BUILDERS` as "janus" on import.

Non-default on purpose: a SigLIP-style tower whose images are padded to a square (JanusImageProcessor), an
understanding aligner and a generation aligner of two layers, a Llama LM with grouped-query attention, rope theta
and an untied head, a VQ whose 4x4 code grid is the tower's patch grid (32-pixel images, 3 downsamplings), a
tokenizer whose post-processor adds BOS (as Janus-Pro's) and ``<image_placeholder>``, ``<begin_of_image>``,
``<end_of_image>`` as special tokens. The VQ's and the generation path's weights are spread (:func:`spread_`) so
that the VQ's blocks are no identity and greedy image generation does not write one code throughout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hf_folders
from hf_fixtures import perturb_, sentencepiece_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

JANUS_SPECIAL = ["<image_placeholder>", "<begin_of_image>", "<end_of_image>"]
# Janus-Pro's conversation format, shortened: "<|User|>: ...", images as placeholders before the text
JANUS_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|User|>: ' }}{% else %}"
    "{{ '<|Assistant|>: ' }}{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image_placeholder>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{ '\n\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|Assistant|>:' }}{% endif %}")


def spread_(module: torch.nn.Module, seed: int) -> None:
    """The VQ's parameters random at a scale that keeps activations O(1) (norm weights near 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif "embedding" in name:
                p.copy_(noise)
            else:
                p.copy_(noise * (0.5 / max(1, p[0].numel()) ** 0.5))


def janus_tokenizer():
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=sentencepiece_tokenizer(JANUS_SPECIAL), bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                              "eoi_token": "<end_of_image>"})
    return tok


def build_janus(folder: Path):
    """Janus: a SigLIP-style tower (4x4 patches of 32-pixel images), a 2-layer aligner, a Llama LM (GQA, untied
    head), a VQ with attention (4x4 codes), the generation embeddings, aligner and head."""
    tok = janus_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in JANUS_SPECIAL}
    width = 64
    torch.manual_seed(0)
    vision = transformers.JanusVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            image_size=32, patch_size=8, mlp_ratio=1.5, projection_dim=width,
                                            depth=2, num_image_tokens=16, layer_norm_eps=1e-5)
    vq = transformers.JanusVQVAEConfig(embed_dim=8, num_embeddings=96, latent_channels=32, base_channels=32,
                                       channel_multiplier=[1, 2, 2, 2], num_res_blocks=1, projection_dim=width,
                                       image_token_embed_dim=width, num_hidden_layers=2)
    text = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=96,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    rms_norm_eps=1e-6, rope_theta=50000.0, max_position_embeddings=256,
                                    initializer_range=0.1,
                                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id)
    cfg = transformers.JanusConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                   vq_config=vq.to_dict(), image_token_id=ids["<image_placeholder>"],
                                   tie_word_embeddings=False)
    model = transformers.JanusForConditionalGeneration(cfg).eval()
    perturb_(model)
    spread_(model.model.vqmodel, 1)
    for part in (model.model.generation_embeddings, model.model.generation_aligner, model.model.generation_head):
        spread_(part, 3)  # at 0.02 the head's bias would pick one code whatever the LM says
    with torch.no_grad():
        bias = model.model.generation_head.vision_head.bias
        bias.copy_(0.05 * torch.randn(bias.shape, generator=torch.Generator().manual_seed(4)))
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        pos = model.model.vision_model.embeddings.position_embedding.weight
        pos.copy_(0.5 * torch.randn(pos.shape, generator=g))
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    gen.generation_kwargs = {"boi_token_id": ids["<begin_of_image>"]}
    model.save_pretrained(folder)
    images = transformers.JanusImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6],
                                              image_std=[0.2, 0.3, 0.25], min_size=4)
    processor = transformers.JanusProcessor(image_processor=images, tokenizer=tok, chat_template=JANUS_TEMPLATE,
                                            num_image_tokens=16)
    processor.save_pretrained(folder)
    return model, transformers.AutoProcessor.from_pretrained(folder)


hf_folders.BUILDERS.setdefault("janus", build_janus)

__all__ = ["JANUS_SPECIAL", "JANUS_TEMPLATE", "build_janus", "janus_tokenizer", "spread_"]
