"""LLaVA-NeXT end to end from a Hugging Face folder: ``vlmkit.load(folder)`` gives the same input_ids (each
``<image>`` expanded to the image's own AnyRes token count) and the same tiles as transformers'
LlavaNextProcessor for non-square images of different sizes (different tile grids, unpadding), the same image
features and logits as LlavaNextForConditionalGeneration (CLIP tower at layer -2, Mistral LM with grouped-query
attention), the same greedy tokens (alone and in a left-padded batch), the score() contract, the folder's chat
template, ``vlmkit convert --from hf`` to a checkpoint that scores the same, and named refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import vlmkit
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.batch import MediaInputs
from vlmkit.processing.llava_next import tile_grid, unpad_slice

from helpers import forward
from hf_fixtures import real_images
from hf_folders import LLAVA_NEXT_PINPOINTS as PINPOINTS
from hf_folders import LLAVA_NEXT_TEMPLATE as TEMPLATE

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

# (prompt, indices into real_images(): 72x48 wide, 40x60 tall, 64x64 square)
PROMPTS = [("[INST] <image>\nWhat colour is the small circle? [/INST]", [0]), ("<image> caption en", [1]),
           ("Compare <image> and <image>: how many squares?", [2, 0])]


@pytest.fixture(scope="module")
def pipe(next_folder):
    return vlmkit.load(next_folder[0])


def images_of(indices):
    ims = real_images()
    return [ims[i] for i in indices]


def test_fixture_images_exercise_tiling_and_unpadding():
    """The images differ in tile grid, and at least one loses padded feature rows or columns: otherwise the
    parity tests below could not tell a wrong grid or a missing unpadding."""
    grids = [tile_grid((im.height, im.width), PINPOINTS, 16) for im in real_images()]
    assert grids == [(4, 5), (4, 3), (4, 4)]
    unpad = [unpad_slice((im.height, im.width), (r * 4, c * 4)) for im, (r, c) in zip(real_images(), grids)]
    assert unpad == [(1, 1), (2, 1), (2, 0)]  # rows cropped, columns cropped, nothing cropped


@pytest.mark.parametrize("prompt, indices", PROMPTS)
def test_input_ids_pixels_features_and_logits_equal_transformers(next_folder, pipe, prompt, indices):
    _, ref, hf_proc = next_folder
    images = images_of(indices)
    theirs = hf_proc(text=prompt, images=images, return_tensors="pt")
    inputs = pipe.processor.prepare_images(images)
    ids = pipe.processor.prompt(prompt, inputs).ids
    assert ids == theirs["input_ids"][0].tolist()
    assert inputs.extra["image_sizes"].tolist() == theirs["image_sizes"].tolist()
    tiles = inputs.extra["image_tiles"].tolist()
    assert len(set(tiles)) == len(tiles)  # every image of the prompt has its own tile count
    expected = torch.cat([pv[:n] for pv, n in zip(theirs["pixel_values"], tiles)])
    torch.testing.assert_close(inputs.pixel_values, expected, rtol=0, atol=1e-5)
    assert all(float(pv[n:].abs().sum()) == 0 for pv, n in zip(theirs["pixel_values"], tiles))  # batch padding
    with torch.no_grad():
        ours = forward(pipe.model, ids, inputs).logits
        ref_logits = ref(**theirs).logits
        feats = ref.model.get_image_features(theirs["pixel_values"], theirs["image_sizes"]).pooler_output
        features = pipe.model.encode_media(inputs)
        torch.testing.assert_close(features.values, torch.cat(feats), rtol=0, atol=1e-5)
    assert inputs.tokens == features.rows == [f.shape[0] for f in feats]
    torch.testing.assert_close(ours, ref_logits, rtol=0, atol=1e-4)


def test_chat_uses_the_folders_template(next_folder, pipe):
    _, _, hf_proc = next_folder
    assert pipe.processor.cfg.chat_template_jinja == TEMPLATE
    images = images_of([1])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    theirs = hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    theirs_ids = hf_proc(text=theirs, images=images)["input_ids"][0]
    inputs = pipe.processor.prepare_images(images)
    assert pipe.processor.chat("What is it?", inputs).ids == list(theirs_ids)


def test_tiles_without_image_sizes_are_refused(pipe):
    """encode_media takes MediaInputs only (no bare pixel tensor any more): tiles without the image sizes and
    tile counts the AnyRes processor gives them cannot be laid out, and are refused."""
    inputs = pipe.processor.prepare_images(images_of([0]))
    with pytest.raises(ValueError, match="MediaInputs"):
        pipe.model.encode_media(MediaInputs(inputs.pixel_values, inputs.tokens, rows=inputs.rows))


def _copy(folder, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("changes, match", [
    ({"vision_feature_layer": [-2, -1]}, "vision_feature_layer"),
    ({"vision_feature_select_strategy": "full"}, "class token"),
    ({"image_grid_pinpoints": [[32, 40]]}, "image_grid_pinpoints"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act"),
])
def test_unimplemented_config_features_are_refused_by_name(next_folder, tmp_path, changes, match):
    folder = _copy(next_folder[0], tmp_path)
    _edit_json(folder / "config.json", **changes)
    with pytest.raises(ConfigError, match=match):
        vlmkit.load(folder)


def test_processor_settings_that_count_differently_are_refused(next_folder, tmp_path):
    folder = _copy(next_folder[0], tmp_path)
    _edit_json(folder / "processor_config.json", patch_size=2)
    with pytest.raises(ConfigError, match=r"processor_config.json: patch_size 2"):
        vlmkit.load(folder)
    _edit_json(folder / "processor_config.json", patch_size=4, num_additional_image_tokens=0)
    with pytest.raises(ConfigError, match="num_additional_image_tokens"):
        vlmkit.load(folder)
    _edit_json(folder / "processor_config.json", num_additional_image_tokens=1)
    data = json.loads((folder / "processor_config.json").read_text())
    data["image_processor"]["image_grid_pinpoints"] = [[32, 64]]
    (folder / "processor_config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="image_grid_pinpoints .* differ from config.json"):
        vlmkit.load(folder)


def test_weights_that_do_not_match_the_config_and_a_missing_tokenizer_are_named(next_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(next_folder[0], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in tensors if k.endswith("image_newline"))  # transformers 5 saves the llava-hf layout
    del tensors[key]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"missing \['{key}'\]"):
        vlmkit.load(folder)
    tensors[key] = torch.zeros(40)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"image_newline has shape \(40,\), the config implies \(48,\)"):
        vlmkit.load(folder)
    shutil.copy(next_folder[0] / "model.safetensors", folder / "model.safetensors")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        vlmkit.load(folder)
