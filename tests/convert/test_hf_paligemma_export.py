"""PaliGemma export: a tiny PaliGemmaForConditionalGeneration folder -> ``vlmkit convert --from hf`` ->
``vlmkit convert --to hf`` loads with transformers' own class and AutoProcessor (PaliGemmaProcessor): the same
input_ids, token_type_ids, labels and pixels as the original processor on real images, the same logits and greedy
tokens as the original model, the chat template kept, tensors in the Hub's layout (google/paligemma-*), and
vlmkit scores of the export equal to those of the original. A vlmkit-built PaliGemma with an untied head exports
too; what PaliGemma cannot express is refused by field, writing nothing."""

from __future__ import annotations

import dataclasses
import json
import shutil

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
from test_hf_paligemma import PROMPTS, images_for

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

# a PaliGemma-style chat template (images first, then the text), added to the import test's folder: PaliGemma
# checkpoints ship none, and the round trip must keep one that is there
TEMPLATE = ("{% for message in messages %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
            "{% endif %}{% endfor %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
            "{% endif %}{% endfor %}{% endfor %}")


@pytest.fixture(scope="module")
def round_trip(paligemma_folder, tmp_path_factory):
    """(original folder with a chat template, its transformers model and AutoProcessor, the vlmkit
    checkpoint, the exported folder)."""
    folder, ref, _ = paligemma_folder
    root = tmp_path_factory.mktemp("paligemma_export")
    src = root / "src"
    shutil.copytree(folder, src)
    (src / "chat_template.jinja").write_text(TEMPLATE)
    assert main(["convert", "--from", "hf", str(src), "--out", str(root / "ours")]) == 0
    assert main(["convert", "--to", "hf", str(root / "ours"), "--out", str(root / "back")]) == 0
    return src, ref, transformers.AutoProcessor.from_pretrained(src), root / "ours", root / "back"


def load_exported(folder):
    model, info = transformers.PaliGemmaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("prompt, suffix", [(PROMPTS[0], " a red circle"), (PROMPTS[1], None), (PROMPTS[2], " Two.")])
def test_round_trip_gives_the_same_inputs_and_logits(round_trip, prompt, suffix):
    src, ref, hf_proc, _, back = round_trip
    again, again_proc = load_exported(back), transformers.AutoProcessor.from_pretrained(back)
    assert type(again_proc).__name__ == "PaliGemmaProcessor" and again_proc.image_seq_length == 16
    images = images_for(prompt)
    theirs = hf_proc(text=prompt, images=images, suffix=suffix, return_tensors="pt")
    ours = again_proc(text=prompt, images=images, suffix=suffix, return_tensors="pt")
    assert sorted(ours) == sorted(theirs)
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert ours[key].tolist() == theirs[key].tolist(), key
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)
    ours.pop("labels"), theirs.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(again(**ours).logits, ref(**theirs).logits, rtol=0, atol=1e-4)


def test_round_trip_generates_the_same_tokens(round_trip):
    """generation_config.json's eos / pad / bos: greedy decoding of the export stops where the original's does."""
    src, ref, hf_proc, _, back = round_trip
    again, again_proc = load_exported(back), transformers.AutoProcessor.from_pretrained(back)
    inputs = hf_proc(text=PROMPTS[1], images=images_for(PROMPTS[1]), return_tensors="pt")
    inputs.pop("labels")
    expected = ref.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert again.generate(**inputs, max_new_tokens=8, do_sample=False).tolist() == expected.tolist()
    assert again.generation_config.eos_token_id == ref.generation_config.eos_token_id
    assert again.generation_config.pad_token_id == ref.generation_config.pad_token_id
    assert again_proc.tokenizer.eos_token == hf_proc.tokenizer.eos_token


def test_round_trip_keeps_the_chat_template_and_vlmkit_scores(round_trip):
    src, _, hf_proc, ours, back = round_trip
    again_proc = transformers.AutoProcessor.from_pretrained(back)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "answer en What is it?"}]}]
    rendered = hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<image>answer en What is it?"  # the template is really there ...
    assert again_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == rendered
    images = real_images()[:1]
    expected = vlmkit.load(src).score(images, PROMPTS[1], " It is red.")
    assert vlmkit.load(back).score(images, PROMPTS[1], " It is red.") == pytest.approx(expected, abs=1e-5)
    assert vlmkit.load(back).chat(images, "What is it?", max_new_tokens=6) == vlmkit.load(src).chat(
        images, "What is it?", max_new_tokens=6)


def test_a_folder_without_a_chat_template_exports_none(paligemma_folder, tmp_path):
    folder, _, hf_proc = paligemma_folder
    assert main(["convert", "--from", "hf", str(folder), "--out", str(tmp_path / "ours")]) == 0
    assert main(["convert", "--to", "hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    assert not (tmp_path / "back" / "chat_template.jinja").exists()
    assert hf_proc.chat_template is None
    assert transformers.AutoProcessor.from_pretrained(tmp_path / "back").chat_template is None


def test_export_is_in_the_hub_layout(round_trip):
    """The tensor names of google/paligemma-* (transformers 4's module names, which 5 maps on load), no pooling
    head (vision_use_head: false; PaliGemma never reads it), no lm_head while tied; the configs PaliGemma needs."""
    _, ref, _, _, back = round_trip
    to_hub = {"model.vision_tower.": "vision_tower.vision_model.", "model.language_model.": "language_model.model.",
              "model.multi_modal_projector.": "multi_modal_projector."}
    expected = set()
    for k in ref.state_dict():
        prefix = next((p for p in to_hub if k.startswith(p)), None)
        if prefix and not k.startswith("model.vision_tower.head."):
            expected.add(to_hub[prefix] + k[len(prefix):])
    with safe_open(str(back / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == expected
        assert "multi_modal_projector.linear.bias" in expected and "language_model.lm_head.weight" not in expected
    config = json.loads((back / "config.json").read_text())
    assert config["vision_config"]["vision_use_head"] is False and config["tie_word_embeddings"] is True
    assert config["image_token_index"] == ref.config.image_token_index
    assert config["text_config"]["num_image_tokens"] == 16
    preprocessor = json.loads((back / "preprocessor_config.json").read_text())
    assert preprocessor["image_processor_type"] == "SiglipImageProcessor" and preprocessor["image_seq_length"] == 16


def _variant(ours, tmp_path, model_edit=None, processor_edit=None, seed=None):
    """A vlmkit PaliGemma checkpoint built from the imported one's config with ``model_edit`` /
    ``processor_edit`` applied (a fresh model when the config changes, else the imported weights)."""
    pipe = vlmkit.load(ours)
    cfg, pcfg = pipe.config, pipe.processor.cfg
    if processor_edit:
        pcfg = dataclasses.replace(pcfg, **processor_edit)
    processor = Processor(pcfg, pipe.processor.tokenizer)
    model = pipe.model
    if model_edit or processor.image_token_id != model.image_token_id:
        for part, changes in (model_edit or {}).items():
            cfg = dataclasses.replace(cfg, **{part: dataclasses.replace(getattr(cfg, part), **changes)})
        torch.manual_seed(seed or 0)
        model = build_model(cfg, processor.image_token_id)
    folder = tmp_path / "variant"
    folder.mkdir()
    write_model_files(folder, model.eval(), cfg, processor)
    return folder


def test_a_vlmkit_paligemma_with_an_untied_head_exports_and_gives_the_same_logits(round_trip, tmp_path):
    _, _, _, ours, _ = round_trip
    src = _variant(ours, tmp_path, {"lm": {"tie_embeddings": False}}, seed=3)
    convert_to_hf(src, tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert "language_model.lm_head.weight" in f.keys()
    ref, hf_proc = load_exported(tmp_path / "hf"), transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    assert ref.config.tie_word_embeddings is False
    pipe = vlmkit.load(src)
    assert not torch.equal(pipe.model.lm.lm_head.weight, pipe.model.lm.embed_tokens.weight)
    images = images_for(PROMPTS[2])
    theirs = hf_proc(text=PROMPTS[2], images=images, return_tensors="pt")
    inputs = pipe.processor.prepare_images(images)
    assert theirs["input_ids"][0].tolist() == pipe.processor.prompt(PROMPTS[2], inputs).ids
    theirs.pop("labels")
    prompt_mask = theirs["token_type_ids"] == 0  # the whole prompt is the prefix
    assert prompt_mask.all()
    with torch.no_grad():
        torch.testing.assert_close(ref(**theirs).logits, forward(pipe.model, theirs["input_ids"], inputs,
                                                                 prompt_mask=prompt_mask).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("model_edit, processor_edit, message", [
    ({"vision": {"post_norm": False}}, None, r"vision\.post_norm: false"),
    ({"vision": {"class_token": True, "pre_norm": True, "patch_bias": False}}, None, r"vision\.class_token: true"),
    ({"vision": {"act": "silu"}}, None, r"vision: not a SigLIP tower transformers can load: act 'silu'"),
    ({"connector": {"kind": "mlp"}}, None, r"connector\.kind 'mlp'"),
    ({"lm": {"norm_offset": False, "embed_scale": False}}, None, r"lm\.norm_offset False, lm\.embed_scale False"),
    (None, {"family": "llava"}, r"processor family 'llava'"),
    (None, {"text_mode": "segments"}, r"text_mode 'segments'"),
    (None, {"image_token": "<loc0000>"}, r"processor image_token '<loc0000>'"),
    (None, {"shortest_edge": 32}, r"processor shortest_edge 32"),
])
def test_what_paligemma_cannot_express_is_refused_and_nothing_is_written(round_trip, tmp_path, model_edit,
                                                                         processor_edit, message):
    """(A CNN tower cannot even be built as the paligemma family: build_paligemma refuses vision.arch 'cnn'.)"""
    _, _, _, ours, _ = round_trip
    src = _variant(ours, tmp_path, model_edit, processor_edit)
    with pytest.raises(ConfigError, match=message):
        convert_to_hf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["variant"]
