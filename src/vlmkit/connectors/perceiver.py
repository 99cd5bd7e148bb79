"""Perceiver resampler connector (Flamingo / IDEFICS): any number of vision features -> a fixed few latents.

A learned set of ``n_latents`` queries is refined by ``depth`` blocks. In each block the latents attend to the
concatenation [features; latents] (Flamingo's choice: the latents also see themselves, so a block is both a
cross- and a self-attention), then go through a ReLU MLP; both are pre-LayerNorm residual branches. A final
LayerNorm closes the stack. The width does not change ([B, N, D] -> [B, n_latents, D]): in Flamingo / IDEFICS
the LM's gated cross-attention maps the latents to its own width (see :mod:`vlmkit.fusion.cross_attention`).

Numerically the same as transformers' ``IdeficsPerceiverResampler``; :func:`idefics_perceiver_key_map` gives
the tensor names to import its weights.

:class:`PerceiverConnector` is Idefics2's variant (``Idefics2Connector``: RMSNorms, grouped-query heads, SwiGLU
MLPs, a mask over padded features) behind a SwiGLU projection to the LM's width; it is the connector registered
as ``perceiver`` (connectors/__init__.py), which any composed model (``ConnectorConfig.kind``) can use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.nn import RMSNorm, activation


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


# ---------------------------------------------------------------------------------------------- Idefics2's variant
#
# Idefics2's resampler (transformers' ``Idefics2PerceiverResampler``) keeps the shape of the one above — latents
# attend to [context; latents], each input normed on its own — but every norm is an RMSNorm, the heads are
# grouped-query, the MLP is a SwiGLU behind its own norm, the latents start at one, a mask hides padded
# context (the patches of a smaller image in a padded batch), and the final norm is an RMSNorm. The two are
# kept apart rather than one module with switches: they share no tensor name.


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), no biases, its own output width (transformers' ``Idefics2MLP``)."""

    def __init__(self, dim: int, hidden: int, out_dim: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, out_dim, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class ResamplerAttention(nn.Module):
    """Latents [B, L, D] (queries) attend to [context; latents] [B, N + L, D] with ``kv_heads`` grouped heads;
    ``mask`` [B, N] (True = a real context row) hides padded context. The inputs are normed by the layer."""

    def __init__(self, dim: int, heads: int, head_dim: int, kv_heads: int):
        super().__init__()
        self.heads, self.head_dim, self.kv_heads = heads, head_dim, kv_heads
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, L, _ = latents.shape
        kv_in = torch.cat([context, latents], dim=1)
        q = self.q_proj(latents).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(kv_in).view(B, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(kv_in).view(B, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        attn_mask = None
        if mask is not None:  # the latents always see each other
            keep = torch.cat([mask.bool(), mask.new_ones(B, L, dtype=torch.bool)], dim=1)
            attn_mask = keep[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.heads * self.head_dim))


class ResamplerLayer(nn.Module):
    def __init__(self, dim: int, cfg):
        super().__init__()
        self.latents_norm = RMSNorm(dim, cfg.norm_eps)
        self.context_norm = RMSNorm(dim, cfg.norm_eps)
        self.attn = ResamplerAttention(dim, cfg.heads, cfg.head_dim, cfg.kv_heads)
        self.mlp_norm = RMSNorm(dim, cfg.norm_eps)
        self.mlp = GatedMLP(dim, 4 * dim, dim, cfg.act)

    def forward(self, context: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        latents = latents + self.attn(self.context_norm(context), self.latents_norm(latents), mask)
        return latents + self.mlp(self.mlp_norm(latents))


class PerceiverConnector(nn.Module):
    """Vision features [B, N, D_vision] -> [B, n_latents, D_lm] (Idefics2's ``Idefics2Connector``): a SwiGLU
    projection of every feature to the LM's width, then ``depth`` resampler layers on learned latents and an
    RMSNorm. ``mask`` [B, N] (True = real) hides the padded features of smaller images; ``grid`` is ignored (the
    latents carry no spatial layout). Settings: ``ConnectorConfig.perceiver`` (a :class:`ResamplerConfig`),
    the projection's activation ``ConnectorConfig.act``."""

    def __init__(self, d_vision: int, d_lm: int, cfg, act: str = "silu"):
        super().__init__()
        self.n_latents = cfg.n_latents
        self.proj = GatedMLP(d_vision, cfg.proj_dim or 4 * d_lm, d_lm, act)
        self.latents = nn.Parameter(torch.ones(cfg.n_latents, d_lm))  # Idefics2 starts them at one
        self.layers = nn.ModuleList(ResamplerLayer(d_lm, cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(d_lm, cfg.norm_eps)

    def num_tokens(self, n: int, grid: tuple[int, int] | None = None) -> int:
        return self.n_latents

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        context = self.proj(x)
        latents = self.latents.to(context.dtype)[None].expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(context, latents, mask)
        return self.norm(latents)


# vlmkit name (inside ``layers.{i}``) -> transformers' (inside ``perceiver_resampler.layers.{i}``)
_IDEFICS2_LAYER = {"latents_norm": "input_latents_norm", "context_norm": "input_context_norm",
                   "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
                   "attn.v_proj": "self_attn.v_proj", "attn.o_proj": "self_attn.o_proj",
                   "mlp_norm": "post_attention_layernorm", "mlp.gate_proj": "mlp.gate_proj",
                   "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj"}


def idefics2_connector_key_map(depth: int, prefix: str = "model.connector.") -> dict[str, str]:
    """{:class:`PerceiverConnector` state-dict key: transformers' ``Idefics2Connector`` key under ``prefix``}."""
    table = {f"proj.{p}.weight": f"{prefix}modality_projection.{p}.weight" for p in ("gate_proj", "up_proj",
                                                                                       "down_proj")}
    r = f"{prefix}perceiver_resampler."
    table |= {"latents": f"{r}latents", "norm.weight": f"{r}norm.weight"}
    for i in range(depth):
        table |= {f"layers.{i}.{ours}.weight": f"{r}layers.{i}.{theirs}.weight" for ours, theirs in _IDEFICS2_LAYER.items()}
    return table
