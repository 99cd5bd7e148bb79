"""MuonAdamW against torch's own AdamW and Muon, and how make_optimizer splits a model between them."""

from __future__ import annotations

import pytest
import torch

from vlmkit.models import build_model
from vlmkit.presets import get_preset
from vlmkit.train.muon import MuonAdamW, orthogonalize
from vlmkit.errors import ConfigError
from vlmkit.train.optim import freeze_for_stage, load_optimizer, make_optimizer, save_optimizer, trained_groups
from vlmkit.train.recipe import StageConfig


def _params(seed: int, shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def _run(opt, params, steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_adamw_groups_match_torch_adamw():
    shapes = [(5, 7), (7,), (3, 2, 2)]
    ours, ref = _params(0, shapes), _params(0, shapes)
    _run(MuonAdamW([{"params": ours, "lr": 3e-3, "weight_decay": 0.1}], betas=(0.9, 0.95)), ours, 6)
    _run(torch.optim.AdamW(ref, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95)), ref, 6)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_orthogonalize_flattens_the_spectrum():
    g = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    g = g @ torch.diag(torch.logspace(-1, 1, 16))  # condition number ~100
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.min() > 0.6 and s.max() < 1.25, s
    assert orthogonalize(g.T).shape == (16, 48)


def test_muon_groups_match_torch_muon():
    """torch.optim.Muon orthogonalises in bf16; ours in fp32, so the updates agree to bf16 precision."""
    ours, ref = _params(0, [(24, 40), (40, 24)]), _params(0, [(24, 40), (40, 24)])
    start = [p.detach().clone() for p in ours]
    _run(MuonAdamW([{"params": ours, "lr": 0.02, "weight_decay": 0.1, "use_muon": True}]), ours, 3)
    _run(torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"), ref, 3)
    for a, b, p0 in zip(ours, ref, start):
        da, db = (a - p0).flatten(), (b - p0).flatten()
        assert torch.nn.functional.cosine_similarity(da, db, dim=0) > 0.999
        assert abs(da.norm() / db.norm() - 1) < 0.01


def test_muon_refuses_non_matrices():
    with pytest.raises(ValueError, match=r"2D weight matrices only; got shapes \[\(4,\)\]"):
        MuonAdamW([{"params": _params(0, [(4, 4), (4,)]), "use_muon": True}])


def test_make_optimizer_puts_hidden_matrices_on_muon(tmp_path):
    model = build_model(get_preset("tiny-llava").model, image_token_id=3)
    opt = make_optimizer(model, StageConfig(train=["connector", "lm"], optimizer="muon"))
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    on_adam = {names[id(p)] for g in opt.param_groups if not g["use_muon"] for p in g["params"]}
    assert "lm.layers.0.attn.q_proj.weight" in on_muon and any(n.startswith("connector.") for n in on_muon)
    assert {"lm.embed_tokens.weight", "lm.lm_head.weight", "lm.norm.weight"} <= on_adam
    assert not any(n.startswith("encoder.") for n in on_muon | on_adam)  # not trained in this stage
    # a training step, then the state survives a save/load round trip exactly
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    opt.step()
    save_optimizer(opt, tmp_path / "opt.safetensors")
    again = make_optimizer(model, StageConfig(train=["connector", "lm"], optimizer="muon"))
    load_optimizer(again, tmp_path / "opt.safetensors")
    for p in on_muon_params(opt):
        assert torch.equal(opt.state[p]["momentum_buffer"], again.state[p]["momentum_buffer"])
    assert [g["use_muon"] for g in again.param_groups] == [g["use_muon"] for g in opt.param_groups]


def on_muon_params(opt):
    return [p for g in opt.param_groups if g["use_muon"] for p in g["params"]]


@pytest.mark.parametrize("preset, groups", [("tiny-llava", {"vision", "connector", "lm"}),
                                            ("tiny-clip", {"vision", "text", "logits"})])
def test_stages_name_the_models_own_module_groups(preset, groups):
    with torch.device("meta"):
        model = build_model(get_preset(preset).model, 3)
    assert trained_groups(model, StageConfig()) == groups  # the default, train: [all]
    assert trained_groups(model, StageConfig(train=["vision"])) == {"vision"}
    table = freeze_for_stage(model, StageConfig(train=["vision"]))
    assert {r["module"]: r["trainable"] for r in table} == {g: g == "vision" for g in groups}
    other = "text" if "lm" in groups else "lm"  # a group of the other kind of model
    with pytest.raises(ConfigError, match=f"names '{other}', which this model does not have; its modules: all, "):
        trained_groups(model, StageConfig(train=["vision", other]))
