"""BLIP-2 and InstructBLIP export: a tiny Blip2ForConditionalGeneration (OPT) / InstructBlipForConditionalGeneration
(Llama) folder -> ``vlmkit convert --from hf`` -> ``vlmkit convert --to hf`` loads with transformers' own class
(nothing missing or unexpected) and AutoProcessor: the same input_ids, pixels and qformer_input_ids as the original
processor, the same logits and greedy tokens as the original model, the tensors under transformers' names (the
tower's fused qkv), and vlmkit scores of the export equal to the original's. vlmkit-built variants export too;
what BLIP-2 cannot express is refused by field, writing nothing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open

import vlmkit
from vlmkit.checkpoint import write_model_files
from vlmkit.cli import main
from vlmkit.convert.hf import convert_to_hf
from vlmkit.errors import ConfigError
from vlmkit.models import build_model
from vlmkit.processing import Processor

from helpers import forward
from hf_fixtures import real_images
from test_hf_finetune import fine_tune, shapes  # noqa: F401  (ShapesWorld and the other families' recipe)

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

FAMILIES = {"blip2": ("blip2_folder", "Blip2ForConditionalGeneration", "Blip2Processor"),
            "instructblip": ("instructblip_folder", "InstructBlipForConditionalGeneration", "InstructBlipProcessor")}
PROMPTS = ["Question: what colour is the small circle? Answer:", "Describe the image."]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def round_trip(request, tmp_path_factory):
    """(family, original folder, its transformers model and AutoProcessor, the vlmkit checkpoint, the export)."""
    family = request.param
    folder, ref, hf_proc = request.getfixturevalue(FAMILIES[family][0])
    root = tmp_path_factory.mktemp(f"{family}_export")
    assert main(["convert", "--from", "hf", str(folder), "--out", str(root / "ours")]) == 0
    assert main(["convert", "--to", "hf", str(root / "ours"), "--out", str(root / "back")]) == 0
    return family, folder, ref, hf_proc, root / "ours", root / "back"


def load_exported(family, folder):
    model, info = getattr(transformers, FAMILIES[family][1]).from_pretrained(folder, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_round_trip_gives_the_same_inputs_and_logits(round_trip, prompt):
    family, _, ref, hf_proc, _, back = round_trip
    again, again_proc = load_exported(family, back), transformers.AutoProcessor.from_pretrained(back)
    assert type(again_proc).__name__ == FAMILIES[family][2]
    assert again_proc.num_query_tokens == hf_proc.num_query_tokens
    images = real_images()[:2]
    theirs = hf_proc(text=[prompt, "Is it red?"], images=images, padding="longest", return_tensors="pt")
    ours = again_proc(text=[prompt, "Is it red?"], images=images, padding="longest", return_tensors="pt")
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        if key != "pixel_values":
            assert ours[key].tolist() == theirs[key].tolist(), key
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(again(**ours).logits, ref(**theirs).logits, rtol=0, atol=1e-4)


def test_round_trip_generates_the_same_tokens(round_trip):
    family, _, ref, hf_proc, _, back = round_trip
    again = load_exported(family, back)
    inputs = hf_proc(text=PROMPTS[1], images=real_images()[:1], return_tensors="pt")
    kw = dict(max_new_tokens=8, do_sample=False, suppress_tokens=[ref.config.image_token_index])
    assert again.generate(**inputs, **kw).tolist() == ref.generate(**inputs, **kw).tolist()
    assert again.generation_config.eos_token_id == hf_proc.tokenizer.eos_token_id


def test_export_has_transformers_tensor_names_and_vlmkit_scores(round_trip):
    family, folder, ref, _, ours, back = round_trip
    tied = {"language_model.lm_head.weight"} if ref.config.text_config.tie_word_embeddings else set()
    with safe_open(str(back / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(ref.state_dict()) - tied  # no head while tied, as transformers saves
        qkv = f.get_tensor("vision_model.encoder.layers.0.self_attn.qkv.bias")
    torch.testing.assert_close(qkv, ref.vision_model.encoder.layers[0].self_attn.qkv.bias.detach(), rtol=0, atol=0)
    images = real_images()[1:2]
    expected = vlmkit.load(folder).score(images, PROMPTS[1], " A blue triangle.")
    assert vlmkit.load(ours).score(images, PROMPTS[1], " A blue triangle.") == pytest.approx(expected, abs=1e-6)
    assert vlmkit.load(back).score(images, PROMPTS[1], " A blue triangle.") == pytest.approx(expected, abs=1e-5)


def _variant(ours, tmp_path, model_edit=None, processor_edit=None, seed=0):
    """A vlmkit checkpoint built from the imported one's config with ``model_edit`` / ``processor_edit`` applied
    (a fresh model, from vlmkit's own initialisation, when the config changes)."""
    pipe = vlmkit.load(ours)
    cfg, pcfg = pipe.config, pipe.processor.cfg
    if processor_edit:
        pcfg = dataclasses.replace(pcfg, **processor_edit)
    processor = Processor(pcfg, pipe.processor.tokenizer, pipe.processor.files)
    model = pipe.model
    if model_edit:
        for part, changes in model_edit.items():
            section = getattr(cfg, part)
            inner = {k: v for k, v in changes.items() if k != "qformer"}
            if "qformer" in changes:
                inner["qformer"] = dataclasses.replace(section.qformer, **changes["qformer"])
            cfg = dataclasses.replace(cfg, **{part: dataclasses.replace(section, **inner)})
        torch.manual_seed(seed)
        model = build_model(cfg, processor.image_token_id)
        processor = Processor(dataclasses.replace(pcfg, image_seq_len=model.image_seq_len), processor.tokenizer,
                              processor.files)
    folder = tmp_path / "variant"
    folder.mkdir()
    write_model_files(folder, model.eval(), cfg, processor)
    return folder


def test_a_vlmkit_built_model_exports_and_gives_the_same_logits(round_trip, tmp_path):
    """vlmkit's from-scratch initialisation, an untied head, another Q-Former shape: transformers computes what
    vlmkit computes."""
    family, _, _, _, ours, _ = round_trip
    src = _variant(ours, tmp_path, {"lm": {"tie_embeddings": False},
                                    "connector": {"qformer": {"num_query_tokens": 3, "cross_attention_frequency": 1}}},
                   seed=3)
    convert_to_hf(src, tmp_path / "hf")
    ref, hf_proc = load_exported(family, tmp_path / "hf"), transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    assert ref.config.num_query_tokens == hf_proc.num_query_tokens == 3
    pipe = vlmkit.load(src)
    images = real_images()[:1]
    theirs = hf_proc(text=PROMPTS[0], images=images, return_tensors="pt")
    enc = pipe.processor.prompt(PROMPTS[0], pipe.processor.prepare_images(images))
    assert theirs["input_ids"][0].tolist() == enc.ids
    with torch.no_grad():  # enc.media: the images with InstructBLIP's instruction, as the layout gives them
        torch.testing.assert_close(ref(**theirs).logits, forward(pipe.model, theirs["input_ids"], enc.media).logits,
                                   rtol=0, atol=1e-4)


@pytest.mark.parametrize("model_edit, processor_edit, message", [
    ({"vision": {"arch": "cnn", "patch_size": 4, "class_token": False, "pos_embed": "sincos2d"}}, None,
     r"vision: not a BLIP-2 tower transformers can load: arch 'cnn'"),
    ({"vision": {"post_norm": False}}, None, r"vision: not a BLIP-2 tower .*post_norm False"),
    ({"vision": {"pre_norm": True}}, None, r"vision: not a BLIP-2 tower .*pre_norm True"),
    ({"lm": {"act": "quick_gelu"}}, None, r"lm.*act 'quick_gelu'"),
    (None, {"image_token": "<pad>"}, r"processor image_token '<pad>': .* writes the query tokens as the literal"),
    (None, {"shortest_edge": 32}, r"processor shortest_edge 32: BlipImageProcessor resizes straight"),
])
def test_what_blip2_cannot_express_is_refused_and_nothing_is_written(round_trip, tmp_path, model_edit,
                                                                     processor_edit, message):
    _, _, _, _, ours, _ = round_trip
    src = _variant(ours, tmp_path, model_edit, processor_edit)
    with pytest.raises(ConfigError, match=message):
        convert_to_hf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["variant"]


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_recipe_fine_tunes_the_import_and_the_result_exports_back(request, family, shapes, tmp_path):  # noqa: F811
    """``init_from`` a Hugging Face folder on ShapesWorld's questions (each question the prompt, its answer the
    continuation, InstructBLIP's Q-Former reading the question): the loss goes down, and transformers loads the
    fine-tuned checkpoint's export with vlmkit's logits."""
    folder = request.getfixturevalue(FAMILIES[family][0])[0]
    losses, res = fine_tune(folder, shapes, tmp_path / "run")
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    assert main(["convert", "--to", "hf", str(res.checkpoint), "--out", str(tmp_path / "hf")]) == 0
    tuned, hf = vlmkit.load(res.checkpoint), load_exported(family, tmp_path / "hf")
    hf_proc = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    images = real_images()[:1]
    theirs = hf_proc(text="What shape is it?", images=images, return_tensors="pt")
    enc = tuned.processor.prompt("What shape is it?", tuned.processor.prepare_images(images))
    assert enc.ids == theirs["input_ids"][0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(hf(**theirs).logits, forward(tuned.model, theirs["input_ids"], enc.media).logits,
                                   rtol=0, atol=1e-4)
