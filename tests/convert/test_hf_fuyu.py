"""Fuyu beyond the conformance row (tests/families/cases.py): FuyuProcessor's patches for images larger and smaller
than the target, wide and tall; its input_ids for prompts without images and with the first image's placeholder
written or not; the export of an imported folder loaded by FuyuForCausalLM and FuyuProcessor with the original's
logits, ids and patches and the Hub's tensor names; and what cannot be represented, refused by name."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from safetensors import safe_open
from torch import nn

import vlmkit
from vlmkit.checkpoint import write_model_files
from vlmkit.config import ProcessorConfig
from vlmkit.convert.hf import convert_from_hf, convert_to_hf
from vlmkit.data.shapes import render_scene, sample_scene
from vlmkit.errors import ConfigError, DataError
from vlmkit.processing import Processor

from hf_fixtures import real_images

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")


def sized_images() -> list:
    """The target is 36x48 (height x width): images larger on one side or both (fitted down), smaller (kept,
    padded to whole patches), wide, tall, and sides that are no multiple of the 6-px patch."""
    rng = random.Random(3)
    sizes = [(200, 90), (30, 150), (48, 36), (47, 35), (13, 7), (96, 32), (60, 40), (300, 301)]
    scenes = [render_scene(sample_scene(rng, max(w, 32), max(h, 32), min_objects=1, max_objects=3)) for w, h in sizes]
    return real_images() + [im.resize((w, h)) if im.size != (w, h) else im for im, (w, h) in zip(scenes, sizes)]


@pytest.fixture(scope="module")
def fuyu(hf_folder):
    folder, model, processor = hf_folder("fuyu")
    return folder, model, processor, vlmkit.load(folder)


def test_patches_equal_fuyu_processor(fuyu):
    _, _, hf_proc, pipe = fuyu
    for im in sized_images():
        ours = pipe.processor.prepare_images([im])
        theirs = hf_proc(text="", images=im, return_tensors="pt")["image_patches"]
        assert ours.pixel_values.shape == theirs.shape, im.size
        torch.testing.assert_close(ours.pixel_values, theirs.float(), rtol=0, atol=1e-5, msg=str(im.size))
        rows, cols = ours.extra["grid"][0].tolist()
        assert ours.tokens == ours.rows == [rows * cols] and ours.texts[0].count("|NEWLINE|") == rows


def test_input_ids_equal_fuyu_processor(fuyu):
    _, _, hf_proc, pipe = fuyu
    ims = sized_images()
    cases = [("What colour is the small circle?", []), ("  leading spaces\tand tabs\nnew lines", []), ("", [ims[0]]),
             ("Is there a yellow square? yes", [ims[3]]), ("a |SPEAKER| b |SPEAKER| c", [ims[1], ims[4], ims[6]]),
             ("|SPEAKER|caption en", [ims[2], ims[7]])]
    for text, imgs in cases:
        ours = pipe.processor.prompt(text, pipe.processor.prepare_images(imgs)).ids
        assert ours == hf_proc(text=text, images=imgs or None, return_tensors="pt")["input_ids"][0].tolist(), text
    # vlmkit's convention, a placeholder for every image with the first at the start, is read as FuyuProcessor's
    same = pipe.processor.prompt("|SPEAKER|What colour?", pipe.processor.prepare_images(ims[:1])).ids
    assert same == hf_proc(text="What colour?", images=ims[:1], return_tensors="pt")["input_ids"][0].tolist()
    chat = pipe.processor.chat("<image>\nWhat colour?", pipe.processor.prepare_images(ims[:1])).ids
    assert chat == same
    two = pipe.processor.chat("What colour?", pipe.processor.prepare_images(ims[:2])).ids  # both images in front
    assert two == hf_proc(text="|SPEAKER|What colour?", images=ims[:2], return_tensors="pt")["input_ids"][0].tolist()


def test_prompts_fuyu_processor_cannot_lay_out_are_refused(fuyu):
    _, _, _, pipe = fuyu
    two = pipe.processor.prepare_images(sized_images()[:2])
    with pytest.raises(DataError, match=r"2 image\(s\) need 1 placeholder"):
        pipe.processor.prompt("a |SPEAKER| b |SPEAKER| c |SPEAKER|", two)
    with pytest.raises(DataError, match=r"this family \(fuyu\) answers one prompt"):
        pipe.processor.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
                             {"role": "user", "content": "and?"}], two)
    with pytest.raises(DataError, match="one question and its answer"):
        pipe.processor.supervised([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                   {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}], two)


def test_supervised_sample_trains_the_answer_and_eos(fuyu):
    _, _, hf_proc, pipe = fuyu
    im = sized_images()[0]
    enc = pipe.processor.supervised([{"from": "human", "value": "<image>\nWhat colour?"},
                                     {"from": "gpt", "value": "red"}], pipe.processor.prepare_images([im]))
    prompt = hf_proc(text="What colour?", images=[im], return_tensors="pt")["input_ids"][0].tolist()
    assert enc.ids[:len(prompt)] == prompt and enc.prompt_len == len(prompt)
    assert enc.labels[len(prompt):] == enc.ids[len(prompt):] and enc.ids[-1] == pipe.processor.tokenizer.eos_id


@pytest.fixture(scope="module")
def exported(fuyu, tmp_path_factory):
    folder, _, _, _ = fuyu
    tmp = tmp_path_factory.mktemp("fuyu_export")
    convert_from_hf(folder, tmp / "vlmkit")
    convert_to_hf(tmp / "vlmkit", tmp / "hf")
    return tmp


def test_export_loads_in_transformers_with_the_same_logits_ids_and_patches(fuyu, exported):
    from hf_folders import fuyu_patchify_fix

    _, ref, hf_proc, _ = fuyu
    back = transformers.FuyuForCausalLM.from_pretrained(exported / "hf").eval()
    proc = fuyu_patchify_fix(transformers.FuyuProcessor.from_pretrained(exported / "hf"))
    ims = sized_images()
    for text, imgs in (("What colour is the small circle?", [ims[0]]), ("a |SPEAKER| b", [ims[5], ims[8]]),
                       ("the quick brown fox", [])):
        a = hf_proc(text=text, images=imgs or None, return_tensors="pt")
        b = proc(text=text, images=imgs or None, return_tensors="pt")
        assert b["input_ids"].tolist() == a["input_ids"].tolist(), text
        if imgs:
            torch.testing.assert_close(b["image_patches"], a["image_patches"], rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(back(**b).logits, ref(**a).logits, rtol=0, atol=1e-4)
    with safe_open(str(exported / "hf" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"vision_embed_tokens.weight", "language_model.lm_head.weight",
            "language_model.model.layers.0.self_attn.query_key_value.weight"} <= keys
    config = json.loads((exported / "hf" / "config.json").read_text())
    assert config["patch_size"] == 6 and config["text_config"]["partial_rotary_factor"] == 0.5


def test_the_hub_config_layout_is_read(fuyu, tmp_path):
    """adept/fuyu-8b's config.json carries the LM's keys at its top level (no text_config)."""
    import shutil

    folder, _, _, pipe = fuyu
    flat = tmp_path / "flat"
    shutil.copytree(folder, flat)
    config = json.loads((flat / "config.json").read_text())
    text = config.pop("text_config")
    config |= {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "hidden_act", "layer_norm_eps", "qk_layernorm",
                                    "max_position_embeddings")} | {"rope_theta": 25000.0, "partial_rotary_factor": 0.5}
    (flat / "config.json").write_text(json.dumps(config))
    im = sized_images()[0]
    assert vlmkit.load(flat).score([im], "What colour?", " It is red.") == pipe.score([im], "What colour?",
                                                                                      " It is red.")


def _beside(exported, tmp_path, pcfg):
    """The exported checkpoint's model written beside another processor."""
    pipe = vlmkit.load(exported / "vlmkit")
    folder = tmp_path / "variant"
    folder.mkdir()
    write_model_files(folder, pipe.model, pipe.config, Processor(pcfg, pipe.processor.tokenizer))
    return folder


@pytest.mark.parametrize("edit, message", [
    ("llava", r"processor family 'llava'"),
    ({"text_mode": "segments"}, r"text_mode 'segments'"),
    ({"newline_token": "|ENDOFTEXT|"}, r"processor newline_token '\|ENDOFTEXT\|'"),
])
def test_what_fuyu_processor_cannot_express_is_refused_and_nothing_is_written(exported, tmp_path, edit, message):
    pcfg = vlmkit.load(exported / "vlmkit").processor.cfg
    if edit == "llava":  # a processor of another family beside a Fuyu model
        pcfg = ProcessorConfig(family="llava", image_token=pcfg.image_token, image_seq_len=pcfg.image_seq_len,
                               text_mode="whole", eos_token=pcfg.eos_token, pad_token=pcfg.pad_token)
    else:
        pcfg = dataclasses.replace(pcfg, **edit)
    src = _beside(exported, tmp_path, pcfg)
    with pytest.raises(ConfigError, match=message):
        convert_to_hf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_vlmkit_trained_fuyu_is_refused_by_its_layout(tmp_path):
    """tiny-fuyu's segment layout (vlmkit's chat template, no BOS and <0x04>) is not FuyuProcessor's."""
    from vlmkit.family import get_family
    from vlmkit.presets import get_preset

    preset, family = get_preset("tiny-fuyu"), get_family("fuyu")
    tok = family.new_tokenizer(["what colour is the small circle? it is red."] * 4, 300)
    cfg, model, processor = family.new_model(preset.model, preset.processor, tok)
    (tmp_path / "tiny").mkdir()
    write_model_files(tmp_path / "tiny", model.eval(), cfg, processor)
    with pytest.raises(ConfigError, match=r"text_mode 'segments'"):
        convert_to_hf(tmp_path / "tiny", tmp_path / "hf")


def test_a_patch_size_the_model_does_not_read_is_refused_at_import(fuyu, tmp_path):
    import shutil

    folder, _, _, _ = fuyu
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "processor_config.json").read_text())
    config["image_processor"]["patch_size"] = {"height": 8, "width": 8}
    (bad / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"patch_size 8x8 must be square and equal config.json's patch_size 6"):
        vlmkit.load(bad)
    config["image_processor"]["patch_size"] = {"height": 6, "width": 6}
    config["image_processor"]["size"] = {"height": 35, "width": 48}
    (bad / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"image_size \(35, 48\) must be whole multiples of patch_size 6"):
        vlmkit.load(bad)


def test_the_image_tower_view_reads_the_patches_as_a_prompt_lays_them_out(fuyu_folder):
    """image_tower() (what a cell_labels stage pretrains: the patch projection and the LM) on a whole target-size
    image gives the LM's states at its patches exactly as in a prompt FuyuProcessor lays out: the image first, each
    row of patches closed by |NEWLINE|, so what the tower learns is what a question meets."""
    pipe = vlmkit.load(fuyu_folder[0])
    h, w = pipe.processor.cfg.image_size
    image = render_scene(sample_scene(random.Random(5), w, h, min_objects=2, max_objects=3))
    tower = pipe.model.image_tower()
    assert tower.grid == (h // pipe.config.patch_size, w // pipe.config.patch_size) and tower.width == \
        pipe.config.lm.width
    assert {id(p) for p in tower.parameters()} == {id(p) for p in pipe.model.parameters()}  # a view, nothing new
    enc = pipe.processor.prompt("What is in the picture?", pipe.processor.prepare_images([image]))
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        ours = tower(pipe.processor.transform(image)[None])
        states = pipe.model.lm(pipe.model.embed(ids, pipe.model.encode_media(enc.media)))
        assert ours.shape == (1, tower.grid[0] * tower.grid[1], tower.width)
        torch.testing.assert_close(ours[0], states[0, ids[0] == pipe.model.image_token_id], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="cuts 36x48 images"):
        tower(torch.zeros(1, 3, h + pipe.config.patch_size, w))
    # tower_layers k (what a see stage labels when the layers above are left to the questions): the states after
    # k layers of FuyuForCausalLM on the same prompt, at the patches, layer-normed without weights
    hf_model, hf_proc = fuyu_folder[1], fuyu_folder[2]
    inputs = hf_proc(text="What is in the picture?", images=image, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == enc.ids
    with torch.no_grad():
        hidden = hf_model(**inputs, output_hidden_states=True).hidden_states
    for k in range(1, pipe.config.lm.depth):
        pipe.model.tower_layers = k
        with torch.no_grad():
            ours = pipe.model.image_tower()(pipe.processor.transform(image)[None])
        theirs = nn.functional.layer_norm(hidden[k][0, ids[0] == pipe.model.image_token_id], (tower.width,),
                                          eps=pipe.config.lm.norm_eps)
        torch.testing.assert_close(ours[0], theirs, rtol=0, atol=1e-4, msg=f"tower_layers {k}")
    pipe.model.tower_layers = 0
    with pytest.raises(ValueError, match="a cache holds every layer"):
        pipe.model.lm(torch.zeros(1, 2, tower.width), cache=pipe.model.lm.new_cache(1, 4), depth=1)
    depth = pipe.config.lm.depth
    with pytest.raises(ConfigError, match=rf"tower_layers {depth + 1}: .* from 1 to lm.depth \({depth}\), or 0"):
        dataclasses.replace(pipe.config, tower_layers=depth + 1)
    pipe.model.newline_token_id = None  # a model whose config never learned its tokenizer's row break
    with pytest.raises(ValueError, match="no newline_token_id"):
        pipe.model.image_tower()
