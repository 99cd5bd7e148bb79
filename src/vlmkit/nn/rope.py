"""Rotary position embeddings (Su et al. 2021) in the rotate-half layout that Llama/Qwen2 checkpoints use."""

import math

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Turns position ids [B, T] into (cos, sin) of shape [B, T, head_dim].

    With ``mrope_section`` (Qwen2-VL's multimodal RoPE) position ids may also be [3, B, T] (temporal, height,
    width): the rotary frequencies are split into consecutive sections of those sizes (summing to head_dim / 2),
    section i rotating with axis i % 3. [B, T] ids then mean the same id on all three axes (plain RoPE)."""

    def __init__(self, head_dim: int, theta: float = 10000.0, mrope_section: tuple[int, ...] = (), scaling=None):
        """``scaling``: a :class:`~vlmkit.config.RopeScalingConfig` (Llama 3's frequency scaling, or linear) or
        None."""
        super().__init__()
        if mrope_section and sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {tuple(mrope_section)} must sum to head_dim / 2 = {head_dim // 2}")
        self.mrope_section = tuple(mrope_section)
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        if scaling is not None and scaling.kind == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor,
                                       scaling.original_max_len)
        elif scaling is not None and scaling.kind == "linear":  # transformers' "linear" (Gemma 3's full layers)
            inv_freq = inv_freq / scaling.factor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype=torch.float32):
        if position_ids.ndim == 3:  # [3, B, T] multimodal position ids
            if not self.mrope_section:
                raise ValueError("position ids of shape [3, B, T] need a RotaryEmbedding with mrope_section")
            freqs = position_ids[..., None].float() * self.inv_freq  # [3, B, T, hd/2]
            parts = freqs.split(self.mrope_section, dim=-1)
            freqs = torch.cat([part[i % 3] for i, part in enumerate(parts)], dim=-1)  # [B, T, hd/2]
        else:
            freqs = position_ids[..., None].float() * self.inv_freq  # [B, T, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, hd]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_len: int) -> torch.Tensor:
    """Llama 3.1's scaled rotary frequencies: long wavelengths (beyond original_max_len / low_freq_factor) slowed
    by ``factor``, short ones (below original_max_len / high_freq_factor) kept, the band between blended
    smoothly (Meta's reference and transformers' ``_compute_llama3_parameters``)."""
    low_wavelen, high_wavelen = original_max_len / low_freq_factor, original_max_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k: [B, H, T, hd]; cos, sin: [B, T, rd] with rd <= hd. With rd < hd (partial rotary, Persimmon) only
    the first rd dims of each head rotate and the rest pass through, as transformers' PersimmonAttention."""
    rd, hd = cos.shape[-1], q.shape[-1]
    if rd < hd:
        (q_rot, q_pass), (k_rot, k_pass) = q.split([rd, hd - rd], -1), k.split([rd, hd - rd], -1)
        q_rot, k_rot = apply_rope(q_rot, k_rot, cos, sin)
        return torch.cat([q_rot, q_pass], dim=-1), torch.cat([k_rot, k_pass], dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rope_2d_positions(grid_h: int, grid_w: int, device=None) -> torch.Tensor:
    """(row, col) ids of a patch grid, [grid_h * grid_w, 2], for 2D rotary embeddings in a ViT."""
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device).repeat(grid_h)
    return torch.stack([rows, cols], dim=-1)


class Rotary2D(nn.Module):
    """2D rotary embedding: half of each head's dimensions rotate with the row, half with the column."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D rotary needs head_dim divisible by 4, got {head_dim}")
        self.axis = RotaryEmbedding(head_dim // 2, theta)

    def forward(self, grid_h: int, grid_w: int, prefix: int = 0, device=None):
        pos = rope_2d_positions(grid_h, grid_w, device)  # [N, 2]
        if prefix:  # class token(s) sit at position (0, 0)
            pos = torch.cat([torch.zeros(prefix, 2, dtype=pos.dtype, device=device), pos])
        return self.at(pos)

    def at(self, pos: torch.Tensor):
        """(cos, sin) [1, N, hd] for explicit (row, col) ids ``pos`` [N, 2], in any token order (Qwen2-VL lists
        its patches window by window)."""
        cos_r, sin_r = self.axis(pos[None, :, 0])
        cos_c, sin_c = self.axis(pos[None, :, 1])
        # interleave the two axes in the rotate-half layout: [r_half1, c_half1, r_half2, c_half2]
        def merge(a, b):
            a1, a2 = a.chunk(2, -1)
            b1, b2 = b.chunk(2, -1)
            return torch.cat([a1, b1, a2, b2], dim=-1)

        return merge(cos_r, cos_c), merge(sin_r, sin_c)  # [1, N, hd]


def sincos_2d(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2D sine-cosine position embeddings [grid_h * grid_w, dim] (MAE; Beyer et al. 2022, "Better plain
    ViT baselines"): a quarter of the channels each for sin/cos of the row and of the column. Unit-scale from
    the first step, so a from-scratch ViT knows where every patch is before it has learned anything."""
    if dim % 4:
        raise ValueError(f"sincos2d position embeddings need a width divisible by 4, got {dim}")
    pos = rope_2d_positions(grid_h, grid_w).float()  # [N, 2] (row, col)
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    rows, cols = pos[:, 0:1] * omega, pos[:, 1:2] * omega  # [N, dim/4] each
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)
