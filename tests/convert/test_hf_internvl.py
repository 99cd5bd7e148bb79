"""InternVL from Hugging Face folders, what the conformance row does not check: GotOcr2's tiling (the grid chosen
for many sizes and tile limits, the pixels of every tile and thumbnail), the pixel shuffle's element order, the
tower's variants (RMSNorm, query/key norm, the final LayerNorm, an earlier feature layer) against transformers both
ways, and named refusals of what vlmkit does not implement.

InternVLProcessor holds a video processor, which needs torchvision (absent here): the reference is
``hf_folders.ImageOnlyInternVLProcessor``, whose text and image path is transformers' own."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import forward
from hf_fixtures import real_images
from hf_folders import ImageOnlyInternVLProcessor, build_internvl

import vlmkit
from vlmkit.cli import main
from vlmkit.connectors import pixel_shuffle
from vlmkit.errors import ConfigError, DataError
from vlmkit.processing.internvl import TilingConfig, best_grid, tile_count

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "Compare <IMG_CONTEXT> and <IMG_CONTEXT> and <IMG_CONTEXT> and <IMG_CONTEXT> and <IMG_CONTEXT>: how many?"




def images() -> list:
    """Scenes of five sizes (the conformance table's): 72x48, 40x60, 64x64, 96x32 and a small 24x20."""
    import random

    from vlmkit.data.shapes import render_scene, sample_scene

    rng = random.Random(1)
    wide = render_scene(sample_scene(rng, 96, 32, min_objects=1, max_objects=2))
    small = render_scene(sample_scene(rng, 48, 40, min_objects=1, max_objects=2)).resize((24, 20))
    return real_images() + [wide, small]


# ------------------------------------------------------------------------------------------------ the parts


def test_the_tile_grid_is_got_ocr2s():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    sizes = [(h, w) for h in (20, 32, 47, 64, 90, 130, 448, 1000) for w in (16, 33, 64, 96, 200, 448, 1333)]
    for lo, hi in ((1, 1), (1, 4), (1, 6), (2, 9), (1, 12), (3, 12)):
        for size in sizes:
            for tile in (32, 448):
                assert best_grid(size, tile, lo, hi) == get_optimal_tiled_canvas(size, (tile, tile), lo, hi), \
                    (size, tile, lo, hi)


def test_tile_counts_are_got_ocr2s():
    proc = transformers.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True,
                                                 max_patches=6)
    for h, w in ((20, 24), (48, 72), (60, 40), (64, 64), (32, 96), (100, 10)):
        for enabled in (True, False):
            theirs = proc.get_number_of_image_patches(h, w, {"crop_to_patches": enabled})
            assert tile_count((h, w), 32, TilingConfig(enabled, 1, 6)) == theirs


@pytest.mark.parametrize("side", [4, 8, 16, 32])
def test_pixel_shuffle_has_internvls_element_order(side):
    x = torch.randn(3, side * side, 5, generator=torch.Generator().manual_seed(side))
    theirs = transformers.InternVLModel.pixel_shuffle(None, x.reshape(3, side, side, 5), 0.5)  # uses no state
    assert torch.equal(pixel_shuffle(x, (side, side), 2), theirs.reshape(3, -1, 20))


def test_the_images_tile_into_several_grids_and_give_transformers_pixels_and_ids(internvl_folder):
    folder, _, hf_proc = internvl_folder
    pipe = vlmkit.load(folder)
    imgs = images()  # 72x48 (3x2 + thumbnail), 40x60 (2x3 + thumbnail), 64x64 (2x2 + thumbnail), 96x32, 24x20
    media = pipe.processor.prepare_images(imgs)
    assert media.rows == [7, 7, 5, 4, 1]
    theirs = hf_proc(text=PROMPT, images=imgs, return_tensors="pt")
    assert torch.equal(media.pixel_values, theirs["pixel_values"])
    assert pipe.processor.prompt(PROMPT, media).ids == theirs["input_ids"][0].tolist()


def test_crop_to_patches_off_in_the_image_processor_still_tiles_as_internvl_processor_does(internvl_folder, tmp_path):
    folder = edited(internvl_folder, tmp_path, "processor_config.json",
                    lambda d: d["image_processor"].update(crop_to_patches=False))
    pipe, hf_proc = vlmkit.load(folder), ImageOnlyInternVLProcessor.from_pretrained(folder)
    theirs = hf_proc(text=PROMPT, images=images(), return_tensors="pt")
    media = pipe.processor.prepare_images(images())
    assert media.rows == [7, 7, 5, 4, 1] and torch.equal(media.pixel_values, theirs["pixel_values"])
    assert pipe.processor.prompt(PROMPT, media).ids == theirs["input_ids"][0].tolist()


def test_a_video_placeholder_is_refused_by_name(internvl_folder):
    pipe = vlmkit.load(internvl_folder[0])
    with pytest.raises(DataError, match="<video>"):
        pipe.processor.prompt("<video> what happens?", pipe.processor.prepare_images([]))


# ------------------------------------------------------------------------------------------------ variants


def variant(tmp_path, name, vision=None, processor=None, llama=False, **top):
    """A tiny InternVL folder with vision_config / InternVLConfig overrides and processor_config.json image
    processor overrides; (folder, transformers model, its processor)."""
    folder = tmp_path / name
    folder.mkdir()
    model, _ = build_internvl(folder, vision=vision, llama=llama, **top)
    if processor:
        path = folder / "processor_config.json"
        data = json.loads(path.read_text())
        data["image_processor"] |= processor
        path.write_text(json.dumps(data))
    return folder, model, ImageOnlyInternVLProcessor.from_pretrained(folder)


def assert_same_logits(folder, model, hf_proc, prompt=PROMPT, n=5):
    pipe = vlmkit.load(folder)
    imgs = images()[:n]
    bos = pipe.processor.tokenizer.bos_token
    # a prompt already holding BOS: transformers' documented call for it (its default would put BOS twice)
    special = {"add_special_tokens": False} if bos and prompt.startswith(bos) else {}
    theirs = hf_proc(text=prompt, images=imgs, return_tensors="pt", **special)
    media = pipe.processor.prepare_images(imgs)
    ids = pipe.processor.prompt(prompt, media).ids
    assert ids == theirs["input_ids"][0].tolist()
    assert torch.equal(media.pixel_values, theirs["pixel_values"])
    with torch.no_grad():
        expected = model(**theirs).logits
    torch.testing.assert_close(forward(pipe.model, torch.tensor([ids]), media).logits, expected, rtol=0, atol=1e-4)


VARIANTS = {
    # InternViT-6B's kind: RMSNorm, query/key norm, no q/k/v bias; the tower's final LayerNorm read
    "rms_qk_norm_final_norm": {"vision": {"norm_type": "rms_norm", "use_qk_norm": True, "attention_bias": False,
                                          "use_mean_pooling": False}},
    # hidden_states[-2]: the output of the first of two layers, before the final LayerNorm, which is not built
    "feature_layer_-2": {"vision": {"use_mean_pooling": False}, "vision_feature_layer": -2},
    # max_patches 1: every image one tile (crop_to_patches: false would not do it: InternVLProcessor passes true)
    "one_tile": {"processor": {"max_patches": 1, "crop_to_patches": False}},
}


def test_a_llama_lm_with_a_bos_adding_tokenizer_equals_transformers(tmp_path):
    """InternVL 2.5's Llama LMs: an untied head, a tokenizer that adds <s>; prompts with and without it already."""
    folder, model, hf_proc = variant(tmp_path, "llama", llama=True)
    for prompt in (PROMPT, "<s>" + PROMPT, "<s><|im_start|>user\n<IMG_CONTEXT>\nWhat colour?<|im_end|>\n"):
        assert_same_logits(folder, model, hf_proc, prompt, prompt.count("<IMG_CONTEXT>"))
    pipe = vlmkit.load(folder)
    assert not pipe.config.lm.tie_embeddings and pipe.processor.cfg.bos_token == "<s>"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_equal_transformers_and_export_back(tmp_path, name):
    folder, model, hf_proc = variant(tmp_path, name, **VARIANTS[name])
    assert_same_logits(folder, model, hf_proc)
    assert main(["convert", "--from", "hf", str(folder), "--out", str(tmp_path / "ours")]) == 0
    assert main(["convert", "--to", "hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    back = transformers.InternVLForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    back_proc = ImageOnlyInternVLProcessor.from_pretrained(tmp_path / "back")
    imgs = images()
    theirs, again = (p(text=PROMPT, images=imgs, return_tensors="pt") for p in (hf_proc, back_proc))
    assert torch.equal(theirs["input_ids"], again["input_ids"])
    assert torch.equal(theirs["pixel_values"], again["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(back(**again).logits, model(**theirs).logits, rtol=0, atol=1e-4)


def test_the_model_prefixed_weight_layout_loads_the_same(internvl_folder, tmp_path):
    """transformers reads both layouts: the legacy one it writes and the ``model.``-prefixed one (with the head
    saved beside tied embeddings, as some Hub folders have it)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "prefixed"
    shutil.copytree(internvl_folder[0], folder)
    tensors = load_file(folder / "model.safetensors")
    renamed = {("model." + k.replace("language_model.model.", "language_model.")): v for k, v in tensors.items()}
    renamed["lm_head.weight"] = renamed["model.language_model.embed_tokens.weight"].clone()
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    _, model, hf_proc = internvl_folder
    assert_same_logits(folder, model, hf_proc)
    assert vlmkit.load(folder).config.lm.tie_embeddings


# ------------------------------------------------------------------------------------------------ refusals


def edited(internvl_folder, tmp_path, file, change):
    folder = tmp_path / "edited"
    shutil.copytree(internvl_folder[0], folder)
    path = folder / file
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return folder


REFUSALS = [
    ("config.json", lambda d: d.update(vision_feature_select_strategy="full"), "vision_feature_select_strategy"),
    ("config.json", lambda d: d.update(vision_feature_layer=[-1, -2]), "vision_feature_layer"),
    ("config.json", lambda d: d.update(downsample_ratio=0.3), "downsample_ratio"),
    ("config.json", lambda d: d["vision_config"].update(use_absolute_position_embeddings=False),
     "use_absolute_position_embeddings"),
    ("config.json", lambda d: d["vision_config"].update(norm_type="batch_norm"), "norm_type"),
    ("processor_config.json", lambda d: d["image_processor"].update(size={"height": 64, "width": 64}), "size 64"),
    ("processor_config.json", lambda d: d["image_processor"].update(size={"height": 32, "width": 48}), "square"),
    ("processor_config.json", lambda d: d["image_processor"].update(min_patches=4, max_patches=2), "min_tiles"),
    ("processor_config.json", lambda d: d.update(image_seq_length=16), "image_seq_length 16"),
    ("tokenizer_config.json", lambda d: d.pop("start_image_token"), "start_image_token"),
]


@pytest.mark.parametrize("file, change, match", REFUSALS, ids=[m for _, _, m in REFUSALS])
def test_what_vlmkit_does_not_implement_is_refused_by_name(internvl_folder, tmp_path, file, change, match):
    folder = edited(internvl_folder, tmp_path, file, change)
    with pytest.raises(ConfigError, match=match):
        vlmkit.load(folder)
