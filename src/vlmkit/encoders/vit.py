"""Vision Transformer image encoder (Dosovitskiy et al. 2020), configurable into CLIP-ViT and SigLIP-ViT.

CLIP: class token, learned positions, ``pre_norm`` on the embeddings, quick-GELU, LLaVA reads layer -2.
SigLIP: no class token, learned positions, tanh-GELU, final norm.  From scratch: any mix, e.g. fixed 2D
sine-cosine positions (unit-scale position information from the first step) or 2D rotary.
Returns patch features [B, N, D] from the selected layer (class token dropped unless asked otherwise).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.config import VisionConfig
from vlmkit.nn import MLP, Attention, Rotary2D, make_norm, sincos_2d


class ConvStem(nn.Module):
    """Early convolutions (Xiao et al. 2021, "Early Convolutions Help Transformers See Better").

    log2(patch) stride-2 3x3 convs with a norm + GELU, then a 1x1 conv to the width: the same token grid as a
    patch embedding, with a locality prior that makes from-scratch training far faster on small data. The
    paper's norm is BatchNorm (``norm="batch"``; batch statistics in training, running averages in eval);
    ``"group"`` (GroupNorm with one group) keeps every image independent of its batch.
    """

    def __init__(self, channels: int, width: int, patch_size: int, norm: str = "group"):
        super().__init__()
        n = patch_size.bit_length() - 1
        if 2**n != patch_size or n < 1:
            raise ValueError(f"vision.stem 'conv' needs a power-of-two patch_size, got {patch_size}")
        norms = {"group": lambda c: nn.GroupNorm(1, c), "batch": nn.BatchNorm2d}
        if norm not in norms:
            raise ValueError(f"vision.stem_norm must be 'group' or 'batch', got {norm!r}")
        layers, c_in = [], channels
        for i in range(n):
            c_out = max(16, width // 2 ** (n - i))
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), norms[norm](c_out), nn.GELU()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [B, C, H, W] -> [B, D, H/p, W/p]


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)); x + mlp(norm(x)). Also the block of the dual encoders'
    text towers, which attend causally (CLIP) or both ways (SigLIP)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, act: str, norm: str, eps: float, qkv_bias: bool):
        super().__init__()
        self.norm1 = make_norm(norm, dim, eps)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias, out_bias=qkv_bias)
        self.norm2 = make_norm(norm, dim, eps)
        self.mlp = MLP(dim, mlp_dim, act=act)

    def residual_outputs(self) -> tuple[nn.Linear, ...]:
        """The projections that write into the residual stream (scaled by depth at a from-scratch init)."""
        return self.attn.o_proj, self.mlp.output

    def forward(self, x: torch.Tensor, rope=None, mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask, is_causal=is_causal, rope=rope)
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """Patch embedding -> [class token] -> positions -> pre-norm blocks -> features of the chosen layer."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.image_size = tuple(cfg.image_size)
        self.patch_size = cfg.patch_size
        self.feature_layer = cfg.feature_layer
        self.drop_class_token = cfg.drop_class_token
        self.width = cfg.width
        gh, gw = cfg.grid
        self.grid = (gh, gw)
        if cfg.pos_scale != 1.0:
            raise ValueError("vision.pos_scale is for arch 'cnn' (its fixed positions); the ViT's are learned or "
                             "rotary, or added before its blocks")
        if cfg.stem == "patch":
            self.patch_embed = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        elif cfg.stem == "conv":
            self.patch_embed = ConvStem(cfg.channels, cfg.width, cfg.patch_size, cfg.stem_norm)
        else:
            raise ValueError(f"vision.stem must be 'patch' or 'conv', got {cfg.stem!r}")
        self.class_token = nn.Parameter(torch.zeros(1, 1, cfg.width)) if cfg.class_token else None
        n_pos = gh * gw + (1 if cfg.class_token else 0)
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, n_pos, cfg.width) * 0.02)
            self.rope = None
        elif cfg.pos_embed == "sincos2d":
            if cfg.class_token:
                raise ValueError("vision.pos_embed 'sincos2d' has no position for a class token; "
                                 "use class_token: false (pooling) or pos_embed: learned")
            # a buffer, not a parameter: fixed, and kept out of checkpoints (rebuilt from the config)
            self.register_buffer("pos_embed", sincos_2d(gh, gw, cfg.width)[None], persistent=False)
            self.rope = None
        elif cfg.pos_embed == "rope2d":
            self.pos_embed = None
            self.rope = Rotary2D(cfg.width // cfg.heads, cfg.rope_theta)
        else:
            raise ValueError(f"vision.pos_embed must be 'learned', 'sincos2d' or 'rope2d', got {cfg.pos_embed!r}")
        self.pre_norm = make_norm(cfg.norm, cfg.width, cfg.norm_eps) if cfg.pre_norm else None
        n_run = self._layers_to_run(cfg.depth, cfg.feature_layer)
        self.blocks = nn.ModuleList(
            ViTBlock(cfg.width, cfg.heads, cfg.mlp_dim, cfg.act, cfg.norm, cfg.norm_eps, cfg.qkv_bias)
            for _ in range(n_run)
        )
        self.post_norm = make_norm(cfg.norm, cfg.width, cfg.norm_eps) if cfg.post_norm else None

    @staticmethod
    def _layers_to_run(depth: int, feature_layer: int) -> int:
        """Blocks after the feature layer never influence the output, so they are not built at all."""
        idx = feature_layer if feature_layer >= 0 else depth + 1 + feature_layer
        if not 0 <= idx <= depth:
            raise ValueError(f"vision.feature_layer {feature_layer} is outside 0..{depth} (or -1..-{depth + 1})")
        return idx

    @property
    def num_tokens(self) -> int:
        n = self.grid[0] * self.grid[1]
        return n + (1 if self.class_token is not None and not self.drop_class_token else 0)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, C, H, W] -> features [B, N, D]."""
        if tuple(pixel_values.shape[-2:]) != self.image_size:
            raise ValueError(f"vision encoder expects images of {self.image_size} (H, W), "
                             f"got {tuple(pixel_values.shape[-2:])}; check the processor's image_size")
        dtype = next(self.patch_embed.parameters()).dtype
        x = self.patch_embed(pixel_values.to(dtype))  # [B, D, gh, gw]
        x = x.flatten(2).transpose(1, 2).contiguous()  # [B, N, D]
        prefix = 0
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1 + N, D]
            prefix = 1
        if self.pos_embed is not None:
            x = x + self.pos_embed
        rope = self.rope(*self.grid, prefix=prefix, device=x.device) if self.rope is not None else None
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x, rope=rope)
        if self.post_norm is not None:
            x = self.post_norm(x)
        if prefix and self.drop_class_token:
            x = x[:, prefix:]
        return x
