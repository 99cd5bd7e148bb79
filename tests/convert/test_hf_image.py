"""Image processors: vlmkit's transform gives transformers' pixels (its PIL backend, which is what runs
without torchvision) within 1e-5, for CLIP's shortest-edge resize + centre crop and SigLIP's fixed resize,
on non-square images, from both processor-config layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.convert.hf import load_hf_image_transform

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")


def images() -> list[Image.Image]:
    rng = np.random.RandomState(0)
    sizes = [(41, 30), (30, 53), (64, 64), (37, 37)]  # (width, height): wide, tall, square, odd
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")) for w, h in sizes]


def processors():
    clip = transformers.CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 24, "width": 26},
                                           image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
    siglip = transformers.SiglipImageProcessor(size={"height": 28, "width": 20}, resample=2)
    return {"clip": clip, "siglip": siglip}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("layout", ["preprocessor_config", "processor_config"])
def test_pixels_match_transformers(kind, layout, tmp_path):
    proc = processors()[kind]
    proc.save_pretrained(tmp_path)
    if layout == "processor_config":  # the newer layout: settings nested under "image_processor"
        cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
        (tmp_path / "preprocessor_config.json").unlink()
        (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": cfg}))
    transform = load_hf_image_transform(tmp_path)
    for img in images():
        theirs = proc(images=img, return_tensors="pt")["pixel_values"][0]
        ours = transform(img)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("change, match", [
    ({"resample": 5}, r"resample 5; supported: \[0, 1, 2, 3\]"),
    ({"do_center_crop": False}, r"size.shortest_edge without do_center_crop"),
    ({"rescale_factor": 0.5}, r"rescale_factor 0.5 is not supported"),
    ({"size": {"longest_edge": 30}}, r"size \{'longest_edge': 30\}: expected shortest_edge"),
    ({"do_rescale": False}, r"do_rescale: false is not supported"),
    ({"do_resize": False}, r"do_resize: false is not supported"),
    ({"crop_size": {"height": 24}}, r"crop_size needs height and width"),
])
def test_unsupported_settings_are_named(tmp_path, change, match):
    processors()["clip"].save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ConfigError, match=match):
        load_hf_image_transform(tmp_path)


def test_a_folder_without_processor_settings_is_refused(tmp_path):
    (tmp_path / "processor_config.json").write_text(json.dumps({"chat_template": "x"}))
    with pytest.raises(CheckpointError, match="no image-processor settings"):
        load_hf_image_transform(tmp_path)
