"""Show-o (Xie et al. 2024): one transformer that reads images and text and draws images by discrete diffusion
(mask-predict) over VQ codes, with omni-attention (models/showo.py; processing/showo.py). vlmkit's from-scratch
tiny-showo: tiny-llava's 3-layer LM, tiny-vq's 16x16 codes.

Decisions in the family interface's terms:

- capabilities: it chats (reading images as codes) and draws (``generate_images``), has a codebook
  (``image_codes``); ``tower_cache=False`` (the features are the frozen VQ's codes, embedded by the LM's table:
  no tower output to precompute); ``shared_prefix`` (an image block lies inside the shared prefix, which every
  grouped question sees whole);
- objectives: ``lm`` (understanding alone) and ``unified`` (text-to-image pairs too). For those pairs
  :meth:`Showo.t2i_training_tokens` masks a share ``cos(pi/2 * u)`` of the codes (MaskGIT's schedule,
  mask_predict.training_mask) and supervises the original code at each masked position only (the model's loss
  reads code labels as same-position targets); ``<|eoi|>`` is read, not trained;
- drawing (:meth:`Showo.draw_images`): MaskGIT's iterative unmasking (mask_predict.unmask) in ``gen.steps`` steps
  (0: ``model.gen.steps``, 12), each step one forward of the whole sequence (prompt, current grid with [MASK] where
  unknown, ``<|eoi|>``) for the conditional and unconditional prompts as one left-padded batch, no KV cache (the
  grid changes every step and sees itself both ways); ``temperature``, ``top_k``, ``cfg_scale`` and ``seed`` as
  the autoregressive families read them. ``steps`` above the grid's code count is refused;
- text: vlmkit's segment layout with Show-o's task tokens; a from-scratch tokenizer gets ``<|t2i|>``, ``<|mmu|>``,
  ``<|soi|>`` and ``<|eoi|>`` among its special tokens; the model's vocabulary is the tokenizer's, the codes and
  one [MASK] id;
- ``gen.vq_from``: a from-scratch model takes a trained VQ tokenizer's config and weights (as tiny-janus);
- no Hugging Face mapping: Show-o is not in transformers (``hf=None``).
"""

from __future__ import annotations

import dataclasses
import random

import torch

from vlmkit.batch import IGNORE, Batch
from vlmkit.config import apply_overrides
from vlmkit.errors import ConfigError
from vlmkit.families.vq import load_vq_weights, vq_config_from
from vlmkit.family import Capabilities, Family, register
from vlmkit.models.showo import ShowoConfig, build_showo
from vlmkit.processing.showo import ShowoImageProcessor, ShowoProcessorConfig, ShowoSegmentLayout
from vlmkit.processing.tokenizer import SPECIAL_TOKENS


@register
class Showo(Family):
    """mask-predict over VQ codes and text in one LM with omni-attention (causal text, bidirectional images)"""

    name = "showo"
    Config = ShowoConfig
    ProcessorConfig = ShowoProcessorConfig
    capabilities = Capabilities(generate=True, generate_images=True, image_codes=True, tower_cache=False,
                                shared_prefix=True)
    objectives = ("lm", "unified")
    image_groups = ("lm",)
    hf = None

    def build(self, cfg, image_token_id, init=True):
        return build_showo(cfg, image_token_id, init)

    def image_processor(self, pcfg):
        return ShowoImageProcessor(pcfg)

    def layout(self, pcfg, tokenizer, files):
        if pcfg.text_mode != "segments":
            raise ConfigError(f"processor.text_mode must be 'segments' for showo (vlmkit's layout; there is no "
                              f"Hugging Face processor to follow), got {pcfg.text_mode!r}")
        return ShowoSegmentLayout(pcfg, tokenizer)

    def new_tokenizer(self, texts, vocab_size):
        from vlmkit.processing.tokenizer import TextTokenizer, train_bpe

        return TextTokenizer(train_bpe(texts, vocab_size, SPECIAL_TOKENS + ShowoProcessorConfig().task_tokens))

    def configure(self, cfg, pcfg, tokenizer):
        """The VQ tokenizer ``gen.vq_from``'s (its processor must read images as this one), the LM's vocabulary the
        tokenizer's V ids + the K codes + [MASK]; the processor's images the VQ's size, each filling its grid."""
        vq = vq_config_from(cfg.gen.vq_from, pcfg, "model.gen.vq_from") if cfg.gen.vq_from else cfg.gen.vq
        v = tokenizer.vocab_size
        cfg = dataclasses.replace(cfg, gen=dataclasses.replace(cfg.gen, vq=vq), text_vocab=v,
                                  lm=dataclasses.replace(cfg.lm, vocab_size=v + vq.codebook_size + 1),
                                  eoi_token_id=tokenizer.token_id(pcfg.eoi_token))
        h, w = vq.grid
        return cfg, apply_overrides(pcfg, {"family": cfg.family, "image_size": list(vq.image_size),
                                           "image_seq_len": h * w})

    def new_model(self, cfg, pcfg, tokenizer):
        """A from-scratch model whose VQ tokenizer is ``gen.vq_from``'s trained one (weights included)."""
        cfg, model, processor = super().new_model(cfg, pcfg, tokenizer)
        if cfg.gen.vq_from:
            load_vq_weights(model.vq, cfg.gen.vq_from)
        return cfg, model, processor

    def t2i_training_tokens(self, model, tokens, rng: random.Random):
        """Mask-predict's sample (module docstring): codes at the drawn positions -> [MASK], labelled with the
        original code; every other position (the kept codes, ``<|eoi|>``) unlabelled."""
        from vlmkit.mask_predict import training_mask

        code = [i for i, t in enumerate(tokens) if t >= model.vocab_size]
        inputs, labels = list(tokens), [IGNORE] * len(tokens)
        for j in training_mask(len(code), rng):
            at = code[j]
            inputs[at], labels[at] = model.mask_id, tokens[at]
        return inputs, labels

    def draw_images(self, model, cond, uncond, gen, progress=False):
        """Pixels [n, 3, H, W] in [-1, 1] by iterative unmasking (module docstring), decoded by the VQ decoder."""
        from vlmkit.mask_predict import unmask

        h, w = model.image_grid
        steps = gen.steps or model.default_steps
        if not 1 <= steps <= h * w:
            raise ConfigError(f"steps must be in 0..{h * w} for this model (0: its default {model.default_steps}; "
                              f"at most one step per code of its {h}x{w} grid), got {gen.steps}")
        guided = gen.cfg_scale != 1.0
        rows = [cond] * gen.n + ([uncond] * gen.n if guided else [])
        device = next(model.parameters()).device

        def logits_of(codes, masked):
            grid = torch.where(masked, model.mask_id, model.code_ids(codes))
            grid = torch.cat([grid, grid]) if guided else grid
            return grid_logits(model, rows, grid)

        codes = unmask(logits_of, gen.n, h * w, steps, gen.cfg_scale, gen.temperature, gen.top_k, gen.seed,
                       device, progress)
        return model.decode_codes(codes.view(gen.n, h, w))

    def image_tokens(self, model) -> str:
        h, w = model.image_grid
        return f"{h * w} ({h}x{w} codes) + 3"


def grid_logits(model, prompts: list[list[int]], grid: torch.Tensor) -> torch.Tensor:
    """The code logits [rows, N, K] at the N grid positions of ``prompt + grid + <|eoi|>`` for each row, the prompts
    left-padded into one batch."""
    from vlmkit.generation import left_pad

    ids, attn = left_pad(prompts, 0)
    n, device = grid.shape[1], grid.device
    eoi = torch.full((len(prompts), 1), model.eoi_token_id, dtype=torch.long, device=device)
    ids = torch.cat([ids.to(device), grid, eoi], dim=1)
    attn = torch.cat([attn.to(device), torch.ones(len(prompts), n + 1, dtype=attn.dtype, device=device)], dim=1)
    logits = model(Batch(ids, attention_mask=attn), head="image", logits_to_keep=n + 1).logits
    return logits[:, :n]


__all__ = ["Showo", "grid_logits"]
