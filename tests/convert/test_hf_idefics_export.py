"""IDEFICS export: a tiny IdeficsForVisionText2Text folder -> ``vlmkit convert --from hf`` -> ``vlmkit convert --to
hf`` loads with transformers' own class and AutoProcessor (IdeficsProcessor): the same input_ids, pixels and
image_attention_mask as the original processor on real images, the same logits and greedy tokens as the original
model, tensors in the Hub's layout (decoupled embeddings split off again), and vlmkit scores of the export equal to
those of the original. A vlmkit-built flamingo (tied head, float gates, no resampler) exports too; what IDEFICS
cannot express is refused by field, writing nothing."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

import vlmkit
from vlmkit.checkpoint import write_model_files
from vlmkit.cli import main
from vlmkit.convert.hf import convert_to_hf
from vlmkit.errors import ConfigError
from vlmkit.models import build_model
from vlmkit.processing import Processor

from helpers import forward
from test_hf_idefics import PROMPTS, as_idefics, images_for

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def round_trip(idefics_folder, tmp_path_factory):
    """(original folder, its transformers model and AutoProcessor, the vlmkit checkpoint, the exported folder)."""
    folder, ref, hf_proc = idefics_folder
    root = tmp_path_factory.mktemp("idefics_export")
    assert main(["convert", "--from", "hf", str(folder), "--out", str(root / "ours")]) == 0
    assert main(["convert", "--to", "hf", str(root / "ours"), "--out", str(root / "back")]) == 0
    return folder, ref, hf_proc, root / "ours", root / "back"


def load_exported(folder):
    model, info = transformers.IdeficsForVisionText2Text.from_pretrained(folder, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("prompt", PROMPTS[1:3])
def test_round_trip_gives_the_same_inputs_and_logits(round_trip, prompt):
    _, ref, hf_proc, _, back = round_trip
    again, again_proc = load_exported(back), transformers.AutoProcessor.from_pretrained(back)
    assert type(again_proc).__name__ == "IdeficsProcessor"
    items = as_idefics(prompt, images_for(prompt))
    theirs, ours = hf_proc(text=items, return_tensors="pt"), again_proc(text=items, return_tensors="pt")
    assert sorted(ours) == sorted(theirs)
    for key in ("input_ids", "attention_mask", "image_attention_mask"):
        assert ours[key].tolist() == theirs[key].tolist(), key
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(again(**ours).logits, ref(**theirs).logits, rtol=0, atol=1e-4)


def test_round_trip_generates_the_same_tokens(round_trip):
    """generation_config.json's eos / pad / bos: greedy decoding of the export stops where the original's does."""
    _, ref, hf_proc, _, back = round_trip
    again = load_exported(back)
    inputs = hf_proc(text=as_idefics(PROMPTS[2], images_for(PROMPTS[2])), return_tensors="pt")
    expected = ref.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert again.generate(**inputs, max_new_tokens=8, do_sample=False).tolist() == expected.tolist()
    assert again.generation_config.eos_token_id == ref.generation_config.eos_token_id
    assert again.generation_config.pad_token_id == ref.generation_config.pad_token_id


def test_round_trip_keeps_vlmkit_scores(round_trip):
    src, _, _, _, back = round_trip
    images = images_for(PROMPTS[2])
    expected = vlmkit.load(src).score(images, PROMPTS[2], " Two squares.")
    assert vlmkit.load(back).score(images, PROMPTS[2], " Two squares.") == pytest.approx(expected, abs=1e-5)


def test_export_is_in_the_hub_layout(round_trip):
    """The tensor names of the original (HuggingFaceM4/idefics-*: model.*, lm_head.*) with the decoupled rows in
    additional_embedding / additional_fc, and the original's config values."""
    _, ref, _, _, back = round_trip
    with safe_open(str(back / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(ref.state_dict())
        assert f.get_slice("model.embed_tokens.additional_embedding.weight").get_shape() == [2, 48]
    config = json.loads((back / "config.json").read_text())
    original = ref.config.to_dict()
    for key in ("vocab_size", "additional_vocab_size", "cross_layer_interval", "qk_layer_norms", "alpha_type",
                "use_resampler", "rms_norm_eps", "rope_parameters", "tie_word_embeddings"):
        assert config[key] == original[key], key
    for key, value in config["perceiver_config"].items():
        assert original["perceiver_config"][key] == value, key
    for key, value in config["vision_config"].items():
        assert original["vision_config"][key] == value, key


def _variant(ours, tmp_path, model_edit=None, processor_edit=None, seed=0):
    """A vlmkit flamingo checkpoint built from the imported one's config with ``model_edit`` / ``processor_edit``
    applied (a fresh model when the config changes, else the imported weights)."""
    pipe = vlmkit.load(ours)
    cfg, pcfg = pipe.config, pipe.processor.cfg
    if processor_edit:
        pcfg = dataclasses.replace(pcfg, **processor_edit)
    processor = Processor(pcfg, pipe.processor.tokenizer)
    model = pipe.model
    if model_edit:
        for part, changes in model_edit.items():
            current = getattr(cfg, part)
            if "perceiver" in changes:
                changes = dict(changes, perceiver=dataclasses.replace(current.perceiver, **changes["perceiver"]))
            cfg = dataclasses.replace(cfg, **{part: dataclasses.replace(current, **changes)})
        torch.manual_seed(seed)
        model = build_model(cfg, processor.image_token_id)
    folder = tmp_path / "variant"
    folder.mkdir()
    write_model_files(folder, model.eval(), cfg, processor)
    return folder


def test_a_vlmkit_flamingo_with_a_tied_head_float_gates_and_no_resampler_exports(round_trip, tmp_path):
    """From scratch (random gates opened so the images matter): IdeficsForVisionText2Text gives vlmkit's logits."""
    _, _, _, ours, _ = round_trip
    src = _variant(ours, tmp_path, {"lm": {"tie_embeddings": True},
                                    "xattn": {"alpha_type": "float", "use_resampler": False, "qk_norm": False}})
    pipe = vlmkit.load(src)
    with torch.no_grad():
        for name, p in pipe.model.named_parameters():
            if "alpha" in name:
                p.fill_(0.8)
    write_model_files(src, pipe.model, pipe.config, pipe.processor)
    convert_to_hf(src, tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.perceiver_resampler.latents" not in f.keys()
    ref = load_exported(tmp_path / "hf")
    assert ref.config.tie_word_embeddings is True and ref.config.use_resampler is False
    hf_proc = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    images = images_for(PROMPTS[2])
    theirs = hf_proc(text=as_idefics(PROMPTS[2], images), return_tensors="pt")
    inputs = pipe.processor.prepare_images(images)
    assert theirs["input_ids"][0].tolist() == pipe.processor.prompt(PROMPTS[2], inputs).ids
    with torch.no_grad():
        ours_logits = forward(pipe.model, theirs["input_ids"], inputs).logits
        torch.testing.assert_close(ref(**theirs).logits, ours_logits, rtol=0, atol=1e-4)
        blank = forward(pipe.model, theirs["input_ids"], pipe.processor.prepare_images(images[::-1])).logits
    assert (blank - ours_logits).abs().max() > 1e-3  # the images reach the logits


@pytest.mark.parametrize("model_edit, processor_edit, message", [
    ({"vision": {"drop_class_token": True}}, None, r"drop_class_token True"),
    ({"vision": {"post_norm": True}}, None, r"post_norm True"),
    ({"vision": {"arch": "cnn", "class_token": False, "pre_norm": False, "patch_size": 2}}, None,
     r"vision: not a (CLIP|SigLIP) tower transformers can load: arch 'cnn'"),
    ({"lm": {"kv_heads": 2}}, None, r"lm\.kv_heads 2 \(IDEFICS has 4\)"),
    ({"lm": {"qkv_bias": True}}, None, r"lm\.qkv_bias, norm_offset or embed_scale \(its LLaMA\) 'qwen2'"),
    ({"xattn": {"heads": 2}}, None, r"xattn\.heads 2 \(IDEFICS has 4\)"),
    ({"xattn": {"only_last": False}}, None, r"xattn\.only_last False"),
    ({"xattn": {"reset_token_id": -1}}, None, r"xattn\.reset_token_id \(the tokenizer's EOS id\) -1"),
    ({"xattn": {"perceiver": {"mlp_dim": 64}}}, None, r"xattn\.perceiver\.mlp_dim 64 \(IDEFICS has 128\)"),
    (None, {"family": "llava"}, r"processor family 'llava'"),  # LLaVA's layout and images, not IdeficsProcessor's
    (None, {"text_mode": "segments"}, r"text_mode 'segments'"),
    (None, {"image_size": (28, 28)}, r"processor image_size \(28, 28\)"),
])
def test_what_idefics_cannot_express_is_refused_and_nothing_is_written(round_trip, tmp_path, model_edit,
                                                                       processor_edit, message):
    _, _, _, ours, _ = round_trip
    src = _variant(ours, tmp_path, model_edit, processor_edit)
    with pytest.raises(ConfigError, match=message):
        convert_to_hf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["variant"]
