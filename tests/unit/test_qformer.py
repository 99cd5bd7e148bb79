"""The Q-Former connector (BLIP-2 / InstructBLIP) against transformers' Q-Formers, and its weight names."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlmkit.connectors.qformer import (
    QFormer,
    QFormerConfig,
    QFormerConnector,
    load_qformer_from_hf,
    qformer_body_key_map,
    qformer_key_map,
    qformer_state_to_hf,
)
from vlmkit.convert.hf.blip2 import qformer_config_from_hf
from vlmkit.errors import CheckpointError, ConfigError

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

WIDTH, HEADS, MLP, VISION, QUERIES, PATCHES = 32, 4, 64, 24, 6, 10


def hf_qformer_config(depth: int, text: bool = False, **kw):
    cls = transformers.InstructBlipQFormerConfig if text else transformers.Blip2QFormerConfig
    extra = {"vocab_size": 50, "max_position_embeddings": 16} if text else {}
    return cls(hidden_size=WIDTH, num_hidden_layers=depth, num_attention_heads=HEADS, intermediate_size=MLP,
               cross_attention_frequency=2, encoder_hidden_size=VISION, layer_norm_eps=1e-6, **extra, **kw)


def ours_config(depth: int, text: bool = False) -> QFormerConfig:
    return QFormerConfig(width=WIDTH, depth=depth, heads=HEADS, mlp_dim=MLP, num_query_tokens=QUERIES,
                         cross_attention_frequency=2, vision_width=VISION, layer_norm_eps=1e-6,
                         vocab_size=50 if text else 0, max_position_embeddings=16)


def perturb_(module: torch.nn.Module, seed: int = 0) -> None:
    """Random LayerNorm scales/shifts (not 1/0) and biases (not 0), so a misplaced norm or bias shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "LayerNorm" in name or "layernorm" in name or name.endswith(".bias"):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.5 * torch.randn(p.shape, generator=g))


def copy_from_hf(hf: torch.nn.Module, cfg: QFormerConfig) -> QFormer:
    ours = QFormer(cfg).eval()
    load_qformer_from_hf(ours, hf.state_dict())
    return ours


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("depth", [2, 3, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_blip2_qformer(depth, masked):
    torch.manual_seed(depth)
    hf = transformers.Blip2QFormerModel(hf_qformer_config(depth)).eval()
    perturb_(hf, depth)
    ours = copy_from_hf(hf, ours_config(depth))
    queries, image = torch.randn(3, QUERIES, WIDTH), torch.randn(3, PATCHES, VISION)
    mask = None
    if masked:  # ragged images: rows keep 10, 7 and 3 patches
        mask = (torch.arange(PATCHES)[None] < torch.tensor([[10], [7], [3]])).long()
    with torch.no_grad():
        want = hf(query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=mask)
        want = want.last_hidden_state
        got = ours(queries, image, image_mask=mask)
    assert got.shape == want.shape == (3, QUERIES, WIDTH)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if masked:  # the mask really acts: masked-out patches do not matter, and without the mask they would
        noisy = image.clone()
        noisy[2, 3:] += 5.0
        with torch.no_grad():
            torch.testing.assert_close(ours(queries, noisy, image_mask=mask)[2], got[2], atol=1e-5, rtol=1e-5)
            assert not torch.allclose(ours(queries, noisy)[2], got[2], atol=1e-3)


@pytest.mark.parametrize("with_mask", [False, True])
def test_matches_instructblip_qformer_with_text(with_mask):
    depth = 3
    torch.manual_seed(1)
    hf = transformers.InstructBlipQFormerModel(hf_qformer_config(depth, text=True)).eval()
    perturb_(hf, 1)
    ours = copy_from_hf(hf, ours_config(depth, text=True))
    B, T = 2, 7
    queries, image = torch.randn(B, QUERIES, WIDTH), torch.randn(B, PATCHES, VISION)
    text_ids = torch.randint(1, 50, (B, T))
    text_mask = torch.tensor([[1] * T, [1] * 4 + [0] * 3]) if with_mask else None
    hf_mask = torch.cat([torch.ones(B, QUERIES, dtype=torch.long), text_mask], 1) if with_mask else None
    with torch.no_grad():
        want = hf(input_ids=text_ids, attention_mask=hf_mask, query_embeds=queries,
                  encoder_hidden_states=image).last_hidden_state
        got = ours(queries, image, text_ids=text_ids, text_mask=text_mask)
    assert got.shape == want.shape == (B, QUERIES + T, WIDTH)
    torch.testing.assert_close(got[:, :QUERIES], want[:, :QUERIES], atol=1e-5, rtol=1e-5)
    # the text positions match too wherever the text is real
    real = slice(QUERIES, QUERIES + (4 if with_mask else T))
    torch.testing.assert_close(got[:, real], want[:, real], atol=1e-5, rtol=1e-5)
    # the queries read the instruction: other text, other query states
    with torch.no_grad():
        other = ours(queries, image, text_ids=(text_ids % 49) + 1, text_mask=text_mask)
    assert not torch.allclose(other[:, :QUERIES], got[:, :QUERIES], atol=1e-4)
    if with_mask:  # padded text is invisible to the queries
        changed = text_ids.clone()
        changed[1, 4:] = 3
        with torch.no_grad():
            again = ours(queries, image, text_ids=changed, text_mask=text_mask)
        torch.testing.assert_close(again[1, :QUERIES], got[1, :QUERIES], atol=1e-6, rtol=1e-6)


def tiny_blip2(instruct: bool = False):
    """A Blip2ForConditionalGeneration / InstructBlipForConditionalGeneration: 1-layer ViT, tiny OPT."""
    vision = {"hidden_size": VISION, "intermediate_size": 48, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 16, "patch_size": 4}
    text = {"model_type": "opt", "hidden_size": 40, "num_hidden_layers": 1, "num_attention_heads": 2,
            "ffn_dim": 48, "vocab_size": 64, "word_embed_proj_dim": 40, "max_position_embeddings": 64}
    qformer = hf_qformer_config(3, text=instruct).to_dict()
    cls = transformers.InstructBlipConfig if instruct else transformers.Blip2Config
    cfg = cls(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=QUERIES)
    model_cls = (transformers.InstructBlipForConditionalGeneration if instruct
                 else transformers.Blip2ForConditionalGeneration)
    torch.manual_seed(3)
    model = model_cls(cfg).eval()
    perturb_(model.qformer, 3)
    with torch.no_grad():
        model.query_tokens.normal_()
    return cfg, model


def test_connector_matches_blip2_image_features():
    cfg, hf = tiny_blip2()
    ours_cfg = qformer_config_from_hf(cfg.to_dict())
    assert ours_cfg == dataclasses.replace(ours_config(3), max_position_embeddings=512)  # unused without text
    conn = QFormerConnector(VISION, 40, ours_cfg).eval()
    load_qformer_from_hf(conn, hf.state_dict())  # the whole checkpoint: vision_model.* etc. are ignored
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = hf.get_image_features(pixel_values=pixels)
        got = conn(out.last_hidden_state)
    assert got.shape == (2, QUERIES, 40)
    torch.testing.assert_close(got, out.pooler_output, atol=1e-5, rtol=1e-5)


def test_connector_matches_instructblip_image_features():
    cfg, hf = tiny_blip2(instruct=True)
    ours_cfg = qformer_config_from_hf(cfg.to_dict())
    assert ours_cfg.vocab_size == 50 and ours_cfg.text_input
    conn = QFormerConnector(VISION, 40, ours_cfg).eval()
    load_qformer_from_hf(conn, hf.state_dict())
    pixels, ids = torch.randn(2, 3, 16, 16), torch.randint(1, 50, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        out = hf.get_image_features(pixel_values=pixels, qformer_input_ids=ids, qformer_attention_mask=mask)
        got = conn(out.vision_outputs.last_hidden_state, text_ids=ids, text_mask=mask)
    want = out.pooler_output
    assert got.shape == want.shape == (2, QUERIES, 40)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ connector


def test_connector_shape_num_tokens_and_gradients():
    conn = QFormerConnector(VISION, 40, ours_config(2, text=True))
    assert conn.num_tokens(PATCHES) == conn.num_tokens(999, grid=(3, 333)) == QUERIES
    x = torch.randn(2, PATCHES, VISION, requires_grad=True)
    ids = torch.randint(0, 50, (2, 4))
    out = conn(x, grid=(2, 5), text_ids=ids, text_mask=torch.ones(2, 4, dtype=torch.long))
    assert out.shape == (2, QUERIES, 40)
    assert conn(torch.randn(1, 37, VISION)).shape == (1, QUERIES, 40)  # M does not depend on N
    out.square().mean().backward()
    for name in ("query_tokens", "language_projection.weight", "qformer.layers.0.cross_attn.k_proj.weight",
                 "qformer.word_embed.weight", "qformer.layers.0.text_mlp.fc1.weight", "qformer.norm.weight"):
        grad = dict(conn.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the last layer's text MLP only shapes text states the connector drops: no gradient reaches it
    last = conn.qformer.layers[-1].text_mlp.fc1.weight.grad
    assert last is None or last.abs().sum() == 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    # layer 1 has no cross-attention at frequency 2
    assert conn.qformer.layers[1].cross_attn is None and conn.qformer.layers[0].cross_attn is not None


def test_connector_checks_its_inputs():
    with pytest.raises(ConfigError, match="vision_width is 24"):
        QFormerConnector(30, 40, ours_config(2))
    with pytest.raises(ConfigError, match="multiple of qformer.heads"):
        QFormerConfig(width=30, heads=4)
    conn = QFormerConnector(VISION, 40, ours_config(2))
    with pytest.raises(ValueError, match="no text input"):
        conn(torch.randn(1, PATCHES, VISION), text_ids=torch.zeros(1, 3, dtype=torch.long))
    follows = QFormerConnector(17, 8, QFormerConfig(width=32, heads=4, depth=1, mlp_dim=8))
    assert follows.cfg.vision_width == 17


def test_config_from_dict():
    cfg = QFormerConfig.from_dict({"width": 64, "heads": 8, "vocab_size": 30523,
                                   "cross_attention_frequency": 1})
    assert (cfg.width, cfg.heads, cfg.vocab_size, cfg.text_input) == (64, 8, 30523, True)
    with pytest.raises(ConfigError, match="unknown key qformer.hidden_size"):
        QFormerConfig.from_dict({"hidden_size": 64})


# ------------------------------------------------------------------------------------------------ key map


@pytest.mark.parametrize("text", [False, True])
def test_key_map_round_trip_is_the_identity(text):
    torch.manual_seed(0)
    conn = QFormerConnector(VISION, 40, ours_config(3, text=text))
    table = qformer_key_map(conn.cfg)
    # the table covers exactly our parameters, one HF name each
    assert set(table) == set(dict(conn.named_parameters()))
    assert len(set(table.values())) == len(table)
    hf_layer = "qformer.encoder.layer"
    assert (table["qformer.layers.2.cross_attn.q_proj.weight"]
            == f"{hf_layer}.2.crossattention.attention.query.weight")
    assert (table["qformer.layers.0.self_attn.q_proj.weight"]
            == f"{hf_layer}.0.attention.attention.query.weight")
    assert "qformer.layers.1.cross_attn.q_proj.weight" not in table
    assert table["query_tokens"] == "query_tokens"
    assert table["language_projection.bias"] == "language_projection.bias"
    norm = "qformer.embeddings.layernorm.weight" if text else "qformer.layernorm.weight"
    assert table["qformer.norm.weight"] == norm
    hf_state = qformer_state_to_hf(conn)
    back = QFormerConnector(VISION, 40, ours_config(3, text=text))
    load_qformer_from_hf(back, hf_state)
    theirs = back.state_dict()
    assert theirs.keys() == conn.state_dict().keys()
    for k, v in conn.state_dict().items():
        assert torch.equal(theirs[k], v), k
    # with prefixes, as inside a full model / checkpoint
    prefixed = qformer_key_map(conn.cfg, prefix="connector.", hf_prefix="model.")
    assert prefixed["connector.query_tokens"] == "model.query_tokens"
    assert {k.removeprefix("connector."): v.removeprefix("model.") for k, v in prefixed.items()} == table


@pytest.mark.parametrize("text", [False, True])
def test_key_map_names_exist_in_transformers(text):
    """Our HF names are exactly the parameters of transformers' Q-Former (no more, no fewer)."""
    cls = transformers.InstructBlipQFormerModel if text else transformers.Blip2QFormerModel
    hf = cls(hf_qformer_config(4, text=text))
    assert set(qformer_body_key_map(ours_config(4, text=text)).values()) == set(dict(hf.named_parameters()))


def test_missing_or_unexpected_key_is_named():
    conn = QFormerConnector(VISION, 40, ours_config(2))
    state = qformer_state_to_hf(conn)
    broken = dict(state)
    del broken["qformer.encoder.layer.1.output_query.LayerNorm.bias"]
    name = r"'qformer\.encoder\.layer\.1\.output_query\.LayerNorm\.bias'"
    with pytest.raises(CheckpointError, match="missing key " + name):
        load_qformer_from_hf(conn, broken)
    extra = dict(state, **{"qformer.encoder.layer.0.intermediate.dense.weight": torch.zeros(MLP, WIDTH)})
    with pytest.raises(CheckpointError, match=r"unexpected key 'qformer\.encoder\.layer\.0\.intermediate"):
        load_qformer_from_hf(conn, extra)
    wrong = dict(state, query_tokens=torch.zeros(1, QUERIES + 1, WIDTH))
    with pytest.raises(CheckpointError, match="query_tokens has shape"):
        load_qformer_from_hf(conn, wrong)
    # keys outside the connector's namespaces (vision tower, LM) are none of its business
    load_qformer_from_hf(conn, dict(state, **{"vision_model.post_layernorm.weight": torch.ones(3)}))
