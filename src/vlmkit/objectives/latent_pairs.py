"""Text-to-image samples over continuous latents, for the ``unified`` objective (objectives/unified.py) of a family
that diffuses latents (Transfusion, families/transfusion.py, through ``Family.t2i_pairs``).

Why this shape (the smallest clean one): the unified objective's mixing (conversations and pairs in one stream,
condition dropout, the per-sample per-step generator that makes a resumed run draw the same) is reused unchanged;
only what a pair *is* differs. A code family's pair is ids (prompt + codes); a latent family's is ids (prompt,
``N`` image placeholders, ``<|eoi|>``) plus its image as media whose extras say how it is noised: ``t`` and
``noise`` drawn from the sample's generator, ``write`` = 1 (supervised). The model encodes the pixels with its
frozen VAE in the forward (models/transfusion.py ``encode_media``): the posterior mean, deterministic, and at
tiny-vae's size cheaper than keeping every latent beside the pixels; the pixels are prepared once, when the stage
binds. The objective counts an image target per written patch (:meth:`LatentPairs.counts`), which is what the
model's ``parts["image"]`` sums over.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from vlmkit.batch import IGNORE, MediaInputs
from vlmkit.data.collate import Item
from vlmkit.diffusion.flow import T_EPS


def draw_t(rng: random.Random, kind: str) -> float:
    """A training timestep from ``rng``: SD3's logit-normal (sigmoid of N(0, 1)) or uniform, in [T_EPS, 1 - T_EPS]
    (diffusion/flow.py sample_timesteps' densities, drawn from a Python generator)."""
    t = rng.random() if kind == "uniform" else 1.0 / (1.0 + math.exp(-rng.gauss(0.0, 1.0)))
    return min(max(t, T_EPS), 1 - T_EPS)


class LatentPairs:
    """Text-to-image samples whose images a latent-diffusion LM writes (module docstring)."""

    def __init__(self, pairs, processor, model, where: str, progress: bool = False, batch_size: int = 128):
        from tqdm.auto import tqdm

        self.pairs, grid = pairs, model.image_grid
        paths = sorted({p.image for p in pairs})
        pixels: dict[Path, torch.Tensor] = {}
        for start in tqdm(range(0, len(paths), batch_size), desc="pair images", unit="batch", disable=not progress,
                          dynamic_ncols=True):
            chunk = paths[start:start + batch_size]
            pixels.update(zip(chunk, processor.prepare_images(chunk, where).pixel_values))
        self.pixels = [pixels[p.image] for p in pairs]
        self.n, self.shape, self.kind = model.image_seq_len, model.latent_shape, model.cfg.gen.timesteps
        self.image_token_id, self.eoi = model.image_token_id, model.eoi_token_id
        self.cond = [processor.image_prompt(p.caption, grid, where=p.source) for p in pairs]
        self.uncond = [processor.image_prompt(p.caption, grid, unconditional=True, where=p.source) for p in pairs]
        self.text = processor.images.text()

    def __len__(self) -> int:
        return len(self.pairs)

    def length(self, i: int) -> int:
        return max(len(self.cond[i]), len(self.uncond[i])) + self.n + 1

    def item(self, i: int, unconditional: bool, rng: random.Random) -> Item:
        """Sample ``i``: its (un)conditional prompt, the image's placeholders and ``<|eoi|>``, no text label; its
        image with a t and noise drawn from ``rng``."""
        prompt = self.uncond[i] if unconditional else self.cond[i]
        ids = prompt + [self.image_token_id] * self.n + [self.eoi]
        t = draw_t(rng, self.kind)
        noise = torch.randn(1, *self.shape, generator=torch.Generator().manual_seed(rng.getrandbits(63)))
        media = MediaInputs(self.pixels[i][None], [self.n], {"t": torch.tensor([t]), "noise": noise,
                                                             "write": torch.ones(1)}, [self.text])
        n = len(ids)
        return Item(torch.tensor(ids), torch.full((n,), IGNORE), torch.arange(n), torch.zeros(n, dtype=torch.long),
                    len(prompt), media, [])

    def counts(self, batch) -> tuple[int, int]:
        """(text targets, image targets): the labelled next tokens, and the patches of the written images."""
        text = int((batch.labels[:, 1:] != IGNORE).sum())
        media = batch.media
        written = int(media.extra["write"].sum()) if media is not None and "write" in media.extra else 0
        return text, written * self.n


__all__ = ["LatentPairs", "draw_t"]
