"""Batched generation: greedy, temperature and top-p sampling, stop tokens and stop strings, KV cache.

Prompts of different lengths are left-padded so that every sequence's next token sits in the last column;
positions are counted from each sequence's first real token, so padding never changes a result.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from vlmkit.batch import Batch, Features, MediaInputs
from vlmkit.errors import ConfigError


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = 1
    return ids, mask


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(-1)
        sorted_p[(cum - sorted_p) >= top_p] = 0  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], media: MediaInputs | None, eos_id: int | Iterable[int], pad_id: int,
             gen: GenerationConfig, decode=None, use_cache: bool = True,
             features: Features | None = None) -> list[list[int]]:
    """Generate continuations for a batch of prompt id lists; returns the new tokens of each (no eos). ``eos_id``:
    the id that ends a sequence, or several (``Processor.stop_ids``: EOS and the folder's other end tokens).

    ``media``: the images of all prompts in reading order (the processor's MediaInputs); or ``features``, already
    encoded (``model.encode_media``'s output in reading order). Each prompt is the model's input: the prefill marks
    its tokens as the prompt (``Batch.prompt_mask``), what is generated after it is not.

    ``decode`` (ids -> str) enables ``gen.stop`` strings: a sequence stops once its text contains one.
    """
    gen.validate()
    device = next(model.parameters()).device
    ids, attn = left_pad(prompts, pad_id)
    ids, attn = ids.to(device), attn.to(device)
    B = ids.shape[0]
    generator = None
    if gen.seed is not None:
        generator = torch.Generator(device=device).manual_seed(gen.seed)
    if features is None and media is not None and len(media) > 0:
        features = model.encode_media(media.to(device))
    cache = model.new_cache(B, ids.shape[1] + gen.max_new_tokens, device) if use_cache else None
    prompt = attn.bool()
    out = model(Batch(ids, attention_mask=attn, prompt_mask=prompt, features=features), cache=cache, logits_to_keep=1)
    new = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    reserved = list(model.reserved_token_ids)
    stops = frozenset([eos_id] if isinstance(eos_id, int) else eos_id)
    for step in range(gen.max_new_tokens):
        logits = out.logits[:, -1].clone()
        logits[:, reserved] = float("-inf")  # an image slot can only come from the processor
        nxt = sample_next(logits, gen.temperature, gen.top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        _append(new, done, nxt, stops, gen, decode)
        if bool(done.all()) or step == gen.max_new_tokens - 1:
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype, device=device)], dim=1)
        if use_cache:
            out = model(Batch(nxt[:, None], attention_mask=attn), cache=cache, logits_to_keep=1)
        else:
            prompt = torch.cat([prompt, torch.zeros(B, 1, dtype=torch.bool, device=device)], dim=1)
            out = model(Batch(ids, attention_mask=attn, prompt_mask=prompt, features=features), logits_to_keep=1)
    return new


def _append(new: list[list[int]], done: torch.Tensor, nxt: torch.Tensor, stops: frozenset[int],
            gen: GenerationConfig, decode) -> None:
    """Add each unfinished row's sampled token, and mark the rows that end (EOS or another stop id, a stop
    string)."""
    for i in range(len(new)):
        if done[i]:
            continue
        t = int(nxt[i])
        if t in stops:
            done[i] = True
            continue
        new[i].append(t)
        if gen.stop and decode is not None and any(s in decode(new[i]) for s in gen.stop):
            done[i] = True
