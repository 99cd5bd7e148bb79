"""Mllama export: a tiny MllamaForConditionalGeneration folder -> ``vlmkit convert --from hf`` -> ``vlmkit convert
--to hf`` loads with transformers' own class and AutoProcessor (MllamaProcessor): the same inputs (ids, tiles,
aspect-ratio ids and masks, cross_attention_mask) as the original processor, the same logits with 1 and 2 images
and the same greedy tokens as the original model, the tensors transformers saves, the chat template kept, vlmkit
scores of the export equal to the original's. A vlmkit-built Mllama (fresh weights, open gates) exports and
transformers computes what vlmkit does; what Mllama cannot express is refused by field, writing nothing."""

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
from vlmkit.config import ProcessorConfig, to_dict
from vlmkit.family import processor_config_from_dict
from vlmkit.processing import Processor

from helpers import forward
from test_hf_mllama import PROMPTS, images

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def round_trip(mllama_folder, tmp_path_factory):
    """(original folder, its transformers model and AutoProcessor, the vlmkit checkpoint, the exported folder)."""
    folder, ref, hf_proc = mllama_folder
    root = tmp_path_factory.mktemp("mllama_export")
    assert main(["convert", "--from", "hf", str(folder), "--out", str(root / "ours")]) == 0
    assert main(["convert", "--to", "hf", str(root / "ours"), "--out", str(root / "back")]) == 0
    return folder, ref, hf_proc, root / "ours", root / "back"


def load_exported(folder):
    model, info = transformers.MllamaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("prompt, which", PROMPTS)
def test_round_trip_gives_the_same_inputs_and_logits(round_trip, prompt, which):
    _, ref, hf_proc, _, back = round_trip
    again, again_proc = load_exported(back), transformers.AutoProcessor.from_pretrained(back)
    assert type(again_proc).__name__ == "MllamaProcessor"
    imgs = [images()[i] for i in which]
    theirs = hf_proc(text=prompt, images=imgs, return_tensors="pt")
    ours = again_proc(text=prompt, images=imgs, return_tensors="pt")
    assert sorted(ours) == sorted(theirs)
    for key in ("input_ids", "attention_mask", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"):
        assert ours[key].tolist() == theirs[key].tolist(), key
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(again(**ours).logits, ref(**theirs).logits, rtol=0, atol=1e-4)


def test_round_trip_generates_the_same_tokens(round_trip):
    _, ref, hf_proc, _, back = round_trip
    again = load_exported(back)
    prompt, which = PROMPTS[2]
    inputs = hf_proc(text=prompt, images=[images()[i] for i in which], return_tensors="pt")
    expected = ref.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert again.generate(**inputs, max_new_tokens=8, do_sample=False).tolist() == expected.tolist()
    assert again.generation_config.eos_token_id == ref.generation_config.eos_token_id


def test_export_is_in_transformers_layout_and_keeps_the_template(round_trip):
    src, _, hf_proc, _, back = round_trip
    with safe_open(str(src / "model.safetensors"), "pt") as f, safe_open(str(back / "model.safetensors"), "pt") as g:
        assert set(g.keys()) == set(f.keys())
    config = json.loads((back / "config.json").read_text())
    assert config["text_config"]["cross_attention_layers"] == [1, 2, 4]
    assert config["text_config"]["num_hidden_layers"] == 5
    assert config["vision_config"]["intermediate_layers_indices"] == [3, 1]
    again_proc = transformers.AutoProcessor.from_pretrained(back)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    rendered = hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert again_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == rendered
    imgs = [images()[i] for i in PROMPTS[1][1]]
    expected = vlmkit.load(src).score(imgs, PROMPTS[1][0], " Two squares.")
    assert vlmkit.load(back).score(imgs, PROMPTS[1][0], " Two squares.") == pytest.approx(expected, abs=1e-5)


def _variant(ours, tmp_path, model_edit=None, processor_edit=None, seed=0):
    """A vlmkit Mllama checkpoint built from the imported one's config with ``model_edit`` / ``processor_edit``
    applied (a fresh model with open gates when the config changes, else the imported weights)."""
    pipe = vlmkit.load(ours)
    cfg, pcfg = pipe.config, pipe.processor.cfg
    if processor_edit and "family" in processor_edit:  # another family's processor, of that family's config type
        base = {f.name for f in dataclasses.fields(ProcessorConfig)}
        pcfg = processor_config_from_dict({k: v for k, v in to_dict(pcfg).items() if k in base} | processor_edit)
    else:
        pcfg = dataclasses.replace(pcfg, **(processor_edit or {}))
    processor = Processor(pcfg, pipe.processor.tokenizer)
    model = pipe.model
    if model_edit is not None:
        for part, changes in model_edit.items():
            cfg = dataclasses.replace(cfg, **{part: dataclasses.replace(getattr(cfg, part), **changes)})
        torch.manual_seed(seed)
        model = build_model(cfg, processor.image_token_id)
        with torch.no_grad():  # from-scratch gates are closed (identity blocks): open them
            for name, p in model.named_parameters():
                if "alpha" in name or name.endswith(("gate", "gate_attn", "gate_ffn")):
                    p.uniform_(0.3, 1.0)
    folder = tmp_path / "variant"
    folder.mkdir()
    write_model_files(folder, model.eval(), cfg, processor)
    return folder


def test_a_vlmkit_built_mllama_exports_and_transformers_computes_the_same(round_trip, tmp_path):
    _, _, _, ours, _ = round_trip
    src = _variant(ours, tmp_path, {"mllama": {"xattn_positions": [0, 2]}}, seed=3)  # blocks first and last
    convert_to_hf(src, tmp_path / "hf")
    ref, hf_proc = load_exported(tmp_path / "hf"), transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    assert ref.config.text_config.cross_attention_layers == [0, 3]
    pipe = vlmkit.load(src)
    prompt, which = PROMPTS[3]
    imgs = [images()[i] for i in which]
    theirs = hf_proc(text=prompt, images=imgs, return_tensors="pt", add_special_tokens=False)  # BOS is in front
    inputs = pipe.processor.prepare_images(imgs)
    assert theirs["input_ids"][0].tolist() == pipe.processor.prompt(prompt, inputs).ids
    with torch.no_grad():
        ours_logits = forward(pipe.model, theirs["input_ids"], inputs).logits[..., :ref.config.text_config.vocab_size]
        torch.testing.assert_close(ref(**theirs).logits, ours_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("model_edit, processor_edit, message", [
    ({"vision": {"arch": "cnn", "patch_size": 4, "class_token": False, "pos_embed": "sincos2d"}}, None,
     r"vision\.arch 'cnn': only Mllama's own tiled tower"),
    ({"connector": {"kind": "mlp"}}, None, r"connector\.kind 'mlp'"),
    ({"lm": {"qkv_bias": True}}, None, r"lm: an LM exported as 'qwen2'"),
    ({"mllama": {"extra_embeddings": 4}}, None, r"mllama\.extra_embeddings 4"),
    (None, {"family": "llava"}, r"processor family 'llava'"),  # LLaVA's fixed-size images, not Mllama's tiles
    (None, {"max_image_tiles": 2}, r"processor image_size \(28, 28\) / max_image_tiles 2"),
])
def test_what_mllama_cannot_express_is_refused_and_nothing_is_written(round_trip, tmp_path, model_edit,
                                                                      processor_edit, message):
    _, _, _, ours, _ = round_trip
    src = _variant(ours, tmp_path, model_edit, processor_edit)
    with pytest.raises(ConfigError, match=message):
        convert_to_hf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["variant"]
