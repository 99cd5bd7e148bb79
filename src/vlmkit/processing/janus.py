"""Janus' processing: images for understanding as a LLaVA's (resized, normalised, one placeholder per image), and a
prompt layout that also writes prompts in image-generation mode: the text as a chat turn, then the
``<begin_of_image>`` marker the codes follow (``image_prompt``). Its unconditional prompt for classifier-free
guidance is Janus': every token but BOS and ``<begin_of_image>`` replaced by the pad token (the same length).
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmkit.config import ProcessorConfig
from vlmkit.errors import DataError
from vlmkit.processing.layouts import SegmentLayout


@dataclass
class JanusProcessorConfig(ProcessorConfig):
    """ProcessorConfig and the marker that begins an image in generation mode."""

    family: str = "janus"
    boi_token: str = "<begin_of_image>"


def unconditional_ids(ids: list[int], keep: set[int], pad_id: int) -> list[int]:
    """Janus' unconditional prompt of ``ids``: every id not in ``keep`` (BOS, the image-start marker) -> pad."""
    return [i if i in keep else pad_id for i in ids]


class JanusSegmentLayout(SegmentLayout):
    """vlmkit's segment layout (models trained in vlmkit) with Janus' image-generation prompts."""

    def image_prompt(self, text: str, grid: tuple[int, int], unconditional: bool = False,
                     where: str = "prompt") -> list[int]:
        """``text`` as a user turn with the generation prompt, then ``<begin_of_image>`` (``grid`` does not change
        Janus' prompt: its images have one size)."""
        if self.cfg.image_token and self.cfg.image_token in text:
            raise DataError(f"{where}: a text-to-image prompt reads no image; remove {self.cfg.image_token!r}")
        segments = self.template.render([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = [i for s in segments for i in self.tokenizer.encode(s.text)] + [self.boi_id]
        self.check_length(ids, where)
        if not unconditional:
            return ids
        return unconditional_ids(ids, {self.boi_id, self.tokenizer.bos_id}, self.tokenizer.pad_id)

    @property
    def boi_id(self) -> int:
        return self.tokenizer.token_id(self.cfg.boi_token)
