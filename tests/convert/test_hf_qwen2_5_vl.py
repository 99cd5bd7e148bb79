"""Qwen2.5-VL specifics the conformance table (tests/families/cases.py, row qwen2_5_vl) does not check: the
processor's pixels and grids for images of several sizes, the window order against transformers'
``get_vision_window_index``, the tower against transformers' (windowed and full-attention blocks both exercised),
the M-RoPE ids against ``get_rope_index`` (images in a left-padded batch; videos' absolute time through
``mrope_position_ids(time_scales=...)``, since vlmkit reads no video), the Hub's flat layout both ways, and
named refusals.

The tiny folder (tests/hf_folders.py ``build_qwen2_5_vl``): a tower of depth 4 whose blocks 1 and 3 attend over
the whole image and 0 and 2 within 16-px windows (2x2 merge units of 4-px patches merged 2x2); the reference
processor is Qwen2_5_VLProcessor without its video half (which needs torchvision).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import forward
from hf_fixtures import real_images

import vlmkit
from vlmkit.encoders.qwen2_5_vl import window_order
from vlmkit.errors import ConfigError, DataError
from vlmkit.models.qwen2_vl import mrope_position_ids

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def _images():
    wide, tall, square = real_images()  # 72x48, 40x60, 64x64 (width x height)
    return {"wide": wide, "tall": tall, "square": square, "small": tall.resize((14, 10)),
            "large": square.resize((200, 120))}


def images_for(names):
    imgs = _images()
    return [imgs[n] for n in names]


# (prompt, image names): images of different sizes and shapes, several per prompt
CASES = [
    (f"{IMAGE}{IMAGE}Compare the two pictures: how many squares?", ("wide", "tall")),
    (f"A caption: {IMAGE} and then {IMAGE} and {IMAGE} too", ("small", "square", "large")),
]


@pytest.mark.parametrize("prompt, names", CASES)
def test_input_ids_pixels_grids_and_logits_equal_transformers(qwen25_folder, prompt, names):
    folder, ref, hf_proc = qwen25_folder
    pipe = vlmkit.load(folder)
    images = images_for(names)
    theirs = hf_proc(text=prompt, images=images, return_tensors="pt")
    inputs = pipe.processor.prepare_images(images)
    ids = pipe.processor.prompt(prompt, inputs).ids
    assert ids == theirs["input_ids"][0].tolist()
    assert inputs.extra["image_grid_thw"].tolist() == theirs["image_grid_thw"].tolist()
    torch.testing.assert_close(inputs.pixel_values, theirs["pixel_values"], rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(forward(pipe.model, ids, inputs).logits, ref(**theirs).logits, rtol=0, atol=1e-4)


def test_the_test_images_have_several_windows_some_cut_short(qwen25_folder):
    """Else the window order would be tested on one window per image, which any order passes."""
    folder, _, _ = qwen25_folder
    pipe = vlmkit.load(folder)
    grids = pipe.processor.prepare_images(images_for(("wide", "tall", "square", "large"))).extra["image_grid_thw"]
    units = pipe.model.encoder.window_units
    assert units == 2 and pipe.model.encoder.full_blocks == {1, 3}
    windows = [window_order(grid[None], 2, units)[1] for grid in grids]
    assert all(len(w) >= 6 and max(w) == 4 * units**2 for w in windows), grids.tolist()
    assert sum(min(w) < max(w) for w in windows) >= 2  # the wide and tall ones: edge windows cut short


@pytest.mark.parametrize("grids", [[[1, 10, 14]], [[1, 16, 10], [1, 4, 6]], [[2, 8, 8], [3, 6, 10]], [[1, 2, 2]]])
def test_window_order_equals_get_vision_window_index(grids):
    from transformers.vision_utils import get_vision_window_index

    grid = torch.tensor(grids)
    index, cu = get_vision_window_index(grid, spatial_merge_size=2, window_size=16, patch_size=4)
    order, lengths = window_order(grid, 2, 2)
    assert order.tolist() == index.tolist()
    assert [0] + torch.tensor(lengths).cumsum(0).tolist() == cu.tolist()


def test_tower_and_merger_equal_transformers_and_depend_on_the_windows(qwen25_folder):
    folder, ref, hf_proc = qwen25_folder
    pipe = vlmkit.load(folder)
    images = images_for(("wide", "large", "tall"))
    theirs = hf_proc(text=IMAGE * 3, images=images, return_tensors="pt")
    with torch.no_grad():
        expected = ref.model.visual(theirs["pixel_values"], grid_thw=theirs["image_grid_thw"]).pooler_output
        features = pipe.model.encode_media(pipe.processor.prepare_images(images)).values
        torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)
        encoder = pipe.model.encoder
        try:  # every block full, or none: other numbers (both kinds of block are exercised above)
            for full in (frozenset(range(4)), frozenset()):
                encoder.full_blocks = full
                other = pipe.model.encode_media(pipe.processor.prepare_images(images)).values
                assert (other - expected).abs().max() > 1e-2
        finally:
            encoder.full_blocks = frozenset({1, 3})


def test_mrope_positions_equal_get_rope_index_for_a_left_padded_batch(qwen25_folder, monkeypatch):
    """Images: Qwen2-VL's ids (no absolute time), whatever second_per_grid_ts says."""
    folder, ref, hf_proc = qwen25_folder
    pipe = vlmkit.load(folder)
    monkeypatch.setattr(hf_proc.tokenizer, "padding_side", "left")  # the processor is shared: undone after
    (p0, n0), (p1, n1) = CASES
    theirs = hf_proc(text=[p0, p1], images=images_for(n0) + images_for(n1), padding=True, return_tensors="pt")
    expected, deltas = ref.model.get_rope_index(theirs["input_ids"], theirs["mm_token_type_ids"],
                                                theirs["image_grid_thw"], second_per_grid_ts=torch.tensor([3.0]),
                                                attention_mask=theirs["attention_mask"])
    assert (theirs["attention_mask"][:, 0] == 0).any()  # a prompt is padded
    ours, our_deltas = mrope_position_ids(theirs["input_ids"], pipe.model.image_token_id, theirs["image_grid_thw"],
                                          2, theirs["attention_mask"])
    assert torch.equal(ours, expected)
    assert our_deltas.tolist() == deltas[:, 0].tolist() and any(our_deltas)


@pytest.mark.parametrize("grids, seconds", [([[4, 4, 6]], [1.0]), ([[3, 6, 4], [5, 2, 2]], [0.5, 1 / 3]),
                                            ([[2, 4, 4]], [2.5])])
def test_videos_absolute_time_equals_get_rope_index(qwen25_folder, grids, seconds):
    """Qwen2.5-VL's temporal ids of a video: frame k of a video at its start + int(k * tokens_per_second *
    second_per_grid_t). vlmkit reads no video: mrope_position_ids takes the time scale of each item and is held
    against transformers' get_rope_index on video grids directly (a left-padded batch of two)."""
    _, ref, hf_proc = qwen25_folder
    tok = hf_proc.tokenizer
    video, start, end = tok.convert_tokens_to_ids(["<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    text = tok("look", add_special_tokens=False)["input_ids"]
    row, types = [], []
    for t, h, w in grids:
        n = t * h * w // 4
        row += text + [start] + [video] * n + [end]
        types += [0] * (len(text) + 1) + [2] * n + [0]
    row += text
    types += [0] * len(text)
    pad = 3
    input_ids = torch.tensor([[tok.pad_token_id] * pad + row, row + (text * pad)[:pad]])
    mask = torch.ones_like(input_ids)
    mask[0, :pad] = 0
    type_ids = torch.tensor([[0] * pad + types, types + [0] * pad])
    scale = ref.config.vision_config.tokens_per_second
    assert scale == 2
    grid = torch.tensor(grids * 2)
    expected, deltas = ref.model.get_rope_index(input_ids, type_ids, video_grid_thw=grid,
                                                second_per_grid_ts=torch.tensor(seconds * 2), attention_mask=mask)
    ours, our_deltas = mrope_position_ids(input_ids, video, grid, 2, mask,
                                          time_scales=[scale * s for s in seconds * 2])
    assert torch.equal(ours, expected)
    assert our_deltas.tolist() == deltas[:, 0].tolist()
    plain, _ = mrope_position_ids(input_ids, video, grid, 2, mask)  # the time scale is what makes them agree
    assert not torch.equal(plain, expected)


def _copy(folder, tmp_path, edit_config=None):
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    if edit_config is not None:
        data = json.loads((out / "config.json").read_text())
        edit_config(data)
        (out / "config.json").write_text(json.dumps(data))
    return out


def test_export_is_in_the_hub_layout_and_reads_back_the_same(qwen25_folder, tmp_path):
    """convert --to hf writes the Hub's Qwen2.5-VL layout (flat config.json, visual. / model. tensors, the tied
    head left out), which vlmkit reads back to the same scores (transformers loads it: the conformance row)."""
    from safetensors.torch import load_file

    from vlmkit.convert.hf import convert_from_hf, convert_to_hf

    folder, _, _ = qwen25_folder
    convert_from_hf(folder, tmp_path / "vlmkit")
    convert_to_hf(tmp_path / "vlmkit", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and "text_config" not in config
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["rope_scaling"] == {"type": "mrope", "mrope_section": [3, 2, 3]}
    vision = config["vision_config"]
    assert (vision["hidden_size"], vision["out_hidden_size"], vision["intermediate_size"]) == (32, 64, 48)
    assert (vision["window_size"], vision["fullatt_block_indexes"], vision["tokens_per_second"]) == (16, [1, 3], 2)
    assert config["tie_word_embeddings"] is True
    names = set(load_file(tmp_path / "hf" / "model.safetensors"))
    assert "visual.merger.ln_q.weight" in names and "visual.merger.ln_q.bias" not in names
    assert "visual.blocks.0.mlp.gate_proj.bias" in names and "lm_head.weight" not in names
    assert all(n.startswith(("visual.", "model.")) for n in names)
    processor = json.loads((tmp_path / "hf" / "processor_config.json").read_text())
    assert processor["processor_class"] == "Qwen2_5_VLProcessor"
    prompt, names = CASES[1]
    images = images_for(names)
    assert vlmkit.load(tmp_path / "hf").score(images, prompt, " It is red.") == pytest.approx(
        vlmkit.load(folder).score(images, prompt, " It is red."), abs=1e-6)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["vision_config"].update(hidden_act="relu"), r"vision_config\): hidden_act 'relu' is not implemented"),
    (lambda c: c["vision_config"].update(fullatt_block_indexes=[1, 4]),
     r"vision_config\): fullatt_block_indexes \[4\] are not blocks of a tower of depth 4"),
    (lambda c: c["vision_config"].update(window_size=4),
     r"vision_config\): window_size 4 is less than one merge unit \(patch_size x spatial_merge_size = 8 pixels\)"),
    (lambda c: c["vision_config"].update(out_hidden_size=48),
     r"vision_config\.out_hidden_size 48 \(the patch merger's output\) must equal the text hidden_size 64"),
    (lambda c: c["vision_config"].update(model_type="qwen2_vl"), r"model_type 'qwen2_vl' is not Qwen2\.5-VL's tower"),
    (lambda c: c["text_config"].update(use_sliding_window=True), r"use_sliding_window: true is not implemented"),
])
def test_unimplemented_config_features_are_refused_by_name(qwen25_folder, tmp_path, edit, message):
    folder, _, _ = qwen25_folder
    with pytest.raises(ConfigError, match=r"config\.json.*" + message):
        vlmkit.load(_copy(folder, tmp_path, edit))


def test_video_placeholders_are_refused(qwen25_folder):
    folder, _, _ = qwen25_folder
    pipe = vlmkit.load(folder)
    with pytest.raises(DataError, match=r"'<\|video_pad\|>' is a placeholder of an input kind vlmkit does not"):
        pipe.score([], f"{VIDEO}What happens?", " nothing")


def test_a_layernorm_tower_does_not_export_as_qwen2_5_vl(qwen25_folder, tmp_path):
    from vlmkit.config import apply_overrides
    from vlmkit.convert.hf.qwen2_5_vl import qwen2_5_vl_config_to_hf

    pipe = vlmkit.load(qwen25_folder[0])
    cfg = apply_overrides(pipe.config, {"vision.norm": "layernorm"})
    with pytest.raises(ConfigError, match=r"vision: not a Qwen2\.5-VL tower .*norm 'layernorm'"):
        qwen2_5_vl_config_to_hf(cfg, {})
