"""Transfusion (Zhou et al. 2024): one transformer over text tokens and continuous image latents, trained with the
LM loss on text and a diffusion (flow-matching) loss on the image patches it writes (models/transfusion.py;
processing/transfusion.py). vlmkit's from-scratch tiny-transfusion: tiny-llava's 3-layer LM, tiny-vae's 16x16x4
latents in 2x2 patches.

Decisions in the family interface's terms:

- capabilities: it chats (reading images as clean latent patches) and draws (``generate_images``); no codebook
  (``image_codes=False``); ``image_latents`` (the VAE's ``encode_latents`` / ``decode_latents``);
  ``tower_cache=False`` (the latents are encoded in the forward from the frozen VAE: nothing precomputed);
  ``shared_prefix`` (an image block lies inside the shared prefix, which every grouped question sees whole);
- objectives: ``lm`` (understanding alone) and ``unified`` (text-to-image pairs too). The unified objective's
  mixing is reused as it is; :meth:`Transfusion.t2i_pairs` makes its pairs latent ones (objectives/latent_pairs.py:
  each pair's image with a t and noise drawn from the per-sample, per-step generator, so a resumed run draws the
  same). ``image_weight`` is Transfusion's lambda;
- drawing (:meth:`Transfusion.draw_images`): Euler steps of the flow ODE (diffusion/flow.py ``euler_sample``, the
  convention x_t = (1 - t) x0 + t noise) over the latent grid, ``gen.steps`` (0: ``model.gen.steps``, 20), with
  classifier-free guidance (``gen.cfg_scale``; the conditional and the unconditional prompts ``caption <|boi|>``
  and ``<|boi|>`` in one batch). Each step runs the whole sequence (prompt, ``<|boi|>``, the current noisy patches,
  ``<|eoi|>``) with no KV cache: the prompt is at most a few dozen tokens beside 64 patches, so caching it would
  save little at this size, and the patches change every step. The seed's generator draws the initial noise,
  the sampler's only randomness. ``temperature`` and ``top_k`` mean nothing to a deterministic ODE sampler: other
  values than their defaults are refused (a user would believe they changed the images);
- text: vlmkit's segment layout; a from-scratch tokenizer gets ``<|boi|>`` and ``<|eoi|>`` among its special
  tokens; the model's vocabulary is the tokenizer's;
- ``gen.vae_from``: a from-scratch model takes a trained VAE's config and weights (as tiny-janus and tiny-showo
  take a VQ through ``gen.vq_from``); "" builds the ``gen.vae`` config untrained (as an empty ``gen.vq_from``
  does: a checkpoint fills it, and the conformance suite builds one so); the recipe names tiny-vae's;
- no Hugging Face mapping: Transfusion's weights were not released and it is not in transformers (``hf=None``).
"""

from __future__ import annotations

import dataclasses

import torch

from vlmkit.batch import Batch
from vlmkit.config import apply_overrides
from vlmkit.errors import ConfigError
from vlmkit.families.vae import load_vae_weights, vae_config_from
from vlmkit.family import Capabilities, Family, register
from vlmkit.models.transfusion import TransfusionConfig, build_transfusion
from vlmkit.processing.tokenizer import SPECIAL_TOKENS
from vlmkit.processing.transfusion import (TransfusionImageProcessor, TransfusionProcessorConfig,
                                           TransfusionSegmentLayout)


@register
class Transfusion(Family):
    """text by next-token prediction and images by flow matching over VAE latent patches, in one LM"""

    name = "transfusion"
    Config = TransfusionConfig
    ProcessorConfig = TransfusionProcessorConfig
    capabilities = Capabilities(generate=True, generate_images=True, image_latents=True, tower_cache=False,
                                shared_prefix=True)
    objectives = ("lm", "unified")
    image_groups = ("connector", "lm")
    hf = None

    def build(self, cfg, image_token_id, init=True):
        return build_transfusion(cfg, image_token_id, init)

    def image_processor(self, pcfg):
        return TransfusionImageProcessor(pcfg)

    def layout(self, pcfg, tokenizer, files):
        if pcfg.text_mode != "segments":
            raise ConfigError(f"processor.text_mode must be 'segments' for transfusion (vlmkit's layout; there is no "
                              f"Hugging Face processor to follow), got {pcfg.text_mode!r}")
        return TransfusionSegmentLayout(pcfg, tokenizer)

    def new_tokenizer(self, texts, vocab_size):
        from vlmkit.processing.tokenizer import TextTokenizer, train_bpe

        pcfg = TransfusionProcessorConfig()
        return TextTokenizer(train_bpe(texts, vocab_size, SPECIAL_TOKENS + [pcfg.boi_token, pcfg.eoi_token]))

    def configure(self, cfg, pcfg, tokenizer):
        """The VAE ``gen.vae_from``'s (its processor must read images as this one; "": the ``gen.vae`` config), the
        LM's vocabulary the tokenizer's; the processor's images the VAE's size, each filling the patch grid."""
        vae = vae_config_from(cfg.gen.vae_from, pcfg, "model.gen.vae_from") if cfg.gen.vae_from else cfg.gen.vae
        cfg = dataclasses.replace(cfg, gen=dataclasses.replace(cfg.gen, vae=vae),
                                  lm=dataclasses.replace(cfg.lm, vocab_size=tokenizer.vocab_size),
                                  boi_token_id=tokenizer.token_id(pcfg.boi_token),
                                  eoi_token_id=tokenizer.token_id(pcfg.eoi_token))
        gh, gw = cfg.patch_grid
        return cfg, apply_overrides(pcfg, {"family": cfg.family, "image_size": list(vae.image_size),
                                           "image_seq_len": gh * gw,
                                           "latent_shape": [vae.latent_channels, *vae.grid]})

    def new_model(self, cfg, pcfg, tokenizer):
        """A from-scratch model whose VAE is ``gen.vae_from``'s trained one (weights included)."""
        cfg, model, processor = super().new_model(cfg, pcfg, tokenizer)
        if cfg.gen.vae_from:
            load_vae_weights(model.vae, cfg.gen.vae_from)
        return cfg, model, processor

    def can_draw(self, model) -> bool:
        return True

    def t2i_pairs(self, pairs, processor, model, where, progress=False):
        from vlmkit.objectives.latent_pairs import LatentPairs

        return LatentPairs(pairs, processor, model, where, progress)

    def draw_images(self, model, cond, uncond, gen, progress=False):
        """Pixels [n, 3, H, W] in [-1, 1]: Euler steps of the flow ODE over the latents, guided, then the VAE's
        decoder (module docstring)."""
        from vlmkit.diffusion.embed import unpatchify
        from vlmkit.diffusion.flow import euler_sample
        from vlmkit.image_generation import check_ode_sampling

        check_ode_sampling(gen, "transfusion")
        steps = gen.steps or model.default_steps
        guided = gen.cfg_scale != 1.0
        batch = block_batch(model, [cond] * gen.n + ([uncond] * gen.n if guided else []))
        device = next(model.parameters()).device
        c, h, w = model.latent_shape
        generator = torch.Generator().manual_seed(gen.seed) if gen.seed is not None else None

        def velocity(x, t):
            xs, ts = (torch.cat([x, x]), torch.cat([t, t])) if guided else (x, t)
            v = unpatchify(model.velocity(batch, xs.to(device), ts.to(device)).float(), model.p, h, w)
            return (v[:gen.n], v[gen.n:]) if guided else v

        z = euler_sample(velocity, (gen.n, c, h, w), steps, generator, gen.cfg_scale, progress=progress)
        return model.decode_latents(z.to(device)).clamp(-1, 1)

    def image_tokens(self, model) -> str:
        gh, gw = model.cfg.patch_grid
        c, h, w = model.latent_shape
        return f"{gh * gw} ({gh}x{gw} patches of {h}x{w}x{c} latents) + 2"


def block_batch(model, prompts: list[list[int]]) -> Batch:
    """``prompt + N placeholders + <|eoi|>`` for each prompt, left-padded into one batch."""
    from vlmkit.generation import left_pad

    block = [model.image_token_id] * model.image_seq_len + [model.eoi_token_id]
    ids, attn = left_pad([p + block for p in prompts], 0)
    device = next(model.parameters()).device
    return Batch(ids.to(device), attention_mask=attn.to(device))


__all__ = ["Transfusion", "block_batch"]
