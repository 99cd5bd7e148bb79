"""Idefics3 and SmolVLM end to end from Hugging Face folders: ``vlmkit.load(folder)`` gives the same input_ids
(tiles, row/column markers, global view) and pixels as transformers' processors with image splitting on and off,
the same logits and greedy tokens as Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration, the
score() contract, the folder's chat template, ``vlmkit convert --from hf``, and named refusals of what vlmkit
does not implement.

SmolVLMProcessor cannot be built here as transformers ships it: it requires a video processor (torchvision) and
num2words, both only for videos. The reference for SmolVLM is that class with those two checks stepped around;
its image and text path (``__call__``) is transformers' own."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import vlmkit
from vlmkit.connectors import pixel_shuffle
from vlmkit.convert.hf.idefics3 import bucketed_positions
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.processing.idefics3 import Idefics3ImageProcessor

from helpers import forward
from hf_fixtures import real_images
from hf_folders import IDEFICS3_TEMPLATE as TEMPLATE

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["User:<image>What colour is the small circle?<end_of_utterance>\nAssistant:",
           "<image> caption en", "Compare <image> and <image>: how many squares?"]
FOLDERS = ["idefics3", "idefics3_nosplit", "smolvlm"]


@pytest.fixture(scope="module")
def folders(idefics3, idefics3_nosplit, smolvlm):
    return {"idefics3": idefics3, "idefics3_nosplit": idefics3_nosplit, "smolvlm": smolvlm}


def images_for(prompt):
    return real_images()[:prompt.count("<image>")]


# ------------------------------------------------------------------------------------------------ the parts


@pytest.mark.parametrize("side, scale", [(4, 2), (6, 3), (8, 4), (8, 2)])
def test_pixel_shuffle_has_idefics3s_element_order(side, scale):
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    x = torch.randn(3, side * side, 5, generator=torch.Generator().manual_seed(side))
    theirs = Idefics3Connector.pixel_shuffle(None, x, scale)  # uses no state
    assert torch.equal(pixel_shuffle(x, (side, side), scale), theirs)


@pytest.mark.parametrize("side", [4, 8, 26, 27, 32, 19, 25])
def test_bucketed_positions_of_a_full_tile_are_transformers(side):
    """Idefics3VisionEmbeddings on an unpadded tile: its position ids are :func:`bucketed_positions` on each
    axis, which are the plain 0..side-1 on the released grids (26, 27, 32) and not on some others (19, 25)."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    config = transformers.Idefics3VisionConfig(hidden_size=8, image_size=side, patch_size=1)
    emb = Idefics3VisionEmbeddings(config).eval()
    pixels = torch.randn(1, 3, side, side)
    full = torch.ones(1, side, side, dtype=torch.bool)
    rows = bucketed_positions(side)
    ids = (rows[:, None] * side + rows[None, :]).reshape(1, -1)
    with torch.no_grad():
        theirs = emb(pixels, full)
        ours = emb.patch_embedding(pixels).flatten(2).transpose(1, 2) + emb.position_embedding(ids)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert torch.equal(rows, torch.arange(side)) == (side not in (19, 25))


def test_vlmkit_load_reads_the_processor_settings_from_the_folder(folders):
    for name, split in (("idefics3", True), ("idefics3_nosplit", False)):
        processor = vlmkit.load(folders[name][0]).processor
        cfg = processor.cfg
        assert isinstance(processor.images, Idefics3ImageProcessor)  # the family's image processor: it tiles
        assert (processor.family.name, cfg.image_size, cfg.split.longest_edge, cfg.split.enabled) == (
            "idefics3", (32, 32), 80, split)
        assert (cfg.mean, cfg.std, cfg.resample, cfg.image_seq_len) == (
            (0.4, 0.5, 0.6), (0.2, 0.3, 0.25), "lanczos", 4)
    cfg = vlmkit.load(folders["smolvlm"][0]).processor.cfg
    assert (cfg.resample, cfg.mean, cfg.bos_token, cfg.eos_token) == (
        "bicubic", (0.5, 0.5, 0.5), "", "<end_of_utterance>")


def test_a_batch_of_prompts_with_different_tile_counts_answers_as_each_alone(idefics3):
    """Tiles of several prompts concatenate in reading order; left padding changes nothing."""
    pipe = vlmkit.load(idefics3[0])
    requests = [(real_images()[:1], "What is it?"), (real_images()[1:], "Compare <image> and <image>.")]
    alone = [pipe.chat(images, question, max_new_tokens=6) for images, question in requests]
    assert pipe.chat_batch(requests, max_new_tokens=6) == alone


@pytest.mark.parametrize("name", FOLDERS)
def test_tiles_per_image_equal_transformers_rows_and_cols(folders, name):
    """72x48 -> 2x3 tiles, 40x60 -> 3x2, 64x64 -> 3x3 (each + a global view) with longest_edge 80, tile 32."""
    folder, _, hf_proc = folders[name]
    pipe = vlmkit.load(folder)
    theirs = hf_proc.image_processor(real_images(), return_row_col_info=True)
    inputs = pipe.processor.prepare_images(real_images())
    tiles = [r * c + 1 if r else 1 for r, c in zip(theirs["rows"][0], theirs["cols"][0])]
    assert inputs.tokens == [4 * t for t in tiles]
    assert tiles == ([7, 7, 10] if name != "idefics3_nosplit" else [1, 1, 1])


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("name", FOLDERS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_input_ids_pixels_and_logits_equal_transformers(folders, name, prompt):
    folder, ref, hf_proc = folders[name]
    pipe = vlmkit.load(folder)
    images = images_for(prompt)
    theirs = hf_proc(text=prompt, images=images, return_tensors="pt")
    inputs = pipe.processor.prepare_images(images)
    ids = pipe.processor.prompt(prompt, inputs).ids
    assert ids == theirs["input_ids"][0].tolist()
    assert theirs["pixel_attention_mask"].all()  # transformers pads nothing within one prompt
    torch.testing.assert_close(inputs.pixel_values, theirs["pixel_values"][0], rtol=0, atol=1e-5)
    with torch.no_grad():
        ours = forward(pipe.model, ids, inputs).logits
        ref_logits = ref(**theirs).logits
    torch.testing.assert_close(ours, ref_logits, rtol=0, atol=1e-4)


def test_chat_uses_the_folders_template(idefics3):
    """The released template writes BOS itself; transformers' apply_chat_template then adds no second one."""
    folder, _, hf_proc = idefics3
    pipe = vlmkit.load(folder)
    assert pipe.processor.cfg.chat_template_jinja == TEMPLATE
    images = images_for(PROMPTS[0])
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                             {"type": "text", "text": "What is it?"}]}]
    theirs = hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    inputs = pipe.processor.prepare_images(images)
    assert pipe.processor.chat("What is it?", inputs).ids == list(theirs["input_ids"][0])


# ------------------------------------------------------------------------------------------------ refusals


def _edited(src, tmp_path, file, edit):
    folder = tmp_path / "edited"
    shutil.copytree(src, folder)
    path = folder / file
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return folder


def _set(*keys, value):
    def edit(data):
        for k in keys[:-1]:
            data = data[k]
        data[keys[-1]] = value
    return edit


@pytest.mark.parametrize("file, edit, error, match", [
    ("config.json", _set("scale_factor", value=3), ConfigError,
     r"config.json: scale_factor 3 must be a positive integer dividing the 4x4 patch grid"),
    ("config.json", _set("vision_config", "hidden_act", value="relu"), ConfigError,
     r"config.json \(vision_config\): hidden_act 'relu' is not implemented"),
    ("config.json", _set("text_config", "rope_parameters", value={"rope_type": "linear", "factor": 2.0,
                                                                  "rope_theta": 1e4}), ConfigError,
     r"config.json \(text_config\): rope_type 'linear' \(RoPE scaling\) is not implemented"),
    ("config.json", _set("vision_config", "intermediate_size", value=40), CheckpointError,
     r"model.vision_model.encoder.layers.0.mlp.fc1.weight has shape \(48, 32\), the config implies \(40, 32\)"),
    ("processor_config.json", _set("image_processor", "max_image_size", value={"longest_edge": 48}), ConfigError,
     r"processor_config.json: max_image_size.longest_edge 48 differs from config.json vision_config.image_size 32"),
    ("processor_config.json", _set("image_processor", "size", value={"height": 64, "width": 64}), ConfigError,
     r"processor_config.json: size \{'height': 64, 'width': 64\}: only \{'longest_edge': N\} is supported"),
    ("processor_config.json", _set("image_processor", "do_rescale", value=False), ConfigError,
     r"processor_config.json: do_rescale: false is not supported"),
    ("processor_config.json", _set("image_seq_len", value=9), ConfigError,
     r"processor_config.json: image_seq_len 9 differs from the model's 4"),
])
def test_unsupported_features_and_mismatches_are_named(idefics3, tmp_path, file, edit, error, match):
    folder = _edited(idefics3[0], tmp_path, file, edit)
    with pytest.raises(error, match=match):
        vlmkit.load(folder)


def test_a_grid_whose_buckets_are_not_plain_positions_is_refused(idefics3, tmp_path):
    folder = _edited(idefics3[0], tmp_path, "config.json", lambda d: d["vision_config"].update(image_size=38,
                                                                                             patch_size=2))
    with pytest.raises(ConfigError, match=r"config.json: vision_config image_size 38 / patch_size 2 gives a 19x19 "
                                          r"patch grid on which transformers' bucketed position ids are not"):
        vlmkit.load(folder)


def test_a_missing_tokenizer_file_is_named(idefics3, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(idefics3[0], folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no tokenizer.json"):
        vlmkit.load(folder)


def test_smolvlm_image_token_names_other_than_idefics3s_are_refused(smolvlm, tmp_path):
    folder = _edited(smolvlm[0], tmp_path, "tokenizer_config.json",
                     _set("extra_special_tokens", value={"global_image_token": "<whole>"}))
    with pytest.raises(ConfigError, match=r"tokenizer_config.json: extra_special_tokens.global_image_token "
                                          r"'<whole>': vlmkit writes Idefics3's '<global-img>'"):
        vlmkit.load(folder)


def test_an_idefics3_tokenizer_without_its_special_tokens_is_refused(idefics3, tmp_path):
    """Idefics3Processor would add <end_of_utterance> as a new token, with an id the embeddings do not have."""
    folder = _edited(idefics3[0], tmp_path, "tokenizer.json", lambda d: d.update(added_tokens=[
        t for t in d["added_tokens"] if t["content"] != "<end_of_utterance>"]))
    with pytest.raises(CheckpointError, match=r"tokenizer.json: special tokens \['<end_of_utterance>'\] are missing"):
        vlmkit.load(folder)
