"""The one Processor used by training, evaluation and serving.

It turns (images, conversation or raw prompt) into model inputs: image tensors, token ids in which every
image placeholder is expanded to exactly the connector's token count, and labels masked so that only
assistant tokens are trained. Placeholder/image mismatches are refused here, before any forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmkit.config import ProcessorConfig, from_dict, to_dict
from vlmkit.errors import DataError
from vlmkit.processing.chat import TEMPLATES, Segment, normalize_messages
from vlmkit.processing.image import ImageTransform, load_image
from vlmkit.processing.tokenizer import TextTokenizer
from vlmkit.utils import atomic_write_json

IGNORE = -100


class Processor:
    def __init__(self, cfg: ProcessorConfig, tokenizer: TextTokenizer):
        if cfg.image_seq_len <= 0:
            raise ValueError("ProcessorConfig.image_seq_len must be set from the model (tokens per image)")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.template = TEMPLATES.build(cfg.chat_template)
        self.transform = ImageTransform(cfg.image_size, cfg.mean, cfg.std, cfg.resample, cfg.shortest_edge)
        self.image_token_id = tokenizer.token_id(cfg.image_token)

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> None:
        atomic_write_json(Path(folder) / "processor.json", to_dict(self.cfg))
        self.tokenizer.save(Path(folder) / "tokenizer.json")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Processor:
        folder = Path(folder)
        cfg = from_dict(ProcessorConfig, json.loads((folder / "processor.json").read_text()))
        return cls(cfg, TextTokenizer.from_file(folder / "tokenizer.json"))

    # ------------------------------------------------------------------ images
    def preprocess_images(self, images, where: str = "") -> torch.Tensor:
        """Paths or PIL images -> [n, C, H, W]."""
        if not images:
            h, w = self.cfg.image_size
            return torch.zeros(0, 3, h, w)
        return torch.stack([self.transform(load_image(im, where)) for im in images])

    # ------------------------------------------------------------------ text
    def _encode_text(self, text: str, n_images_left: list[int], where: str) -> list[int]:
        """Tokenise text, expanding each placeholder to image_seq_len image tokens."""
        ids: list[int] = []
        parts = text.split(self.cfg.image_token)
        for i, part in enumerate(parts):
            if i > 0:
                n_images_left[0] -= 1
                ids.extend([self.image_token_id] * self.cfg.image_seq_len)
            ids.extend(self.tokenizer.encode(part))
        return ids

    def check_placeholders(self, texts: list[str], n_images: int, where: str) -> None:
        n_ph = sum(t.count(self.cfg.image_token) for t in texts)
        if n_ph != n_images:
            raise DataError(f"image placeholder count {n_ph} != images {n_images} in {where}: put one "
                            f"{self.cfg.image_token!r} in the text for each image")

    def encode_segments(self, segments: list[Segment], n_images: int, where: str) -> tuple[list[int], list[int]]:
        self.check_placeholders([s.text for s in segments], n_images, where)
        ids: list[int] = []
        labels: list[int] = []
        left = [n_images]
        for seg in segments:
            seg_ids = self._encode_text(seg.text, left, where)
            ids.extend(seg_ids)
            labels.extend(seg_ids if seg.train else [IGNORE] * len(seg_ids))
        if len(ids) > self.cfg.max_length:
            raise DataError(f"{where}: {len(ids)} tokens exceed max_length {self.cfg.max_length} "
                            f"(raise processor max_length or shorten the conversation)")
        return ids, labels

    def encode_conversation(self, conversations: list, n_images: int, where: str = "sample"):
        """LLaVA/OpenAI-style turns -> (input_ids, labels) with the chat template applied."""
        messages = normalize_messages(conversations, where)
        return self.encode_segments(self.template.render(messages), n_images, where)

    def encode_chat_prompt(self, question: str, n_images: int, where: str = "prompt") -> list[int]:
        """A single user question -> prompt ids ending in the assistant's generation prompt."""
        segs = self.template.render([{"role": "user", "content": question}], add_generation_prompt=True)
        return self.encode_segments(segs, n_images, where)[0]

    def encode_prompt(self, prompt: str, n_images: int, where: str = "prompt") -> list[int]:
        """Raw text (no template) with image placeholders -> ids."""
        return self.encode_segments([Segment(prompt)], n_images, where)[0]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)
