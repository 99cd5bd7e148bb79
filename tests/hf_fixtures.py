"""Shared builders for the Hugging Face parity tests: real images (ShapesWorld scenes, non-square), tokenizers
of the two kinds families use (SentencePiece-style with a BOS post-processor, byte-level BPE without), and
the perturbation that makes a tiny random checkpoint's norms and biases non-trivial."""

from __future__ import annotations

import random

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from vlmkit.data.shapes import render_scene, sample_scene

CORPUS = [
    "What colour is the small circle? It is red.", "How many squares are there? Two squares.",
    "Describe the image. A blue triangle left of a green star.", "Is there a yellow square? yes",
    "caption en", "answer en what is in the picture?", "the quick brown fox jumps over the lazy dog",
    "USER: ASSISTANT: a picture of shapes on a grey background.", "  leading spaces\tand tabs\nnew lines",
]


# llava-hf's chat template (images first, then the text)
LLAVA_TEMPLATE = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
            "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
            "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', "
            "'text') %}{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}"
            "{{ 'ASSISTANT:' }}{% endif %}")


def real_images() -> list[Image.Image]:
    """ShapesWorld scenes (rendered shapes, not noise) of wide, tall and square sizes."""
    rng = random.Random(0)
    return [render_scene(sample_scene(rng, w, h, min_objects=2, max_objects=4)) for w, h in
            ((72, 48), (40, 60), (64, 64))]


def sentencepiece_tokenizer(special: list[str], vocab_size: int = 200) -> Tokenizer:
    """A Llama/Gemma-style tokenizer: Metaspace ("▁") pre-tokenisation with a prefix space on the first
    piece, BPE, and a post-processor that adds <s> in front (add_special_tokens=True)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 10, trainer)
    tok.add_special_tokens(special)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return tok


def byte_level_tokenizer(special: list[str], vocab_size: int = 300) -> Tokenizer:
    """A Qwen2-style tokenizer: byte-level BPE, no BOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"] + special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 10, trainer)
    return tok


def reference_logprobs(model, processor, images, prompt, continuation):
    """transformers' per-token log-probabilities of the continuation, the lmms-eval way: the
    tokens of prompt + continuation after those of the prompt alone, scored by the model on the whole."""
    n = processor(text=prompt, images=images or None, return_tensors="pt")["input_ids"].shape[1]
    full = processor(text=prompt + continuation, images=images or None, return_tensors="pt")
    with torch.no_grad():
        logits = model(**full).logits[0]
    logp = torch.log_softmax(logits[n - 1:-1].float(), -1)
    return logp.gather(-1, full["input_ids"][0, n:, None]).squeeze(-1)


def perturb_(model: torch.nn.Module, seed: int = 0) -> None:
    """Norm weights around 1 with spread, biases and class/newline embeddings non-zero: a zero bias or a unit
    norm would hide a missing or misplaced tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias") or "class_embedding" in name or "newline" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
