"""Pipeline = load(path): chat, generate and score with one model and its Processor.

The evaluation tasks, the server and the CLI all go through these methods, so a model answers the same
way everywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.checkpoint import load_checkpoint
from vlmkit.errors import DataError
from vlmkit.generation import GenerationConfig, generate


def _as_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


class Pipeline:
    def __init__(self, model, processor, config=None, meta: dict | None = None):
        self.model = model.eval()
        self.processor = processor
        self.config = config
        self.meta = meta or {}
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu") -> Pipeline:
        model, processor, cfg, meta = load_checkpoint(path, device)
        return cls(model, processor, cfg, meta)

    # ------------------------------------------------------------------ generation
    def _run(self, items: list[tuple[list, list[int]]], gen: GenerationConfig) -> list[str]:
        pixels = [self.processor.preprocess_images(imgs) for imgs, _ in items]
        pixel_values = torch.cat(pixels) if pixels else None
        tok = self.processor.tokenizer
        out = generate(self.model, [ids for _, ids in items], pixel_values, tok.eos_id, tok.pad_id, gen,
                       decode=tok.decode)
        texts = [tok.decode(ids) for ids in out]
        return [_cut_at_stop(t, gen.stop) for t in texts]

    def chat_batch(self, requests: list[tuple[object, str]], **gen) -> list[str]:
        """[(images, question), ...] -> answers, generated as one batch with the chat template."""
        cfg = GenerationConfig(**gen)
        items = []
        for images, question in requests:
            images = _as_list(images)
            if self.processor.cfg.image_token not in question and images:
                question = (self.processor.cfg.image_token + "\n") * len(images) + question
            items.append((images, self.processor.encode_chat_prompt(question, len(images))))
        return self._run(items, cfg)

    def chat(self, images, question: str, **gen) -> str:
        """Answer ``question`` about ``images`` with the model's chat template.

        Without placeholders in the question, one is put in front of it for each image.
        """
        return self.chat_batch([(images, question)], **gen)[0]

    def generate(self, images, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None) -> str:
        """Continue a raw ``prompt`` (no template); each image placeholder in it marks an image."""
        images = _as_list(images)
        cfg = GenerationConfig(max_new_tokens, temperature, top_p, list(stop or []), seed)
        return self._run([(images, self.processor.encode_prompt(prompt, len(images)))], cfg)[0]

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, images, prompt: str, continuation: str) -> list[float]:
        """Per-token log-probabilities of ``continuation`` given ``images`` and the raw ``prompt``."""
        images = _as_list(images)
        if self.processor.cfg.image_token in continuation:
            raise DataError("the continuation passed to score() must not contain image placeholders")
        p_ids = self.processor.encode_prompt(prompt, len(images))
        c_ids = self.processor.tokenizer.encode(continuation)
        if not c_ids:
            return []
        if not p_ids:
            raise DataError("score() needs a non-empty prompt to condition the first continuation token on")
        ids = torch.tensor([p_ids + c_ids], device=self.device)
        pixels = self.processor.preprocess_images(images).to(self.device)
        logits = self.model(ids, pixels).logits[0].float()  # [T, V]
        logp = torch.log_softmax(logits[len(p_ids) - 1:-1], dim=-1)  # predictions of the continuation
        return logp.gather(-1, torch.tensor(c_ids, device=self.device)[:, None]).squeeze(-1).tolist()


def _cut_at_stop(text: str, stop: list[str]) -> str:
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
