"""The pooling connectors (connectors/pooling.py): tokens out for several grids, the downsampling each paper
describes, gradients to every parameter, bad settings refused by name, and the tiny presets' 16 tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlmkit.config import ConnectorConfig
from vlmkit.connectors import CONNECTORS, build_connector
from vlmkit.errors import ConfigError
from vlmkit.presets import get_preset

pytestmark = pytest.mark.usefixtures("single_thread")

DV, DLM = 16, 24  # tower and LM widths differ, so a connector that forgets to project fails
KINDS = {
    "ldp": ConnectorConfig(kind="ldp"),
    "ldp_v2": ConnectorConfig(kind="ldp_v2"),
    "c_abstractor": ConnectorConfig(kind="c_abstractor", num_queries=4, depth=2),
    "avg_pool": ConnectorConfig(kind="avg_pool"),
    "attn_pool": ConnectorConfig(kind="attn_pool", heads=4),
}
# grid -> tokens out, per connector
TOKENS = {
    # stride 2, padding 1: ceil(side / 2)
    "ldp": {(4, 4): 4, (8, 8): 16, (7, 7): 16, (6, 4): 6, (24, 24): 144},
    "ldp_v2": {(4, 4): 4, (8, 8): 16, (6, 4): 6, (24, 24): 144},
    "c_abstractor": {(4, 4): 4, (8, 8): 4, (7, 5): 4, (2, 2): 4},  # always num_queries
    "avg_pool": {(4, 4): 4, (8, 8): 16, (6, 4): 6, (2, 2): 1},
    "attn_pool": {(4, 4): 4, (8, 8): 16, (6, 4): 6, (2, 2): 1},
}


def connector(kind: str, **kw):
    torch.manual_seed(0)
    return build_connector(dataclasses.replace(KINDS[kind], **kw), DV, DLM)


def test_every_pooling_connector_is_registered():
    assert set(KINDS) <= set(CONNECTORS.names())
    assert all(CONNECTORS.describe(k) for k in KINDS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_tokens_out_match_num_tokens_on_several_grids(kind):
    c = connector(kind)
    for (h, w), m in TOKENS[kind].items():
        y = c(torch.randn(2, h * w, DV), (h, w))
        assert y.shape == (2, m, DLM), (kind, h, w)
        assert c.num_tokens(h * w, (h, w)) == m
    assert c.num_tokens(64) == TOKENS[kind][(8, 8)]  # no grid: a square one


def test_ldp_halves_each_side_of_the_grid():
    """MobileVLM: a 24x24 grid -> 12x12 tokens; 4x4 -> 2x2. Each output token sees only its 3x3 neighbourhood
    of the stride-1 block's output, so a patch far from it changes nothing there (8x8 grid, top-left
    token)."""
    c = connector("ldp")
    x = torch.randn(1, 64, DV)
    x2 = x.clone()
    x2[0, 63] += 5.0  # the bottom-right patch
    # squeeze-excite mixes the whole grid's mean into every channel gate, so compare with it disabled
    for block in c.blocks:
        block.se = torch.nn.Identity()
    y, y2 = c(x, (8, 8)), c(x2, (8, 8))
    assert torch.allclose(y[0, 0], y2[0, 0]) and not torch.allclose(y[0, 15], y2[0, 15])


def test_avg_pool_is_the_mlp_of_each_windows_mean():
    c = connector("avg_pool")
    x = torch.randn(2, 16, DV)
    grid = x.view(2, 4, 4, DV)
    means = grid.view(2, 2, 2, 2, 2, DV).mean((2, 4)).reshape(2, 4, DV)  # [B, (row, col) of windows, D]
    torch.testing.assert_close(c(x, (4, 4)), c.mlp(means))


def test_adaptive_pooling_to_num_queries():
    c = connector("avg_pool", num_queries=4)
    x = torch.randn(1, 36, DV)
    assert c(x, (6, 6)).shape == (1, 4, DLM)  # 6x6 -> 2x2 (3x3 windows)
    means = x.view(1, 2, 3, 2, 3, DV).mean((2, 4)).reshape(1, 4, DV)
    torch.testing.assert_close(c(x, (6, 6)), c.mlp(means))


def test_ldp_v2_is_pooled_mlp_plus_its_positional_conv():
    c = connector("ldp_v2")
    with torch.no_grad():
        c.peg.weight.zero_()
        c.peg.bias.zero_()
    x = torch.randn(1, 16, DV)
    y = c.mlp(x).view(1, 2, 2, 2, 2, DLM).mean((2, 4)).reshape(1, 4, DLM)
    torch.testing.assert_close(c(x, (4, 4)), y)  # y + peg(y), the PEG zeroed


def test_attn_pool_reads_only_its_window():
    """Molmo: each 2x2 window pooled by attention from the window's mean; a token depends on its own 4
    patches, in any order, and a window of equal patches pools to that patch's value projection."""
    c = connector("attn_pool")
    x = torch.randn(1, 16, DV)
    y = c(x, (4, 4))
    x2 = x.clone()
    x2[0, 15] += 3.0  # bottom-right patch: window 3 only
    y2 = c(x2, (4, 4))
    assert torch.allclose(y[0, :3], y2[0, :3]) and not torch.allclose(y[0, 3], y2[0, 3])
    swapped = x.clone()
    swapped[0, [0, 1, 4, 5]] = x[0, [5, 4, 1, 0]]  # the patches of window 0, reordered
    torch.testing.assert_close(c(swapped, (4, 4)), y)
    flat = torch.randn(DV).expand(1, 16, DV)
    torch.testing.assert_close(c(flat, (4, 4))[0, 0], c.mlp(c.o_proj(c.v_proj(flat[0, :1])))[0])


def test_c_abstractor_pools_to_its_queries_whatever_the_grid():
    c = connector("c_abstractor", num_queries=9)
    for h, w in [(6, 6), (12, 12), (5, 8)]:
        assert c(torch.randn(1, h * w, DV), (h, w)).shape == (1, 9, DLM)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_gradients_reach_every_parameter(kind):
    c = connector(kind)
    c(torch.randn(2, 64, DV), (8, 8)).square().mean().backward()
    missing = [n for n, p in c.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


@pytest.mark.parametrize("kind, settings, grid, match", [
    ("c_abstractor", {"num_queries": 0}, None, r"connector\.num_queries 0.*square"),
    ("c_abstractor", {"num_queries": 10}, None, r"connector\.num_queries 10.*square"),
    ("c_abstractor", {"depth": 0}, None, r"connector\.depth 0"),
    ("avg_pool", {"num_queries": 8}, None, r"connector\.num_queries 8"),
    ("avg_pool", {"pool": 0}, None, r"connector\.pool 0"),
    ("avg_pool", {"pool": 3}, (8, 8), r"connector\.pool 3.*8x8 grid does not divide.*num_queries"),
    ("ldp_v2", {"pool": 3}, (4, 4), r"connector\.pool 3"),
    ("attn_pool", {"pool": 2}, (5, 5), r"connector\.pool 2.*5x5"),
    ("attn_pool", {"heads": 3}, None, r"connector\.heads 3.*divisor"),
    ("ldp", {"pool": 1}, None, r"connector\.pool 1.*ldp"),
])
def test_bad_settings_are_refused_by_name(kind, settings, grid, match):
    with pytest.raises(ConfigError, match=match):
        c = connector(kind, **settings)
        c.num_tokens(grid[0] * grid[1], grid)


def test_unknown_connector_lists_the_pooling_ones():
    listed = r"Unknown connector 'ldpv3'.*attn_pool.*avg_pool.*c_abstractor.*ldp.*ldp_v2"
    with pytest.raises(ConfigError, match=listed):
        build_connector(ConnectorConfig(kind="ldpv3"), DV, DLM)


PRESETS = ["tiny-llava-ldp", "tiny-llava-ldpv2", "tiny-llava-cabs", "tiny-llava-avgpool", "tiny-llava-attnpool"]


@pytest.mark.parametrize("name", PRESETS)
def test_tiny_presets_give_the_processor_16_tokens(name):
    """tiny-llava's 8x8 grid -> 16 LM tokens, as its pixel shuffle gives; the processor's image_seq_len is the
    connector's count."""
    from vlmkit.family import get_family

    preset = get_preset(name)
    family = get_family(preset.model.family)
    model = family.build(preset.model, image_token_id=5)
    assert model.image_seq_len == 16
    assert type(model.connector).__name__ != "PixelShuffleConnector"
    bad = dataclasses.replace(preset.model, connector=dataclasses.replace(preset.model.connector, pool=3,
                                                                           num_queries=0))
    if bad.connector.kind != "ldp":  # ldp's stride 3 pads: 8x8 -> 3x3
        with pytest.raises(ConfigError, match=r"connector\.(pool|num_queries)"):
            _ = family.build(bad, image_token_id=5).image_seq_len


def test_export_to_transformers_refuses_a_pooling_connector_by_name():
    from vlmkit.convert.hf.llava import llava_config_to_hf

    vit = get_preset("tiny-llava-vit").model  # a tower transformers has, so the connector is what is refused
    with pytest.raises(ConfigError, match=r"connector\.kind 'ldp'.*kind: mlp"):
        llava_config_to_hf(dataclasses.replace(vit, connector=KINDS["ldp"]), 5, 16)
