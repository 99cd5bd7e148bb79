"""Presets of the Fuyu family: Adept's Fuyu-8B shape, and vlmkit's tiny Fuyu for ShapesWorld."""

from __future__ import annotations

from vlmkit.models.fuyu import FuyuConfig, persimmon_lm
from vlmkit.presets import PRESETS, Preset, whole
from vlmkit.processing.fuyu import FuyuProcessorConfig


@PRESETS.register("fuyu-8b", "Fuyu-8B shapes: 30-px patches -> one Linear -> Persimmon-8B (no image encoder), "
                             "images fitted into 1080x1920")
def fuyu_8b() -> Preset:
    lm = persimmon_lm(vocab_size=262144, width=4096, depth=36, heads=64, kv_heads=64, mlp_dim=16384, norm_eps=1e-5,
                      rope_theta=25000.0, rotary_fraction=0.5, max_seq_len=16384)
    model = FuyuConfig(lm=lm, patch_size=30, num_channels=3, image_size=(1080, 1920))
    proc = whole(FuyuProcessorConfig, image_size=(1080, 1920), patch_size=30, resample="bilinear",
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), max_length=16384, eos_token="|ENDOFTEXT|",
                 bos_token="|ENDOFTEXT|", pad_token="<unk>")
    return Preset(model, proc, source="adept/fuyu-8b")


@PRESETS.register("tiny-fuyu", "from-scratch Fuyu-style model (8-px patches -> Linear -> Persimmon, no image "
                               "encoder) for ShapesWorld")
def tiny_fuyu() -> Preset:
    # ShapesWorld's 64x64 images fill the 64x64 target: 8x8 patches of 8 px, 64 image tokens (tiny-flamingo's and
    # tiny-mllama's 64 cells) and 8 row breaks per image; an object (11-19 px across) spans two or three patches a
    # side (16-px patches, tiny-llava's 4x4 grid, learned less: 0.621 against 0.664 held-out, both at lr 4e-3).
    # The LM is tiny-llava's scale, 128 wide, and here also the image encoder: its see stage labels the states
    # after the first 2 of its 4 layers (tower_layers), leaving 2 to answer with (recipes/tiny-fuyu.yaml has the
    # measurements: 0.990 held-out; 0.790 labelling the final states).
    lm = persimmon_lm(vocab_size=1024, width=128, depth=4, heads=4, kv_heads=4, mlp_dim=512, max_seq_len=512,
                      head_init_std=0.25)
    model = FuyuConfig(lm=lm, patch_size=8, num_channels=3, image_size=(64, 64), tower_layers=2)
    proc = FuyuProcessorConfig(image_size=(64, 64), patch_size=8, resample="bilinear", mean=(0.5, 0.5, 0.5),
                               std=(0.5, 0.5, 0.5))
    return Preset(model, proc, source="Bavishi et al. 2023, Fuyu-8B (architecture only); tiny-llava's LM scale")
