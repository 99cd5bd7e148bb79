"""Llama / Qwen2 / Mistral / Gemma import: logits and greedy tokens equal transformers' on tiny random checkpoints
that transformers builds here (offline), and bad folders get errors that name the file and key."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.convert.hf import export_hf_lm, load_hf_lm, read_weights

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
    with pytest.raises(ConfigError, match=r"lm: norm 'layernorm', mlp 'plain': with rotary positions no "):
        lm_config_to_hf(LanguageConfig(**{**opt, "pos_embed": "rope", "pos_offset": 0, "bias": False}))
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
