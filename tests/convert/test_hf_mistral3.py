"""Mistral 3 / Pixtral beyond the conformance row (tests/families/cases.py): PixtralImageProcessor's pixels and sizes
for images larger and smaller than the longest edge, wide, tall and tiny, several in one call; PixtralProcessor's
rows of [IMG] with [IMG_BREAK] / [IMG_END]; the tower and projector's features against transformers'
``get_image_features`` (the last layer and an earlier one); the Hub's tensor layout read and written; Pixtral-12B's
LLaVA format read as this family and written back as LLaVA; and what vlmkit does not implement, refused by name."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors import safe_open

import vlmkit
from vlmkit.convert.hf import convert_from_hf, convert_to_hf
from vlmkit.data.shapes import render_scene, sample_scene
from vlmkit.errors import ConfigError
from vlmkit.processing.mistral3 import resized_size

from hf_fixtures import real_images

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

PATCH, MERGE, LONGEST = 4, 2, 40  # the tiny folder's (tests/hf_folders.py: build_mistral3)


def sized_images() -> list:
    """Images larger than the 40-px longest edge on one side or both (scaled down), smaller (rounded up to 8-px
    units), wide, tall, tiny, and sides that are no multiple of the unit."""
    rng = random.Random(5)
    sizes = [(200, 90), (30, 150), (40, 40), (41, 39), (13, 7), (5, 3), (96, 32), (300, 301), (17, 64)]
    scenes = [render_scene(sample_scene(rng, max(w, 32), max(h, 32), min_objects=1, max_objects=3)) for w, h in sizes]
    return real_images() + [im.resize((w, h)) if im.size != (w, h) else im for im, (w, h) in zip(scenes, sizes)]


def patches_of(pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
    """transformers' padded [n, 3, H, W] pixels -> each image's unpadded patches [h/p * w/p, 3 * p * p]."""
    out = []
    for x, (h, w) in zip(pixel_values, image_sizes.tolist()):
        x = x[:, :h, :w]
        out.append(x.reshape(3, h // PATCH, PATCH, w // PATCH, PATCH).permute(1, 3, 0, 2, 4).reshape(-1, 3 * PATCH**2))
    return out


@pytest.fixture(scope="module")
def mistral3(mistral3_folder):
    folder, model, processor = mistral3_folder
    return folder, model, processor, vlmkit.load(folder)


def test_pixels_and_sizes_equal_pixtral_processor(mistral3):
    _, _, hf_proc, pipe = mistral3
    ims = sized_images()
    for group in [[im] for im in ims] + [ims[:4], ims[5:]]:  # alone, and several of different sizes in one call
        theirs = hf_proc(text="[IMG]" * len(group), images=group, return_tensors="pt")
        ours = pipe.processor.prepare_images(group)
        grid = ours.extra["image_grid"]
        assert (grid * PATCH).tolist() == theirs["image_sizes"].tolist()
        for k, (mine, ref) in enumerate(zip(ours.pixel_values.split(ours.rows), patches_of(theirs["pixel_values"],
                                                                                           theirs["image_sizes"]))):
            torch.testing.assert_close(mine, ref.float(), rtol=0, atol=1e-6, msg=str(group[k].size))
        assert ours.tokens == [int(h) // MERGE * (int(w) // MERGE) for h, w in grid.tolist()]
        assert ours.rows == [int(h) * int(w) for h, w in grid.tolist()]
        ids = pipe.processor.prompt("[IMG]" * len(group), ours).ids
        assert ids == theirs["input_ids"][0].tolist()


def test_each_image_is_rows_of_tokens_with_breaks_and_an_end(mistral3):
    _, _, _, pipe = mistral3
    for im in sized_images():
        media = pipe.processor.prepare_images([im])
        h, w = resized_size(im.height, im.width, LONGEST, PATCH * MERGE)
        assert max(h, w) <= LONGEST + PATCH * MERGE - 1
        rows, cols = h // (PATCH * MERGE), w // (PATCH * MERGE)
        text = media.texts[0]
        assert text == ("[IMG]" * cols + "[IMG_BREAK]") * (rows - 1) + "[IMG]" * cols + "[IMG_END]"
        assert media.tokens == [rows * cols]
        # the text a dataset is laid out with before its images are read: the same
        placeholders = pipe.processor.placeholders([im])
        assert placeholders.tokens == media.tokens and placeholders.texts == media.texts


def test_features_equal_transformers_image_features(mistral3):
    _, ref, hf_proc, pipe = mistral3
    group = sized_images()[:3] + sized_images()[6:8]
    theirs = hf_proc(text="[IMG]" * len(group), images=group, return_tensors="pt")
    with torch.no_grad():
        expected = torch.cat(ref.model.get_image_features(theirs["pixel_values"], theirs["image_sizes"]).pooler_output)
        feats = pipe.model.encode_media(pipe.processor.prepare_images(group))
    torch.testing.assert_close(feats.values, expected, rtol=0, atol=1e-5)
    assert feats.rows == [len(p) for p in ref.model.get_image_features(theirs["pixel_values"],
                                                                        theirs["image_sizes"]).pooler_output]
    assert [len(f.values) for f in feats.split()] == feats.rows


def edited(folder, tmp_path, name: str, edit) -> object:
    """A copy of ``folder`` with ``edit(json)`` applied to its file ``name``."""
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    data = json.loads((out / name).read_text())
    edit(data)
    (out / name).write_text(json.dumps(data))
    return out


def test_an_earlier_feature_layer_equals_transformers(mistral3, tmp_path):
    folder, _, hf_proc, _ = mistral3
    layer = edited(folder, tmp_path, "config.json", lambda c: c.update(vision_feature_layer=-2))
    ref = transformers.Mistral3ForConditionalGeneration.from_pretrained(layer).eval()
    pipe = vlmkit.load(layer)
    assert pipe.model.encoder.used_layers == 1
    group = sized_images()[:2]
    theirs = hf_proc(text="[IMG][IMG]", images=group, return_tensors="pt")
    with torch.no_grad():
        expected = torch.cat(ref.model.get_image_features(theirs["pixel_values"], theirs["image_sizes"]).pooler_output)
        torch.testing.assert_close(pipe.model.encode_media(pipe.processor.prepare_images(group)).values, expected,
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(pipe.model(_batch(pipe, theirs, group)).logits, ref(**theirs).logits,
                                   rtol=0, atol=1e-4)


def _batch(pipe, theirs, group):
    from vlmkit.batch import Batch

    return Batch(input_ids=theirs["input_ids"], media=pipe.processor.prepare_images(group))


def test_a_hub_config_without_tie_word_embeddings_keeps_its_saved_head(mistral3, tmp_path):
    """Mistral Small 3.1's config.json has no tie_word_embeddings (Mistral3Config's default: true) and its weights
    carry a head of their own: transformers 5 then uses that head, untied, and so does vlmkit."""

    def drop(c):
        c.pop("tie_word_embeddings", None)
        c["text_config"].pop("tie_word_embeddings", None)

    folder = edited(mistral3[0], tmp_path, "config.json", drop)
    ref = transformers.Mistral3ForConditionalGeneration.from_pretrained(folder).eval()
    pipe = vlmkit.load(folder)
    assert pipe.config.lm.tie_embeddings is False
    group = sized_images()[:2]
    theirs = mistral3[2](text="[INST][IMG][IMG]Which?[/INST]", images=group, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(_batch(pipe, theirs, group)).logits, ref(**theirs).logits,
                                   rtol=0, atol=1e-4)


IN_MEMORY = (("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
             ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."))


def test_both_tensor_layouts_are_read_and_the_export_writes_the_hubs(mistral3, tmp_path):
    """transformers 5 saves the Hub's names (``vision_tower.``, ``language_model.model.``...); its in-memory names
    (``model.vision_tower.``, ``model.language_model.``, ``lm_head.``) are read too."""
    from safetensors.torch import load_file, save_file

    folder, ref, hf_proc, pipe = mistral3
    group = sized_images()[:3]
    prompt = "[INST]Compare [IMG], [IMG] and [IMG][/INST]"
    expected = pipe.score(group, prompt, " It is red.")
    renamed = tmp_path / "renamed"
    shutil.copytree(folder, renamed)
    tensors = load_file(str(folder / "model.safetensors"))
    assert any(k.startswith("vision_tower.") for k in tensors)

    def new_name(k):
        return next((new + k[len(old):] for old, new in IN_MEMORY if k.startswith(old)), k)

    save_file({new_name(k): v for k, v in tensors.items()}, str(renamed / "model.safetensors"),
              metadata={"format": "pt"})
    assert vlmkit.load(renamed).score(group, prompt, " It is red.") == expected
    convert_from_hf(renamed, tmp_path / "vlmkit")
    convert_to_hf(tmp_path / "vlmkit", tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(tensors)  # the Hub's names, every one of them
    # the exported processor files load in PixtralProcessor and lay out the same ids and pixels
    from hf_folders import pixtral_processor_class

    back = pixtral_processor_class().from_pretrained(tmp_path / "hf")
    a, b = hf_proc(text=prompt, images=group, return_tensors="pt"), back(text=prompt, images=group,
                                                                        return_tensors="pt")
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"], rtol=0, atol=0)
    assert vlmkit.load(tmp_path / "hf").score(group, prompt, " It is red.") == pytest.approx(expected, abs=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(_logits(tmp_path / "hf", a), ref(**a).logits, rtol=0, atol=1e-4)


def _logits(folder, inputs):
    model = transformers.Mistral3ForConditionalGeneration.from_pretrained(folder).eval()
    return model(**inputs).logits


@pytest.mark.parametrize("name, edit, message", [
    ("config.json", lambda c: c.update(vision_feature_layer=[-1, -2]),
     r"vision_feature_layer \[-1, -2\]: only one layer \(an integer\) is implemented"),
    ("config.json", lambda c: c["vision_config"].update(model_type="siglip_vision_model"),
     r"model_type 'siglip_vision_model' is not implemented as Mistral 3's tower; supported: pixtral"),
    ("config.json", lambda c: c["vision_config"].update(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0}),
     r"rope_type 'yarn'; supported: axial"),
    ("config.json", lambda c: c.update(projector_hidden_act="swish"), r"projector_hidden_act 'swish'"),
    ("processor_config.json", lambda c: c.pop("spatial_merge_size"),
     r"spatial_merge_size 1 \(PixtralProcessor's 1 when absent\) does not match config.json's 2"),
    ("processor_config.json", lambda c: c.update(patch_size=8), r"patch_size 8 .* does not match config.json's 4"),
    ("processor_config.json", lambda c: c["image_processor"].update(size={"height": 40, "width": 40}),
     r"expected \{'longest_edge': int\}"),
    ("processor_config.json", lambda c: c["image_processor"].update(do_resize=False),
     r"do_resize False is not implemented for mistral3"),
])
def test_what_vlmkit_does_not_implement_is_refused_by_name(mistral3, tmp_path, name, edit, message):
    folder = mistral3[0]
    with pytest.raises(ConfigError, match=message):
        vlmkit.load(edited(folder, tmp_path, name, edit))


@pytest.fixture(scope="module")
def pixtral_llava(hf_folder):
    return hf_folder("pixtral_llava")


def test_pixtral_12b_loads_as_mistral3_and_converts_back_to_llava(pixtral_llava, tmp_path):
    """Pixtral-12B's Hub format (LlavaForConditionalGeneration with a Pixtral tower): the LLaVA family's loader hands
    it to this family (conformance row ``pixtral_llava`` checks the numbers); the conversions say so."""
    folder = pixtral_llava[0]
    pipe = vlmkit.load(folder)
    assert pipe.family.name == "mistral3" and pipe.config.connector.kind == "mlp" and pipe.processor.cfg.merge_size == 1
    assert convert_from_hf(folder, tmp_path / "vlmkit")["family"] == "mistral3"
    report = convert_to_hf(tmp_path / "vlmkit", tmp_path / "hf")
    assert report["transformers_class"] == "LlavaForConditionalGeneration"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llava" and config["vision_config"]["model_type"] == "pixtral"
    assert config["vision_feature_select_strategy"] == "full"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f, \
            safe_open(str(folder / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(vision_feature_select_strategy="default"),
     r"vision_feature_select_strategy 'default': a Pixtral tower has no class token to drop"),
    (lambda c: c.update(vision_feature_layer=[-1, -2]), r"only one layer \(an integer\) is implemented"),
])
def test_what_pixtral_12b_cannot_be_is_refused_by_name(pixtral_llava, tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        vlmkit.load(edited(pixtral_llava[0], tmp_path, "config.json", edit))


def test_the_llava_config_reader_names_a_pixtral_tower(pixtral_llava):
    """LLaVA's own config reader (which LLaVA-NeXT's shares) does not take a Pixtral tower for a CLIP one."""
    from vlmkit.convert.hf.llava import llava_config_from_hf

    config = json.loads((pixtral_llava[0] / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"vision_config.model_type 'pixtral' \(Pixtral-12B's layout"):
        llava_config_from_hf(config)
