"""Normalisation layers."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama): computed in fp32, scaled by a learned weight.

    ``offset=True`` is Gemma's variant: the scale is ``1 + weight`` (weight initialised at zero), applied in
    fp32 before casting back (Llama casts first, then scales)."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: bool = False):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


class HeadLayerNorm(nn.Module):
    """Chameleon's query / key norm (transformers' ChameleonLayerNorm): each head's vector normalised over its
    ``head_dim`` (eps 1e-5, as transformers hard-codes it), then scaled and shifted by that head's own weight and
    bias ([heads, head_dim]: the original's model-parallel shards each kept theirs). Reads [B, heads, T, head_dim]."""

    def __init__(self, heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], None, None, self.eps)
        return x * self.weight[:, None] + self.bias[:, None]


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; valid: layernorm, rmsnorm")
