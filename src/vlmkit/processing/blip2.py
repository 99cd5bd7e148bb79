"""BLIP-2's and InstructBLIP's processor: fixed-size images whose query tokens go before the prompt.

Pixels are those of the base :class:`~vlmkit.processing.image.ImageProcessor` (resize to height x width, rescale,
normalise: BlipImageProcessor). The text is laid out as transformers' Blip2Processor / InstructBlipProcessor do:
the prompt is tokenised on its own with the tokenizer's special tokens (OPT's and Vicuna's BOS), and each image's
``num_query_tokens`` image tokens are put in front of it, so a prompt carries no image placeholder. InstructBLIP's
instruction (the prompt again, through the Q-Former's tokenizer) is the Processor's
(:meth:`~vlmkit.processing.Processor.instruction`).
"""

from __future__ import annotations

import torch

from vlmkit.errors import DataError
from vlmkit.processing.image import IMAGE_PROCESSORS, ImageProcessor


@IMAGE_PROCESSORS.register("blip2", "fixed-size images whose query tokens go before the prompt and its BOS "
                                    "(BLIP-2, InstructBLIP)")
class Blip2ImageProcessor(ImageProcessor):
    """The fixed-size image processor; the Processor writes the images first (see the module docstring)."""

    images_first = True


# ----------------------------------------------------------------------------- InstructBLIP's instruction


def without_placeholders(text: str, placeholders: tuple[str, ...]) -> str:
    """``text`` with its image placeholders (and the newline that puts an image on its own line) removed: the
    images of these families go before the prompt whatever it says."""
    for p in placeholders:
        text = text.replace(p + "\n", "").replace(p, "")
    return text


def conversation_instruction(messages: list[dict], placeholders: tuple[str, ...]) -> str:
    """The instruction of a conversation ({"role", "content"} turns): the text of the user turn that carries the
    image (its first placeholder; without any, the first user turn, before which the images go), placeholders
    removed. For one question and its answer, the question: what InstructBLIP's Q-Former reads."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    turn = next((u for u in users if any(p in u for p in placeholders)), users[0] if users else "")
    return without_placeholders(turn, placeholders)


def instruction_tensors(tokenizer, pad_id: int, text: str, n_images: int, max_length: int,
                        where: str) -> dict[str, torch.Tensor]:
    """``qformer_input_ids`` and ``qformer_attention_mask`` [n_images, max_length]: ``text`` tokenised with the
    Q-Former tokenizer's special tokens (BERT's [CLS] ... [SEP], as InstructBlipProcessor), the same for every
    image, padded on the right. Longer texts are refused, not cut: transformers' processor does not cut them."""
    ids = tokenizer.encode(text, add_special_tokens=True).ids
    if len(ids) > max_length:
        raise DataError(f"{where}: the instruction has {len(ids)} Q-Former tokens, more than the processor's "
                        f"qformer_max_length {max_length}; shorten the prompt")
    row = torch.full((max_length,), pad_id, dtype=torch.long)
    row[:len(ids)] = torch.tensor(ids, dtype=torch.long)
    mask = (torch.arange(max_length) < len(ids)).long()
    return {"qformer_input_ids": row.expand(n_images, -1).clone(),
            "qformer_attention_mask": mask.expand(n_images, -1).clone()}
