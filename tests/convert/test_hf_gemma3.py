"""Gemma 3 specifics the conformance table does not check: pixels equal Gemma3ImageProcessor's for images of every
shape, the mask (each image's tokens see each other both ways; on the sliding layers only within the window behind
a query), left-padded batches with images equal transformers' logits, the Hub's 4.x tensor layout and tokenizer
keys, the exported folder read by transformers' AutoProcessor to the same ids and pixels, pan-and-scan crops, and
named refusals (a mismatched image_seq_length, a text decoder that is not Gemma 3's)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import forward
from hf_fixtures import real_images
from safetensors.torch import load_file, save_file

import vlmkit
from vlmkit.batch import MediaInputs
from vlmkit.convert.hf import convert_from_hf, convert_to_hf
from vlmkit.errors import ConfigError
from vlmkit.models.gemma3 import image_groups, with_image_blocks
from vlmkit.nn import causal_mask, sliding_window

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")


def pictures():
    """72x48, 40x60, 64x64 scenes and a 24x20 crop (resized up)."""
    imgs = real_images()
    return imgs + [imgs[0].resize((24, 20))]


PROMPT = "Compare <start_of_image> and <start_of_image>: how many squares?"


def test_pixels_equal_gemma3_image_processor(gemma3_folder):
    folder, _, hf_proc = gemma3_folder
    pipe = vlmkit.load(folder)
    imgs = pictures()
    ours = pipe.processor.prepare_images(imgs).pixel_values
    theirs = hf_proc.image_processor(imgs, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_image_blocks_and_the_window_on_a_hand_made_case():
    """Tokens: t i i i t t i i (two images of 3 and 2 tokens); window 2 on a sliding layer."""
    ids = torch.tensor([[5, 9, 9, 9, 5, 5, 9, 9]])
    groups = image_groups(ids, 9)
    assert groups.tolist() == [[-1, 0, 0, 0, -1, -1, 1, 1]]
    full = with_image_blocks(causal_mask(8), groups)[0, 0].int()
    assert full[1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # the first image token sees its whole image
    assert full[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]  # text after it: causal
    assert full[6].tolist() == [1, 1, 1, 1, 1, 1, 1, 1]  # the second image sees itself, not the first's future
    slide = sliding_window(with_image_blocks(causal_mask(8), groups), 2)[0, 0].int()
    assert slide[1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # keys after the query stay (AND after the OR)
    assert slide[3].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]  # keys behind it: only within the window
    # after a cache of 3 positions the new tokens' blocks sit at their own columns
    step = with_image_blocks(causal_mask(2, offset=3), torch.tensor([[0, 0]]), offset=3)[0, 0].int()
    assert step.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_bidirectional_images_and_the_window_change_the_logits(gemma3_folder):
    """The proofs can fail: without the image blocks, or without the window, the logits move."""
    folder, ref, hf_proc = gemma3_folder
    pipe = vlmkit.load(folder)
    imgs = [pictures()[0], pictures()[2]]
    inputs = hf_proc(text=PROMPT, images=imgs, return_tensors="pt")
    media = pipe.processor.prepare_images(imgs)
    with torch.no_grad():
        theirs = ref(**inputs).logits
        ours = forward(pipe.model, inputs["input_ids"], media).logits
        causal = pipe.model.lm.lm_head(pipe.model.lm(pipe.model.embed(inputs["input_ids"],
                                                                      pipe.model.encode_media(media))))
        lm = pipe.model.lm
        types = lm.cfg.layer_types
        lm.cfg.layer_types = ()
        try:
            windowless = forward(pipe.model, inputs["input_ids"], media).logits
        finally:
            lm.cfg.layer_types = types
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert (causal - theirs).abs().max() > 1e-3
    assert (windowless - theirs).abs().max() > 1e-3


def test_left_padded_batch_with_images_equals_transformers(gemma3_folder):
    folder, ref, hf_proc = gemma3_folder
    pipe = vlmkit.load(folder)
    texts = [PROMPT, "<start_of_image> caption en"]
    imgs = [[pictures()[0], pictures()[2]], [pictures()[1]]]
    hf_proc.tokenizer.padding_side = "left"
    inputs = hf_proc(text=texts, images=imgs, return_tensors="pt", padding=True)
    media = MediaInputs.cat([pipe.processor.prepare_images(i) for i in imgs])
    with torch.no_grad():
        theirs = ref(**inputs).logits
        ours = forward(pipe.model, inputs["input_ids"], media, attention_mask=inputs["attention_mask"]).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-4)


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_the_hubs_4x_layout_and_tokenizer_keys_load_the_same(gemma3_folder, tmp_path):
    """google/gemma-3-*'s tensors ("language_model.model.", "vision_tower.vision_model.", "multi_modal_projector.")
    and tokenizer_config.json's top-level boi_token / eoi_token."""
    folder = _copy(gemma3_folder[0], tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    renamed = {}
    for k, v in tensors.items():
        k = k.replace("model.language_model.", "language_model.model.").replace("model.vision_tower.", "vision_tower.")
        k = k.replace("model.multi_modal_projector.", "multi_modal_projector.")
        renamed["language_model.lm_head.weight" if k == "lm_head.weight" else k] = v
    (folder / "model.safetensors").unlink()
    save_file(renamed, str(folder / "model.safetensors"))

    def top_level(d):
        d.update(d.pop("extra_special_tokens"))

    _edit_json(folder / "tokenizer_config.json", top_level)
    a, b = vlmkit.load(gemma3_folder[0]), vlmkit.load(folder)
    imgs = [pictures()[0], pictures()[2]]
    assert a.score(imgs, PROMPT, " It is red.") == b.score(imgs, PROMPT, " It is red.")
    assert b.processor.cfg.boi_token == "<start_of_image>"


def test_export_is_read_by_autoprocessor_to_the_same_ids_and_pixels(gemma3_folder, tmp_path):
    convert_from_hf(gemma3_folder[0], tmp_path / "vlmkit")
    convert_to_hf(tmp_path / "vlmkit", tmp_path / "hf")
    ref_proc = gemma3_folder[2]
    proc = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    assert type(proc).__name__ == "Gemma3Processor" and proc.image_seq_length == ref_proc.image_seq_length
    imgs = [pictures()[0], pictures()[2]]
    ours, theirs = proc(text=PROMPT, images=imgs, return_tensors="pt"), ref_proc(text=PROMPT, images=imgs,
                                                                                  return_tensors="pt")
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=0)
    assert ours["token_type_ids"].tolist() == theirs["token_type_ids"].tolist()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["text_config"]["model_type"] == "gemma3_text"
    assert config["text_config"]["layer_types"][:3] == ["sliding_attention", "sliding_attention", "full_attention"]


@pytest.mark.parametrize("file, edit, match", [
    ("processor_config.json", lambda d: d.update(image_seq_length=16), "image_seq_length 16"),
    ("config.json", lambda d: d["text_config"].update(model_type="gemma2"), "text_config.model_type 'gemma2'"),
    ("config.json", lambda d: d.update(mm_tokens_per_image=8), "mm_tokens_per_image 8"),
])
def test_what_vlmkit_lacks_is_refused_by_name(gemma3_folder, tmp_path, file, edit, match):
    folder = _copy(gemma3_folder[0], tmp_path)
    path = folder / file
    if not path.is_file():  # the image processor's settings may sit in processor_config.json
        path = folder / "processor_config.json"
        _edit_json(path, lambda d: edit(d["image_processor"]))
    else:
        _edit_json(path, edit)
    with pytest.raises(ConfigError, match=match):
        vlmkit.load(folder)


def test_pan_and_scan_crops_ids_pixels_and_logits_equal_transformers(gemma3_folder, tmp_path):
    """Pan-and-scan (crops of at least 8 px here): a wide 96x32 image gets 3 crops, a tall 40x60 one 2, a square one
    none, with transformers' ids, pixels and logits when Gemma3Processor is called with the settings. A folder that
    writes them in its image-processor settings crops nothing by default: Gemma3Processor's own defaults win over
    the folder's on every call, and vlmkit follows transformers' default call. A converted checkpoint whose
    processor.json turns them on crops, and exports them."""
    folder = _copy(gemma3_folder[0], tmp_path)
    settings = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 8, "pan_and_scan_max_num_crops": 4,
                "pan_and_scan_min_ratio_to_activate": 1.2}
    _edit_json(folder / "processor_config.json", lambda d: d["image_processor"].update(settings))
    _, ref, hf_proc = gemma3_folder
    imgs = [real_images()[0].resize((96, 32)), real_images()[1], real_images()[2]]
    prompt = "<start_of_image> <start_of_image> <start_of_image> which?"
    by_default = vlmkit.load(folder).processor
    plain = hf_proc(text=prompt, images=imgs, return_tensors="pt")
    assert by_default.prompt(prompt, by_default.prepare_images(imgs)).ids == plain["input_ids"][0].tolist()
    assert by_default.prepare_images(imgs).rows == [1, 1, 1] and not by_default.cfg.do_pan_and_scan
    convert_from_hf(folder, tmp_path / "vlmkit")
    _edit_json(tmp_path / "vlmkit" / "processor.json", lambda d: d.update(settings))
    pipe = vlmkit.load(tmp_path / "vlmkit")
    theirs = hf_proc(text=prompt, images=imgs, return_tensors="pt", **settings)
    media = pipe.processor.prepare_images(imgs)
    assert media.rows == [4, 3, 1] and media.tokens == [36, 27, 9]
    ours = pipe.processor.prompt(prompt, media)
    assert ours.ids == theirs["input_ids"][0].tolist()
    torch.testing.assert_close(media.pixel_values, theirs["pixel_values"], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(forward(pipe.model, ours.ids, media).logits, ref(**theirs).logits, rtol=0,
                                   atol=1e-4)
    # the placeholders of a dataset read the images (crops depend on their size), and the export keeps the setting
    assert pipe.processor.placeholders(imgs).tokens == [36, 27, 9]
    convert_to_hf(tmp_path / "vlmkit", tmp_path / "hf")
    exported = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert {k: exported[k] for k in settings} == settings


def test_a_from_scratch_tiny_gemma3_exports_to_transformers(tmp_path):
    """tiny-gemma3 built from scratch (its own BPE tokenizer, <image> as the image token) exports to a folder that
    Gemma3ForConditionalGeneration and AutoProcessor load to the same ids, pixels and logits."""
    from vlmkit.convert.hf.gemma3 import export_gemma3
    from vlmkit.family import get_family
    from vlmkit.presets import get_preset

    preset, family = get_preset("tiny-gemma3"), get_family("gemma3")
    tok = family.new_tokenizer(["what colour is the small circle? it is red.", "how many squares? two."] * 8, 320)
    torch.manual_seed(0)
    cfg, model, proc = family.new_model(preset.model, preset.processor, tok)
    export_gemma3(model.eval(), cfg, proc, tmp_path)
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path).eval()
    hf_proc = transformers.AutoProcessor.from_pretrained(tmp_path)
    imgs = real_images()[:2]
    inputs = hf_proc(text="<start_of_image> and <start_of_image> how many squares?", images=imgs, return_tensors="pt")
    media = proc.prepare_images(imgs)
    torch.testing.assert_close(media.pixel_values, inputs["pixel_values"], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(forward(model, inputs["input_ids"], media).logits, hf(**inputs).logits, rtol=0,
                                   atol=1e-4)
