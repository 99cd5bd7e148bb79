"""LoRA adapters: a fresh adapter is a no-op, training moves only the adapters, merge / unmerge / remove,
adapter files, parity with peft's LoraLayer, and the promised errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlmkit.config import apply_overrides, from_dict
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models import build_model
from vlmkit.presets import get_preset
from vlmkit.nn.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    remove_lora,
    save_adapter,
    unmerge_lora,
)

from helpers import fixed_media, forward

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGE_TOKEN = 5
VOCAB = 64
TARGETS = ["lm.layers.*.attn.q_proj", "*.v_proj", "connector.*", "lm.lm_head"]


def tiny_model(seed: int = 0, **overrides):
    cfg = apply_overrides(get_preset("tiny-llava").model, {"lm.vocab_size": VOCAB, **overrides})
    torch.manual_seed(seed)
    return cfg, build_model(cfg, image_token_id=IMAGE_TOKEN)


def batch(model, seed: int = 1):
    """Two rows of text around one image each, labels on the text only."""
    g = torch.Generator().manual_seed(seed)
    M = model.image_seq_len
    ids = torch.randint(6, VOCAB, (2, M + 8), generator=g)
    ids[0, 1:1 + M] = IMAGE_TOKEN
    ids[1, 3:3 + M] = IMAGE_TOKEN
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    return ids, fixed_media(torch.randn(2, 3, 64, 64, generator=g), M), labels


@torch.no_grad()
def logits(model, ids, pixels):
    return forward(model.eval(), ids, pixels).logits


def randomise_adapters(model, seed: int = 2, std: float = 0.05):
    """Give every B (zero when fresh) random values, so that the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_parameters(model):
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def base_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}


# ------------------------------------------------------------------------------------------------ apply


def test_fresh_adapter_leaves_logits_unchanged_exactly():
    _, model = tiny_model()
    ids, pixels, _ = batch(model)
    before = logits(model, ids, pixels)
    linears = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    wrapped = apply_lora(model, LoRAConfig(targets=["*"], rank=4, alpha=8))
    assert wrapped == linears and len(wrapped) == 24  # every Linear, sorted
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in wrapped)
    assert torch.equal(logits(model, ids, pixels), before)
    for name in wrapped:
        m = model.get_submodule(name)
        assert not m.base.weight.requires_grad and m.scaling == 2.0
        assert torch.count_nonzero(m.lora_B.weight) == 0 and torch.count_nonzero(m.lora_A.weight) > 0
    # state-dict keys: <name>.base.weight, <name>.lora_A.weight, <name>.lora_B.weight
    keys = set(model.state_dict())
    assert {"lm.lm_head.base.weight", "lm.lm_head.lora_A.weight", "lm.lm_head.lora_B.weight"} <= keys
    assert "lm.lm_head.weight" not in keys
    assert sorted(lora_state_dict(model)) == sorted(n for n, _ in lora_parameters(model))
    assert len(lora_parameters(model)) == 2 * 24


def test_patterns_globs_and_regular_expressions():
    _, model = tiny_model()
    assert apply_lora(copy.deepcopy(model), LoRAConfig(targets=[])) == []  # LoRA off
    assert apply_lora(copy.deepcopy(model), LoRAConfig(targets=TARGETS)) == sorted(
        ["connector.proj.fc1", "connector.proj.fc2", "lm.lm_head"]
        + [f"lm.layers.{i}.attn.{p}_proj" for i in range(3) for p in "qv"])
    wrapped = apply_lora(model, LoRAConfig(targets=[r"re:lm\.layers\.[01]\.(attn\.o|mlp\.down)_proj"]))
    assert wrapped == ["lm.layers.0.attn.o_proj", "lm.layers.0.mlp.down_proj", "lm.layers.1.attn.o_proj",
                       "lm.layers.1.mlp.down_proj"]
    with pytest.raises(ConfigError, match="matches no nn.Linear"):  # "re:" is a full match, not a search
        apply_lora(tiny_model()[1], LoRAConfig(targets=["re:q_proj"]))


def test_config_builds_from_a_dict_and_validates():
    cfg = from_dict(LoRAConfig, {"targets": ["*.q_proj"], "rank": 4, "alpha": 8, "dropout": 0.1})
    assert cfg == LoRAConfig(targets=["*.q_proj"], rank=4, alpha=8.0, dropout=0.1) and cfg.scaling == 2.0
    with pytest.raises(ConfigError, match="unknown key LoRAConfig.r"):
        from_dict(LoRAConfig, {"r": 4})
    for bad, msg in [({"rank": 0}, "rank must be >= 1"), ({"alpha": 0}, "alpha must be > 0"),
                     ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
                     ({"targets": ["re:("]}, "not a valid regular expression")]:
        with pytest.raises(ConfigError, match=msg):
            apply_lora(tiny_model()[1], LoRAConfig(**{"targets": ["*.q_proj"], **bad}))


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_training_moves_only_the_adapters_and_lowers_the_loss():
    _, model = tiny_model()
    ids, pixels, labels = batch(model)
    wrapped = apply_lora(model, LoRAConfig(targets=TARGETS, rank=4, alpha=8))
    # freeze everything else; the wrapped Linears are apply_lora's to freeze
    for name, p in model.named_parameters():
        if not name.startswith(tuple(f"{w}." for w in wrapped)):
            p.requires_grad_(False)
    params = lora_parameters(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [n for n, _ in params]
    before = base_params(model)
    adapters = {n: p.detach().clone() for n, p in params}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.eval()  # the CNN's BatchNorm statistics stay put; the adapters have no dropout here
    losses = []
    for _ in range(8):
        loss = forward(model, ids, pixels, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    after = base_params(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    assert all(not torch.equal(adapters[n], p) for n, p in params), "every A and B must have moved"


def test_dropout_follows_train_and_eval():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 16), rank=4, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(8, 32)
    plain = layer.base(x) + layer.lora_B(layer.lora_A(x)) * layer.scaling
    layer.train()
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, b) and not torch.allclose(a, plain)
    layer.eval()
    torch.testing.assert_close(layer(x), plain, rtol=0, atol=1e-6)
    layer.merge()  # merged: base alone, dropout or not
    layer.train()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ merge


def test_merge_unmerge_and_remove():
    cfg, model = tiny_model()
    ids, pixels, _ = batch(model)
    apply_lora(model, LoRAConfig(targets=TARGETS, rank=4, alpha=8))
    randomise_adapters(model)
    base = base_params(model)
    unmerged = logits(model, ids, pixels)
    assert not torch.allclose(unmerged, logits(tiny_model()[1], ids, pixels), atol=1e-3)  # adapters matter

    merge_lora(model)
    merge_lora(model)  # idempotent: not added twice
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    assert not torch.allclose(model.lm.lm_head.base.weight, base["lm.lm_head.base.weight"], atol=1e-4)
    torch.testing.assert_close(logits(model, ids, pixels), unmerged, rtol=0, atol=1e-5)

    unmerge_lora(model)
    unmerge_lora(model)
    after = base_params(model)
    for k in base:
        torch.testing.assert_close(after[k], base[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids, pixels), unmerged, rtol=0, atol=1e-5)

    remove_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.lm.lm_head) is nn.Linear and model.lm.lm_head.weight.requires_grad  # as before apply
    torch.testing.assert_close(logits(model, ids, pixels), unmerged, rtol=0, atol=1e-5)
    fresh = build_model(cfg, image_token_id=IMAGE_TOKEN)
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(logits(fresh, ids, pixels), unmerged, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ files


def test_adapter_round_trip(tmp_path):
    _, model = tiny_model()
    ids, pixels, _ = batch(model)
    base_state = copy.deepcopy(model.state_dict())
    cfg = LoRAConfig(targets=TARGETS, rank=4, alpha=8, dropout=0.1)
    wrapped = apply_lora(model, cfg)
    randomise_adapters(model)
    expected = logits(model, ids, pixels)
    save_adapter(tmp_path / "adapter", model, cfg)

    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta == {"format": "vlmkit-lora", "targets": TARGETS, "rank": 4, "alpha": 8.0, "dropout": 0.1,
                    "modules": wrapped}
    saved = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    assert saved.keys() == lora_state_dict(model).keys()
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter.safetensors",
                                                                       "adapter_config.json"]

    _, fresh = tiny_model(seed=123)  # other random weights, then the base weights of the saved model
    fresh.load_state_dict(base_state)
    assert load_adapter(fresh, tmp_path / "adapter") == cfg
    assert torch.equal(logits(fresh, ids, pixels), expected)
    assert fresh.lm.lm_head.dropout.p == 0.1

    # into a model that already has the adapters (merged, even): the tensors are replaced
    randomise_adapters(fresh, seed=7)
    merge_lora(fresh)
    load_adapter(fresh, tmp_path / "adapter")
    unmerge_lora(fresh)
    torch.testing.assert_close(logits(fresh, ids, pixels), expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ peft


def test_parity_with_peft_lora_layer():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("fc", nn.Linear(24, 20))
    net.add_module("act", nn.Tanh())
    net.add_module("out", nn.Linear(20, 6))
    ours = copy.deepcopy(net)
    ref = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc"]))
    apply_lora(ours, LoRAConfig(targets=["fc"], rank=4, alpha=8))

    layer = ref.base_model.model.fc
    assert isinstance(layer, peft.tuners.lora.LoraLayer)
    assert layer.scaling["default"] == ours.fc.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # B starts at zero in both
    assert torch.count_nonzero(ours.fc.lora_B.weight) == 0
    torch.testing.assert_close(layer.base_layer.weight, ours.fc.base.weight, rtol=0, atol=0)
    with torch.no_grad():  # B non-zero, so that the adapter path is exercised
        layer.lora_B["default"].weight.normal_()
        ours.fc.lora_A.weight.copy_(layer.lora_A["default"].weight)
        ours.fc.lora_B.weight.copy_(layer.lora_B["default"].weight)
    ref.eval()
    ours.eval()
    x = torch.randn(16, 24)
    with torch.no_grad():
        expected = ref(x)
        assert not torch.allclose(expected, net(x), atol=1e-3)
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-6)
        merged = ref.merge_and_unload()
        remove_lora(ours)
        torch.testing.assert_close(ours.fc.weight, merged.fc.weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours(x), merged(x), rtol=0, atol=1e-6)


def test_a_init_has_peft_kaiming_bound():
    peft = pytest.importorskip("peft")
    fan_in = 256
    torch.manual_seed(0)
    ref = peft.get_peft_model(nn.Sequential(nn.Linear(fan_in, 64)),
                              peft.LoraConfig(r=16, target_modules=["0"]))
    theirs = ref.base_model.model[0].lora_A["default"].weight.detach()
    mine = LoRALinear(nn.Linear(fan_in, 64), rank=16, alpha=16).lora_A.weight.detach()
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)): sqrt(6 / ((1 + 5) * fan_in))
    for a in (theirs, mine):
        assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound
        assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform(-b, b)


# ------------------------------------------------------------------------------------------------ errors


def test_pattern_matching_nothing_names_it_and_suggests_names():
    _, model = tiny_model()
    with pytest.raises(ConfigError, match=r"'\*\.q_prj' matches no nn.Linear.*"
                                          r"did you mean lm\.layers\.\d\.attn\.q_proj"):
        apply_lora(model, LoRAConfig(targets=["*.q_proj", "*.q_prj"]))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing half-applied
    # nothing close: an overview of the model's Linears with layer indices folded
    with pytest.raises(ConfigError, match=r"'vision\.\*' matches no nn.Linear.*24 Linears are "
                                          r"connector\.proj\.fc1.*lm\.layers\.\*\.attn\.q_proj"):
        apply_lora(model, LoRAConfig(targets=["vision.*"]))


def test_applying_twice_is_refused():
    _, model = tiny_model()
    apply_lora(model, LoRAConfig(targets=["*.q_proj"]))
    with pytest.raises(ConfigError, match="already applied"):
        apply_lora(model, LoRAConfig(targets=["*.k_proj"]))


def test_tied_and_multihead_attention_linears_are_refused():
    _, model = tiny_model(**{"lm.tie_embeddings": True, "lm.head_init_std": None})
    assert model.lm.lm_head.weight is model.lm.embed_tokens.weight
    with pytest.raises(ConfigError, match=r"'lm\.lm_head' matches only lm\.lm_head.*shared with "
                                          r"lm\.embed_tokens\.weight \(tied\)"):
        apply_lora(model, LoRAConfig(targets=["lm.lm_head"]))
    mha = nn.Module()
    mha.attn = nn.MultiheadAttention(8, 2)
    with pytest.raises(ConfigError, match="attn.out_proj, which cannot take an adapter: it belongs to an "
                                          "nn.MultiheadAttention"):
        apply_lora(mha, LoRAConfig(targets=["*out_proj"]))


def test_bad_adapters_raise_checkpoint_errors(tmp_path):
    cfg, model = tiny_model()
    lcfg = LoRAConfig(targets=["*.q_proj", "lm.lm_head"], rank=4, alpha=8)
    apply_lora(model, lcfg)
    folder = tmp_path / "adapter"
    save_adapter(folder, model, lcfg)
    weights = folder / "adapter.safetensors"
    with pytest.raises(CheckpointError, match="adapter config not found: .*missing/adapter_config.json"):
        load_adapter(tiny_model()[1], tmp_path / "missing")

    # a key the model lacks (the file's metadata kept, as save_adapter wrote it)
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(weights))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    save_file({**tensors, "lm.layers.9.attn.q_proj.lora_A.weight": torch.zeros(4, 128)},
              str(bad / "adapter.safetensors"), metadata=metadata)
    fresh = tiny_model()[1]
    with pytest.raises(CheckpointError, match=r"bad/adapter.safetensors: key 'lm\.layers\.9\.attn\.q_proj"
                                              r"\.lora_A\.weight' is not a LoRA parameter"):
        load_adapter(fresh, bad)
    assert not any(isinstance(m, LoRALinear) for m in fresh.modules())  # refused before any change

    # a tensor of the wrong shape
    save_file({**tensors, "lm.lm_head.lora_B.weight": torch.zeros(VOCAB, 3)},
              str(bad / "adapter.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"key 'lm\.lm_head\.lora_B\.weight' has shape \(64, 3\)"):
        load_adapter(tiny_model()[1], bad)

    # a module the model lacks: the adapter is on layer 2 of 3, the model has 2 layers
    with pytest.raises(CheckpointError, match=r"adapter_config.json: module 'lm\.layers\.2\.attn\.q_proj' is "
                                              r"not an nn.Linear of this model"):
        load_adapter(tiny_model(**{"lm.depth": 2})[1], folder)

    (folder / "adapter.safetensors").unlink()
    with pytest.raises(CheckpointError, match="adapter weights not found: .*adapter.safetensors"):
        load_adapter(tiny_model()[1], folder)
