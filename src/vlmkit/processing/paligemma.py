"""PaliGemma's processor: fixed-size SigLIP images, and the prompt layout of transformers' PaliGemmaProcessor.

Pixels are those of the base :class:`~vlmkit.processing.image.ImageProcessor` (resize to height x width,
rescale, normalise: SiglipImageProcessor). The text is what makes PaliGemma its own family:

- a prompt becomes ``<image>`` x n_images + BOS + prompt + ``"\\n"`` when it has no image placeholder, else
  BOS goes right after its last placeholder and ``"\\n"`` at the end; the string is tokenised *without* the
  tokenizer's special tokens (PaliGemmaProcessor turns ``add_bos_token`` / ``add_eos_token`` off: the BOS is
  in the text). Each placeholder then expands to ``image_seq_len`` image tokens.
- a scored continuation is the processor's ``suffix``: tokenised on its own (transformers passes it as the
  tokenizer's ``text_pair``) with EOS appended, so ``score()`` includes the log-probability of that EOS, as
  the processor's ``labels`` do.

A prompt without images (which transformers' processor refuses) gets BOS + prompt + ``"\\n"``.
"""

from __future__ import annotations

from vlmkit.processing.image import IMAGE_PROCESSORS, ImageProcessor


def paligemma_prompt(prompt: str, n_images: int, image_token: str, bos_token: str) -> str:
    """PaliGemmaProcessor's text for ``prompt`` with ``n_images`` images, before placeholder expansion."""
    if image_token in prompt:
        end = prompt.rfind(image_token) + len(image_token)
        return prompt[:end] + bos_token + prompt[end:] + "\n"
    return image_token * n_images + bos_token + prompt + "\n"


@IMAGE_PROCESSORS.register("paligemma", "fixed-size images, PaliGemma's prompt layout (BOS after the images, "
                                        "'\\n' at the end) and suffix + EOS continuations")
class PaliGemmaImageProcessor(ImageProcessor):
    """The fixed-size image processor with PaliGemma's text hooks (see the module docstring)."""

    def format_prompt(self, prompt: str, n_images: int) -> str:
        return paligemma_prompt(prompt, n_images, self.cfg.image_token, self.cfg.bos_token)

    def format_continuation(self, continuation: str) -> str:
        return continuation + self.cfg.eos_token
