"""Idefics2's model: a SigLIP-like NaViT tower on images of their own size, the perceiver connector (a SwiGLU
projection and a resampler to ``n_latents`` tokens per image or crop), spliced into a Mistral LM.

The tower (:class:`NaViTEncoder`) is vlmkit's ViT with transformers' ``Idefics2VisionEmbeddings`` positions: an
image of gh x gw patches takes, along each axis, the bucket of its fractional coordinate ``i / g`` among the
``side`` buckets of the position table (``side`` = image_size // patch_size), so every image, whatever its size,
spans the whole table. transformers pads a batch's images to the largest and masks the padded patches in the
tower's attention and in the resampler; vlmkit lists each image's patches alone (processing/idefics2.py) and pads
them here with the same masks, which gives the same numbers (a masked key has zero weight).
"""

from __future__ import annotations

import torch

from vlmkit.batch import Features, MediaInputs
from vlmkit.config import VLMConfig
from vlmkit.connectors import build_connector
from vlmkit.encoders.vit import ViTEncoder
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models.init import check_head_init, init_from_scratch
from vlmkit.models.vlm import VisionLanguageModel


def bucketed_positions(side: int, gh: int, gw: int) -> torch.Tensor:
    """The position ids [gh * gw] of a gh x gw patch grid on a ``side`` x ``side`` position table, computed as
    transformers' ``Idefics2VisionEmbeddings`` does (float32 coordinates, bucketize)."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    counts = torch.tensor([gh, gw])
    step = 1.0 / counts  # float32, as transformers divides by the integer patch counts
    h = torch.clamp(torch.arange(gh, dtype=torch.float32) * step[0], max=1.0 - 1e-6)
    w = torch.clamp(torch.arange(gw, dtype=torch.float32) * step[1], max=1.0 - 1e-6)
    bh, bw = torch.bucketize(h, boundaries, right=True), torch.bucketize(w, boundaries, right=True)
    return (bh[:, None] * side + bw[None, :]).reshape(-1)


class NaViTEncoder(ViTEncoder):
    """The ViT on images of any size up to the position table's (module docstring). ``encode(patches, grids)``:
    the patches [sum of gh * gw, C, p, p] of several images, each image's (gh, gw) -> padded features
    [n, max gh * gw, D] and their mask [n, max gh * gw] (True = a real patch)."""

    def __init__(self, cfg):
        if cfg.pos_embed != "learned" or cfg.class_token or cfg.stem != "patch":
            raise ValueError("the NaViT tower needs vision.pos_embed: learned, class_token: false, stem: patch "
                             f"(got {cfg.pos_embed!r}, {cfg.class_token}, {cfg.stem!r})")
        super().__init__(cfg)
        self.side = cfg.grid[0]

    def encode(self, patches: torch.Tensor, grids: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.patch_embed.weight.dtype
        x = self.patch_embed(patches.to(dtype)).flatten(1)  # [sum N, D]: each patch is one conv window
        sizes = [gh * gw for gh, gw in grids]
        n_max = max(sizes)
        out = x.new_zeros(len(grids), n_max, x.shape[-1])
        mask = torch.zeros(len(grids), n_max, dtype=torch.bool, device=x.device)
        for i, (part, (gh, gw)) in enumerate(zip(x.split(sizes), grids)):
            pos = bucketed_positions(self.side, gh, gw).to(x.device)
            out[i, :len(part)] = part + self.pos_embed[0, pos]
            mask[i, :len(part)] = True
        attn_mask = mask[:, None, None, :]
        for block in self.blocks:
            out = block(out, mask=attn_mask)
        if self.post_norm is not None:
            out = self.post_norm(out)
        return out, mask

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Whole images [n, C, H, W] of the table's size -> features [n, N, D] (``image_tower()``)."""
        gh, gw = self.grid
        p = self.patch_size
        n, c = pixel_values.shape[:2]
        patches = pixel_values.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, p, p)
        return self.encode(patches, [(gh, gw)] * n)[0]


class Idefics2Model(VisionLanguageModel):
    """Idefics2's model: ``encode_media`` takes each image's crops as patch lists (``media.extra["grids"]``
    [n_images, crops, 2]: each crop's patch grid) and gives ``n_latents`` features per crop, each image's crops
    as its rows."""

    @property
    def image_seq_len(self) -> int:
        return self.connector.n_latents

    def encode_media(self, media: MediaInputs) -> Features:
        grids = media.extra["grids"]
        crops = [(int(h), int(w)) for h, w in grids.reshape(-1, 2).tolist()]
        states, mask = self.encoder.encode(media.pixel_values, crops)
        values = self.connector(states, mask=mask)  # [n_crops, M, D_lm]
        return Features(values, [grids.shape[1]] * grids.shape[0])


def build_idefics2(cfg: VLMConfig, image_token_id: int, init: bool = True) -> Idefics2Model:
    """The NaViT tower, the perceiver connector and the decoder of ``cfg``."""
    check_head_init(cfg)
    if cfg.vision.arch != "vit" or cfg.connector.kind != "perceiver":
        raise ValueError(f"the idefics2 family needs vision.arch: vit and connector.kind: perceiver, got "
                         f"{cfg.vision.arch!r} and {cfg.connector.kind!r}")
    connector = build_connector(cfg.connector, cfg.vision.width, cfg.lm.width)
    model = Idefics2Model(NaViTEncoder(cfg.vision), connector, DecoderLM(cfg.lm), image_token_id)
    if init:
        init_from_scratch(model, cfg)
    return model


__all__ = ["Idefics2Model", "NaViTEncoder", "bucketed_positions", "build_idefics2"]
