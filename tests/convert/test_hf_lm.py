"""Llama / Qwen2 / Mistral / Gemma / OPT / Persimmon import: logits and greedy tokens equal transformers' on tiny
random checkpoints that transformers builds here (offline), and bad folders get errors that name the file and key."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.convert.hf import export_hf_lm, load_hf_lm, read_weights

from hf_fixtures import perturb_

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

# small but not default-shaped: grouped-query attention, head_dim not width/heads, non-default theta and eps
COMMON = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=128)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=50000.0, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1e6, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(rope_theta=20000.0, sliding_window=None)),
    # Gemma: norms scale by 1 + weight, embeddings by sqrt(width), GELU-gated MLP, tied head
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(rope_theta=10000.0, hidden_activation="gelu_pytorch_tanh")),
}


def make_checkpoint(family: str, folder, **extra):
    conf_cls, model_cls, kw = FAMILIES[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, conf_cls)(**{**COMMON, **kw, **extra})
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # random (not zero) biases and norm weights, so a dropped one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.5 if "norm" in name else 0.1).add_(1.0 if "norm" in name else 0.0)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_greedy_tokens_match_transformers(family, tmp_path):
    ref = make_checkpoint(family, tmp_path)
    lm = load_hf_lm(tmp_path)
    assert lm.cfg.qkv_bias == (family == "qwen2") and lm.cfg.tie_embeddings == (family in ("qwen2", "gemma"))
    assert lm.cfg.norm_offset == lm.cfg.embed_scale == (family == "gemma")
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = ref(ids).logits
        ours = lm.lm_head(lm(lm.embed_tokens(ids)))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    # 8 greedy steps from the same prompt
    seq_ref = ref.generate(ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 13:].tolist()
    seq = ids[:1]
    with torch.no_grad():
        for _ in range(8):
            nxt = lm.lm_head(lm(lm.embed_tokens(seq)))[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert seq[0, 13:].tolist() == seq_ref


def test_sharded_weights_are_read_through_the_index(tmp_path):
    make_checkpoint("llama", tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[half:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    weight_map = {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert read_weights(tmp_path).keys() == tensors.keys()
    load_hf_lm(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists shard 'model-00002-of-00002.safetensors', which is not in"):
        load_hf_lm(tmp_path)


def test_pickled_weights_are_refused_never_loaded(tmp_path):
    make_checkpoint("llama", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(CheckpointError, match=r"only pickled weights \(pytorch_model.bin\); vlmkit never unpickles"):
        load_hf_lm(tmp_path)


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, error, match", [
    ({"model_type": "gpt2"}, ConfigError, r"config.json: model_type 'gpt2' is not a text LM vlmkit imports; "
                                          r"supported: llama, qwen2, mistral, gemma"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}}, ConfigError,
     r"config.json: rope_type 'yarn' \(RoPE scaling\) is not implemented in vlmkit; supported: default, mrope, "
     r"llama3"),
    ({"hidden_act": "gelu"}, ConfigError, r"hidden_act 'gelu' is not implemented for llama"),
    ({"intermediate_size": 64}, CheckpointError, r"layers.0.mlp.gate_proj.weight has shape \(80, 48\), the "
                                                 r"config implies \(64, 48\)"),
    ({"num_hidden_layers": 3}, CheckpointError, r"missing \['model.layers.2"),
    ({"hidden_size": None}, ConfigError, r"config.json: missing key 'hidden_size' for model_type 'llama'"),
])
def test_bad_config_names_the_file_and_key(tmp_path, changes, error, match):
    make_checkpoint("llama", tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(error, match=match):
        load_hf_lm(tmp_path)


def test_unexpected_weights_are_named(tmp_path):
    make_checkpoint("llama", tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected \['model.layers.0.self_attn.q_norm.weight'\]"):
        load_hf_lm(tmp_path)


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_hf_lm(tmp_path)


def test_a_folder_without_weights_or_with_a_broken_index_is_refused(tmp_path):
    make_checkpoint("llama", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights: expected model.safetensors or model.safetensors"):
        load_hf_lm(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"shards": []}))
    with pytest.raises(CheckpointError, match=r"index.json: expected JSON with a 'weight_map'"):
        load_hf_lm(tmp_path)


@pytest.mark.parametrize("family, changes, match", [
    ("llama", {"mlp_bias": True}, r"mlp_bias: true is not implemented"),
    ("qwen2", {"use_sliding_window": True}, r"use_sliding_window: true is not implemented for qwen2"),
])
def test_family_features_vlmkit_lacks_are_named(tmp_path, family, changes, match):
    make_checkpoint(family, tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ConfigError, match=match):
        load_hf_lm(tmp_path)


def test_mistral_sliding_window_caps_the_length_where_attention_is_still_full(tmp_path):
    make_checkpoint("mistral", tmp_path, sliding_window=64)
    assert load_hf_lm(tmp_path).cfg.max_seq_len == 64  # max_position_embeddings is 128


# ------------------------------------------------------------------------------------ OPT (BLIP-2's LM)

OPT_TINY = dict(vocab_size=96, hidden_size=48, ffn_dim=80, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, word_embed_proj_dim=48, dropout=0.0, pad_token_id=1)


def make_opt(folder, **extra):
    """A tiny OPTForCausalLM with random biases, LayerNorm weights and biases, and learned positions."""
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(transformers.OPTConfig(**{**OPT_TINY, **extra})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.normal_(0, 0.3 if "layer_norm" in name else 0.1).add_(1.0 if "norm" in name and
                                                                        name.endswith("weight") else 0.0)
            elif "embed_positions" in name:
                p.normal_(0, 0.5)  # positions as loud as the tokens: a wrong offset or row shows in the logits
    model.save_pretrained(folder)
    return model


def test_opt_logits_with_left_padding_and_greedy_tokens_match_transformers(tmp_path):
    """LayerNorms with bias, ReLU MLP, biased attention, learned positions offset by 2 and counted from each row's
    first real token (a left-padded batch), tied head; 8 greedy steps with vlmkit's KV cache."""
    ref = make_opt(tmp_path)
    lm = load_hf_lm(tmp_path)
    assert (lm.cfg.norm, lm.cfg.mlp, lm.cfg.bias, lm.cfg.pos_embed, lm.cfg.pos_offset) == (
        "layernorm", "plain", True, "learned", 2)
    assert lm.cfg.tie_embeddings and lm.rotary is None and lm.embed_positions.weight.shape == (66, 48)
    ids = torch.randint(3, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 is left-padded: its positions start at its first real token
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask).logits
        ours = lm.lm_head(lm(lm.embed_tokens(ids), attention_mask=mask))
        shifted = lm.lm_head(lm(lm.embed_tokens(ids)))  # positions counted from column 0 in row 1 too
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(ours[1, 4:], theirs[1, 4:], rtol=0, atol=1e-4)
    assert (shifted[1, 4:] - theirs[1, 4:]).abs().max() > 1e-2  # the positions are what makes them equal
    expected = ref.generate(ids[:1], max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, 13:].tolist()
    cache, seq, step = lm.new_cache(1, 21), [], ids[:1]
    with torch.no_grad():
        for _ in range(8):
            logits = lm.lm_head(lm(lm.embed_tokens(step), cache=cache))[:, -1]
            logits[:, ref.config.eos_token_id] = float("-inf")  # as min_new_tokens does
            step = logits.argmax(-1, keepdim=True)
            seq.append(int(step))
    assert seq == expected


def test_opt_position_ids_are_used_as_given(tmp_path):
    """A packed row passes each sample's own positions: they override the mask's count, as transformers'."""
    ref = make_opt(tmp_path)
    lm = load_hf_lm(tmp_path)
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        theirs = ref(input_ids=ids, position_ids=pos).logits
        ours = lm.lm_head(lm(lm.embed_tokens(ids), position_ids=pos))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_opt_exports_back_to_opt_for_causal_lm(tmp_path):
    make_opt(tmp_path / "src", tie_word_embeddings=False, enable_bias=False)
    lm = load_hf_lm(tmp_path / "src")
    assert not lm.cfg.bias and not lm.cfg.tie_embeddings and lm.layers[0].attn.q_proj.bias is None
    export_hf_lm(lm, tmp_path / "out")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(ref).__name__ == "OPTForCausalLM"
    ids = torch.tensor([[3, 17, 42, 90, 5, 7, 64]])
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, lm.lm_head(lm(lm.embed_tokens(ids))), rtol=0,
                                   atol=1e-4)


@pytest.mark.parametrize("changes, match", [
    ({"word_embed_proj_dim": 32}, r"config.json: word_embed_proj_dim 32 != hidden_size 48 \(OPT's project_in"),
    ({"do_layer_norm_before": False}, r"config.json: do_layer_norm_before: false is not implemented for opt"),
    ({"_remove_final_layer_norm": True}, r"_remove_final_layer_norm: true is not implemented for opt"),
    ({"activation_function": "gelu_new"}, r"activation_function 'gelu_new' is not implemented for opt; supported: "
                                          r"relu, gelu"),
    ({"ffn_dim": None}, r"config.json: missing key 'ffn_dim' for model_type 'opt'"),
])
def test_opt_variants_vlmkit_lacks_are_named(tmp_path, changes, match):
    make_opt(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ConfigError, match=match):
        load_hf_lm(tmp_path)


def test_what_neither_opt_nor_llama_expresses_is_refused_on_export(tmp_path):
    from vlmkit.config import LanguageConfig
    from vlmkit.convert.hf import lm_config_to_hf

    opt = dict(vocab_size=50, width=32, depth=1, heads=4, kv_heads=4, mlp_dim=64, act="relu", norm="layernorm",
               mlp="plain", bias=True, pos_embed="learned", pos_offset=2)
    assert lm_config_to_hf(LanguageConfig(**opt))["model_type"] == "opt"
    with pytest.raises(ConfigError, match=r"lm: learned positions export as OPT, which cannot express: kv_heads 2"):
        lm_config_to_hf(LanguageConfig(**{**opt, "kv_heads": 2}))
    with pytest.raises(ConfigError, match=r"lm: rotary positions with LayerNorms export as Persimmon, which cannot "
                                          r"express: bias False \(Persimmon has True\)"):
        lm_config_to_hf(LanguageConfig(**{**opt, "pos_embed": "rope", "pos_offset": 0, "bias": False}))
    with pytest.raises(ConfigError, match=r"lm: mlp 'plain', bias True, qk_norm True: with RMSNorms no transformers"):
        lm_config_to_hf(LanguageConfig(**{**opt, "norm": "rmsnorm", "pos_embed": "rope", "pos_offset": 0,
                                          "qk_norm": True}))
    with pytest.raises(ConfigError, match=r"learned positions export as OPT, which cannot express: qk_norm True"):
        lm_config_to_hf(LanguageConfig(**{**opt, "qk_norm": True}))
    with pytest.raises(ConfigError, match=r"lm.norm 'batchnorm'; valid: rmsnorm, layernorm"):
        LanguageConfig(norm="batchnorm")


def test_llama3_rope_scaling_matches_transformers_and_exports(tmp_path):
    """Llama 3.1+ (and Llama 3.2 Vision's LM) scale their rotary frequencies (rope_type "llama3"). With an
    original context of 16 the tiny model's frequencies fall in all three bands (kept, blended, divided), so the
    logits at 13 positions differ from unscaled RoPE, and must equal transformers'."""
    scaling = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    ref = make_checkpoint("llama", tmp_path / "hf", rope_parameters=scaling)
    lm = load_hf_lm(tmp_path / "hf")
    assert lm.cfg.rope_scaling.kind == "llama3" and lm.cfg.rope_scaling.original_max_len == 16
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = ref(ids).logits
        ours = lm.lm_head(lm(lm.embed_tokens(ids)))
        unscaled = make_checkpoint("llama", tmp_path / "plain")(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert (unscaled - theirs).abs().max() > 1e-3
    export_hf_lm(lm, tmp_path / "out")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, theirs, rtol=0, atol=1e-4)


def test_llama3_rope_scaling_without_its_keys_is_refused(tmp_path):
    make_checkpoint("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="rope_type 'llama3' without 'low_freq_factor'"):
        load_hf_lm(tmp_path)


# ------------------------------------------------------------------------------------ Persimmon (Fuyu's LM)

# not PersimmonConfig's defaults: 3 heads of 20 dims with 10 rotating (partial_rotary_factor 0.5, as Fuyu-8B's),
# Fuyu-8B's theta 25000, qk_layernorm, an eps that is not LayerNorm's default, odd widths
PERSIMMON_TINY = dict(vocab_size=97, hidden_size=60, intermediate_size=84, num_hidden_layers=2, num_attention_heads=3,
                      max_position_embeddings=64, layer_norm_eps=1e-6, qk_layernorm=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5})


def make_persimmon(folder, **extra):
    """A tiny PersimmonForCausalLM whose projections are unit-scale (a misplaced row of the fused q, k, v shows in
    the logits, not at 1e-5) and whose norms and biases are perturbed."""
    torch.manual_seed(0)
    model = transformers.PersimmonForCausalLM(transformers.PersimmonConfig(**{**PERSIMMON_TINY, **extra})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed_tokens" not in name:
                p.normal_(0, p.shape[1] ** -0.5)
    perturb_(model)
    model.save_pretrained(folder)
    return model


def test_persimmon_logits_padded_and_cached_match_transformers(tmp_path):
    """LayerNorms, fused q/k/v split head by head, per-head q/k LayerNorms, rotary on half of each head, squared-ReLU
    MLP, biases, untied head: logits equal transformers' on a left-padded batch, and vlmkit's KV cache (a prefill,
    then one token at a time) gives the uncached logits."""
    ref = make_persimmon(tmp_path)
    lm = load_hf_lm(tmp_path)
    c = lm.cfg
    assert (c.norm, c.mlp, c.bias, c.act, c.qk_norm, c.rotary_fraction, c.rope_theta, c.norm_eps) == (
        "layernorm", "plain", True, "relu2", True, 0.5, 25000.0, 1e-6)
    assert not c.tie_embeddings and c.pos_embed == "rope" and lm.rotary.inv_freq.numel() == 5  # 10 of 20 dims rotate
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 is left-padded
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() passes them; vlmkit counts them from the mask itself
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        ours = lm.lm_head(lm(lm.embed_tokens(ids), attention_mask=mask))
        cache = lm.new_cache(2, 13)
        steps = [lm.lm_head(lm(lm.embed_tokens(ids[:, :9]), attention_mask=mask[:, :9], cache=cache))]
        for t in range(9, 13):
            steps.append(lm.lm_head(lm(lm.embed_tokens(ids[:, t:t + 1]), attention_mask=mask[:, :t + 1],
                                       cache=cache)))
    assert theirs.std() > 0.5  # loud enough that 1e-4 means something
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(ours[1, 4:], theirs[1, 4:], rtol=0, atol=1e-4)
    cached = torch.cat(steps, 1)
    torch.testing.assert_close(cached[0], ours[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(cached[1, 4:], ours[1, 4:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("extra", [{}, {"qk_layernorm": False, "tie_word_embeddings": True,
                                        "hidden_act": "gelu_pytorch_tanh"}], ids=["fuyu_like", "tied_no_qk_norm"])
def test_persimmon_exports_back_to_persimmon_for_causal_lm(tmp_path, extra):
    ref = make_persimmon(tmp_path / "src", **extra)
    lm = load_hf_lm(tmp_path / "src")
    assert lm.cfg.qk_norm == ref.config.qk_layernorm and lm.cfg.tie_embeddings == ref.config.tie_word_embeddings
    export_hf_lm(lm, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "PersimmonForCausalLM"
    assert back.config.rope_parameters["partial_rotary_factor"] == 0.5
    fused = "model.layers.1.self_attn.query_key_value.weight"  # fused again in transformers' head-by-head order
    assert torch.equal(read_weights(tmp_path / "out")[fused], read_weights(tmp_path / "src")[fused])
    ids = torch.tensor([[3, 17, 42, 90, 5, 7, 64]])
    with torch.no_grad():
        theirs = ref(input_ids=ids).logits
        torch.testing.assert_close(back(input_ids=ids).logits, theirs, rtol=0, atol=1e-4)
        torch.testing.assert_close(lm.lm_head(lm(lm.embed_tokens(ids))), theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("changes, match", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 1.5}},
     r"config.json: partial_rotary_factor 1.5 rotates 30 of the 20 dims of each head; supported: a factor in "
     r"\(0, 1\]"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.25}},
     r"partial_rotary_factor 0.25 rotates 5 of the 20 dims of each head; supported: .* an even number >= 2"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 25000.0, "factor": 2.0}},
     r"config.json: rope_type 'linear' \(RoPE scaling\) is not implemented for persimmon; supported: default"),
    ({"hidden_act": "gelu_new"}, r"config.json: hidden_act 'gelu_new' is not implemented for persimmon; supported: "
                                 r"relu2, relu, gelu, silu, gelu_pytorch_tanh"),
    ({"num_attention_heads": 7}, r"config.json: hidden_size 60 is not a multiple of num_attention_heads 7"),
    ({"intermediate_size": None}, r"config.json: missing key 'intermediate_size' for model_type 'persimmon'"),
])
def test_persimmon_values_vlmkit_lacks_are_refused_by_key(tmp_path, changes, match):
    make_persimmon(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ConfigError, match=match):
        load_hf_lm(tmp_path)


def test_persimmon_4x_config_keys_and_a_misshaped_fused_projection(tmp_path):
    """transformers 4.x (and Fuyu-8B's config.json) keep rope_theta and partial_rotary_factor at the top level; a
    fused projection that is not 3 x hidden_size rows is named."""
    make_persimmon(tmp_path)
    _edit_config(tmp_path, rope_parameters=None, rope_scaling=None, rope_theta=25000.0, partial_rotary_factor=0.5)
    cfg = load_hf_lm(tmp_path).cfg
    assert (cfg.rope_theta, cfg.rotary_fraction) == (25000.0, 0.5)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.0.self_attn.query_key_value.weight"
    tensors[key] = tensors[key][:120]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"query_key_value.weight has shape \(120, 60\), the config implies "
                                              r"\(180, ...\)"):
        load_hf_lm(tmp_path)


def test_rotary_fraction_and_qk_norm_are_checked():
    from vlmkit.config import LanguageConfig

    base = dict(vocab_size=50, width=48, depth=1, heads=3, kv_heads=3, mlp_dim=64)  # head_dim 16
    assert LanguageConfig(**base, rotary_fraction=0.25).rotary_dim == 4
    with pytest.raises(ConfigError, match=r"lm.rotary_fraction 0.0: the fraction of each head's dims that rotate; "
                                          r"valid: \(0, 1\]"):
        LanguageConfig(**base, rotary_fraction=0.0)
    with pytest.raises(ConfigError, match=r"lm.rotary_fraction 0.2: head_dim 16 x 0.2 gives 3 rotated dims; rotary "
                                          r"needs an even number >= 2"):
        LanguageConfig(**base, rotary_fraction=0.2)
    with pytest.raises(ConfigError, match=r"lm.rotary_fraction 0.5 \(partial rotary\) needs lm.pos_embed: rope"):
        LanguageConfig(**base, rotary_fraction=0.5, pos_embed="learned")
