"""Flamingo / IDEFICS fusion: the perceiver resampler and the gated cross-attention block against
transformers' IDEFICS modules, media masks, and a DecoderLM wrapped with gated blocks (identity at zero
gates)."""

from __future__ import annotations

import pytest
import torch

from vlmkit.config import LanguageConfig
from vlmkit.connectors.perceiver import PerceiverResampler, idefics_perceiver_key_map
from vlmkit.fusion.cross_attention import (CrossAttentionLM, GatedCrossAttentionBlock, add_cross_attention,
                                           idefics_gated_xattn_key_map, media_mask)
from vlmkit.lm.decoder import DecoderLM

pytestmark = pytest.mark.usefixtures("single_thread")

IMG = 7  # image placeholder id in the hand-made sequences


def load_mapped(ours: torch.nn.Module, theirs: torch.nn.Module, table: dict[str, str]) -> None:
    """Copy ``theirs``' tensors into ``ours`` through a {our key: their key} table that must cover both."""
    src = theirs.state_dict()
    assert set(table) == set(ours.state_dict()), "key map does not cover vlmkit's parameters exactly"
    assert set(table.values()) == set(src), "key map does not cover IDEFICS' parameters exactly"
    ours.load_state_dict({k: src[v] for k, v in table.items()})


def perturb_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Move every norm weight / bias (and the alphas) off their init so that a swapped name would show."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or name.endswith(".ln.weight") or name.endswith(".ln.bias") or "alpha" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)


# ------------------------------------------------------------------------------------------------ perceiver


@pytest.mark.parametrize("qk_norm", [False, True])
def test_perceiver_matches_idefics_resampler(qk_norm):
    pytest.importorskip("transformers", reason="transformers (a test extra) is the reference for parity")
    from transformers.models.idefics.configuration_idefics import IdeficsConfig
    from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

    dim, depth, heads, head_dim, n_lat = 24, 2, 3, 8, 5
    perceiver = {"use_resampler": True, "resampler_depth": depth, "resampler_n_heads": heads,
                 "resampler_head_dim": head_dim, "resampler_n_latents": n_lat,
                 "qk_layer_norms_perceiver": qk_norm}
    cfg = IdeficsConfig(vision_config={"embed_dim": dim}, use_resampler=True, perceiver_config=perceiver)
    assert cfg.perceiver_config.qk_layer_norms_perceiver == qk_norm
    torch.manual_seed(0)
    ref = IdeficsPerceiverResampler(cfg, dim, depth, heads, head_dim, n_lat).eval()
    perturb_(ref, torch.Generator().manual_seed(1))
    ours = PerceiverResampler(dim, depth, heads, head_dim, n_lat, qk_norm=qk_norm).eval()
    load_mapped(ours, ref, idefics_perceiver_key_map(depth, qk_norm, prefix=""))

    x = torch.randn(3, 11, dim)
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert got.shape == (3, n_lat, dim) and ours.num_tokens(11) == n_lat == ours.num_tokens(99, grid=(9, 11))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a different number of input features still gives n_latents outputs
    assert ours(torch.randn(2, 4, dim)).shape == (2, n_lat, dim)


def test_perceiver_key_map_uses_idefics_model_names():
    table = idefics_perceiver_key_map(2)
    assert table["latents"] == "perceiver_resampler.latents"
    assert table["blocks.1.attn.context_norm.bias"] == \
        "perceiver_resampler.blocks.1.0.context_layer_norm.bias"
    assert table["blocks.0.mlp.fc2.weight"] == "perceiver_resampler.blocks.0.1.c_proj.weight"
    assert table["norm.weight"] == "perceiver_resampler.layer_norm.weight"
    assert not any("q_layer_norm" in v for v in table.values())
    assert "blocks.0.attn.q_norm.weight" in idefics_perceiver_key_map(2, qk_norm=True)


# ------------------------------------------------------------------------------------------------ media mask


def test_media_mask_on_a_hand_made_sequence():
    t = 3  # any text token
    ids = torch.tensor([[t, t, IMG, t, t, IMG, t, t],  # text before, between and after two images
                        [IMG, t, t, t, t, t, t, t]])  # one image; its second slot is never used
    none, first, second, both = [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]
    want_last = torch.tensor([[none, none, first, first, first, second, second, second], [first] * 8])
    want_all = torch.tensor([[none, none, first, first, first, both, both, both], [first] * 8])
    got = media_mask(ids, IMG, tokens_per_image=2)
    assert got.dtype == torch.bool and got.shape == (2, 8, 4)
    assert torch.equal(got, want_last.bool())
    assert torch.equal(media_mask(ids, IMG, 2, only_last=False), want_all.bool())
    # explicit room for more images: extra slots stay unmarked; too little room is an error
    unused = torch.zeros(2, 8, 2, dtype=torch.bool)
    assert torch.equal(media_mask(ids, IMG, 2, num_images=3), torch.cat([want_last.bool(), unused], -1))
    with pytest.raises(ValueError, match="2 image tokens but num_images is 1"):
        media_mask(ids, IMG, 2, num_images=1)


class _Tok:
    """The two attributes IDEFICS' processor helper reads from a tokenizer."""
    eos_token_id = -100

    def convert_tokens_to_ids(self, token):
        return IMG


def idefics_masks(ids: torch.Tensor, tokens_per_image: int, dtype=torch.float32):
    """image_attention_mask and cross_attention_gate as IdeficsProcessor + IdeficsModel.forward build them."""
    proc = pytest.importorskip("transformers.models.idefics.processing_idefics")
    incremental, _ = proc.image_attention_mask_for_packed_input_ids_pt(ids, _Tok())
    n_img = int((ids == IMG).sum(-1).max())
    per_image = proc.incremental_to_binary_attention_mask(incremental, "pt", num_classes=n_img)  # [B, T, n]
    # IdeficsModel.forward, verbatim
    m = per_image[..., None].expand(-1, -1, -1, tokens_per_image).reshape(*per_image.shape[:2], -1)
    m = torch.where(m[:, None, :, :].bool(), torch.full((), 0.0, dtype=dtype), torch.finfo(dtype).min)
    gate = (m == 0.0).any(dim=-1).to(dtype=dtype).squeeze(dim=1)
    return m, gate


def test_media_mask_is_what_idefics_builds():
    ids = torch.tensor([[3, 3, IMG, 3, IMG, 3, 3, 3, 3], [3, 3, 3, 3, IMG, 3, 3, 3, 3]])
    additive, gate = idefics_masks(ids, 3)
    ours = media_mask(ids, IMG, 3)
    assert torch.equal(ours, additive[:, 0] == 0)
    assert torch.equal(ours.any(-1), gate.bool())


# ------------------------------------------------------------------------------------------- gated block


@pytest.mark.parametrize("alpha_type,qk_norm", [("float", False), ("vector", True)])
def test_gated_block_matches_idefics_layer(alpha_type, qk_norm):
    modeling = pytest.importorskip("transformers.models.idefics.modeling_idefics")
    from transformers.models.idefics.configuration_idefics import IdeficsConfig

    dim, d_img, heads, mlp, M = 32, 24, 4, 48, 3
    cfg = IdeficsConfig(hidden_size=dim, num_attention_heads=heads, intermediate_size=mlp, rms_norm_eps=1e-6,
                        vision_config={"embed_dim": d_img}, qk_layer_norms=qk_norm, alpha_type=alpha_type)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = modeling.IdeficsGatedCrossAttentionLayer(cfg, layer_idx=0).eval()
    assert not ref.alpha_cross_attn.any() and not ref.alpha_dense.any()  # IDEFICS starts at zero too
    perturb_(ref, torch.Generator().manual_seed(2))  # non-zero alphas, moved norms
    ours = GatedCrossAttentionBlock(dim, d_img, heads, mlp, qk_norm=qk_norm, alpha_type=alpha_type).eval()
    load_mapped(ours, ref, idefics_gated_xattn_key_map(qk_norm))

    ids = torch.tensor([[3, 3, IMG, 3, IMG, 3, 3, 3, 3],  # text before, between and after images
                        [3, 3, 3, 3, IMG, 3, 3, 3, 3]])
    additive, gate = idefics_masks(ids, M)
    x, images = torch.randn(2, 9, dim), torch.randn(2, 2 * M, d_img)
    with torch.no_grad():
        want = ref(x, None, image_hidden_states=images, image_attention_mask=additive,
                   cross_attention_gate=gate)
        got = ours(x, images, media_mask(ids, IMG, M))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # tokens before any image do not see the images: other images leave them alone, and move the rest
    with torch.no_grad():
        other = ours(x, torch.randn_like(images), media_mask(ids, IMG, M))
    blind = ~media_mask(ids, IMG, M).any(-1)
    assert torch.equal(other[blind], got[blind]) and not torch.allclose(other[~blind], got[~blind])


def test_fresh_gated_block_is_the_identity():
    block = GatedCrossAttentionBlock(16, 8, 2, 32)
    x = torch.randn(2, 5, 16)
    assert torch.equal(block(x, torch.randn(2, 6, 8)), x)
    assert torch.equal(block(x, None), x)


# ------------------------------------------------------------------------------------------ wrapped LM


def tiny_lm(depth: int = 4) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(LanguageConfig(vocab_size=50, width=32, depth=depth, heads=4, kv_heads=2, mlp_dim=64,
                                    max_seq_len=64)).eval()


@pytest.mark.slow
def test_wrapped_lm_at_zero_gates_gives_the_bare_lm_logits_and_learns_the_gates():
    lm = tiny_lm()
    model = add_cross_attention(lm, every=2, d_image=24)
    assert isinstance(model, CrossAttentionLM) and len(model.xattn) == 2  # before layers 0 and 2
    assert all(not b.alpha_cross_attn.any() and not b.alpha_dense.any() for b in model.xattn)
    ids = torch.tensor([[3, IMG, 4, 5, IMG, 6, 8, 9], [3, 4, 5, IMG, 6, 7, 8, 9]])
    mask = media_mask(ids, IMG, 4)
    images = torch.randn(2, 8, 24)

    embeds = lm.embed_tokens(ids)
    bare = lm.lm_head(lm(embeds))
    wrapped = model.lm_head(model(embeds, images, mask))
    assert torch.equal(wrapped, bare)
    # also with padding (explicit attention_mask path) and without images
    pad = torch.ones(2, 8, dtype=torch.long)
    pad[1, :2] = 0
    assert torch.equal(model(embeds, images, mask, attention_mask=pad), lm(embeds, attention_mask=pad))
    assert torch.equal(model(embeds), lm(embeds))

    # gradients reach every gate at zero (tanh'(0) = 1), so training can open them
    model.freeze_lm()
    model(embeds, images, mask).pow(2).mean().backward()
    for block in model.xattn:
        assert block.alpha_cross_attn.grad is not None and block.alpha_cross_attn.grad.abs().sum() > 0
        assert block.alpha_dense.grad is not None and block.alpha_dense.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm.parameters())

    # opened gates change the logits, and the images now matter
    with torch.no_grad():
        for block in model.xattn:
            block.alpha_cross_attn.fill_(0.7)
            block.alpha_dense.fill_(-0.4)
        opened = model.lm_head(model(embeds, images, mask))
        other = model.lm_head(model(embeds, torch.randn_like(images), mask))
    assert not torch.allclose(opened, bare) and not torch.allclose(opened, other)


def test_wrapped_lm_block_count_and_cached_decoding():
    lm = tiny_lm(depth=3)
    model = add_cross_attention(lm, every=2, d_image=24, heads=2, mlp_dim=40, qk_norm=True)
    assert len(model.xattn) == 2
    order = []  # the blocks run before layers 0 and 2, as IDEFICS' idx % cross_layer_interval == 0
    for i, block in enumerate(model.xattn):
        block.register_forward_hook(lambda *_, n=f"x{i}": order.append(n))
    for i, layer in enumerate(lm.layers):
        layer.register_forward_hook(lambda *_, n=f"L{i}": order.append(n))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.xattn.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    ids = torch.tensor([[3, IMG, 4, 5, IMG, 6, 8, 9]])
    mask, images = media_mask(ids, IMG, 4), torch.randn(1, 8, 24)
    embeds = lm.embed_tokens(ids)
    with torch.no_grad():
        full = model(embeds, images, mask)
        cache = model.new_cache(1, 16)
        head = model(embeds[:, :6], images, mask[:, :6], cache=cache)
        steps = [model(embeds[:, t:t + 1], images, mask[:, t:t + 1], cache=cache) for t in (6, 7)]
    torch.testing.assert_close(torch.cat([head, *steps], 1), full, atol=1e-5, rtol=1e-5)
    assert order[:5] == ["x0", "L0", "L1", "x1", "L2"] and len(order) == 4 * 5


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="alpha_type"):
        GatedCrossAttentionBlock(16, 8, 2, 32, alpha_type="matrix")
    with pytest.raises(ValueError, match="every"):
        add_cross_attention(tiny_lm(), every=0, d_image=8)


# ------------------------------------------------------------------------------------- Mllama's options

# vlmkit GatedCrossAttentionBlock key -> transformers MllamaCrossAttentionDecoderLayer key
MLLAMA_BLOCK = {"input_norm.weight": "input_layernorm.weight",
                "post_attn_norm.weight": "post_attention_layernorm.weight",
                "attn.q_norm.weight": "cross_attn.q_norm.weight", "attn.k_norm.weight": "cross_attn.k_norm.weight",
                "alpha_cross_attn": "cross_attn_attn_gate", "alpha_dense": "cross_attn_mlp_gate"}
MLLAMA_BLOCK |= {f"attn.{p}_proj.weight": f"cross_attn.{p}_proj.weight" for p in "qkvo"}
MLLAMA_BLOCK |= {f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}


def test_gated_block_matches_mllama_cross_attention_layer():
    """Grouped-query cross-attention with q/k norms, and Mllama's rows that see no image: they attend to every
    image token of the sample and drop their MLP branch (transformers' full_text_row_masked_out_mask)."""
    modeling = pytest.importorskip("transformers.models.mllama.modeling_mllama")
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig

    dim, heads, kv_heads, mlp, tiles, P = 32, 4, 2, 48, 2, 3
    cfg = MllamaTextConfig(hidden_size=dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                           intermediate_size=mlp, rms_norm_eps=1e-5)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = modeling.MllamaCrossAttentionDecoderLayer(cfg, layer_idx=0).eval()
    perturb_(ref, torch.Generator().manual_seed(2))
    with torch.no_grad():  # open gates (transformers starts them at zero)
        ref.cross_attn_attn_gate.fill_(0.8)
        ref.cross_attn_mlp_gate.fill_(-0.6)
    ours = GatedCrossAttentionBlock(dim, dim, heads, mlp, eps=1e-5, qk_norm=True, kv_heads=kv_heads,
                                    empty_rows="mllama").eval()
    load_mapped(ours, ref, MLLAMA_BLOCK)
    # [B, T, images, tiles]: row 0 sees nothing at first, then image 0's first tile, then both images; row 1 all
    tile_mask = torch.zeros(2, 5, 2, tiles, dtype=torch.long)
    tile_mask[0, 2:, 0, 0] = 1
    tile_mask[0, 4:, :, :] = 1
    tile_mask[1] = 1
    additive, full_row = modeling._prepare_cross_attention_mask(tile_mask, P, torch.float32)
    x, images = torch.randn(2, 5, dim), torch.randn(2, 2 * tiles * P, dim)
    sees = tile_mask[..., None].expand(2, 5, 2, tiles, P).reshape(2, 5, -1).bool()
    with torch.no_grad():
        want = ref(x, cross_attention_states=images, cross_attention_mask=additive, attention_mask=None,
                   full_text_row_masked_out_mask=full_row)
        got = ours(x, images, sees)
        cached = ours(x, None, sees, kv=ours.attn.project_images(images))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(cached, got)
    # the rows that see no image still depend on the images; without any image the block is skipped
    with torch.no_grad():
        other = ours(x, torch.randn_like(images), sees)
    assert not torch.allclose(other[0, :2], got[0, :2]) and torch.equal(ours(x, None), x)
    # a key mask keeps a row to its own sample's image tokens, the empty rows too
    keys = torch.zeros(2, 1, images.shape[1], dtype=torch.bool)
    keys[:, :, :tiles * P] = True  # only the first image is the sample's
    with torch.no_grad():
        kept = ours(x, images, sees, key_mask=keys)
        alone = ours(x, images[:, :tiles * P], sees[..., :tiles * P])
    torch.testing.assert_close(kept, alone, atol=1e-6, rtol=0)


def test_wrapped_lm_at_explicit_positions_with_cached_image_keys():
    lm = tiny_lm(depth=3)
    model = add_cross_attention(lm, None, d_image=24, positions=[0, 0, 3], qk_norm=True, kv_heads=2,
                                empty_rows="mllama")
    order = []
    for i, block in enumerate(model.xattn):
        block.register_forward_hook(lambda *_, n=f"x{i}": order.append(n))
    for i, layer in enumerate(lm.layers):
        layer.register_forward_hook(lambda *_, n=f"L{i}": order.append(n))
    ids = torch.tensor([[3, IMG, 4, 5, IMG, 6, 8, 9]])
    mask, images = media_mask(ids, IMG, 4), torch.randn(1, 8, 24)
    embeds = lm.embed_tokens(ids)
    with torch.no_grad():
        assert torch.equal(model(embeds, images, mask), lm(embeds))  # closed gates: the bare LM
        g = torch.Generator().manual_seed(3)
        for p in model.xattn.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        full = model(embeds, images, mask)
        kv = model.project_images(images)
        torch.testing.assert_close(model(embeds, None, mask, image_kv=kv), full, atol=1e-6, rtol=0)
    assert order[-6:] == ["x0", "x1", "L0", "L1", "L2", "x2"]  # the last block after the last layer
    assert not torch.allclose(full, lm(embeds))
    for bad in ({"every": 2, "positions": [0]}, {"every": None, "positions": [2, 1]},
                {"every": None, "positions": [0, 4]}):
        with pytest.raises(ValueError, match="every|positions"):
            add_cross_attention(tiny_lm(depth=3), d_image=8, **bad)
    with pytest.raises(ValueError, match="empty_rows"):
        GatedCrossAttentionBlock(16, 8, 2, 32, empty_rows="zero")
