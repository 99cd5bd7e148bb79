"""Contrastive dual encoders: CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023).

An image tower (the core's :class:`~vlmkit.encoders.vit.ViTEncoder` plus a pooling) and a text tower (the same
pre-norm :class:`~vlmkit.encoders.vit.ViTBlock` over token embeddings) each give one vector per input; the
vectors are projected into a joint space, L2-normalised, and compared by a learned temperature (and, for the
sigmoid loss, a learned bias).

=====================  ==========================================  ============================================
                       CLIP (family ``clip``)                      SigLIP (family ``siglip``)
=====================  ==========================================  ============================================
image pooling          class token after the final LayerNorm       attention-pooling head (a learned probe
                                                                   attends over the final-normed patches)
image projection       bias-free linear                            none: the head's output is the embedding
text attention         causal                                      both ways, over text padded to the context
text pooling           first end-of-text token                     last position
text projection        bias-free linear                            linear with bias
logits                 exp(t) * cos                                exp(t) * cos + b
loss                   symmetric InfoNCE                           pairwise sigmoid
=====================  ==========================================  ============================================

The losses live in :mod:`vlmkit.objectives.contrastive` (correct under data parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.batch import Batch, MediaInputs
from vlmkit.config import ModelConfig, VisionConfig
from vlmkit.encoders.cnn import ConvEncoder
from vlmkit.encoders.vit import ViTBlock, ViTEncoder
from vlmkit.errors import ConfigError
from vlmkit.nn import MLP


@dataclass
class TextConfig:
    """The text tower of a dual encoder (families ``clip`` and ``siglip``): token and learned position embeddings,
    pre-norm transformer blocks (the ViT's), a final LayerNorm and one pooled vector per text.

    CLIP's is causal and pools the first end-of-text token; SigLIP's attends both ways over text padded to the
    context length and pools the last position."""

    vocab_size: int = 49408
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    context_length: int = 77  # learned positions; longer texts are truncated by the processor (and counted)
    causal: bool = True
    # eos: the first ``eos_token_id`` (CLIP); argmax: the highest id (CLIP configs whose eos_token_id is the
    # legacy 2, where end-of-text is the last id of the vocabulary); last: the last position (SigLIP)
    pool: str = "eos"
    eos_token_id: int = 49407  # set from the tokenizer when a recipe builds the model


@dataclass
class ContrastiveConfig:
    """How a dual encoder embeds, compares and learns (CLIP: Radford et al. 2021; SigLIP: Zhai et al. 2023)."""

    embed_dim: int = 512  # width of the joint space (CLIP's projection_dim; SigLIP's text projection_size)
    # class_token: the class token after the final norm (CLIP); map: SigLIP's attention-pooling head over the
    # final-normed patches; mean: the mean of the final-normed tokens
    image_pool: str = "class_token"
    # CLIP: bias-free linear projections of both towers. SigLIP: none after the image head (its output is the
    # embedding), a linear head with bias after the text tower
    projection: str = "clip"  # clip | siglip
    loss: str = "clip"  # clip: symmetric InfoNCE over the batch; siglip: pairwise sigmoid
    logit_scale_init: float = 2.6592  # log(1 / 0.07), CLIP's; SigLIP starts at log(10)
    logit_bias_init: float = -10.0  # SigLIP's learned bias (used only with loss siglip or projection siglip)
    # training clamps the learned log scale to at most this after every step (CLIP caps the scale at
    # 100 = exp(4.6052)); 0: never clamped (SigLIP)
    max_logit_scale: float = 4.6052


@dataclass
class DualEncoderConfig(ModelConfig):
    """A contrastive dual encoder (families ``clip`` and ``siglip``): an image tower (``vision``) and a text tower
    (``text``) meeting in a joint space (``contrastive``)."""

    family: str = "clip"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    image_token: str = ""


IMAGE_POOLS = ("class_token", "map", "mean")
TEXT_POOLS = ("eos", "argmax", "last")
PROJECTIONS = ("clip", "siglip")
LOSSES = ("clip", "siglip")


@dataclass
class ContrastiveOutput:
    image_embeds: torch.Tensor  # [B, E], L2-normalised
    text_embeds: torch.Tensor  # [B, E], L2-normalised
    logits_per_image: torch.Tensor  # [B_images, B_texts]: exp(scale) * cosine (+ bias)
    loss: torch.Tensor | None = None


class AttentionPool(nn.Module):
    """SigLIP's multihead attention pooling ("MAP") head: one learned probe attends over the tokens, then a
    residual MLP on its LayerNorm. Returns [B, D]."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, act: str, eps: float):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, dim))
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attention(self.probe.expand(x.shape[0], -1, -1), x, x, need_weights=False)[0]
        h = h + self.mlp(self.norm(h))
        return h[:, 0]


class ImageTower(nn.Module):
    """ViT -> pooled vector -> projection into the joint space."""

    def __init__(self, cfg: VisionConfig, ccfg: ContrastiveConfig):
        super().__init__()
        _check_image_tower(cfg, ccfg)
        self.encoder = ViTEncoder(cfg) if cfg.arch == "vit" else ConvEncoder(cfg)
        self.pool = ccfg.image_pool
        self.head = (AttentionPool(cfg.width, cfg.heads, cfg.mlp_dim, cfg.act, cfg.norm_eps)
                     if ccfg.image_pool == "map" else None)
        self.proj = nn.Linear(cfg.width, ccfg.embed_dim, bias=False) if ccfg.projection == "clip" else None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.encoder(pixel_values)  # [B, (1 +) N, D], after the final norm
        if self.pool == "class_token":
            pooled = x[:, 0]
        elif self.pool == "map":
            pooled = self.head(x)
        else:
            pooled = x.mean(dim=1)
        return self.proj(pooled) if self.proj is not None else pooled


class TextTower(nn.Module):
    """Token + learned position embeddings -> pre-norm blocks (causal or not) -> pooled, LayerNormed ->
    projection into the joint space."""

    def __init__(self, cfg: TextConfig, ccfg: ContrastiveConfig):
        super().__init__()
        if cfg.pool not in TEXT_POOLS:
            raise ConfigError(f"text.pool must be one of {', '.join(TEXT_POOLS)}, got {cfg.pool!r}")
        if cfg.pool == "last" and cfg.causal:
            raise ConfigError("text.pool 'last' with text.causal: true reads only the last token's prefix and "
                              "depends on how much padding follows the text; use pool 'eos' for a causal tower")
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(ViTBlock(cfg.width, cfg.heads, cfg.mlp_dim, cfg.act, "layernorm", cfg.norm_eps,
                                             qkv_bias=True) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.width, ccfg.embed_dim, bias=ccfg.projection == "siglip")

    def pool_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B] position each text is read at."""
        if self.cfg.pool == "last":
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        if self.cfg.pool == "argmax":
            return input_ids.argmax(dim=-1)
        is_eos = input_ids == self.cfg.eos_token_id
        if not bool(is_eos.any(dim=-1).all()):
            row = int((~is_eos.any(dim=-1)).nonzero()[0])
            raise ValueError(f"text {row} of the batch has no end-of-text token (id {self.cfg.eos_token_id}), where "
                             f"this CLIP text tower reads it; encode texts with the model's processor")
        return is_eos.int().argmax(dim=-1)  # the first end-of-text token

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] (T <= context_length) -> [B, E]."""
        T = input_ids.shape[1]
        if T > self.cfg.context_length:
            raise ValueError(f"texts of {T} tokens exceed the text tower's context_length {self.cfg.context_length}; "
                             f"the processor truncates them (processor max_length)")
        x = self.token_embed(input_ids) + self.pos_embed[:T]
        for block in self.blocks:
            x = block(x, is_causal=self.cfg.causal)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.pool_index(input_ids)]
        return self.proj(self.norm(pooled))  # LayerNorm is per token: norm(x)[i] == norm(x[i])


class LogitScale(nn.Module):
    """The learned temperature (stored as log scale, as CLIP and SigLIP do) and SigLIP's learned bias."""

    def __init__(self, scale_init: float, bias_init: float | None):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        self.bias = nn.Parameter(torch.tensor(float(bias_init))) if bias_init is not None else None

    def forward(self, similarity: torch.Tensor) -> torch.Tensor:
        logits = similarity * self.scale.exp()
        return logits + self.bias if self.bias is not None else logits


class DualEncoder(nn.Module):
    """CLIP / SigLIP: ``encode_images``, ``encode_texts`` (L2-normalised embeddings) and ``forward`` (logits and,
    by default, the configured contrastive loss over the batch)."""

    def __init__(self, cfg: DualEncoderConfig):
        super().__init__()
        ccfg = cfg.contrastive
        if ccfg.projection not in PROJECTIONS:
            raise ConfigError(f"contrastive.projection must be one of {', '.join(PROJECTIONS)}, got {ccfg.projection!r}")
        if ccfg.loss not in LOSSES:
            raise ConfigError(f"contrastive.loss must be one of {', '.join(LOSSES)}, got {ccfg.loss!r}")
        self.cfg = cfg
        self.vision = ImageTower(cfg.vision, ccfg)
        self.text = TextTower(cfg.text, ccfg)
        has_bias = ccfg.loss == "siglip" or ccfg.projection == "siglip"
        self.logits = LogitScale(ccfg.logit_scale_init, ccfg.logit_bias_init if has_bias else None)

    @property
    def embed_dim(self) -> int:
        return self.cfg.contrastive.embed_dim

    def module_groups(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "text": self.text, "logits": self.logits}

    def image_tower(self) -> nn.Module:
        return self.vision.encoder

    def encode_images(self, images: MediaInputs | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Images (the processor's MediaInputs, or pixels [B, C, H, W]) -> [B, E]."""
        pixels = images.pixel_values if isinstance(images, MediaInputs) else images
        z = self.vision(pixels)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_texts(self, input_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, T] token ids -> [B, E]."""
        z = self.text(input_ids)
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, batch: Batch, return_loss: bool = True, gather: bool | None = None) -> ContrastiveOutput:
        """A batch of images (``batch.media``) and their texts (``batch.input_ids`` [B, T]: row i describes image
        i) -> embeddings, logits and the loss. Under torch.distributed the loss compares against every rank's batch
        (``gather``)."""
        from vlmkit.objectives.contrastive import contrastive_loss

        img = self.encode_images(batch.media)
        txt = self.encode_texts(batch.input_ids)
        logits = self.logits(img @ txt.t())
        loss = None
        if return_loss:
            loss = contrastive_loss(img, txt, self.logits.scale, self.logits.bias, self.cfg.contrastive.loss, gather)
        return ContrastiveOutput(img, txt, logits, loss)

    def clamp_logit_scale(self) -> None:
        """CLIP caps the learned scale at 100 (open_clip clamps it after every optimizer step)."""
        if self.cfg.contrastive.max_logit_scale > 0:
            with torch.no_grad():
                self.logits.scale.clamp_(max=self.cfg.contrastive.max_logit_scale)


def _check_image_tower(cfg: VisionConfig, ccfg: ContrastiveConfig) -> None:
    if cfg.arch not in ("vit", "cnn"):
        raise ConfigError(f"a dual encoder's image tower is a ViT or a CNN (vision.arch: vit | cnn), got {cfg.arch!r}")
    if ccfg.image_pool not in IMAGE_POOLS:
        raise ConfigError(f"contrastive.image_pool must be one of {', '.join(IMAGE_POOLS)}, got {ccfg.image_pool!r}")
    if ccfg.projection == "siglip" and ccfg.embed_dim != cfg.width:
        raise ConfigError(f"with contrastive.projection 'siglip' the image embedding is the pooled tower output: "
                          f"contrastive.embed_dim ({ccfg.embed_dim}) must equal vision.width ({cfg.width})")
    if cfg.arch == "cnn":
        if ccfg.image_pool == "class_token":
            raise ConfigError("vision.arch 'cnn' has no class token: set contrastive.image_pool to 'map' (attention "
                              "pooling, as CLIP's ResNets) or 'mean'")
        return
    if cfg.feature_layer not in (-1, cfg.depth):
        raise ConfigError(f"a dual encoder pools the last layer: vision.feature_layer must be -1, got "
                          f"{cfg.feature_layer}")
    if not cfg.post_norm:
        raise ConfigError("a dual encoder pools after the tower's final norm: set vision.post_norm: true")
    if ccfg.image_pool == "class_token" and (not cfg.class_token or cfg.drop_class_token):
        raise ConfigError("contrastive.image_pool 'class_token' needs vision.class_token: true and "
                          "vision.drop_class_token: false")


def build_dual_encoder(cfg: DualEncoderConfig, image_token_id=None, init: bool = True) -> DualEncoder:
    model = DualEncoder(cfg)
    if init:
        init_dual_encoder(model, cfg)
    return model


def init_dual_encoder(model: DualEncoder, cfg: DualEncoderConfig) -> None:
    """From-scratch initialisation as OpenAI's CLIP (open_clip's ``init_parameters``), for both layouts.

    Text tower: token embeddings at std 0.02, positions at 0.01, attention at width^-0.5, the MLP's input at
    (2 width)^-0.5, and the projections writing into the residual stream at width^-0.5 (2 depth)^-0.5. Image tower:
    PyTorch's default init of its linear layers (OpenAI defined none), class token and positions at width^-0.5.
    Projections into the joint space at width^-0.5; SigLIP's probe at width^-0.5.

    The scales matter: with GPT-2's 0.02 everywhere, the pooled class token of a from-scratch ViT is nearly the
    same vector for every image (cosine 0.999 across a batch), the first steps collapse both towers to one
    embedding, and the loss stays at log(batch) with vanishing gradients (ShapesWorld, tiny-clip).
    """
    if any(p.is_meta for p in model.parameters()):
        return
    with torch.no_grad():
        text, w = model.text, cfg.text.width
        nn.init.normal_(text.token_embed.weight, std=0.02)
        nn.init.normal_(text.pos_embed, std=0.01)
        proj_std = w ** -0.5 * (2 * cfg.text.depth) ** -0.5
        for block in text.blocks:
            for lin in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj):
                nn.init.normal_(lin.weight, std=w ** -0.5)
            nn.init.normal_(block.attn.o_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * w) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
            for lin in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.o_proj, block.mlp.fc1,
                        block.mlp.fc2):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        encoder, v = model.vision.encoder, cfg.vision.width
        if getattr(encoder, "class_token", None) is not None:
            nn.init.normal_(encoder.class_token, std=v ** -0.5)
        if isinstance(encoder.pos_embed, nn.Parameter):
            nn.init.normal_(encoder.pos_embed, std=v ** -0.5)
        for proj in (model.vision.proj, text.proj):
            if proj is not None:
                nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)
        if model.vision.head is not None:
            nn.init.normal_(model.vision.head.probe, std=v ** -0.5)


__all__ = ["AttentionPool", "ContrastiveConfig", "DualEncoderConfig", "TextConfig", "ContrastiveOutput", "DualEncoder", "ImageTower", "LogitScale", "TextTower",
           "build_dual_encoder"]
