"""Gemma 2 / Gemma 3 text decoders (``gemma2``, ``gemma3_text``) in the shared DecoderLM: logits equal
transformers' on tiny random checkpoints with a sliding window (5 tokens) much shorter than the 20-token prompts,
left-padded and packed batches, cached decoding equal to uncached, export back to transformers' classes, and the
refusals."""

from __future__ import annotations

import json

import pytest
import torch
from hf_fixtures import perturb_

from vlmkit.config import LanguageConfig
from vlmkit.convert.hf import export_hf_lm, load_hf_lm
from vlmkit.errors import ConfigError
from vlmkit.nn import document_mask

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

WINDOW = 5
COMMON = {"vocab_size": 96, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5, "max_position_embeddings": 128,
              "sliding_window": WINDOW, "query_pre_attn_scalar": 24, "hidden_activation": "gelu_pytorch_tanh"}
KINDS = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"attn_logit_softcapping": 7.0, "final_logit_softcapping": 5.0, "tie_word_embeddings": True,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    {"final_logit_softcapping": None, "tie_word_embeddings": False,
                         "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
                         "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                             "rope_theta": 1e6},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
}
T = 20


def make(kind: str, folder, **extra):
    conf_cls, model_cls, kw = KINDS[kind]
    torch.manual_seed(0)
    cfg = getattr(transformers, conf_cls)(**{**COMMON, **kw, **extra})
    cfg._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(cfg).eval()
    perturb_(model)
    model.save_pretrained(folder)
    return model


def ids_(batch=2, length=T, seed=1):
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(lm, ids, **kw):
    return lm.lm_head(lm(lm.embed_tokens(ids), **kw))


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_padded_packed_and_cached_match_transformers(kind, tmp_path):
    ref = make(kind, tmp_path)
    lm = load_hf_lm(tmp_path)
    assert lm.cfg.post_norms and lm.cfg.sliding_window == WINDOW and lm.cfg.attn_scalar == 24
    assert lm.cfg.layer_types[:2] == ("sliding", "full")
    ids = ids_()
    with torch.no_grad():
        theirs = ref(ids).logits
        torch.testing.assert_close(logits(lm, ids), theirs, rtol=0, atol=1e-4)
        # without the window (every layer full) the logits differ: the window matters on this prompt
        full = load_hf_lm(tmp_path)
        full.cfg.layer_types = ()
        assert (logits(full, ids) - theirs).abs().max() > 1e-3
        # left padding: the second row is 6 tokens shorter
        mask = torch.ones(2, T, dtype=torch.long)
        mask[1, :6] = 0
        padded = ids.clone()
        padded[1, :6] = 0
        theirs = ref(padded, attention_mask=mask).logits
        ours = logits(lm, padded, attention_mask=mask)
        torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(ours[1, 6:], theirs[1, 6:], rtol=0, atol=1e-4)
        torch.testing.assert_close(ours[1, 6:], logits(lm, ids[1:, 6:])[0], rtol=0, atol=1e-4)
        # packed: two samples in one row, each with its own positions, equal each sample alone
        a, b = ids[0, :12], ids[1, :8]
        docs = torch.tensor([[0] * 12 + [1] * 8])
        pos = torch.cat([torch.arange(12), torch.arange(8)])[None]
        packed = logits(lm, torch.cat([a, b])[None], position_ids=pos, mask=document_mask(docs))
        torch.testing.assert_close(packed[0, :12], logits(lm, a[None])[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(packed[0, 12:], logits(lm, b[None])[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", list(KINDS))
def test_cached_greedy_decoding_equals_uncached_and_transformers(kind, tmp_path):
    ref = make(kind, tmp_path)
    lm = load_hf_lm(tmp_path)
    ids = ids_(1)
    steps = 8
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0)[0, T:].tolist()
        seq = ids
        for _ in range(steps):  # uncached
            seq = torch.cat([seq, logits(lm, seq)[:, -1].argmax(-1, keepdim=True)], 1)
        assert seq[0, T:].tolist() == expected
        cache = lm.new_cache(1, T + steps)
        out, step_logits = [], logits(lm, ids, cache=cache)[:, -1]
        full = logits(lm, seq[:, :-1])
        for i in range(steps):
            nxt = step_logits.argmax(-1, keepdim=True)
            out.append(int(nxt))
            torch.testing.assert_close(step_logits, full[:, T - 1 + i], rtol=0, atol=1e-4)
            step_logits = logits(lm, nxt, cache=cache)[:, -1]
        assert out == expected
        # a left-padded batch decodes as each row alone
        mask = torch.ones(2, T + steps, dtype=torch.long)
        mask[0, :4] = 0
        batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), ids[:, 4:]], 1), ids])
        cache = lm.new_cache(2, T + steps)
        step_logits = logits(lm, batch, attention_mask=mask[:, :T], cache=cache)[:, -1]
        rows = [[], []]
        for i in range(steps):
            nxt = step_logits.argmax(-1, keepdim=True)
            for r in range(2):
                rows[r].append(int(nxt[r]))
            step_logits = logits(lm, nxt, attention_mask=mask[:, :T + i + 1], cache=cache)[:, -1]
        assert rows[1] == expected
        alone = ids[:, 4:]
        for _ in range(steps):
            alone = torch.cat([alone, logits(lm, alone)[:, -1].argmax(-1, keepdim=True)], 1)
        assert rows[0] == alone[0, T - 4:].tolist()


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_loads_in_transformers_with_the_same_logits(kind, tmp_path):
    make(kind, tmp_path / "in")
    lm = load_hf_lm(tmp_path / "in")
    export_hf_lm(lm, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == kind
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(back).__name__ == KINDS[kind][1]
    ids = ids_()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, logits(lm, ids), rtol=0, atol=1e-4)
    assert load_hf_lm(tmp_path / "out").cfg == lm.cfg


def _edit(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("kind, changes, match", [
    ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention: true"),
    ("gemma2", {"layer_types": ["sliding_attention", "chunked_attention", "full_attention", "full_attention"]},
     "layer_types"),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0},
                                          "sliding_attention": {"rope_type": "default"}}}, "'yarn'"),
])
def test_what_vlmkit_lacks_is_refused_by_key(kind, changes, match, tmp_path):
    make(kind, tmp_path)
    _edit(tmp_path, **changes)
    with pytest.raises(ConfigError, match=match):
        load_hf_lm(tmp_path)


def test_gemma3_4x_rope_keys_and_default_layer_pattern(tmp_path):
    """4.x's rope_theta / rope_local_base_freq / rope_scaling and sliding_window_pattern read as 5's keys."""
    make("gemma3_text", tmp_path)
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    del cfg["rope_parameters"], cfg["layer_types"]
    cfg |= {"rope_theta": 5e5, "rope_local_base_freq": 2e4, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            "sliding_window_pattern": 3}
    path.write_text(json.dumps(cfg))
    lm = load_hf_lm(tmp_path)
    assert (lm.cfg.rope_theta, lm.cfg.local_rope_theta, lm.cfg.rope_scaling.factor) == (5e5, 2e4, 2.0)
    assert lm.cfg.layer_types == ("sliding", "sliding", "full", "sliding")


def test_gemma_only_settings_are_checked_and_refused_on_other_exports():
    with pytest.raises(ConfigError, match="layer_types"):
        LanguageConfig(depth=2, layer_types=("sliding", "global"))
    with pytest.raises(ConfigError, match="sliding_window"):
        LanguageConfig(depth=2, layer_types=("sliding", "full"))
    from vlmkit.convert.hf.lm import lm_config_to_hf
    with pytest.raises(ConfigError, match="only Gemma 2 / 3"):
        lm_config_to_hf(LanguageConfig(depth=2, layer_types=("sliding", "full"), sliding_window=4))
    with pytest.raises(ConfigError, match="cannot express"):
        lm_config_to_hf(LanguageConfig(depth=2, post_norms=True))  # no norm_offset / embed_scale


@pytest.mark.parametrize("name", ["gemma2_text", "gemma3_text"])
def test_the_tiny_folders_for_the_text_family_load_with_transformers_logits(hf_folder, name):
    """tests/hf_folders.py's gemma2_text / gemma3_text (BOS-adding tokenizer, 5-token window): a 20+ token prompt
    with the tokenizer's BOS scores as transformers does, greedy tokens equal."""
    folder, ref, tok = hf_folder(name)
    lm = load_hf_lm(folder)
    ids = tok("the quick brown fox jumps over the lazy dog, how many squares?", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_token_id and ids.shape[1] > 2 * WINDOW
    with torch.no_grad():
        torch.testing.assert_close(logits(lm, ids), ref(ids).logits, rtol=0, atol=1e-4)
        expected = ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        seq = ids
        for _ in range(6):
            seq = torch.cat([seq, logits(lm, seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert seq.tolist() == expected.tolist()


def test_a_soft_capped_head_takes_no_lora_adapter(tmp_path):
    """An adapter adds after its Linear's forward: on a capped head it would skip the cap, so it is refused."""
    from vlmkit.nn.lora import LoRAConfig, apply_lora

    make("gemma2", tmp_path)
    lm = load_hf_lm(tmp_path)
    lm.lm_head.weight = torch.nn.Parameter(lm.lm_head.weight.detach().clone())  # untied: only the cap refuses
    with pytest.raises(ConfigError, match="more than a linear map"):
        apply_lora(lm, LoRAConfig(targets=["lm_head"]))
    apply_lora(lm, LoRAConfig(targets=["*.q_proj"]))
