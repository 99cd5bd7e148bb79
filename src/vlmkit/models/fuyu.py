"""Fuyu (Bavishi et al. 2023, Adept's Fuyu-8B): a decoder-only LM that reads images without an image encoder.

Each image is cut into ``patch_size`` x ``patch_size`` x ``num_channels`` patches (processing/fuyu.py); one Linear
(transformers' ``vision_embed_tokens``, here :attr:`FuyuModel.patch_embed`) maps every patch to the LM's width, and
the patch embeddings take the places of the image token (``|SPEAKER|``) in the text, in reading order. The text
marks the end of each row of patches with ``|NEWLINE|``, an ordinary token: there are no image positions other
than the LM's own. The LM is Persimmon (lm/decoder.py: LayerNorms, squared-ReLU MLP, query/key LayerNorms,
rotary on half of each head).

What an encoder-free model is to shared code:

- ``encode_media`` is the patch projection: ``Features`` of flat rows [total patches, D], each image's patches its
  rows, so a feature cache or the serving engine splits and joins them per image like any family's;
- ``module_groups``: ``connector`` is the patch projection (the only image-specific weights: it maps pixels into
  the LM's space, as a projector maps a tower's features) and ``lm`` the decoder. There is no ``vision`` group:
  nothing sees an image before the LM does. What sees the images is the projection and the LM together, and
  ``image_tower()`` is a view of them (:class:`PatchTower`: whole images -> the LM's states at their patches),
  which a ``cell_labels`` stage pretrains (the family's ``image_groups``);
- attention and positions are the decoder's (causal; packed documents by ``Batch.document_ids``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vlmkit.batch import Batch, Features, MediaInputs
from vlmkit.config import LanguageConfig, ModelConfig
from vlmkit.errors import ConfigError
from vlmkit.fusion.splice import splice_image_features
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models.init import init_lm_from_scratch
from vlmkit.models.vlm import GenerativeModel, lm_output
from vlmkit.nn import KVCache

IMAGE_TOKEN = "|SPEAKER|"  # FuyuProcessor's image token: each patch's place in the text
NEWLINE_TOKEN = "|NEWLINE|"  # the end of a row of patches


def persimmon_lm(**kw) -> LanguageConfig:
    """A LanguageConfig of Persimmon's kind (Fuyu's LM): LayerNorms with biases, biases on every projection, a plain
    squared-ReLU MLP, query/key LayerNorms and rotary on half of each head; ``kw`` sets the shape."""
    base = dict(norm="layernorm", mlp="plain", bias=True, act="relu2", qk_norm=True, rotary_fraction=0.5,
                rope_theta=25000.0, norm_eps=1e-5, tie_embeddings=False)
    return LanguageConfig(**{**base, **kw})


@dataclass
class FuyuConfig(ModelConfig):
    """A Fuyu model: its LM, and the patches its one Linear reads (``patch_size`` x ``patch_size`` x
    ``num_channels`` values each, in transformers' order: rows, columns, channels)."""

    family: str = "fuyu"
    lm: LanguageConfig = field(default_factory=persimmon_lm)
    patch_size: int = 30
    num_channels: int = 3
    image_token: str = IMAGE_TOKEN
    # the (height, width) images are fitted into: the processor's target, cut into the grid of image_tower()
    image_size: tuple[int, int] = (1080, 1920)
    # the tokenizer's |NEWLINE| (the row break): image_tower() lays patches out with it, as a prompt does
    newline_token_id: int | None = None
    # training only (inference and transformers' FuyuForCausalLM have no such setting): image_tower() gives the LM's
    # states after this many layers (0: all, its final states), so that a cell_labels stage teaches the lower
    # layers to see and leaves the upper ones free to find and compare what they saw (recipes/tiny-fuyu.yaml)
    tower_layers: int = 0

    def __post_init__(self):
        if self.patch_size < 1 or self.num_channels < 1:
            raise ConfigError(f"fuyu patch_size {self.patch_size} and num_channels {self.num_channels} must be >= 1")
        self.image_size = tuple(self.image_size)
        if len(self.image_size) != 2 or any(s < self.patch_size or s % self.patch_size for s in self.image_size):
            raise ConfigError(f"fuyu image_size {self.image_size} must be whole multiples of patch_size "
                              f"{self.patch_size} (the (height, width) target images are fitted into)")
        if not 0 <= self.tower_layers <= self.lm.depth:
            raise ConfigError(f"fuyu tower_layers {self.tower_layers}: the LM layers image_tower() reads after, "
                              f"from 1 to lm.depth ({self.lm.depth}), or 0 for all of them")

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.num_channels


class PatchTower(nn.Module):
    """What sees a Fuyu model's images, as a tower (module docstring): whole images [n, C, H, W] -> the LM's states
    at their patches [n, rows * cols, D] in reading order. The LM reads each image as a prompt holds it: the
    patches cut as the processor cuts them (rows, columns, then each patch's rows, columns and channels), each row
    of patches followed by the ``|NEWLINE|`` token, so what it learns here (the patch above is a row plus one
    back) is what it meets in a prompt. The states are the LM's final ones, or with ``layers`` those after its
    first ``layers`` blocks, layer-normed without weights (FuyuConfig.tower_layers). A view: its modules are the
    model's own."""

    def __init__(self, patch_embed: nn.Linear, lm: DecoderLM, patch_size: int, grid: tuple[int, int],
                 newline_token_id: int, layers: int = 0):
        super().__init__()
        self.patch_embed, self.lm, self.patch, self.grid = patch_embed, lm, patch_size, grid
        self.newline, self.layers = newline_token_id, layers
        self.width = lm.cfg.width

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        n, c, h, w = pixel_values.shape
        p = self.patch
        if (h // p, w // p) != self.grid or h % p or w % p:
            raise ValueError(f"fuyu's image tower cuts {self.grid[0] * p}x{self.grid[1] * p} images into "
                             f"{self.grid[0]}x{self.grid[1]} patches of {p}; got {h}x{w}")
        rows, cols = self.grid
        x = pixel_values.reshape(n, c, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1).reshape(n, rows, cols, p * p * c)
        breaks = self.lm.embed_tokens.weight[self.newline].expand(n, rows, 1, -1)
        embeds = torch.cat([self.patch_embed(x), breaks], dim=2).reshape(n, rows * (cols + 1), -1)
        if self.layers:
            states = self.lm(embeds, depth=self.layers)
            states = nn.functional.layer_norm(states, states.shape[-1:], eps=self.lm.cfg.norm_eps)
        else:
            states = self.lm(embeds)
        return states.reshape(n, rows, cols + 1, -1)[:, :, :cols].reshape(n, rows * cols, -1)


class FuyuModel(GenerativeModel):
    """patches -> Linear -> spliced at the image tokens of a Persimmon ``DecoderLM`` (module docstring)."""

    def __init__(self, patch_embed: nn.Linear, lm: DecoderLM, image_token_id: int, patch_size: int,
                 grid: tuple[int, int], newline_token_id: int | None = None, tower_layers: int = 0):
        super().__init__()
        self.patch_embed = patch_embed
        self.lm = lm
        self.image_token_id, self.newline_token_id = image_token_id, newline_token_id
        self.patch_size, self.grid, self.tower_layers = patch_size, grid, tower_layers

    def encode_media(self, media: MediaInputs) -> Features:
        """Patches [total patches, patch_dim] -> LM-space rows [total patches, D], each image's patches together."""
        if media.pixel_values.ndim != 2 or media.pixel_values.shape[-1] != self.patch_embed.in_features:
            raise ValueError(f"fuyu reads patches [n, {self.patch_embed.in_features}], got "
                             f"{tuple(media.pixel_values.shape)}: the processor's patch_size must be the model's")
        return Features(self.patch_embed(media.pixel_values), media.item_rows())

    def embed(self, input_ids: torch.Tensor, features: Features | None) -> torch.Tensor:
        ids = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        return splice_image_features(self.lm.embed_tokens(ids), input_ids, self.image_token_id,
                                     features.values if features is not None else None)

    def forward(self, batch: Batch, cache: KVCache | None = None, logits_to_keep: int = 0):
        embeds = self.embed(batch.input_ids, self.media_features(batch))
        hidden = self.lm(embeds, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                         mask=self.attention(batch, cache), cache=cache)
        return lm_output(self.lm.lm_head, hidden, batch.labels, logits_to_keep)

    def module_groups(self) -> dict[str, nn.Module]:
        return {"connector": self.patch_embed, "lm": self.lm}

    def image_tower(self) -> PatchTower:
        """The patch projection and the LM as a tower over whole target-size images (:class:`PatchTower`)."""
        if self.newline_token_id is None:
            raise ValueError("fuyu's image tower lays each row of patches out with its |NEWLINE| token, and this "
                             "model's config has no newline_token_id (set it to the tokenizer's |NEWLINE| id)")
        return PatchTower(self.patch_embed, self.lm, self.patch_size, self.grid, self.newline_token_id,
                          self.tower_layers)


def build_fuyu(cfg: FuyuConfig, image_token_id: int, init: bool = True) -> FuyuModel:
    """A FuyuModel from its config; ``init``: vlmkit's from-scratch initialisation (GPT-2's std 0.02 for the LM,
    residual outputs scaled by depth, the head at ``lm.head_init_std`` when set; fan-in for the patch projection,
    so patch embeddings enter the LM at about unit scale, as a connector's do)."""
    if cfg.lm.head_init_std is not None and cfg.lm.tie_embeddings:
        raise ValueError("lm.head_init_std initialises an untied LM head; with lm.tie_embeddings: true the head "
                         "is the token embedding (set tie_embeddings: false, or leave head_init_std unset)")
    grid = (cfg.image_size[0] // cfg.patch_size, cfg.image_size[1] // cfg.patch_size)
    model = FuyuModel(nn.Linear(cfg.patch_dim, cfg.lm.width), DecoderLM(cfg.lm), image_token_id, cfg.patch_size, grid,
                      cfg.newline_token_id, cfg.tower_layers)
    if init and not any(p.is_meta for p in model.parameters()):
        with torch.no_grad():
            nn.init.normal_(model.patch_embed.weight, std=cfg.patch_dim ** -0.5)
            nn.init.zeros_(model.patch_embed.bias)
            init_lm_from_scratch(model.lm, cfg.lm)
    return model


__all__ = ["FuyuConfig", "FuyuModel", "PatchTower", "IMAGE_TOKEN", "NEWLINE_TOKEN", "build_fuyu", "persimmon_lm"]
