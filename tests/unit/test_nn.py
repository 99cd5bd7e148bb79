"""vlmkit.nn: masks, attention against an explicit softmax reference, RMSNorm, rotary embeddings, KV cache; and the
DecoderLM flags built on them."""

from __future__ import annotations

import math

import pytest
import torch

from vlmkit.nn import (
    MLP,
    Attention,
    KVCache,
    RMSNorm,
    Rotary2D,
    RotaryEmbedding,
    SwiGLU,
    activation,
    apply_rope,
    causal_mask,
    make_norm,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# ------------------------------------------------------------------------------------------------ causal_mask


def test_causal_mask_without_padding_is_lower_triangular():
    mask = causal_mask(4)
    assert mask.shape == (1, 1, 4, 4)
    assert torch.equal(mask[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())


def test_causal_mask_excludes_padded_keys_and_keeps_padded_rows_diagonal():
    attn = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])  # sample 0 is left-padded by 2
    mask = causal_mask(4, attn)
    assert mask.shape == (2, 1, 4, 4)
    expected0 = torch.tensor([
        [1, 0, 0, 0],  # padding row: only its own diagonal, so SDPA has something to attend to
        [0, 1, 0, 0],
        [0, 0, 1, 0],  # first real token sees itself only
        [0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected0)
    assert torch.equal(mask[1, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert mask.any(-1).all(), "a fully masked row makes SDPA return NaN"


def test_padded_rows_give_finite_attention_output():
    torch.manual_seed(0)
    attn_layer = Attention(16, heads=2)
    attn = torch.tensor([[0, 0, 0, 1, 1]])
    out = attn_layer(torch.randn(1, 5, 16), mask=causal_mask(5, attn))
    assert torch.isfinite(out).all()


def test_causal_mask_with_cache_offset():
    attn = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    mask = causal_mask(2, attn, offset=3)  # queries are positions 3 and 4
    assert mask.shape == (2, 1, 2, 5)
    assert torch.equal(mask[0, 0], torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool))
    assert torch.equal(mask[1, 0], torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))


# ------------------------------------------------------------------------------------------------ attention


def reference_attention(layer: Attention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V written out head by head; query head h reads kv head h // (H / H_kv)."""
    B, T, _ = x.shape
    H, Hkv, hd = layer.heads, layer.kv_heads, layer.head_dim
    q = torch.nn.functional.linear(x, layer.q_proj.weight, layer.q_proj.bias).view(B, T, H, hd)
    k = torch.nn.functional.linear(x, layer.k_proj.weight, layer.k_proj.bias).view(B, T, Hkv, hd)
    v = torch.nn.functional.linear(x, layer.v_proj.weight, layer.v_proj.bias).view(B, T, Hkv, hd)
    heads = []
    for h in range(H):
        g = h // (H // Hkv)
        scores = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(hd)  # [B, T, T]
        scores = scores.masked_fill(~mask[:, 0], float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[:, :, g])  # [B, T, hd]
    out = torch.cat(heads, dim=-1)  # [B, T, H * hd]
    return torch.nn.functional.linear(out, layer.o_proj.weight, layer.o_proj.bias)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (4, 4)])
def test_attention_with_grouped_query_heads_matches_reference(heads, kv_heads):
    torch.manual_seed(0)
    layer = Attention(32, heads, kv_heads, qkv_bias=True, out_bias=True)
    x = torch.randn(2, 6, 32)
    mask = torch.rand(2, 1, 6, 6) > 0.5
    mask |= torch.eye(6, dtype=torch.bool)  # no empty rows
    torch.testing.assert_close(layer(x, mask=mask), reference_attention(layer, x, mask), atol=1e-5, rtol=1e-5)


def test_is_causal_path_equals_explicit_causal_mask():
    torch.manual_seed(0)
    layer = Attention(32, 4, 2)
    x = torch.randn(2, 7, 32)
    fast = layer(x, is_causal=True)
    torch.testing.assert_close(fast, layer(x, mask=causal_mask(7)), atol=1e-6, rtol=1e-6)
    tril = torch.ones(7, 7, dtype=torch.bool).tril()[None, None].expand(2, 1, 7, 7)
    torch.testing.assert_close(fast, reference_attention(layer, x, tril), atol=1e-5, rtol=1e-5)


def test_attention_with_kv_cache_equals_full_causal_attention():
    torch.manual_seed(0)
    layer = Attention(32, 4, 2)
    rotary = RotaryEmbedding(8)
    x = torch.randn(2, 6, 32)
    pos = torch.arange(6)[None].expand(2, 6)
    full = layer(x, is_causal=True, rope=rotary(pos))
    cache = KVCache(1, 2, 2, 8, max_len=6)
    steps = [layer(x[:, :3], mask=causal_mask(3), rope=rotary(pos[:, :3]), cache=cache)]
    cache.advance(3)
    for t in range(3, 6):
        rope = rotary(pos[:, t:t + 1])
        steps.append(layer(x[:, t:t + 1], mask=causal_mask(1, offset=t), rope=rope, cache=cache))
        cache.advance(1)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_qk_norm_layernorms_each_heads_queries_and_keys_before_rotary():
    """Persimmon's qk_layernorm: one LayerNorm over head_dim, shared by the heads, on q and k (not v), then RoPE."""
    torch.manual_seed(0)
    layer = Attention(24, 3, qkv_bias=True, out_bias=True, qk_norm=True, norm_eps=1e-6)
    assert Attention(24, 3).q_norm is None and "q_norm.weight" not in dict(Attention(24, 3).named_parameters())
    with torch.no_grad():
        for norm in (layer.q_norm, layer.k_norm):
            norm.weight.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
    x, pos = torch.randn(2, 5, 24), torch.arange(5)[None].expand(2, 5)
    cos, sin = RotaryEmbedding(8)(pos)

    def heads(proj, norm=None):
        t = proj(x).view(2, 5, 3, 8)
        t = torch.nn.functional.layer_norm(t, (8,), norm.weight, norm.bias, 1e-6) if norm is not None else t
        return t.transpose(1, 2)

    q, k = apply_rope(heads(layer.q_proj, layer.q_norm), heads(layer.k_proj, layer.k_norm), cos, sin)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, heads(layer.v_proj), is_causal=True)
    expected = layer.o_proj(out.transpose(1, 2).reshape(2, 5, 24))
    torch.testing.assert_close(layer(x, is_causal=True, rope=(cos, sin)), expected, atol=1e-5, rtol=1e-5)


def test_heads_must_be_a_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        Attention(32, heads=4, kv_heads=3)


def test_kv_cache_overflow_raises():
    cache = KVCache(layers=1, batch=1, kv_heads=1, head_dim=4, max_len=3)
    cache.update(0, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
    cache.advance(2)
    with pytest.raises(ValueError, match="max_len 3"):
        cache.update(0, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))


# ------------------------------------------------------------------------------------------------ norms, MLPs


def test_rmsnorm_equals_formula():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 5, 16) * 4
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)


def test_make_norm_kinds_and_unknown():
    assert isinstance(make_norm("layernorm", 8, 1e-5), torch.nn.LayerNorm)
    assert isinstance(make_norm("rmsnorm", 8, 1e-5), RMSNorm)
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'"):
        make_norm("batchnorm", 8, 1e-5)


def test_unknown_activation_raises():
    with pytest.raises(ValueError, match="unknown activation 'swish2'"):
        activation("swish2")
    with pytest.raises(ValueError, match="unknown activation"):
        MLP(8, 16, act="swish2")


def test_relu2_is_squared_relu():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0])
    torch.testing.assert_close(activation("relu2")(x), torch.tensor([0.0, 0.0, 0.0, 0.25, 9.0]))


def test_mlp_and_swiglu_shapes():
    x = torch.randn(2, 5, 16)
    assert MLP(16, 64)(x).shape == (2, 5, 16)
    assert MLP(16, 64, out_dim=24)(x).shape == (2, 5, 24)
    assert SwiGLU(16, 48)(x).shape == (2, 5, 16)


def test_swiglu_equals_formula():
    torch.manual_seed(0)
    ff = SwiGLU(16, 48)
    x = torch.randn(2, 3, 16)
    expected = ff.down_proj(torch.nn.functional.silu(ff.gate_proj(x)) * ff.up_proj(x))
    torch.testing.assert_close(ff(x), expected)


# ------------------------------------------------------------------------------------------------ rotary


def rope_reference(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE as complex multiplication: (x[:d/2] + i x[d/2:]) * exp(i * pos * theta^(-2j/d))."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = pos[..., None].double() * inv_freq  # [T, d/2]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double())
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1).float()


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd] rotated at ``positions`` [T] with vlmkit's RotaryEmbedding + apply_rope."""
    cos, sin = RotaryEmbedding(x.shape[-1])(positions[None])
    return apply_rope(x, x, cos, sin)[0]


def test_apply_rope_matches_complex_rotation_reference():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 16)
    pos = torch.tensor([0, 1, 2, 7, 100])
    torch.testing.assert_close(rotate(x, pos), rope_reference(x, pos), atol=1e-5, rtol=1e-5)


def test_apply_rope_preserves_norms():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 16)
    y = rotate(x, torch.arange(6) * 5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y[:, :, 1:], x[:, :, 1:]), "positions > 0 must rotate"


def test_rope_dot_product_depends_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def dot(m: int, n: int) -> float:
        return float((rotate(q, torch.tensor([m])) * rotate(k, torch.tensor([n]))).sum())

    assert dot(3, 1) == pytest.approx(dot(13, 11), abs=1e-4)
    assert dot(3, 1) == pytest.approx(dot(52, 50), abs=1e-4)
    assert dot(3, 1) != pytest.approx(dot(4, 1), abs=1e-3), "a different distance must change the score"


def test_partial_rope_rotates_the_first_dims_and_passes_the_rest():
    """cos, sin narrower than the heads (Persimmon's partial_rotary_factor): the first rd dims rotate as a head of
    rd dims would, the remaining ones are untouched."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 6, 16), torch.randn(2, 3, 6, 16)
    pos = torch.tensor([0, 1, 2, 7, 100, 3])
    cos, sin = RotaryEmbedding(6, theta=25000.0)(pos[None])
    assert cos.shape == (1, 6, 6)
    q2, k2 = apply_rope(q, k, cos, sin)
    torch.testing.assert_close(q2[..., :6], rope_reference(q[..., :6], pos, 25000.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k2[..., :6], rope_reference(k[..., :6], pos, 25000.0), atol=1e-5, rtol=1e-5)
    assert torch.equal(q2[..., 6:], q[..., 6:]) and torch.equal(k2[..., 6:], k[..., 6:])


def test_rotary2d_shapes_and_prefix():
    rot = Rotary2D(16)
    cos, sin = rot(3, 4)
    assert cos.shape == sin.shape == (1, 12, 16)
    cos_p, sin_p = rot(3, 4, prefix=1)
    assert cos_p.shape == (1, 13, 16)
    torch.testing.assert_close(cos_p[:, 1:], cos)
    torch.testing.assert_close(sin_p[:, 1:], sin)
    torch.testing.assert_close(cos_p[0, 0], torch.ones(16))  # class token sits at (0, 0): no rotation
    with pytest.raises(ValueError, match="divisible by 4"):
        Rotary2D(10)


def test_rotary2d_encodes_row_and_column_separately():
    cos, _ = Rotary2D(16)(3, 3)
    cos = cos[0]  # [9, 16]; token index = row * 3 + col
    row_dims = torch.cat([cos[:, 0:4], cos[:, 8:12]], dim=-1)
    col_dims = torch.cat([cos[:, 4:8], cos[:, 12:16]], dim=-1)
    torch.testing.assert_close(row_dims[0], row_dims[2])  # (0,0) and (0,2): same row
    torch.testing.assert_close(col_dims[1], col_dims[7])  # (0,1) and (2,1): same column
    assert not torch.allclose(cos[1], cos[3]), "(0,1) and (1,0) must be told apart"


def test_rotary2d_scores_depend_only_on_row_and_column_offsets():
    torch.manual_seed(0)
    cos, sin = Rotary2D(16)(4, 4)
    q, k = torch.randn(16).expand(1, 1, 16, 16), torch.randn(16).expand(1, 1, 16, 16)
    qr, kr = apply_rope(q, k, cos, sin)

    def score(a: tuple[int, int], b: tuple[int, int]) -> float:
        return float(qr[0, 0, a[0] * 4 + a[1]] @ kr[0, 0, b[0] * 4 + b[1]])

    assert score((0, 0), (1, 2)) == pytest.approx(score((2, 1), (3, 3)), abs=1e-4)
    assert score((0, 0), (1, 2)) != pytest.approx(score((0, 0), (2, 1)), abs=1e-3)


def test_rmsnorm_offset_scales_by_one_plus_weight():
    x = torch.randn(2, 5, 8)
    plain, gemma = RMSNorm(8), RMSNorm(8, offset=True)
    torch.testing.assert_close(gemma(x), plain(x))  # initialised at weight 0: the identity scale
    with torch.no_grad():
        gemma.weight.fill_(0.5)
        plain.weight.fill_(1.5)
    torch.testing.assert_close(gemma(x), plain(x))


# ------------------------------------------------------------------------------------------------ DecoderLM flags


def test_persimmon_flags_are_off_by_default_and_change_the_lm_when_on():
    """qk_norm and rotary_fraction default to the Llama path (no q/k norms, every dim rotates); turning them on
    adds only the two per-head norms and narrows the rotary table, and changes the output."""
    import dataclasses

    from vlmkit.config import LanguageConfig
    from vlmkit.lm.decoder import DecoderLM

    cfg = LanguageConfig(vocab_size=40, width=32, depth=2, heads=4, kv_heads=2, mlp_dim=48, max_seq_len=16)
    torch.manual_seed(0)
    lm = DecoderLM(cfg).eval()
    assert lm.rotary.inv_freq.numel() == 4 and lm.layers[0].attn.q_norm is None  # head_dim 8: all of it rotates
    persimmon = DecoderLM(dataclasses.replace(cfg, qk_norm=True, rotary_fraction=0.5)).eval()
    missing, unexpected = persimmon.load_state_dict(lm.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == sorted(f"layers.{i}.attn.{n}_norm.{w}" for i in range(2)
                                                        for n in "qk" for w in ("weight", "bias"))
    assert persimmon.rotary.inv_freq.numel() == 2
    torch.testing.assert_close(persimmon.rotary.inv_freq, lm.rotary.inv_freq[:2] ** 2)  # theta^(-2j/4) for j < 2
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        assert (persimmon(x) - lm(x)).abs().max() > 1e-3
        without_norms = DecoderLM(dataclasses.replace(cfg, rotary_fraction=0.5)).eval()
        without_norms.load_state_dict(lm.state_dict())
        assert (without_norms(x) - lm(x)).abs().max() > 1e-3
