"""Encoders, decoder, connectors, splice fusion, the composed VisionLanguageModel and the presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from vlmkit.batch import Batch
from vlmkit.config import ConnectorConfig, LanguageConfig, QFormerConfig, ResamplerConfig, VisionConfig, VLMConfig
from vlmkit.connectors import CONNECTORS, build_connector, pixel_shuffle
from vlmkit.encoders.cnn import ConvEncoder
from vlmkit.encoders.vit import ViTEncoder
from vlmkit.errors import ConfigError
from vlmkit.fusion.splice import splice_image_features
from vlmkit.lm.decoder import DecoderLM
from vlmkit.models import build_model, count_parameters
from vlmkit.presets import PRESETS, get_preset

from helpers import fixed_media, forward


def vit_config(**kw) -> VisionConfig:
    base = {"image_size": (16, 32), "patch_size": 8, "width": 32, "depth": 2, "heads": 2, "mlp_dim": 64}
    return VisionConfig(**{**base, **kw})


pytestmark = pytest.mark.usefixtures("single_thread")

# ------------------------------------------------------------------------------------------------ CNN


@pytest.mark.parametrize("pos", ["sincos2d", "learned", "none"])
def test_cnn_tower_gives_the_vit_token_grid(pos):
    cfg = vit_config(arch="cnn", pos_embed=pos)
    enc = ConvEncoder(cfg)
    x = torch.randn(3, 3, 16, 32)
    out = enc(x)
    assert out.shape == (3, enc.num_tokens, 32) and enc.grid == cfg.grid == (2, 4)
    assert enc.num_tokens == ViTEncoder(vit_config()).num_tokens
    # each token sees its own region: changing the right half of the image leaves the far-left tokens alone
    enc.eval()
    y = x.clone()
    y[..., 24:] = torch.randn_like(y[..., 24:])
    a, b = enc(x).view(3, 2, 4, 32), enc(y).view(3, 2, 4, 32)
    assert torch.allclose(a[:, :, 0], b[:, :, 0]) and not torch.allclose(a[:, :, 3], b[:, :, 3])


def test_cnn_tower_positions_tell_tokens_apart():
    enc = ConvEncoder(vit_config(arch="cnn", pos_embed="sincos2d")).eval()
    out = enc(torch.zeros(1, 3, 16, 32))  # a blank image: only the positions differ
    assert torch.cdist(out[0], out[0]).add(torch.eye(8) * 1e3).min() > 0.1


def test_cnn_tower_bad_configs_raise():
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        ConvEncoder(vit_config(arch="cnn", image_size=(12, 24), patch_size=6))
    with pytest.raises(ValueError, match="no class token"):
        ConvEncoder(vit_config(arch="cnn", class_token=True))
    with pytest.raises(ValueError, match="arch 'cnn' must be 'sincos2d', 'learned' or 'none'"):
        ConvEncoder(vit_config(arch="cnn", pos_embed="rope2d"))
    with pytest.raises(ValueError, match="pos_scale scales fixed sincos2d positions; pos_embed is 'learned'"):
        ConvEncoder(vit_config(arch="cnn", pos_embed="learned", pos_scale=2.0))
    with pytest.raises(ValueError, match="pos_scale is for arch 'cnn'"):
        ViTEncoder(vit_config(pos_scale=2.0))
    loud = ConvEncoder(vit_config(arch="cnn", image_size=(32, 32), patch_size=8, pos_embed="sincos2d", pos_scale=2.0))
    quiet = ConvEncoder(vit_config(arch="cnn", image_size=(32, 32), patch_size=8, pos_embed="sincos2d"))
    torch.testing.assert_close(loud.pos_embed, 2 * quiet.pos_embed)
    cfg = get_preset("tiny-llava").model
    with pytest.raises(ValueError, match="needs vision.arch one of"):
        build_model(dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, arch="resnet")), 3)


def test_head_init_std_needs_an_untied_head():
    cfg = get_preset("tiny-llava").model
    model = build_model(cfg, 3)
    assert cfg.lm.head_init_std == 0.25 and not cfg.lm.tie_embeddings
    assert model.lm.lm_head.weight.std().item() == pytest.approx(0.25, rel=0.05)
    assert model.lm.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    tied = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, tie_embeddings=True))
    with pytest.raises(ValueError, match="head_init_std initialises an untied LM head"):
        build_model(tied, 3)


# ------------------------------------------------------------------------------------------------ ViT


@pytest.mark.parametrize("pos_embed", ["learned", "rope2d", "sincos2d"])
@pytest.mark.parametrize("class_token,drop_class_token", [(False, True), (True, True), (True, False)])
def test_vit_output_shapes_on_non_square_images(pos_embed, class_token, drop_class_token):
    if pos_embed == "sincos2d" and class_token:
        pytest.skip("sincos2d refuses a class token (tested below)")
    cfg = vit_config(pos_embed=pos_embed, class_token=class_token, drop_class_token=drop_class_token)
    enc = ViTEncoder(cfg)
    out = enc(torch.randn(3, 3, 16, 32))
    n = (16 // 8) * (32 // 8) + (1 if class_token and not drop_class_token else 0)
    assert enc.grid == (2, 4)
    assert out.shape == (3, n, 32)
    assert enc.num_tokens == n


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_vit_stems_give_the_same_token_grid(stem):
    enc = ViTEncoder(vit_config(stem=stem, class_token=True))
    assert enc(torch.randn(2, 3, 16, 32)).shape == (2, 8, 32)


def test_vit_unknown_stem_or_bad_conv_stem_patch_raises():
    with pytest.raises(ValueError, match="vision.stem"):
        ViTEncoder(vit_config(stem="resnet"))
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        ViTEncoder(vit_config(stem="conv", image_size=(12, 24), patch_size=6))
    with pytest.raises(ValueError, match="vision.stem_norm must be 'group' or 'batch'"):
        ViTEncoder(vit_config(stem="conv", stem_norm="layer"))


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_vit_casts_fp32_pixels_to_its_own_dtype(stem):
    enc = ViTEncoder(vit_config(stem=stem, depth=1)).to(torch.bfloat16)
    out = enc(torch.randn(1, 3, 16, 32))  # processors always produce fp32
    assert out.dtype == torch.bfloat16 and out.shape == (1, 8, 32)


def test_vit_rope2d_has_no_learned_positions_and_depends_on_patch_position():
    torch.manual_seed(0)
    enc = ViTEncoder(vit_config(image_size=(16, 16), pos_embed="rope2d", depth=1)).eval()
    assert enc.pos_embed is None
    img = torch.randn(1, 3, 16, 16)
    swapped = img.clone()  # swap the top-left and top-right patches
    swapped[..., :8, :8], swapped[..., :8, 8:] = img[..., :8, 8:], img[..., :8, :8]
    a, b = enc(img), enc(swapped)
    # with no positions attention is permutation-equivariant: patch 0 of `swapped` would be patch 1 of `img`
    assert not torch.allclose(a[:, 1], b[:, 0], atol=1e-4)


def test_sincos2d_positions_are_fixed_unit_scale_and_encode_row_and_column():
    from vlmkit.nn import sincos_2d

    pe = sincos_2d(3, 5, 16)  # rows 0..2, columns 0..4
    assert pe.shape == (15, 16)
    # each (sin, cos) pair has unit norm, so every position vector has norm sqrt(dim / 2)
    torch.testing.assert_close(pe.norm(dim=1), torch.full((15,), 8**0.5))
    rows, cols = pe[:, :8], pe[:, 8:]
    assert torch.equal(rows[0], rows[4]) and not torch.equal(rows[0], rows[5])  # same row, next row
    assert torch.equal(cols[0], cols[5]) and not torch.equal(cols[0], cols[1])  # same column, next column
    torch.testing.assert_close(rows[5, :4], torch.sin(torch.tensor(1.0) / 10000 ** (torch.arange(4) / 4)))

    enc = ViTEncoder(vit_config(pos_embed="sincos2d"))
    assert "pos_embed" not in enc.state_dict() and all(p is not enc.pos_embed for p in enc.parameters())
    torch.testing.assert_close(enc.pos_embed[0], sincos_2d(2, 4, 32))
    with pytest.raises(ValueError, match="sincos2d.*class token"):
        ViTEncoder(vit_config(pos_embed="sincos2d", class_token=True))
    with pytest.raises(ValueError, match="width divisible by 4, got 30"):
        sincos_2d(2, 2, 30)
    with pytest.raises(ValueError, match="learned', 'sincos2d' or 'rope2d'"):
        ViTEncoder(vit_config(pos_embed="absolute"))


def test_vit_without_final_norm_feeds_pixel_shuffle():
    """Regression: without post_norm the ViT returned a strided view of its patch embedding and the
    pixel-shuffle connector's ``view`` raised. Both sides are fixed; both are checked."""
    cfg = vit_config(image_size=(16, 16), post_norm=False)
    enc = ViTEncoder(cfg)
    feats = enc(torch.randn(2, 3, 16, 16))
    conn = build_connector(ConnectorConfig(kind="pixel_shuffle", scale_factor=2, layers=1), 32, 24)
    assert conn(feats, enc.grid).shape == (2, 1, 24)
    strided = torch.randn(2, 32, 16).transpose(1, 2)  # [B, N=16, D=32], not contiguous
    torch.testing.assert_close(pixel_shuffle(strided, (4, 4), 2), pixel_shuffle(strided.contiguous(), (4, 4), 2))


@pytest.mark.parametrize("feature_layer,built", [(-1, 2), (-2, 1), (0, 0), (2, 2), (1, 1)])
def test_vit_feature_layer_builds_only_needed_blocks(feature_layer, built):
    enc = ViTEncoder(vit_config(feature_layer=feature_layer))
    assert len(enc.blocks) == built
    assert enc(torch.randn(1, 3, 16, 32)).shape == (1, 8, 32)


def test_vit_feature_layer_out_of_range_raises():
    with pytest.raises(ValueError, match="feature_layer"):
        ViTEncoder(vit_config(feature_layer=-4))
    with pytest.raises(ValueError, match="feature_layer"):
        ViTEncoder(vit_config(feature_layer=3))


@pytest.mark.parametrize("post_norm", [False, True])
def test_vit_penultimate_layer_equals_hidden_state_after_penultimate_block(post_norm):
    """LLaVA's layer -2 is the output of the full encoder's block depth-1 (CLIP: class token, pre-norm)."""
    torch.manual_seed(0)
    kw = {"class_token": True, "pre_norm": True, "post_norm": post_norm}
    full = ViTEncoder(vit_config(feature_layer=-1, **kw)).eval()
    penult = ViTEncoder(vit_config(feature_layer=-2, **kw)).eval()
    missing, unexpected = penult.load_state_dict(full.state_dict(), strict=False)
    assert missing == [] and unexpected and all(k.startswith("blocks.1.") for k in unexpected)

    captured = {}
    full.blocks[0].register_forward_hook(lambda m, args, out: captured.setdefault("h", out))
    img = torch.randn(2, 3, 16, 32)
    full(img)
    expected = captured["h"]  # [B, 1 + N, D]
    if post_norm:
        expected = full.post_norm(expected)
    torch.testing.assert_close(penult(img), expected[:, 1:])


def test_vit_feature_layer_zero_is_the_embeddings():
    torch.manual_seed(0)
    full = ViTEncoder(vit_config(feature_layer=-1, post_norm=False)).eval()
    zero = ViTEncoder(vit_config(feature_layer=0, post_norm=False)).eval()
    zero.load_state_dict(full.state_dict(), strict=False)
    captured = {}
    full.blocks[0].register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    img = torch.randn(2, 3, 16, 32)
    full(img)
    torch.testing.assert_close(zero(img), captured["x"])


def test_vit_wrong_image_size_names_the_processor():
    enc = ViTEncoder(vit_config())
    with pytest.raises(ValueError, match="processor"):
        enc(torch.randn(1, 3, 32, 16))  # (H, W) swapped


# ------------------------------------------------------------------------------------------------ decoder LM


def lm_config(**kw) -> LanguageConfig:
    base = {"vocab_size": 50, "width": 32, "depth": 2, "heads": 4, "kv_heads": 2, "mlp_dim": 64, "max_seq_len": 64}
    return LanguageConfig(**{**base, **kw})


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("kv_heads,head_dim", [(2, None), (4, None), (1, 16)])
def test_decoder_shapes_and_flags(tie, qkv_bias, kv_heads, head_dim):
    lm = DecoderLM(lm_config(tie_embeddings=tie, qkv_bias=qkv_bias, kv_heads=kv_heads, head_dim=head_dim))
    hd = head_dim or 8
    attn = lm.layers[0].attn
    assert (lm.lm_head.weight is lm.embed_tokens.weight) == tie
    assert (attn.q_proj.bias is not None) == qkv_bias
    assert attn.q_proj.out_features == 4 * hd and attn.k_proj.out_features == kv_heads * hd
    hidden = lm(lm.embed_tokens(torch.randint(0, 50, (2, 7))))
    assert hidden.shape == (2, 7, 32)
    assert lm.lm_head(hidden).shape == (2, 7, 50)


def test_decoder_is_causal_and_masked_path_equals_fast_path():
    torch.manual_seed(0)
    lm = DecoderLM(lm_config()).eval()
    x = torch.randn(2, 6, 32)
    fast = lm(x)  # is_causal SDPA
    masked = lm(x, attention_mask=torch.ones(2, 6, dtype=torch.long))
    torch.testing.assert_close(masked, fast, atol=1e-5, rtol=1e-5)
    y = x.clone()
    y[:, 4:] = torch.randn(2, 2, 32)  # change the future
    out = lm(y)
    torch.testing.assert_close(out[:, :4], fast[:, :4], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out[:, 4:], fast[:, 4:])


# ------------------------------------------------------------------------------------------------ connectors

CONNECTOR_CASES = {  # name -> (ConnectorConfig, expected M for a 4x4 grid of 16 patches)
    "linear": [(ConnectorConfig(kind="linear"), 16)],
    "mlp": [(ConnectorConfig(kind="mlp"), 16)],
    "pixel_shuffle": [(ConnectorConfig(kind="pixel_shuffle", scale_factor=2, layers=1), 4),
                      (ConnectorConfig(kind="pixel_shuffle", scale_factor=2, layers=2), 4),
                      (ConnectorConfig(kind="pixel_shuffle", scale_factor=4, layers=1), 1)],
    "qformer": [(ConnectorConfig(kind="qformer", qformer=QFormerConfig(width=32, depth=2, heads=4, mlp_dim=64,
                                                                       num_query_tokens=5)), 5)],
    "perceiver": [(ConnectorConfig(kind="perceiver", act="silu", perceiver=ResamplerConfig(n_latents=5, depth=2, heads=4,
                                                                                          head_dim=8, kv_heads=2)), 5)],
    # the pooling connectors (connectors/pooling.py): each 2x2 window one token, or adaptive pooling to num_queries
    "ldp": [(ConnectorConfig(kind="ldp", pool=2), 4)],
    "ldp_v2": [(ConnectorConfig(kind="ldp_v2", pool=2), 4), (ConnectorConfig(kind="ldp_v2", num_queries=1), 1)],
    "c_abstractor": [(ConnectorConfig(kind="c_abstractor", num_queries=4, depth=1), 4)],
    "avg_pool": [(ConnectorConfig(kind="avg_pool", pool=2), 4), (ConnectorConfig(kind="avg_pool", pool=4), 1)],
    "attn_pool": [(ConnectorConfig(kind="attn_pool", pool=2, heads=2), 4)],
}


def test_every_registered_connector_has_a_test_case():
    assert sorted(CONNECTOR_CASES) == CONNECTORS.names()


@pytest.mark.parametrize("cfg,m", [case for cases in CONNECTOR_CASES.values() for case in cases],
                         ids=lambda v: getattr(v, "kind", str(v)))
def test_connector_maps_vision_to_lm_width_with_stated_token_count(cfg, m):
    conn = build_connector(cfg, 24, 40)
    x = torch.randn(2, 16, 24)  # [B, N, D_vision], 4x4 grid
    out = conn(x, (4, 4))
    assert conn.num_tokens(16, (4, 4)) == m
    assert out.shape == (2, m, 40)


def test_a_llava_model_with_the_perceiver_connector_builds_runs_and_trains():
    """The perceiver (Idefics2's connector) is a registered connector any composed model can use."""
    cfg = VLMConfig(family="llava", vision=VisionConfig(image_size=(16, 16), patch_size=4, width=32, depth=1, heads=4,
                                                        mlp_dim=64),
                    connector=ConnectorConfig(kind="perceiver", act="silu", perceiver=ResamplerConfig(
                        n_latents=5, depth=2, heads=4, head_dim=8, kv_heads=2)),
                    lm=LanguageConfig(vocab_size=50, width=32, depth=1, heads=4, kv_heads=2, mlp_dim=64))
    torch.manual_seed(0)
    model = build_model(cfg, image_token_id=3)
    assert model.image_seq_len == 5
    ids = torch.tensor([[1, 3, 3, 3, 3, 3, 7, 8, 9, 10, 11]] * 2)
    media = fixed_media(torch.randn(2, 3, 16, 16), 5)
    labels = ids.masked_fill(ids == 3, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = model(Batch(ids, labels=labels, media=media)).loss
        opt.zero_grad()
        loss.backward()
        assert model.connector.latents.grad.abs().sum() > 0 and model.connector.proj.gate_proj.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_pixel_shuffle_bad_grid_and_layers_raise():
    with pytest.raises(ValueError, match="divisible by 2"):
        pixel_shuffle(torch.randn(1, 9, 4), (3, 3), 2)
    with pytest.raises(ValueError, match="layers must be 1 or 2"):
        build_connector(ConnectorConfig(kind="pixel_shuffle", layers=3), 8, 8)


def idefics3_pixel_shuffle(x: torch.Tensor, scale_factor: int = 2) -> torch.Tensor:
    """Idefics3Connector.pixel_shuffle, copied from transformers/models/idefics3/modeling_idefics3.py."""
    bsz, seq, embed_dim = x.size()
    height = width = int(seq**0.5)
    x = x.view(bsz, height, width, embed_dim)
    x = x.view(bsz, height, int(width / scale_factor), embed_dim * scale_factor)
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(bsz, int(width / scale_factor), int(height / scale_factor), embed_dim * (scale_factor**2))
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(bsz, int(seq / (scale_factor**2)), embed_dim * (scale_factor**2))
    return x


def loop_pixel_shuffle(x: torch.Tensor, grid: tuple[int, int], s: int) -> torch.Tensor:
    """Token (i, j) = patches (i*s + u, j*s + t) concatenated with u (row offset) outer, t (column) inner."""
    B, _, D = x.shape
    h, w = grid
    patches = x.view(B, h, w, D)
    tokens = [torch.cat([patches[:, i * s + u, j * s + t] for u in range(s) for t in range(s)], dim=-1)
              for i in range(h // s) for j in range(w // s)]
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("side,s", [(4, 2), (8, 2), (8, 4)])
def test_pixel_shuffle_matches_idefics3_on_square_grids(side, s):
    x = torch.randn(2, side * side, 6)
    out = pixel_shuffle(x, (side, side), s)
    torch.testing.assert_close(out, idefics3_pixel_shuffle(x, s), rtol=0, atol=0)
    torch.testing.assert_close(out, loop_pixel_shuffle(x, (side, side), s), rtol=0, atol=0)
    assert torch.equal(out.flatten().sort().values, x.flatten().sort().values)  # a permutation: nothing lost


def test_pixel_shuffle_non_square_grid_groups_spatial_neighbours():
    x = torch.randn(1, 4 * 8, 3)
    out = pixel_shuffle(x, (4, 8), 2)
    assert out.shape == (1, 8, 12)
    torch.testing.assert_close(out, loop_pixel_shuffle(x, (4, 8), 2), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ splice


def test_splice_puts_features_exactly_at_placeholders():
    IMG = 99
    ids = torch.tensor([
        [5, IMG, IMG, 6, 7, 8, 9],  # sample 0: one image at 1..2
        [IMG, IMG, 3, 4, IMG, IMG, 2],  # sample 1: images at 0..1 and 4..5
    ])
    embeds = torch.randn(2, 7, 4)
    feats = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4) + 1000  # [n_images, M, D]
    out = splice_image_features(embeds, ids, IMG, feats)
    assert torch.equal(out[0, 1:3], feats[0])
    assert torch.equal(out[1, 0:2], feats[1])
    assert torch.equal(out[1, 4:6], feats[2])
    text = ids != IMG
    assert torch.equal(out[text], embeds[text])


def test_splice_count_mismatch_raises():
    ids = torch.tensor([[99, 99, 1, 99, 99]])
    with pytest.raises(ValueError, match="4 image placeholder tokens"):
        splice_image_features(torch.zeros(1, 5, 4), ids, 99, torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="placeholder"):
        splice_image_features(torch.zeros(1, 5, 4), ids, 99, None)
    with pytest.raises(ValueError, match="placeholder"):
        splice_image_features(torch.zeros(1, 3, 4), torch.tensor([[1, 2, 3]]), 99, torch.zeros(1, 2, 4))


# ------------------------------------------------------------------------------------------------ VLM


def random_batch(model, image_token_id: int, vocab: int, extra=(6, 3)):
    """Rows of M + extra[i] tokens, one image each at offset 1 + i, right-padded with token 0."""
    M = model.image_seq_len
    lengths = [M + e for e in extra]
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        row = torch.randint(1, vocab, (n,))
        row[row == image_token_id] = 1
        row[1 + i:1 + i + M] = image_token_id
        ids[i, :n] = row
    return ids, torch.randn(len(lengths), 3, 16, 16)


def test_loss_equals_cross_entropy_of_full_logits_at_supervised_positions(tiny_config, tokenizer):
    torch.manual_seed(0)
    cfg = tiny_config(connector="mlp")
    img_id = tokenizer.token_id("<image>")
    model = build_model(cfg, img_id).eval()
    ids, pixels = random_batch(model, img_id, cfg.lm.vocab_size, extra=(8, 8))  # T = M + 8
    T = ids.shape[1]
    labels = ids.clone()
    labels[0, :T - 6] = -100
    labels[1, :T - 4] = -100
    labels[1, T - 2] = -100
    media = fixed_media(pixels, model.image_seq_len)
    out = forward(model, ids, media, labels=labels)
    logits = forward(model, ids, media).logits  # [B, T, V]
    keep = labels[:, 1:] != -100
    expected = F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    assert out.n_tokens == int(keep.sum()) == 6 + 3


@pytest.mark.parametrize("connector,layers", [("linear", 1), ("mlp", 2), ("pixel_shuffle", 1),
                                              ("pixel_shuffle", 2)])
def test_every_parameter_gets_a_finite_gradient(tiny_config, tokenizer, connector, layers):
    """timm-style: forward + backward through the whole model reaches every trainable parameter."""
    torch.manual_seed(0)
    cfg = tiny_config(connector=connector, layers=layers, class_token=True, pre_norm=True, tie=False)
    img_id = tokenizer.token_id("<image>")
    model = build_model(cfg, img_id).train()
    ids, pixels = random_batch(model, img_id, cfg.lm.vocab_size)
    forward(model, ids, fixed_media(pixels, model.image_seq_len), labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_every_registered_connector_builds_into_a_model(tiny_config, tokenizer):
    for name in CONNECTORS.names():  # each with its first test case's settings (c_abstractor needs num_queries)
        cfg = dataclasses.replace(tiny_config(), connector=CONNECTOR_CASES[name][0][0])
        model = build_model(cfg, tokenizer.token_id("<image>"))
        feats = model.encode_media(fixed_media(torch.randn(2, 3, 16, 16), model.image_seq_len))
        assert feats.values.shape == (2, model.image_seq_len, 32) and feats.rows == [1, 1]


def test_placeholder_id_outside_the_embedding_table_is_spliced(tiny_config):
    """Imported checkpoints may put the image token past the LM's vocabulary; it is never looked up."""
    torch.manual_seed(0)
    cfg = tiny_config()
    img_id = cfg.lm.vocab_size + 7
    model = build_model(cfg, img_id).eval()
    ids = torch.tensor([[10] + [img_id] * model.image_seq_len + [11, 12]])
    pixels = torch.randn(1, 3, 16, 16)
    logits = forward(model, ids, fixed_media(pixels, model.image_seq_len)).logits
    assert logits.shape == (1, model.image_seq_len + 3, cfg.lm.vocab_size) and torch.isfinite(logits).all()


def test_left_padding_with_attention_mask_does_not_change_logits(tiny_config, tokenizer):
    torch.manual_seed(0)
    cfg = tiny_config()
    img_id = tokenizer.token_id("<image>")
    model = build_model(cfg, img_id).eval()
    M = model.image_seq_len
    short = [5, img_id] + [img_id] * (M - 1) + [7, 8, 9]
    long = [4, 6] + [img_id] * M + [10, 11, 12, 13, 14, 15, 16]
    pixels = torch.randn(2, 3, 16, 16)
    alone = forward(model, short, fixed_media(pixels[:1], M)).logits[0]
    pad = len(long) - len(short)
    ids = torch.tensor([[0] * pad + short, long])
    attn = torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)])
    batched = forward(model, ids, fixed_media(pixels, M), attention_mask=attn).logits
    torch.testing.assert_close(batched[0, pad:], alone, atol=1e-5, rtol=1e-5)
    long_alone = forward(model, long, fixed_media(pixels[1:], M)).logits[0]
    torch.testing.assert_close(batched[1], long_alone, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ presets


def test_preset_names():
    assert {"tiny-llava", "llava-1.5-7b", "smolvlm-256m"} <= set(PRESETS.names())


def meta_parameter_count(name: str) -> int:
    with torch.device("meta"):
        return count_parameters(build_model(get_preset(name).model, image_token_id=0))


def test_smolvlm_256m_parameter_count_matches_checkpoint():
    assert meta_parameter_count("smolvlm-256m") == 256_484_928  # HuggingFaceTB/SmolVLM-256M-Instruct


def test_llava_15_7b_parameter_count_matches_checkpoint():
    v = get_preset("llava-1.5-7b").model.vision
    # The CLIP layer after the feature layer (-2) is never run, so vlmkit does not build it:
    # q, k, v, o projections with bias + fc1 and fc2 with bias + two LayerNorms (weight and bias).
    attn = 4 * (v.width * v.width + v.width)
    mlp = (v.width * v.mlp_dim + v.mlp_dim) + (v.mlp_dim * v.width + v.width)
    clip_layer = attn + mlp + 2 * (2 * v.width)
    post_layernorm = 2 * v.width  # CLIP's post_layernorm only acts on the pooled output LLaVA does not use
    published = 7_063_427_072  # llava-hf/llava-1.5-7b-hf
    assert meta_parameter_count("llava-1.5-7b") == published - clip_layer - post_layernorm


def test_meta_build_touches_no_memory():
    with torch.device("meta"):
        model = build_model(get_preset("smolvlm-256m").model, image_token_id=0)
    assert all(p.is_meta for p in model.parameters())
    assert model.image_seq_len == (512 // 16) ** 2 // 16


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match=r"Unknown preset 'llava-9'.*Available:.*tiny-llava"):
        get_preset("llava-9")


def test_tiny_llava_preset_runs(tokenizer):
    cfg = get_preset("tiny-llava").model
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=tokenizer.vocab_size))
    model = build_model(cfg, tokenizer.token_id("<image>")).eval()
    M = model.image_seq_len
    ids = torch.tensor([[10] + [tokenizer.token_id("<image>")] * M + [11, 12]])
    assert forward(model, ids, fixed_media(torch.randn(1, 3, 64, 64), M)).logits.shape == (1, M + 3,
                                                                                          tokenizer.vocab_size)


@pytest.mark.parametrize("connector,layers", [("mlp", 2), ("linear", 2), ("pixel_shuffle", 1), ("pixel_shuffle", 2)])
def test_from_scratch_connector_emits_image_tokens_near_unit_scale(tiny_config, tokenizer, connector, layers):
    """Fan-in init: image tokens start at RMS ~0.3-1.5, not the ~0.02*sqrt(fan_in) of GPT-2's std-0.02 init."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_config(connector=connector, layers=layers),
                              vision=dataclasses.replace(tiny_config().vision, width=128),
                              lm=dataclasses.replace(tiny_config().lm, width=256, heads=4, kv_heads=2))
    model = build_model(cfg, tokenizer.token_id("<image>"))
    feats = torch.randn(64, model.encoder.num_tokens, 128)  # unit-scale, like the ViT's normed output
    with torch.no_grad():
        rms = model.connector(feats, model.encoder.grid).pow(2).mean().sqrt()
    assert 0.3 < float(rms) < 1.5, float(rms)
    linears = [m for m in model.connector.modules() if isinstance(m, torch.nn.Linear)]
    assert all(abs(float(m.weight.detach().std()) * m.in_features**0.5 - 1) < 0.1 for m in linears)
    assert all(not m.bias.any() for m in linears if m.bias is not None)


def test_precomputed_features_need_a_frozen_tower_in_eval_mode():
    from vlmkit.train.frozen_features import FrozenVisionFeatures

    tower = ConvEncoder(vit_config(arch="cnn", image_size=(16, 16), patch_size=8, pos_embed="sincos2d"))
    with pytest.raises(RuntimeError, match="needs the tower in eval mode"):
        FrozenVisionFeatures(tower.train(), processor=None, images=[])


def test_skip_default_init_leaves_weights_alone_and_restores_the_init_functions():
    from vlmkit.models import skip_default_init

    before = torch.nn.init.kaiming_uniform_
    with pytest.raises(RuntimeError, match="inside"):
        with skip_default_init():
            lin = torch.nn.Linear(4, 4)
            torch.nn.init.normal_(lin.weight.data.fill_(7.0))
            assert bool((lin.weight == 7.0).all())  # normal_ did nothing
            raise RuntimeError("inside")
    assert torch.nn.init.kaiming_uniform_ is before
    torch.manual_seed(0)
    assert not bool((torch.nn.init.normal_(torch.full((4,), 7.0)) == 7.0).all())


@pytest.mark.parametrize("preset", ["tiny-llava-vit", "paligemma-3b-224", "qwen2-vl-2b", "llava-onevision-0.5b",
                                    "mistral-small-3.1-24b"])
def test_every_family_gets_the_same_from_scratch_initialisation(preset):
    """One init for every family's model: fan-in connector, GPT-2 std elsewhere, residual outputs scaled."""
    from vlmkit.config import apply_overrides

    small = {"lm.depth": 2, "lm.vocab_size": 100, "lm.width": 256, "lm.heads": 4, "lm.kv_heads": 2,
             "lm.head_dim": None, "lm.mlp_dim": 256, "vision.depth": 2, "vision.width": 64, "vision.heads": 2,
             "vision.mlp_dim": 128, "lm.head_init_std": None}
    if preset.startswith("qwen2"):
        small["lm.mrope_section"] = [8, 12, 12]
    cfg = apply_overrides(get_preset(preset).model, small)
    torch.manual_seed(0)
    model = build_model(cfg, image_token_id=5)
    first = next(m for m in model.connector.modules() if isinstance(m, torch.nn.Linear))
    assert float(first.weight.std()) == pytest.approx(first.in_features ** -0.5, rel=0.1)
    assert float(model.lm.layers[0].mlp.up_proj.weight.std()) == pytest.approx(0.02, rel=0.1)
    assert float(model.lm.layers[0].mlp.down_proj.weight.std()) == pytest.approx(0.02 / 2, rel=0.1)  # /sqrt(2*2)
