"""Export of LLaVA-NeXT and LLaVA-OneVision to Hugging Face: the tiny transformers checkpoints of the import
tests -> ``vlmkit convert --from hf`` -> ``vlmkit convert --to hf`` -> transformers loads the result with the
family's own class (no missing or unexpected tensors, the Hub's llava-hf names), its processor gives the
original processor's input_ids, tiles and image sizes on real images of different tile grids, the logits and
greedy tokens are the original model's, the chat template is kept, and ``vlmkit.load`` scores the export as the
original. vlmkit-built models with the other feature strategy (a SigLIP tower in LLaVA-NeXT, a CLIP tower in
OneVision) export too, and what the families cannot express is refused by name, writing nothing.

transformers cannot build LlavaOnevisionProcessor without torchvision (AutoProcessor insists on loading its
video processor), so the OneVision reference processor is the import test's LlavaOnevisionProcessor without
the video processor, loaded from the exported files; whether AutoProcessor itself loads a OneVision export
(with a video processor inferred from preprocessor_config.json) is not checked here."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import vlmkit
from vlmkit.checkpoint import load_checkpoint, write_model_files
from vlmkit.cli import main
from vlmkit.config import VisionConfig
from vlmkit.convert.hf import convert_to_hf
from vlmkit.errors import ConfigError
from vlmkit.models import build_model

from helpers import forward
from hf_fixtures import real_images
from hf_folders import ImageOnlyOnevisionProcessor
import test_hf_llava_next as next_tests
import test_hf_llava_onevision as ov_tests

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

FAMILIES = {
    "llava_next": dict(fixture="next_folder", module=next_tests, cls="LlavaNextForConditionalGeneration"),
    "llava_onevision": dict(fixture="ov_folder", module=ov_tests, cls="LlavaOnevisionForConditionalGeneration"),
}


def hf_processor(family, folder):
    """The family's transformers processor read from ``folder`` (OneVision: without its video processor)."""
    if family == "llava_onevision":
        return ImageOnlyOnevisionProcessor.from_pretrained(folder)
    proc = transformers.AutoProcessor.from_pretrained(folder)
    assert type(proc).__name__ == "LlavaNextProcessor"
    return proc


def hf_model(family, folder):
    """The family's own transformers class, refusing a load that left tensors out or over."""
    cls = getattr(transformers, FAMILIES[family]["cls"])
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(model) is cls
    return model.eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def trip(request, tmp_path_factory):
    """(family, original folder, original model, original processor, vlmkit folder, exported folder)."""
    family = request.param
    src, ref, proc = request.getfixturevalue(FAMILIES[family]["fixture"])
    tmp = tmp_path_factory.mktemp(f"{family}_export")
    assert main(["convert", "--from", "hf", str(src), "--out", str(tmp / "ours")]) == 0
    assert main(["convert", "--to", "hf", str(tmp / "ours"), "--out", str(tmp / "back")]) == 0
    return family, src, ref, proc, tmp / "ours", tmp / "back"


def test_transformers_gives_the_original_inputs_logits_and_tokens(trip):
    family, _, ref, hf_proc, _, back = trip
    again, again_proc = hf_model(family, back), hf_processor(family, back)
    module = FAMILIES[family]["module"]
    for prompt, indices in module.PROMPTS:  # one image per tile grid, and two images in one prompt
        images = module.images_of(indices)
        theirs = hf_proc(text=prompt, images=images, return_tensors="pt")
        ours = again_proc(text=prompt, images=images, return_tensors="pt")
        assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
        assert ours["image_sizes"].tolist() == theirs["image_sizes"].tolist()
        torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(again(**ours).logits, ref(**theirs).logits, rtol=0, atol=1e-4)
    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)  # on the two-image prompt
    assert again.generate(**ours, **gen).tolist() == ref.generate(**theirs, **gen).tolist()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert (again_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    if family == "llava_onevision":  # a nested image list: OneVision's multi-image mode (squares, not tiled)
        theirs = hf_proc(text=[prompt], images=[images], return_tensors="pt")
        ours = again_proc(text=[prompt], images=[images], return_tensors="pt")
        assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
        assert theirs["pixel_values"].shape[:2] == (2, 1)  # two images, one untiled view each
        torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(again(**ours).logits, ref(**theirs).logits, rtol=0, atol=1e-4)


def test_exported_files_carry_the_anyres_settings_and_the_hub_layout(trip):
    """config.json, the processor files and model.safetensors: the AnyRes settings, the token ids transformers
    generates with, and the llava-hf tensor names with the original tensors (the tower cut to the layers
    vlmkit built, read at -1)."""
    family, src, ref, hf_proc, _, back = trip
    again, again_proc = hf_model(family, back), hf_processor(family, back)
    a, r = again.config, ref.config
    assert a.image_grid_pinpoints == r.image_grid_pinpoints == FAMILIES[family]["module"].PINPOINTS
    assert a.vision_feature_select_strategy == r.vision_feature_select_strategy
    assert a.vision_feature_layer == -1
    # NeXT reads its 3-layer tower at -2: the export holds the 2 layers that compute it; OneVision reads at -1
    layers = {"llava_next": 2, "llava_onevision": 3}[family]
    assert a.vision_config.num_hidden_layers == layers
    assert a.vision_config.model_type == r.vision_config.model_type
    assert a.image_token_id == r.image_token_id
    for key in ("eos_token_id", "bos_token_id"):
        assert getattr(a.text_config, key) == getattr(r.text_config, key), key
        assert getattr(again.generation_config, key) == getattr(ref.generation_config, key), key
    # the tokenizer's pad token (the NeXT original's config leaves pad_token_id unset)
    assert a.text_config.pad_token_id == again.generation_config.pad_token_id == hf_proc.tokenizer.pad_token_id
    assert a.tie_word_embeddings == r.tie_word_embeddings
    if family == "llava_onevision":
        assert a.vision_aspect_ratio == r.vision_aspect_ratio == "anyres_max_9"
        assert a.video_token_id == r.video_token_id
        assert (again_proc.num_image_tokens, again_proc.video_token) == (hf_proc.num_image_tokens, "<video>")
        assert again_proc.vision_aspect_ratio == hf_proc.vision_aspect_ratio
    else:
        assert (again_proc.patch_size, again_proc.num_additional_image_tokens) == (4, 1)
        assert again_proc.patch_size == hf_proc.patch_size
    assert again_proc.vision_feature_select_strategy == hf_proc.vision_feature_select_strategy
    assert again_proc.image_token == hf_proc.image_token
    ours, theirs = again_proc.image_processor, hf_proc.image_processor
    for key in ("image_grid_pinpoints", "size", "crop_size", "do_center_crop", "image_mean", "image_std", "resample",
                "do_pad"):
        assert getattr(ours, key) == getattr(theirs, key) or not (getattr(ours, key) or getattr(theirs, key)), key
    exported = load_file(back / "model.safetensors")
    hub = ("vision_tower.vision_model.", "multi_modal_projector.", "language_model.model.", "language_model.lm_head.")
    assert "image_newline" in exported and all(k.startswith(hub) for k in exported if k != "image_newline")
    # transformers 5 saves the llava-hf names except the tower's "vision_model." (which it adds back on load)
    original = {k if k.startswith(hub[0]) else k.replace("vision_tower.", hub[0], 1): v
                for k, v in load_file(src / "model.safetensors").items()}
    dropped = {k for k in original if ".encoder.layers.2." in k} if family == "llava_next" else set()
    assert dropped or family == "llava_onevision"
    assert set(exported) == set(original) - dropped
    for k, v in exported.items():
        if "post_layernorm" not in k:  # never read by LLaVA models: written as an identity
            assert torch.equal(v, original[k]), k


def test_vlmkit_scores_the_export_as_the_original(trip):
    family, src, *_, back = trip
    prompt, indices = FAMILIES[family]["module"].PROMPTS[2]
    images = [real_images()[i] for i in indices]
    exported = vlmkit.load(back)
    assert exported.model.image_newline.shape == (48,)
    assert exported.score(images, prompt, " Two squares.") == pytest.approx(
        vlmkit.load(src).score(images, prompt, " Two squares."), abs=1e-5)


def randomize_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


SIGLIP = dict(class_token=False, pre_norm=False, patch_bias=True, act="gelu_tanh", drop_class_token=False)
CLIP = dict(class_token=True, pre_norm=True, patch_bias=False, act="quick_gelu", drop_class_token=True)


OTHER_TOWER = {"llava_next": SIGLIP, "llava_onevision": CLIP}


def test_a_vlmkit_built_model_with_the_other_tower_exports(trip, tmp_path):
    """The families' other feature strategy, from a model vlmkit built: LLaVA-NeXT with a SigLIP tower ("full",
    no extra token) and OneVision with a CLIP tower ("default", num_image_tokens one above the patches)."""
    family, tower = trip[0], OTHER_TOWER[trip[0]]
    _, processor, cfg, _ = load_checkpoint(trip[4])
    vision = VisionConfig(**{**cfg.vision.__dict__, **tower, "post_norm": False, "feature_layer": -1})
    cfg = dataclasses.replace(cfg, vision=vision)
    model = build_model(cfg, processor.image_token_id)
    randomize_(model)
    (tmp_path / "ours").mkdir()
    write_model_files(tmp_path / "ours", model, cfg, processor)
    convert_to_hf(tmp_path / "ours", tmp_path / "hf")
    ref, hf_proc = hf_model(family, tmp_path / "hf"), hf_processor(family, tmp_path / "hf")
    assert ref.config.vision_feature_select_strategy == ("full" if tower is SIGLIP else "default")
    prompt, indices = FAMILIES[family]["module"].PROMPTS[2]
    images = [real_images()[i] for i in indices]
    # OneVision: the prompt's images as its list, which its processor squares, as an imported folder does
    theirs = hf_proc(text=[prompt], images=[images] if family == "llava_onevision" else images, return_tensors="pt")
    inputs = processor.prepare_images(images)
    assert theirs["input_ids"][0].tolist() == processor.prompt(prompt, inputs).ids
    with torch.no_grad():
        torch.testing.assert_close(ref(**theirs).logits, forward(model, theirs["input_ids"], inputs).logits, rtol=0,
                                   atol=1e-4)


DROP = object()  # an _edit value: remove the key


def _edit(folder, name, section, path, value):
    """Set ``section``'s dotted ``path`` in a vlmkit checkpoint's JSON file (``DROP``: remove it)."""
    data = json.loads((folder / name).read_text())
    node = data[section] if section else data
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    if value is DROP:
        del node[leaf]
    else:
        node[leaf] = value
    (folder / name).write_text(json.dumps(data))


REFUSALS = {
    "llava_next": [
        ([("model", "anyres.max_tiles", 4), ("processor", "anyres.max_tiles", 4)],
         r"anyres.max_tiles 4: LLaVA-NeXT never reduces"),
        ([("model", "connector.act", "relu")], r"connector.act 'relu'"),
        ([("model", "vision.act", "relu")], r"not a CLIP tower transformers can load: act 'relu'"),
        ([("processor", "anyres.grid_pinpoints", [[32, 32]])],
         r"processor anyres.grid_pinpoints \[\[32, 32\]\] differ"),
    ],
    "llava_onevision": [
        ([("model", "anyres.max_tiles", 0), ("processor", "anyres.max_tiles", 0)],
         r"anyres.max_tiles 0: LLaVA-OneVision reduces"),
        ([("processor", "anyres.max_tiles", 4)], r"processor anyres.max_tiles 4 differs from the model's 9"),
        ([("model", "lm.norm_offset", True)], r"lm: norm_offset and embed_scale"),
        # a processor that does not tile: the family decides its image processor, so it is another family's
        # processor (fixed-size images) saved beside the model
        ([("processor", "family", "llava"), ("processor", "anyres", DROP)],
         r"processor family 'llava' does not tile images"),
    ],
}


def test_what_the_families_cannot_express_is_refused_and_nothing_is_written(trip, tmp_path):
    family, *_, ours, _ = trip
    for i, (edits, match) in enumerate(REFUSALS[family]):
        src, dst = tmp_path / f"ours{i}", tmp_path / f"hf{i}"
        shutil.copytree(ours, src)
        for where, path, value in edits:
            name, section = ("config.json", "model") if where == "model" else ("processor.json", None)
            _edit(src, name, section, path, value)
        with pytest.raises(ConfigError, match=match):
            convert_to_hf(src, dst)
        assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"ours{i}" for i in range(len(REFUSALS[family])))
