"""Connectors that shrink the patch grid: vision features [B, h*w, D_vision] on a grid (h, w) -> [B, M, D_lm].

- :class:`LDPConnector` (MobileVLM's Lightweight Downsample Projector, Chu et al. 2023): a pointwise MLP, then
  two MobileNetV3 inverted-residual blocks of depthwise 3x3 convolutions, the second of stride 2, which halves
  each side of the grid (M = ceil(h/2) * ceil(w/2): 24x24 -> 12x12 in MobileVLM, 8x8 -> 4x4 in
  tiny-llava-ldp).
- :class:`LDPv2Connector` (MobileVLM V2's LDPv2, Chu et al. 2024): the MLP, average pooling of each 2x2 window
  (or adaptive, to a fixed number of tokens), then a depthwise 3x3 convolution as a positional encoding (PEG)
  added back residually.
- :class:`CAbstractor` (Honeybee's C-Abstractor, Cha et al. 2024, the connector of MM1): ResNet blocks on the
  grid, adaptive average pooling to ``num_queries`` tokens (a square), ResNet blocks again, then an MLP
  readout.
- :class:`AvgPoolConnector` (LLaVA-NeXT-Video's pooler): each pool x pool window averaged (or adaptive pooling
  to ``num_queries``), then LLaVA-1.5's two-layer MLP.
- :class:`AttnPoolConnector` (Molmo's ``attention-meanq`` pooling, Deitke et al. 2024): each pool x pool
  window of patches read by one cross-attention whose query is the window's mean, then the MLP.

Every connector states its M through ``num_tokens(n, grid)``, which the processor's ``image_seq_len`` comes
from, and refuses a grid it cannot pool by name (``connector.pool`` / ``connector.num_queries``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.connectors.projector import MLPConnector
from vlmkit.errors import ConfigError


def as_grid(x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    """[B, h*w, D] -> [B, D, h, w] (a square grid when ``grid`` is None)."""
    B, N, D = x.shape
    h, w = grid if grid is not None else (math.isqrt(N), math.isqrt(N))
    if h * w != N:
        raise ValueError(f"{N} vision tokens do not fill a {h}x{w} patch grid")
    return x.transpose(1, 2).reshape(B, D, h, w)


def as_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, D, h, w] -> [B, h*w, D] in row-major order."""
    return x.flatten(2).transpose(1, 2)


def square_side(num_queries: int, kind: str) -> int:
    side = math.isqrt(max(num_queries, 0))
    if num_queries <= 0 or side * side != num_queries:
        raise ConfigError(f"connector.num_queries {num_queries}: {kind} pools to a square grid of tokens; "
                          f"valid: a square such as 16, 64, 144")
    return side


class GridPool(nn.Module):
    """Average pooling of the grid: each ``pool`` x ``pool`` window -> 1 token, or (``num_queries`` > 0)
    adaptive pooling to a sqrt(num_queries)-sided square whatever the grid."""

    def __init__(self, kind: str, pool: int = 2, num_queries: int = 0):
        super().__init__()
        if num_queries:
            self.side = square_side(num_queries, kind)
        elif pool < 1:
            raise ConfigError(f"connector.pool {pool}: {kind} needs a window of at least 1 (or "
                              f"num_queries > 0)")
        self.kind, self.pool, self.num_queries = kind, pool, num_queries

    def out_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        if self.num_queries:
            return self.side, self.side
        h, w = grid
        if h % self.pool or w % self.pool:
            p = self.pool
            raise ConfigError(f"connector.pool {p}: {self.kind} pools {p}x{p} windows and the tower's "
                              f"{h}x{w} grid does not divide; use a pool dividing both sides or "
                              f"connector.num_queries (adaptive pooling)")
        return h // self.pool, w // self.pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, D, h, w] -> [B, D, h', w']
        return F.adaptive_avg_pool2d(x, self.out_grid(tuple(x.shape[-2:])))


def grid_of(n: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is None:
        side = math.isqrt(n)
        return side, side
    return tuple(grid)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of [B, C, H, W] (timm's ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """Channel gating by the spatial mean: reduce (1x1) -> act -> expand (1x1) -> gate."""

    def __init__(self, channels: int, reduced: int, act: type[nn.Module], gate: type[nn.Module]):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = act()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))


def make_divisible(v: float, divisor: int = 8) -> int:
    """timm's ``make_divisible`` (MobileNetV3's channel rounding)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class InvertedResidual(nn.Module):
    """MobileNetV3's block as MobileVLM's LDP builds it (timm ``InvertedResidual``, expansion 1): pointwise
    conv -> LN -> Hardswish, depthwise 3x3 (``stride``) -> LN -> Hardswish, squeeze-excite (ReLU, hard
    sigmoid), pointwise conv -> LN; a residual when the grid keeps its size."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.conv_pw = nn.Conv2d(dim, dim, 1, bias=False)
        self.norm1 = LayerNorm2d(dim)
        self.conv_dw = nn.Conv2d(dim, dim, 3, stride=stride, padding=1, groups=dim, bias=False)
        self.norm2 = LayerNorm2d(dim)
        self.act = nn.Hardswish()
        self.se = SqueezeExcite(dim, make_divisible(dim * 0.25), nn.ReLU, nn.Hardsigmoid)
        self.conv_pwl = nn.Conv2d(dim, dim, 1, bias=False)
        self.norm3 = LayerNorm2d(dim)
        self.skip = stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv_pw(x)))
        y = self.se(self.act(self.norm2(self.conv_dw(y))))
        y = self.norm3(self.conv_pwl(y))
        return x + y if self.skip else y


class LDPConnector(nn.Module):
    """MobileVLM's LDP: MLP per patch (D_vision -> D_lm -> D_lm), an inverted-residual block of stride 1, one
    of stride ``pool`` (2): the grid's sides shrink to ceil(side / pool)."""

    def __init__(self, d_vision: int, d_lm: int, pool: int = 2, act: str = "gelu", bias: bool = True):
        super().__init__()
        if pool < 2:
            raise ConfigError(f"connector.pool {pool}: ldp downsamples with a stride-`pool` depthwise conv; "
                              f"valid: 2 (MobileVLM) or more")
        self.pool = pool
        self.mlp = MLPConnector(d_vision, d_lm, act=act, bias=bias)
        self.blocks = nn.Sequential(InvertedResidual(d_lm, 1), InvertedResidual(d_lm, pool))

    def num_tokens(self, n: int, grid: tuple[int, int] | None = None) -> int:
        h, w = grid_of(n, grid)
        return -(-h // self.pool) * -(-w // self.pool)  # a 3x3 conv, padding 1, stride p: ceil(side / p)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return as_tokens(self.blocks(as_grid(self.mlp(x), grid)))  # [B, N', D_lm]


class LDPv2Connector(nn.Module):
    """MobileVLM V2's LDPv2: MLP per patch, average pooling (2x2 windows, or adaptive to ``num_queries``),
    then a depthwise 3x3 conv (with bias) added to its input, the positional-encoding generator (PEG)."""

    def __init__(self, d_vision: int, d_lm: int, pool: int = 2, num_queries: int = 0, act: str = "gelu",
                 bias: bool = True):
        super().__init__()
        self.mlp = MLPConnector(d_vision, d_lm, act=act, bias=bias)
        self.down = GridPool("ldp_v2", pool, num_queries)
        self.peg = nn.Conv2d(d_lm, d_lm, 3, padding=1, groups=d_lm, bias=True)

    def num_tokens(self, n: int, grid: tuple[int, int] | None = None) -> int:
        return math.prod(self.down.out_grid(grid_of(n, grid)))

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        y = self.down(as_grid(self.mlp(x), grid))
        return as_tokens(y + self.peg(y))


class ResBlock(nn.Module):
    """Honeybee's ResNet block (timm RegNet ``Bottleneck``: group size 1, SE 0.25, SiLU, LayerNorm2d): 1x1 ->
    LN -> SiLU, depthwise 3x3 -> LN -> SiLU, squeeze-excite, 1x1 -> LN, plus the shortcut (1x1 -> LN when the
    width changes), then SiLU."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(d_in, d_out, 1, bias=False)
        self.norm1 = LayerNorm2d(d_out)
        self.conv2 = nn.Conv2d(d_out, d_out, 3, padding=1, groups=d_out, bias=False)
        self.norm2 = LayerNorm2d(d_out)
        self.se = SqueezeExcite(d_out, max(1, round(d_in * 0.25)), nn.SiLU, nn.Sigmoid)
        self.conv3 = nn.Conv2d(d_out, d_out, 1, bias=False)
        self.norm3 = LayerNorm2d(d_out)
        self.act = nn.SiLU()
        self.shortcut = (nn.Identity() if d_in == d_out
                         else nn.Sequential(nn.Conv2d(d_in, d_out, 1, bias=False), LayerNorm2d(d_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.se(self.act(self.norm2(self.conv2(y))))
        return self.act(self.norm3(self.conv3(y)) + self.shortcut(x))


class CAbstractor(nn.Module):
    """Honeybee's C-Abstractor: ``depth`` ResNet blocks (D_vision -> D_lm), adaptive average pooling to
    ``num_queries`` tokens, ``depth`` blocks more, then a two-layer MLP readout. Honeybee's learned positional
    embedding of the tower's grid is left out: vlmkit's towers already add theirs."""

    def __init__(self, d_vision: int, d_lm: int, num_queries: int, depth: int = 3, act: str = "gelu",
                 bias: bool = True):
        super().__init__()
        if depth < 1:
            raise ConfigError(f"connector.depth {depth}: c_abstractor needs at least 1 ResNet block on each "
                              f"side of its pooling (Honeybee: 3)")
        square_side(num_queries, "c_abstractor")  # required: its readout is num_queries tokens
        self.sampler = GridPool("c_abstractor", num_queries=num_queries)
        self.before = nn.Sequential(*[ResBlock(d_vision if i == 0 else d_lm, d_lm) for i in range(depth)])
        self.after = nn.Sequential(*[ResBlock(d_lm, d_lm) for _ in range(depth)])
        self.readout = MLPConnector(d_lm, d_lm, act=act, bias=bias)

    def num_tokens(self, n: int, grid: tuple[int, int] | None = None) -> int:
        return math.prod(self.sampler.out_grid(grid_of(n, grid)))

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        y = self.after(self.sampler(self.before(as_grid(x, grid))))
        return self.readout(as_tokens(y))  # [B, num_queries, D_lm]


class AvgPoolConnector(nn.Module):
    """LLaVA-NeXT-Video's pooler then LLaVA-1.5's MLP: each ``pool`` x ``pool`` window of patches averaged (or
    adaptive pooling to ``num_queries`` tokens), then D_vision -> D_lm -> D_lm."""

    def __init__(self, d_vision: int, d_lm: int, pool: int = 2, num_queries: int = 0, act: str = "gelu",
                 bias: bool = True):
        super().__init__()
        self.down = GridPool("avg_pool", pool, num_queries)
        self.mlp = MLPConnector(d_vision, d_lm, act=act, bias=bias)

    def num_tokens(self, n: int, grid: tuple[int, int] | None = None) -> int:
        return math.prod(self.down.out_grid(grid_of(n, grid)))

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return self.mlp(as_tokens(self.down(as_grid(x, grid))))


def windows(x: torch.Tensor, grid: tuple[int, int] | None, pool: int) -> torch.Tensor:
    """[B, h*w, D] -> [B * (h/p) * (w/p), p*p, D]: the patches of each p x p window, windows in row-major
    order."""
    g = as_grid(x, grid)  # [B, D, h, w]
    B, D, h, w = g.shape
    g = g.reshape(B, D, h // pool, pool, w // pool, pool).permute(0, 2, 4, 3, 5, 1)  # [B, h', w', p, p, D]
    return g.reshape(B * (h // pool) * (w // pool), pool * pool, D)


class AttnPoolConnector(nn.Module):
    """Molmo's attention pooling: the patches of each ``pool`` x ``pool`` window are keys and values of one
    multi-head cross-attention at the tower's width whose single query is their mean; the pooled token then
    goes through the MLP (D_vision -> D_lm -> D_lm; Molmo's is a SwiGLU, and it pools two tower layers
    concatenated)."""

    def __init__(self, d_vision: int, d_lm: int, pool: int = 2, heads: int = 4, act: str = "gelu",
                 bias: bool = True):
        super().__init__()
        if heads < 1 or d_vision % heads:
            raise ConfigError(f"connector.heads {heads}: attn_pool's attention is the tower's width "
                              f"({d_vision}) wide; valid: a divisor of it")
        self.down = GridPool("attn_pool", pool)
        self.pool, self.heads = pool, heads
        self.q_proj = nn.Linear(d_vision, d_vision)
        self.k_proj = nn.Linear(d_vision, d_vision)
        self.v_proj = nn.Linear(d_vision, d_vision)
        self.o_proj = nn.Linear(d_vision, d_vision)
        self.mlp = MLPConnector(d_vision, d_lm, act=act, bias=bias)

    def num_tokens(self, n: int, grid: tuple[int, int] | None = None) -> int:
        return math.prod(self.down.out_grid(grid_of(n, grid)))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [W, T, D] -> [W, H, T, hd]

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        h, w = self.down.out_grid(grid_of(x.shape[1], grid))
        win = windows(x, grid, self.pool)  # [B*h*w, p*p, D]
        q = self.q_proj(win.mean(1, keepdim=True))  # [B*h*w, 1, D]
        out = F.scaled_dot_product_attention(self._heads(q), self._heads(self.k_proj(win)),
                                             self._heads(self.v_proj(win)))  # [B*h*w, H, 1, hd]
        pooled = self.o_proj(out.transpose(1, 2).flatten(2))  # [B*h*w, 1, D]
        return self.mlp(pooled.reshape(x.shape[0], h * w, -1))  # [B, h*w, D_lm]


__all__ = ["AttnPoolConnector", "AvgPoolConnector", "CAbstractor", "LDPConnector", "LDPv2Connector"]
