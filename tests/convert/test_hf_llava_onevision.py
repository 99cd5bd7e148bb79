"""LLaVA-OneVision (images) end to end from a Hugging Face folder: ``vlmkit.load(folder)`` gives the same
input_ids and tiles as transformers' LlavaOnevisionProcessor for non-square images of different sizes
(different tile grids, unpadding of rows and of columns, anyres_max_9's bilinear reduction for some images and
not others), the same image features and logits as LlavaOnevisionForConditionalGeneration (SigLIP tower at
layer -1 "full", Qwen2 LM with grouped-query attention and tied embeddings), OneVision's multi-image mode
(untiled square images, as the processor does for a nested image list), the same greedy tokens (alone and in
a left-padded batch), the score() contract, the folder's chat template, ``vlmkit convert --from hf`` to a
checkpoint that scores the same, and named refusals (video among them).

transformers cannot build LlavaOnevisionProcessor without torchvision (its video processor needs it, and
AutoProcessor insists on loading one), so the reference processor here is LlavaOnevisionProcessor with the
video processor left out: the same class code, saved as and reloaded from the folder's files."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

import vlmkit
from vlmkit.errors import ConfigError, DataError
from vlmkit.processing import Processor
from vlmkit.processing.llava_next import reduced_size, tile_grid, unpad_slice

from helpers import forward
from hf_fixtures import real_images
from hf_folders import ONEVISION_PINPOINTS as PINPOINTS
from hf_folders import ONEVISION_TEMPLATE as TEMPLATE

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

# (prompt, indices into real_images(): 72x48 wide, 40x60 tall, 64x64 square)
PROMPTS = [("<|im_start|>user <image>\nWhat colour is the small circle?<|im_end|>\n<|im_start|>assistant\n", [0]),
           ("<image>caption en", [1]), ("Compare <image> and <image>: how many squares?", [2, 0])]


@pytest.fixture(scope="module")
def pipe(ov_folder):
    return vlmkit.load(ov_folder[0])


def with_multi_image(pipe, mode):
    cfg = pipe.processor.cfg
    return Processor(dataclasses.replace(cfg, anyres=dataclasses.replace(cfg.anyres, multi_image=mode)),
                     pipe.processor.tokenizer)


def images_of(indices):
    ims = real_images()
    return [ims[i] for i in indices]


def test_fixture_images_exercise_tiling_unpadding_and_reduction():
    """Tile grids differ, rows are cropped for one image and columns for another, and anyres_max_9 shrinks
    two of the three: otherwise the parity tests below could not tell these steps wrong or missing."""
    grids = [tile_grid((im.height, im.width), PINPOINTS, 16) for im in real_images()]
    assert grids == [(4, 5), (4, 3), (4, 4)]
    unpad = [unpad_slice((im.height, im.width), (r * 4, c * 4)) for im, (r, c) in zip(real_images(), grids)]
    assert unpad == [(1, 1), (2, 1), (2, 0)]
    assert [reduced_size(hw, 4, 9) for hw in ((14, 20), (16, 10), (16, 16))] == [(10, 14), None, (12, 12)]


@pytest.mark.parametrize("prompt, indices", PROMPTS)
def test_input_ids_pixels_features_and_logits_equal_transformers(ov_folder, pipe, prompt, indices):
    """Every image tiled: the processor given a flat list of images, or anyres.multi_image "tile"."""
    _, ref, hf_proc = ov_folder
    images = images_of(indices)
    theirs = hf_proc(text=prompt, images=images, return_tensors="pt")
    tiled = with_multi_image(pipe, "tile")
    inputs = tiled.prepare_images(images)
    ids = tiled.prompt(prompt, inputs).ids
    assert ids == theirs["input_ids"][0].tolist()
    assert inputs.extra["image_sizes"].tolist() == theirs["image_sizes"].tolist()
    tiles = inputs.extra["image_tiles"].tolist()
    expected = torch.cat([pv[:n] for pv, n in zip(theirs["pixel_values"], tiles)])
    torch.testing.assert_close(inputs.pixel_values, expected, rtol=0, atol=1e-5)
    assert all(float(pv[n:].abs().sum()) == 0 for pv, n in zip(theirs["pixel_values"], tiles))  # batch padding
    with torch.no_grad():
        ours = forward(pipe.model, ids, inputs).logits
        ref_logits = ref(**theirs).logits
        feats = ref.model.get_image_features(theirs["pixel_values"], theirs["image_sizes"],
                                             vision_aspect_ratio="anyres_max_9").pooler_output
        features = pipe.model.encode_media(inputs)
        torch.testing.assert_close(features.values, torch.cat(feats), rtol=0, atol=1e-5)
    assert inputs.tokens == features.rows == [f.shape[0] for f in feats]
    torch.testing.assert_close(ours, ref_logits, rtol=0, atol=1e-4)


def test_several_images_are_squares_by_default_as_transformers_takes_a_prompts_images(ov_folder, pipe):
    """An imported folder's default (anyres.multi_image "square"): a prompt's several images are padded to squares
    in the mean colour and not tiled, as LlavaOnevisionProcessor does for the prompt's images as one list
    (images=[[a, b]], what apply_chat_template passes); a single image is still tiled. Tiling them all (the flat-list
    call) was the default before, and scored such prompts differently from transformers."""
    _, ref, hf_proc = ov_folder
    assert pipe.processor.cfg.anyres.multi_image == "square"
    prompt, _ = PROMPTS[2]
    images = images_of([0, 1])  # both non-square: the padding colour shows
    theirs = hf_proc(text=[prompt], images=[images], return_tensors="pt")
    inputs = pipe.processor.prepare_images(images)
    ids = pipe.processor.prompt(prompt, inputs).ids
    assert ids == theirs["input_ids"][0].tolist()
    assert inputs.extra["image_tiles"].tolist() == [1, 1] and inputs.tokens == [17, 17]
    torch.testing.assert_close(inputs.pixel_values, theirs["pixel_values"].flatten(0, 1), rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(forward(pipe.model, ids, inputs).logits, ref(**theirs).logits,
                                   rtol=0, atol=1e-4)
    single = images_of([0])
    assert pipe.processor.prepare_images(single).tokens == with_multi_image(pipe, "tile").prepare_images(single).tokens
    assert pipe.processor.prepare_images(single).extra["image_tiles"].item() > 1


def test_chat_uses_the_folders_template(ov_folder, pipe):
    _, _, hf_proc = ov_folder
    assert pipe.processor.cfg.chat_template_jinja == TEMPLATE
    images = images_of([1])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    theirs = hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    theirs_ids = hf_proc(text=theirs, images=images)["input_ids"][0]
    inputs = pipe.processor.prepare_images(images)
    assert pipe.processor.chat("What is it?", inputs).ids == list(theirs_ids)


def test_video_placeholders_are_refused(pipe):
    with pytest.raises(DataError, match="'<video>' is a placeholder of an input kind vlmkit does not implement"):
        pipe.generate([], "<video>What happens?", max_new_tokens=2)
    with pytest.raises(DataError, match="'<video>'"):
        pipe.score(images_of([0]), "<image><video>", " a dog")


def _copy(folder, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("changes, match", [
    ({"vision_aspect_ratio": "anyres"}, "vision_aspect_ratio 'anyres' is not implemented"),
    ({"vision_feature_layer": [-2, -1]}, "vision_feature_layer"),
    ({"vision_feature_select_strategy": "default"}, "drops a class token this tower does not have"),
    ({"image_grid_pinpoints": [[16, 24]]}, "image_grid_pinpoints entry"),
])
def test_unimplemented_config_features_are_refused_by_name(ov_folder, tmp_path, changes, match):
    folder = _copy(ov_folder[0], tmp_path)
    _edit_json(folder / "config.json", **changes)
    with pytest.raises(ConfigError, match=match):
        vlmkit.load(folder)


@pytest.mark.parametrize("changes, match", [
    ({"num_image_tokens": 9}, r"processor_config.json: num_image_tokens 9"),
    ({"vision_aspect_ratio": "anyres_max_4"}, r"processor_config.json: vision_aspect_ratio 'anyres_max_4' differs"),
])
def test_processor_settings_that_count_differently_are_refused(ov_folder, tmp_path, changes, match):
    folder = _copy(ov_folder[0], tmp_path)
    _edit_json(folder / "processor_config.json", **changes)
    with pytest.raises(ConfigError, match=match):
        vlmkit.load(folder)
