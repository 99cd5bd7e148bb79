"""CLIP and SigLIP vision towers: hidden states equal transformers' on tiny random checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.convert.hf import load_hf_vision

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8, layer_norm_eps=1e-6)


def randomise_norms_and_biases(model):
    with torch.no_grad():  # not the init's ones and zeros, so a dropped norm or bias shows
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.3)
            elif name.endswith("bias") or "class_embedding" in name:
                p.normal_(0.0, 0.3)


def save(model, folder):
    randomise_norms_and_biases(model)
    model.eval().save_pretrained(folder)
    return model


def build(kind: str, folder, whole: bool = False):
    torch.manual_seed(0)
    if kind == "clip":
        vis = transformers.CLIPVisionConfig(**VISION, hidden_act="quick_gelu")
        if whole:
            text = transformers.CLIPTextConfig(hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, vocab_size=64)
            full = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(),
                                                                  vision_config=vis.to_dict(), projection_dim=16))
            return tower(save(full, folder))
        return tower(save(transformers.CLIPVisionModel(vis), folder))
    vis = transformers.SiglipVisionConfig(**VISION, hidden_act="gelu_pytorch_tanh")
    return tower(save(transformers.SiglipVisionModel(vis), folder))


def tower(model):
    """The vision transformer inside (transformers 4 wraps it as .vision_model; 5's standalone towers are it)."""
    return getattr(model, "vision_model", model)


@pytest.mark.parametrize("kind, whole", [("clip", False), ("clip", True), ("siglip", False)],
                         ids=["clip-vision", "clip-dual-encoder", "siglip-vision"])
@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_hidden_states_match_transformers(kind, whole, feature_layer, tmp_path):
    ref = build(kind, tmp_path, whole)
    enc = load_hf_vision(tmp_path, feature_layer=feature_layer)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ref(pixel_values=pixels, output_hidden_states=True)
        # transformers: CLIP's last_hidden_state is not post-normed; SigLIP's is
        theirs = out.last_hidden_state if feature_layer == -1 else out.hidden_states[feature_layer]
        ours = enc(pixels)
    assert ours.shape == theirs.shape == (2, 16 + (kind == "clip"), 32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert len(enc.blocks) == 3 + 1 + feature_layer  # layers after the feature layer are not built


def test_unknown_vision_type_and_activation_are_named(tmp_path):
    build("siglip", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    with pytest.raises(ConfigError, match=r"config.json: hidden_act 'relu' is not implemented"):
        load_hf_vision(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "dinov2"}))
    with pytest.raises(ConfigError, match=r"model_type 'dinov2' is not a vision tower vlmkit imports"):
        load_hf_vision(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_size": 40}))
    with pytest.raises(CheckpointError,
                       match=r"patch_embedding.weight has shape \(32, 3, 8, 8\), the config implies \(40, 3, 8, 8\)"):
        load_hf_vision(tmp_path)


def test_unknown_tensors_in_built_layers_are_reported_not_skipped(tmp_path):
    from safetensors.torch import load_file, save_file

    build("clip", tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["encoder.layers.0.self_attn.q_norm.weight"] = torch.ones(8)  # in a layer vlmkit builds
    tensors["encoder.layers.2.self_attn.q_norm.weight"] = torch.ones(8)  # after feature layer -2: not built
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected \['encoder.layers.0.self_attn.q_norm.weight'\]"):
        load_hf_vision(tmp_path, feature_layer=-2)
