"""LLaVA-1.5 import: logits and greedy tokens equal transformers' LlavaForConditionalGeneration on a tiny
random checkpoint (CLIP tower read at layer -2 without its class token, two-layer GELU projector, Llama)."""

from __future__ import annotations

import json

import pytest
import torch

from vlmkit.errors import ConfigError
from vlmkit.convert.hf.llava import load_hf_llava

from helpers import fixed_media, forward

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGE = 95


def make_llava(folder):
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=32, patch_size=8, layer_norm_eps=1e-6)
    text = transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                                    rope_theta=50000.0, max_position_embeddings=128)
    cfg = transformers.LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                   image_token_index=IMAGE, image_seq_length=16)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.3)
            elif name.endswith("bias") or "class_embedding" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    return model


def prompt() -> torch.Tensor:
    return torch.tensor([[1, 7, 9, *[IMAGE] * 16, 11, 12, 13, 14]])  # 16 patches, class token dropped


def test_llava_logits_and_greedy_tokens_match_transformers(tmp_path):
    ref = make_llava(tmp_path)
    model = load_hf_llava(tmp_path)
    assert model.image_seq_len == 16 and model.image_token_id == IMAGE
    ids, pixels = prompt(), torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = ref(input_ids=ids, pixel_values=pixels).logits
        ours = forward(model, ids, fixed_media(pixels, 16)).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    expected = ref.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=8, do_sample=False,
                            pad_token_id=0)[0, ids.shape[1]:].tolist()
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, forward(model, seq, fixed_media(pixels, 16)).logits[:, -1].argmax(-1, keepdim=True)],
                            1)
    ours = seq[0, ids.shape[1]:].tolist()
    # transformers stops at the end-of-sequence token (id 2 here); up to there the tokens must be the same
    eos = ref.generation_config.eos_token_id
    assert ours[:len(expected)] == expected and (len(expected) == 8 or expected[-1] == eos)


def test_siglip_tower_at_the_last_layer_skips_its_final_norm(tmp_path):
    """LLaVA reads hidden_states, which never pass the tower's post-layernorm, even at layer -1 (a SigLIP tower
    with the "full" strategy, as LLaVA-OneVision): the norm must not be applied."""
    torch.manual_seed(0)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8)
    text = transformers.Qwen2Config(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, rope_theta=20000.0)
    cfg = transformers.LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE,
                                   vision_feature_layer=-1, vision_feature_select_strategy="full", image_seq_length=16)
    ref = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.3)
    ref.save_pretrained(tmp_path)
    model = load_hf_llava(tmp_path)
    ids, pixels = prompt(), torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(forward(model, ids, fixed_media(pixels, 16)).logits,
                                   ref(input_ids=ids, pixel_values=pixels).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("changes, match", [
    ({"vision_feature_layer": [-2, -5]}, r"vision_feature_layer \[-2, -5\]: concatenating several layers is "
                                         r"not implemented"),
    ({"vision_feature_select_strategy": "cls"}, r"vision_feature_select_strategy 'cls'; supported: default, full"),
    ({"projector_hidden_act": "relu"}, r"projector_hidden_act 'relu' is not implemented"),
    ({"model_type": "llava_next"}, r"model_type 'llava_next' is not 'llava'"),
])
def test_unsupported_llava_features_are_named(tmp_path, changes, match):
    make_llava(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **changes}))
    with pytest.raises(ConfigError, match=match):
        load_hf_llava(tmp_path)


def test_default_strategy_needs_a_class_token(tmp_path):
    make_llava(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vision_config"] = {**cfg["vision_config"], "model_type": "siglip_vision_model"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"'default' drops a class token this tower does not have; use 'full'"):
        load_hf_llava(tmp_path)
