"""Transfusion (Zhou et al. 2024, "Transfusion: Predict the Next Token and Diffuse Images with One Multi-Modal
Model"): one decoder LM over text tokens and continuous image latent patches, trained with the LM loss on text and
a diffusion loss on the image patches it writes.

Decisions, at vlmkit's tiny scale:

- **Images are blocks of latent patches.** Each image is ``<|boi|>``, ``N`` image placeholders and ``<|eoi|>``
  (processing/transfusion.py). The frozen KL-VAE (models/vae.py, ``gen.vae`` / ``gen.vae_from``; a model without
  a VAE is not built: the latent grid and the patch size are checked together here) maps a 64x64
  image to a 16x16x4 latent grid; ``patch_size`` p (default 2) cuts it into ``(16/p)^2`` patches of ``4 p p``
  values (64 patches at p = 2: as many LM positions as tiny-janus' 8x8 generation grid, and each patch 8x8 pixels,
  the size of ShapesWorld's smallest objects). ``patch_in`` (a Linear, Transfusion's "linear" patchifier; a
  small U-Net is left out at this size) maps each patch to the LM's width; the embeddings are spliced at the
  placeholders as any family's image features.
- **Where a patch is**: fixed 2-D sin-cos positions (MAE's) added to every patch embedding. RoPE gives the 64
  patches only their 1-D order; docs/generation.md's grid finding for tiny-janus (a 3-layer LM learns the 2-D
  place of codes from 1-D positions slowly) is why the 2-D place is given, not learned.
- **When**: ``TimestepEmbedding(width)`` of the image's t added to every patch of its block (Transfusion adds
  the timestep embedding to the patches; no adaLN in an LM's blocks).
- **Reading and writing.** An image read in a conversation (understanding) enters clean, at t = 0
  (Transfusion's reading path: the same patch_in, no separate tower). An image written (a text-to-image pair)
  enters noised: ``x_t = (1 - t) x0 + t noise`` with its own t and noise (diffusion/flow.py: rectified flow /
  flow matching, not Transfusion's DDPM epsilon-prediction; flow.py's docstring says why and how the two
  relate). Per image the media carry ``t``, ``noise`` and ``write`` (MediaInputs.extra); only written images
  have a diffusion loss.
- **Attention** (:meth:`TransfusionModel.attention`): causal (or packed documents) plus ``nn.with_blocks`` over
  each run of placeholders (``nn.block_ids``, which also splits runs at packed-sample starts): text is causal and
  never sees a later image, every patch sees its whole image both ways. On SDPA as every vlmkit mask.
- **Output**: ``patch_out`` (Linear width -> ``C p p``, zero-initialised so the initial velocity is 0) on the
  LM's final-normed hidden states at an image's placeholders: the predicted velocity of each patch.
- **The loss** (:meth:`TransfusionModel.loss`): text next-token cross-entropy over the labelled positions (the
  image placeholders are never labelled) and, for written images, the per-patch MSE between ``patch_out`` and
  ``patchify(noise - x0)`` (mean over the ``C p p`` values of a patch). ``ModelOutput.parts`` = {"text": (sum,
  tokens), "image": (sum of per-patch MSE, patches)}, so the unified objective's ``text_weight`` and
  ``image_weight`` (Transfusion's lambda = 5) weight them: loss = LM + lambda * diffusion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.batch import IGNORE, Batch, Features, MediaInputs, ModelOutput
from vlmkit.config import LanguageConfig, ModelConfig
from vlmkit.diffusion.embed import TimestepEmbedding, patchify
from vlmkit.diffusion.flow import add_noise, velocity_target
from vlmkit.errors import ConfigError
from vlmkit.fusion.splice import splice_image_features
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models.init import init_lm_from_scratch
from vlmkit.models.vae import VAEConfig, VAEModel, build_vae
from vlmkit.models.vlm import GenerativeModel
from vlmkit.nn import KVCache, block_attention, init_linear_, sincos_2d

MAX_STEPS = 1000  # ImageGenerationConfig's bound on gen.steps


@dataclass
class TransfusionGenConfig:
    """The image side: the frozen VAE, where a from-scratch model takes it from, the patch size, the sampler's
    default steps and the training timesteps' density."""

    vae: VAEConfig = field(default_factory=VAEConfig)
    # a vlmkit VAE checkpoint (``vlmkit train tiny-vae``'s final folder) whose config and weights a from-scratch
    # model takes; "": the ``vae`` config (untrained unless a checkpoint fills it)
    vae_from: str = ""
    patch_size: int = 2  # p: a patch is p x p latents (module docstring: 64 patches of 16x16 latents at p = 2)
    steps: int = 20  # Euler steps when a request gives 0
    timesteps: str = "logit_normal"  # training t's density (diffusion/flow.py sample_timesteps): logit_normal | uniform


@dataclass
class TransfusionConfig(ModelConfig):
    """A Transfusion model: its LM (the tokenizer's vocabulary, with ``<|boi|>`` / ``<|eoi|>``) and its image side."""

    family: str = "transfusion"
    lm: LanguageConfig = field(default_factory=LanguageConfig)
    gen: TransfusionGenConfig = field(default_factory=TransfusionGenConfig)
    boi_token_id: int | None = None  # <|boi|>, before an image's patches
    eoi_token_id: int | None = None  # <|eoi|>, after them

    def __post_init__(self):
        from vlmkit.diffusion.flow import TIMESTEP_KINDS

        g = self.gen
        if g.patch_size < 1:
            raise ConfigError(f"model.gen.patch_size must be >= 1, got {g.patch_size}")
        h, w = g.vae.grid
        if h % g.patch_size or w % g.patch_size:
            raise ConfigError(f"model.gen.patch_size {g.patch_size} does not divide the VAE's {h}x{w} latent grid; "
                              f"give a divisor of {h} and {w} (e.g. 1, 2 or 4 for 16x16)")
        if self.lm.width % 4:
            raise ConfigError(f"model.lm.width must be a multiple of 4 (the patches' 2-D sin-cos positions give a "
                              f"quarter of it to each of row sin/cos and column sin/cos), got {self.lm.width}")
        if not 1 <= g.steps <= MAX_STEPS:
            raise ConfigError(f"model.gen.steps must be in 1..{MAX_STEPS} (the default Euler steps), got {g.steps}")
        if g.timesteps not in TIMESTEP_KINDS:
            raise ConfigError(f"model.gen.timesteps must be one of {', '.join(TIMESTEP_KINDS)}, got {g.timesteps!r}")
        for name in ("boi_token_id", "eoi_token_id"):
            i = getattr(self, name)
            if i is not None and not 0 <= i < self.lm.vocab_size:
                raise ConfigError(f"model.{name} must be a token id in 0..{self.lm.vocab_size - 1}, got {i}")

    @property
    def patch_grid(self) -> tuple[int, int]:
        h, w = self.gen.vae.grid
        return h // self.gen.patch_size, w // self.gen.patch_size


class TransfusionModel(GenerativeModel):
    """Text tokens and latent patches in one DecoderLM (module docstring)."""

    def __init__(self, cfg: TransfusionConfig, vae: VAEModel, lm: DecoderLM, image_token_id: int | None):
        super().__init__()
        self.cfg, self.vae, self.lm = cfg, vae, lm
        self.image_token_id = image_token_id if image_token_id is not None else -1
        self.p = cfg.gen.patch_size
        width, values = cfg.lm.width, vae.latent_channels * self.p * self.p
        self.patch_in = nn.Linear(values, width)
        self.t_embed = TimestepEmbedding(width)
        self.patch_out = nn.Linear(width, values)
        self.register_buffer("patch_pos", sincos_2d(*cfg.patch_grid, width), persistent=False)  # MAE's 2-D sin-cos
        self.boi_token_id, self.eoi_token_id = cfg.boi_token_id, cfg.eoi_token_id

    # ------------------------------------------------------------------ shapes
    @property
    def image_grid(self) -> tuple[int, int]:
        """The latent grid (h, w) an image is drawn on."""
        return self.vae.latent_grid

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.vae.latent_channels, *self.vae.latent_grid)

    @property
    def image_seq_len(self) -> int:
        gh, gw = self.cfg.patch_grid
        return gh * gw

    @property
    def default_steps(self) -> int:
        return self.cfg.gen.steps

    @property
    def reserved_token_ids(self) -> tuple[int, ...]:
        return (self.image_token_id,) if self.image_token_id >= 0 else ()

    # ------------------------------------------------------------------ images
    def encode_latents(self, pixels) -> torch.Tensor:
        return self.vae.encode_latents(pixels)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode_latents(z)

    def patch_features(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noisy latents [n, C, h, w] at timesteps t [n] -> patch embeddings [n, N, D]: patch_in + 2-D positions +
        the timestep's embedding."""
        x = self.patch_in(patchify(x_t, self.p).to(self.patch_in.weight.dtype))
        return x + self.patch_pos.to(x.dtype) + self.t_embed(t)[:, None].to(x.dtype)

    def encode_media(self, media: MediaInputs) -> Features:
        """Images -> clean latents (the frozen VAE's posterior mean, no gradient) -> noised at each image's t with
        its noise (t = 0: read clean) -> patch embeddings [n, N, D]; ``extra`` keeps each image's velocity target
        [n, N, C p p] and whether it is written (supervised)."""
        n = len(media)
        t = media.extra.get("t", torch.zeros(n)).to(media.pixel_values.device).float()
        with torch.no_grad():
            x0 = self.vae.encode_latents(media.pixel_values)
        noise = media.extra.get("noise", torch.zeros_like(x0)).to(x0)
        write = media.extra.get("write", torch.zeros(n)).to(x0.device)
        target = patchify(velocity_target(x0, noise), self.p)
        return Features(self.patch_features(add_noise(x0, noise, t), t), [1] * n,
                        {"target": target, "write": write.float()})

    def embed(self, input_ids: torch.Tensor, features: Features | None) -> torch.Tensor:
        embeds = self.lm.embed_tokens(input_ids.masked_fill(input_ids == self.image_token_id, 0))
        return splice_image_features(embeds, input_ids, self.image_token_id,
                                     features.values if features is not None else None)

    # ------------------------------------------------------------------ the model
    def attention(self, batch: Batch, cache: KVCache | None = None) -> torch.Tensor:
        """Causal or packed documents, plus each image block both ways (module docstring)."""
        offset = cache.length if cache is not None else 0
        return block_attention(batch.input_ids == self.image_token_id, batch.attention_mask, batch.document_ids,
                               batch.segment_ids, offset)

    def hidden(self, batch: Batch, features: Features | None, cache: KVCache | None = None) -> torch.Tensor:
        embeds = self.embed(batch.input_ids, features)
        return self.lm(embeds, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                       mask=self.attention(batch, cache), cache=cache)

    def forward(self, batch: Batch, cache: KVCache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """The loss (with ``batch.labels``: :meth:`loss`) or the text logits."""
        features = self.media_features(batch)
        hidden = self.hidden(batch, features, cache)
        if batch.labels is not None:
            return self.loss(hidden, batch, features)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return ModelOutput(logits=self.lm.lm_head(hidden))

    def image_outputs(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """patch_out at every image placeholder, image by image in reading order: [n_images, N, C p p]."""
        out = self.patch_out(hidden[input_ids == self.image_token_id])
        return out.view(-1, self.image_seq_len, out.shape[-1])

    def velocity(self, batch: Batch, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The predicted velocity patches [n, N, C p p] of the images x_t [n, C, h, w] at t [n] placed at the
        placeholders of ``batch`` (one image per row in the sampler)."""
        features = Features(self.patch_features(x_t, t), [1] * len(x_t))
        return self.image_outputs(self.hidden(batch, features), batch.input_ids)

    def loss(self, hidden: torch.Tensor, batch: Batch, features: Features | None) -> ModelOutput:
        """Text: next-token cross-entropy over the labels; images: the per-patch MSE of the written images'
        velocity; the mean over both, and each kind's sum and count in ``parts``."""
        labels = batch.labels
        targets = labels[:, 1:]
        keep = targets != IGNORE
        n_text = int(keep.sum())
        t_sum = (F.cross_entropy(self.lm.lm_head(hidden[:, :-1][keep]).float(), targets[keep], reduction="sum")
                 if n_text else hidden.sum() * 0.0)
        i_sum, n_image = hidden.sum() * 0.0, 0
        if features is not None and len(features):
            write = features.extra["write"] > 0
            if bool(write.any()):
                pred = self.image_outputs(hidden, batch.input_ids)[write].float()
                per_patch = (pred - features.extra["target"][write].float()).square().mean(-1)
                i_sum, n_image = per_patch.sum(), per_patch.numel()
        n = n_text + n_image
        loss = (t_sum + i_sum) / n if n else hidden.sum() * float("nan")
        return ModelOutput(loss=loss, n_tokens=n, parts={"text": (t_sum, n_text), "image": (i_sum, n_image)})

    # ------------------------------------------------------------------ training
    def module_groups(self) -> dict[str, nn.Module]:
        """``lm`` (embeddings, blocks, head), ``connector`` (patch_in, the timestep embedding, patch_out: the layers
        between the latent space and the LM's width, both ways, in the role of a connector) and ``vae`` (a separate
        pretrained autoencoder: no recipe trains it, and no gradient reaches it)."""
        connector = nn.ModuleDict({"patch_in": self.patch_in, "t_embed": self.t_embed, "patch_out": self.patch_out})
        return {"lm": self.lm, "connector": connector, "vae": self.vae}

    def image_tower(self) -> nn.Module:
        raise ConfigError("transfusion reads images as VAE latent patches through a linear patch_in: there is no "
                          "image tower to pretrain (objective cell_labels)")


def build_transfusion(cfg: TransfusionConfig, image_token_id: int | None, init: bool = True) -> TransfusionModel:
    """The Transfusion model of ``cfg`` (the VAE's weights come from ``gen.vae_from`` or a checkpoint). ``init``:
    the LM as vlmkit's from-scratch LMs (tiny-showo's), patch_in and the timestep MLP as the LM's linears,
    patch_out zero (the initial velocity is 0)."""
    model = TransfusionModel(cfg, build_vae(cfg.gen.vae, init), DecoderLM(cfg.lm), image_token_id)
    if init and not any(p.is_meta for p in model.parameters()):
        with torch.no_grad():
            init_lm_from_scratch(model.lm, cfg.lm)
            init_linear_(model.patch_in)
            init_linear_(model.t_embed)
            nn.init.zeros_(model.patch_out.weight)
            nn.init.zeros_(model.patch_out.bias)
    return model


__all__ = ["TransfusionConfig", "TransfusionGenConfig", "TransfusionModel", "build_transfusion"]
