"""Qwen2-VL export: the import test's tiny Qwen2VLForConditionalGeneration folder -> ``vlmkit convert --from hf`` ->
``vlmkit convert --to hf`` loads with transformers' own class and processor: the same input_ids, mm_token_type_ids,
image grids and pixel patches as the original processor on real non-square images, the same logits (M-RoPE
positions included) and greedy tokens as the original model, the chat template kept, tensors and config.json in
the Hub's layout (Qwen/Qwen2-VL-*: ``visual.`` / ``model.`` / ``lm_head``, flat text keys, ``rope_scaling`` type
mrope, min_pixels / max_pixels), tied embeddings kept tied, and vlmkit scores of the export equal to those of the
original. What Qwen2-VL cannot express is refused by field, writing nothing.

As in the import test, ``AutoProcessor.from_pretrained`` cannot build Qwen2VLProcessor here: its video processor
needs torchvision (absent). The exported folder's processor is read with Qwen2VLProcessor without its video half
(the import test's ImageOnlyQwen2VLProcessor: image processor through AutoImageProcessor, tokenizer through
AutoTokenizer, as AutoProcessor would). Not checked for that reason: that AutoProcessor picks Qwen2VLProcessor
(processor_class is written in both processor files) and what the video processor reads from the folder (vlmkit
writes no video settings; transformers' video defaults apply). Transformers 4 is not installed: that it reads the
export is argued from the layout (the key set transformers 5 itself saves, the Hub's flat config), not run.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vlmkit
from vlmkit.cli import main
from vlmkit.convert.hf import convert_to_hf
from vlmkit.errors import ConfigError

from hf_folders import QWEN2_VL_TEMPLATE as TEMPLATE
from hf_folders import ImageOnlyQwen2VLProcessor
from test_hf_qwen2_vl import CASES, images_for

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGE_CASES = [c for c in CASES if c[1]]


def round_trip_of(src, root):
    """src (a transformers folder) -> root/ours (vlmkit) -> root/back (transformers), through the CLI."""
    assert main(["convert", "--from", "hf", str(src), "--out", str(root / "ours")]) == 0
    assert main(["convert", "--to", "hf", str(root / "ours"), "--out", str(root / "back")]) == 0
    return root / "ours", root / "back"


@pytest.fixture(scope="module")
def round_trip(qwen_folder, tmp_path_factory):
    """(original folder, its transformers model and processor, the vlmkit checkpoint, the exported folder)."""
    src, ref, hf_proc = qwen_folder
    ours, back = round_trip_of(src, tmp_path_factory.mktemp("qwen2_vl_export"))
    return src, ref, hf_proc, ours, back


def load_exported(folder):
    model, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def tensor_names(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("prompt, names", IMAGE_CASES)
def test_round_trip_gives_the_same_inputs_and_logits(round_trip, prompt, names):
    src, ref, hf_proc, _, back = round_trip
    again, again_proc = load_exported(back), ImageOnlyQwen2VLProcessor.from_pretrained(back)
    assert type(again_proc.image_processor).__name__ == type(hf_proc.image_processor).__name__
    images = images_for(names)
    theirs = hf_proc(text=prompt, images=images, return_tensors="pt")
    ours = again_proc(text=prompt, images=images, return_tensors="pt")
    assert sorted(ours) == sorted(theirs)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert ours[key].tolist() == theirs[key].tolist(), key
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(again(**ours).logits, ref(**theirs).logits, rtol=0, atol=1e-4)


def test_round_trip_keeps_the_image_processor_settings(round_trip):
    """min/max pixels, patch, merge and temporal sizes, resampling and normalisation read back as written."""
    src, _, hf_proc, _, back = round_trip
    again = ImageOnlyQwen2VLProcessor.from_pretrained(back).image_processor
    for key in ("size", "patch_size", "merge_size", "temporal_patch_size", "resample", "image_mean", "image_std",
                "do_resize", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb"):
        assert getattr(again, key) == getattr(hf_proc.image_processor, key), key
    # a dynamic-resolution case the processor resizes both ways gives the same grids (small: up, wide: down)
    images = images_for(("small", "wide", "tall"))
    assert again(images)["image_grid_thw"].tolist() == [[1, 4, 6], [1, 10, 14], [1, 16, 10]]


def test_round_trip_generates_the_same_tokens(round_trip):
    """generation_config.json's eos / pad / bos: greedy decoding of the export stops where the original's does."""
    src, ref, hf_proc, _, back = round_trip
    again, again_proc = load_exported(back), ImageOnlyQwen2VLProcessor.from_pretrained(back)
    assert again.generation_config.eos_token_id == ref.config.text_config.eos_token_id
    assert again.generation_config.pad_token_id == ref.config.text_config.pad_token_id
    prompt, names = CASES[1]
    images = images_for(names)
    kw = dict(max_new_tokens=8, do_sample=False, suppress_tokens=[hf_proc.image_token_id])
    theirs = hf_proc(text=prompt, images=images, return_tensors="pt")
    ours = again_proc(text=prompt, images=images, return_tensors="pt")
    expected = ref.generate(**theirs, **kw)
    assert len(set(expected[0, theirs["input_ids"].shape[1]:].tolist())) > 2  # a varied continuation
    assert again.generate(**ours, **kw).tolist() == expected.tolist()


def test_export_is_in_the_hub_layout(round_trip):
    """The tensor names transformers 5 itself saves (the 4.x names, which its key mapping reads back, as do vLLM
    and SGLang), and the Hub's flat config.json with M-RoPE as rope_scaling type "mrope"."""
    src, ref, _, _, back = round_trip
    names = tensor_names(back)
    assert names == tensor_names(src)
    assert {n.split(".")[0] for n in names} == {"visual", "model", "lm_head"}
    assert not any(n.startswith(("model.visual.", "model.language_model.")) for n in names)
    config = json.loads((back / "config.json").read_text())
    assert "text_config" not in config and config["hidden_size"] == 64 and config["num_key_value_heads"] == 2
    assert config["rope_scaling"] == {"type": "mrope", "mrope_section": [3, 2, 3]}
    assert config["rope_theta"] == 50000.0
    assert config["vision_config"]["in_chans"] == config["vision_config"]["in_channels"] == 3
    assert config["vision_config"]["rope_parameters"] == {"rope_type": "axial", "rope_theta": 2000.0}
    original = ref.config
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert config[key] == getattr(original, key), key
    again = transformers.AutoConfig.from_pretrained(back)
    for key in ("rope_parameters", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
                "eos_token_id", "pad_token_id", "bos_token_id", "use_sliding_window", "hidden_act"):
        mine, theirs = getattr(again.text_config, key), getattr(original.text_config, key)
        if key == "rope_parameters":  # transformers keeps the Hub's "type": "mrope" beside rope_type
            mine = {k: v for k, v in mine.items() if k != "type"}
        assert mine == theirs, key
    for key in ("depth", "embed_dim", "hidden_size", "hidden_act", "mlp_ratio", "num_heads", "in_channels",
                "patch_size", "spatial_merge_size", "temporal_patch_size", "rope_parameters"):
        assert getattr(again.vision_config, key) == getattr(original.vision_config, key), key
    images = json.loads((back / "preprocessor_config.json").read_text())
    assert (images["min_pixels"], images["max_pixels"]) == (256, 2560)  # the Hub's keys (transformers 4)
    assert images["size"] == {"shortest_edge": 256, "longest_edge": 2560}  # the same bounds as transformers 5 saves
    assert images["image_processor_type"] == "Qwen2VLImageProcessor"
    assert images["processor_class"] == "Qwen2VLProcessor"


def test_round_trip_keeps_the_chat_template(round_trip):
    src, _, hf_proc, _, back = round_trip
    again_proc = ImageOnlyQwen2VLProcessor.from_pretrained(back)
    assert again_proc.chat_template == TEMPLATE
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert (again_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def test_vlmkit_scores_the_export_as_the_original(round_trip):
    src, _, _, _, back = round_trip
    for prompt, names in CASES[:2]:
        images = images_for(names)
        assert vlmkit.load(back).score(images, prompt, " Two squares.") == pytest.approx(
            vlmkit.load(src).score(images, prompt, " Two squares."), abs=1e-5)


def test_tied_embeddings_export_tied(qwen_folder, tmp_path):
    """tie_word_embeddings (Qwen2-VL-2B): no lm_head.weight written, and transformers ties the head again."""
    src, _, hf_proc = qwen_folder
    tied = tmp_path / "tied"
    shutil.copytree(src, tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tensors = load_file(tied / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tied / "model.safetensors", metadata={"format": "pt"})
    _, back = round_trip_of(tied, tmp_path)
    assert "lm_head.weight" not in tensor_names(back)
    ref = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tied).eval()
    again = load_exported(back)
    assert again.lm_head.weight.data_ptr() == again.model.language_model.embed_tokens.weight.data_ptr()
    prompt, names = CASES[0]
    inputs = hf_proc(text=prompt, images=images_for(names), return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, ref(**inputs).logits, rtol=0, atol=1e-4)


def _edit(data: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        data = data[key]
    data[last] = value


@pytest.mark.parametrize("file, path, value, message", [
    ("config.json", "model.connector.act", "gelu_tanh", r"connector\.act 'gelu_tanh'.*patch merger"),
    ("config.json", "model.vision.norm_eps", 1e-5, r"vision: not a Qwen2-VL tower .*norm_eps 1e-05"),
    ("config.json", "model.vision.norm", "rmsnorm", r"vision: not a Qwen2-VL tower .*norm 'rmsnorm'"),
    ("config.json", "model.lm.norm_offset", True, r"lm\.norm_offset True.*Gemma's"),
    ("processor.json", "native.patch_size", 8, r"processor native\.patch_size 8 is not the tower's vision\.patch_size 4"),
    ("processor.json", "text_mode", "segments", r"processor text_mode 'segments': Qwen2VLProcessor's layout"),
    ("processor.json", "image_token", "<|video_pad|>", r"processor image_token '<\|video_pad\|>'"),
])
def test_what_qwen2_vl_cannot_express_is_refused_and_nothing_is_written(round_trip, tmp_path, file, path, value,
                                                                         message):
    _, _, _, ours, _ = round_trip
    edited = tmp_path / "ours"
    shutil.copytree(ours, edited)
    data = json.loads((edited / file).read_text())
    _edit(data, path, value)
    (edited / file).write_text(json.dumps(data))
    if value == "rmsnorm":  # the tower's RMSNorms have no biases: the checkpoint is saved without them
        tensors = load_file(edited / "model.safetensors")
        tensors = {k: v for k, v in tensors.items() if not (k.startswith("encoder.blocks.") and ".norm" in k
                                                             and k.endswith(".bias"))}
        save_file(tensors, edited / "model.safetensors", metadata={"format": "pt"})
    vlmkit.load(edited)  # a valid vlmkit checkpoint: only the export refuses it
    with pytest.raises(ConfigError, match=message):
        convert_to_hf(edited, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]


def test_a_tokenizer_without_qwen2_vl_markup_is_refused(round_trip, tmp_path):
    """config.json must name <|vision_start|> (transformers 4 finds images by it): a tokenizer without it is
    refused by token, nothing written."""
    _, _, _, ours, _ = round_trip
    edited = tmp_path / "ours"
    shutil.copytree(ours, edited)
    tok = json.loads((edited / "tokenizer.json").read_text())
    for entry in tok["added_tokens"]:
        if entry["content"] == "<|vision_start|>":
            entry["content"] = "<|vision_begin|>"
    tok["model"]["vocab"]["<|vision_begin|>"] = tok["model"]["vocab"].pop("<|vision_start|>")
    (edited / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match=r"processor tokenizer: no token '<\|vision_start\|>'"):
        convert_to_hf(edited, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]
