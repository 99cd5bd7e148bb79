"""Perceiver resampler connector (Flamingo / IDEFICS): any number of vision features -> a fixed few latents.

A learned set of ``n_latents`` queries is refined by ``depth`` blocks. In each block the latents attend to the
concatenation [features; latents] (Flamingo's choice: the latents also see themselves, so a block is both a
cross- and a self-attention), then go through a ReLU MLP; both are pre-LayerNorm residual branches. A final
LayerNorm closes the stack. The width does not change ([B, N, D] -> [B, n_latents, D]): in Flamingo / IDEFICS
the LM's gated cross-attention maps the latents to its own width (see :mod:`vlmkit.fusion.cross_attention`).

Numerically the same as transformers' ``IdeficsPerceiverResampler``; :func:`idefics_perceiver_key_map` gives
the tensor names to import its weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PerceiverAttention(nn.Module):
    """Latents [B, L, D] attend to [context; latents] [B, N + L, D]. The two inputs have their own LayerNorm;
    ``qk_norm`` adds a LayerNorm over each head's queries and keys (IDEFICS' ``qk_layer_norms_perceiver``).
    No biases in the projections (Perceiver / Flamingo)."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: bool = False, eps: float = 1e-5):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.context_norm = nn.LayerNorm(dim, eps=eps)
        self.latents_norm = nn.LayerNorm(dim, eps=eps)
        self.q_norm = nn.LayerNorm(head_dim, eps=eps) if qk_norm else None
        self.k_norm = nn.LayerNorm(head_dim, eps=eps) if qk_norm else None
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        context, latents = self.context_norm(context), self.latents_norm(latents)
        kv_in = torch.cat([context, latents], dim=1)  # [B, N + L, D]
        q = self._split(self.q_proj(latents))
        k, v = self._split(self.k_proj(kv_in)), self._split(self.v_proj(kv_in))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)  # no mask: every latent sees every input; scale hd^-0.5
        B, _, L, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.heads * self.head_dim))


class PerceiverMLP(nn.Module):
    """LayerNorm -> Linear -> ReLU -> Linear, no biases (IDEFICS' perceiver MLP). The norm sits inside the
    branch, as in IDEFICS, so its tensor names map one to one."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.norm(x))))


class PerceiverBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, mlp_dim: int, qk_norm: bool = False,
                 eps: float = 1e-5):
        super().__init__()
        self.attn = PerceiverAttention(dim, heads, head_dim, qk_norm, eps)
        self.mlp = PerceiverMLP(dim, mlp_dim, eps)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(context, latents)
        return latents + self.mlp(latents)


class PerceiverResampler(nn.Module):
    """[B, N, D] vision features -> [B, n_latents, D]: ``depth`` perceiver blocks on learned latents, then a
    LayerNorm. ``mlp_dim`` defaults to 4 * dim (IDEFICS: 4 x the vision width, which is ``dim`` there).

    Connector interface as in :mod:`vlmkit.connectors.projector`: ``num_tokens`` is ``n_latents`` whatever the
    number of input features, and ``grid`` is ignored (the latents carry no spatial layout)."""

    def __init__(self, dim: int, depth: int = 6, heads: int = 16, head_dim: int = 96, n_latents: int = 64,
                 mlp_dim: int | None = None, qk_norm: bool = False, eps: float = 1e-5):
        super().__init__()
        self.n_latents = n_latents
        self.latents = nn.Parameter(torch.randn(n_latents, dim))  # IDEFICS initialises them N(0, 1)
        self.blocks = nn.ModuleList(PerceiverBlock(dim, heads, head_dim, mlp_dim or 4 * dim, qk_norm, eps)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)

    def num_tokens(self, n: int, grid: tuple[int, int] | None = None) -> int:
        return self.n_latents

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        latents = self.latents.to(x.dtype)[None].expand(x.shape[0], -1, -1)  # [B, L, D]
        for block in self.blocks:
            latents = block(x, latents)
        return self.norm(latents)


# vlmkit name (inside one block) -> IDEFICS name (inside ``blocks.{i}``); the attention is IDEFICS' ``0``, the
# MLP its ``1`` (a ModuleList pair)
_BLOCK_NAMES = {
    "attn.context_norm": "0.context_layer_norm",
    "attn.latents_norm": "0.latents_layer_norm",
    "attn.q_norm": "0.q_layer_norm",
    "attn.k_norm": "0.k_layer_norm",
    "attn.q_proj": "0.q_proj",
    "attn.k_proj": "0.k_proj",
    "attn.v_proj": "0.v_proj",
    "attn.o_proj": "0.output_proj",
    "mlp.norm": "1.ln",
    "mlp.fc1": "1.fc",
    "mlp.fc2": "1.c_proj",
}
_NORMS = {"attn.context_norm", "attn.latents_norm", "attn.q_norm", "attn.k_norm", "mlp.norm"}


def idefics_perceiver_key_map(depth: int, qk_norm: bool = False,
                              prefix: str = "perceiver_resampler.") -> dict[str, str]:
    """{vlmkit ``PerceiverResampler`` state-dict key: IDEFICS key}. ``prefix`` is where the resampler sits in
    the IDEFICS state dict: ``perceiver_resampler.`` in ``IdeficsModel``, ``model.perceiver_resampler.`` in a
    saved ``IdeficsForVisionText2Text``, ``""`` for a bare ``IdeficsPerceiverResampler``."""
    table = {"latents": f"{prefix}latents", "norm.weight": f"{prefix}layer_norm.weight",
             "norm.bias": f"{prefix}layer_norm.bias"}
    for i in range(depth):
        for ours, theirs in _BLOCK_NAMES.items():
            if not qk_norm and ours in ("attn.q_norm", "attn.k_norm"):
                continue
            for param in ("weight", "bias") if ours in _NORMS else ("weight",):
                table[f"blocks.{i}.{ours}.{param}"] = f"{prefix}blocks.{i}.{theirs}.{param}"
    return table
