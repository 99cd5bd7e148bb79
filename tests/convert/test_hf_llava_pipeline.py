"""LLaVA-1.5 end to end from a Hugging Face folder: ``vlmkit.load(folder)`` gives the same input_ids and pixels
as transformers' LlavaProcessor, the same logits and greedy tokens as LlavaForConditionalGeneration, the
score() contract (per-token log-probabilities of a continuation), the folder's chat template, and
``vlmkit convert --from hf`` to a vlmkit checkpoint that scores the same."""

from __future__ import annotations

import json

import pytest
import torch

import vlmkit
from vlmkit.cli import main
from vlmkit.convert.hf import read_chat_template
from vlmkit.errors import CheckpointError, ConfigError

from helpers import forward
from hf_fixtures import LLAVA_TEMPLATE, real_images

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["USER: <image>\nWhat colour is the small circle? ASSISTANT:",
           "<image> caption en", "Compare <image> and <image>: how many squares?"]


def images_for(prompt):
    return real_images()[:prompt.count("<image>")]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_input_ids_pixels_and_logits_equal_transformers(llava_folder, prompt):
    folder, ref, hf_proc = llava_folder
    pipe = vlmkit.load(folder)
    images = images_for(prompt)
    theirs = hf_proc(text=prompt, images=images, return_tensors="pt")
    inputs = pipe.processor.prepare_images(images)
    ids = pipe.processor.prompt(prompt, inputs).ids
    assert ids == theirs["input_ids"][0].tolist()
    torch.testing.assert_close(inputs.pixel_values, theirs["pixel_values"], rtol=0, atol=1e-5)
    with torch.no_grad():
        ours = forward(pipe.model, ids, inputs).logits
        ref_logits = ref(**theirs).logits
    torch.testing.assert_close(ours, ref_logits, rtol=0, atol=1e-4)


def test_chat_uses_the_folders_template(llava_folder):
    folder, _, hf_proc = llava_folder
    pipe = vlmkit.load(folder)
    assert pipe.processor.cfg.chat_template_jinja == LLAVA_TEMPLATE
    images = images_for(PROMPTS[0])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    theirs = hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    theirs_ids = hf_proc(text=theirs, images=images)["input_ids"][0]
    inputs = pipe.processor.prepare_images(images)
    assert pipe.processor.chat("What is it?", inputs).ids == list(theirs_ids)


def copy_folder(src, dst, drop=()):
    dst.mkdir()
    for p in src.iterdir():
        if p.name not in drop:
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize("broken, error, match", [
    ("tokenizer", CheckpointError, r"has no tokenizer.json"),
    ("model_type", ConfigError, r"config.json: model_type 'llava_next_video' is not a family vlmkit imports; "
                                r"supported: .*llava"),
    ("pickle", CheckpointError, r"has only pickled weights \(pytorch_model.bin\); vlmkit never unpickles"),
    ("vocab", CheckpointError, r"has shape \(\d+, 48\), the config implies \(\d+, 48\)"),
])
def test_broken_folders_get_named_errors_and_convert_writes_nothing(llava_folder, tmp_path, broken, error, match):
    folder, _, _ = llava_folder
    bad = copy_folder(folder, tmp_path / "bad", drop={"tokenizer": ("tokenizer.json",),
                                                      "pickle": ("model.safetensors",)}.get(broken, ()))
    cfg = json.loads((bad / "config.json").read_text())
    if broken == "model_type":
        cfg["model_type"] = "llava_next_video"
    if broken == "vocab":
        cfg["text_config"]["vocab_size"] += 3
    if broken == "pickle":
        (bad / "pytorch_model.bin").write_bytes(b"not unpickled")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(error, match=match):
        vlmkit.load(bad)
    assert main(["convert", "--from", "hf", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


@pytest.mark.parametrize("layout", ["jinja", "json", "tokenizer_config", "named_list"])
def test_chat_template_is_read_from_each_layout(tmp_path, layout):
    template = "{{ messages[0]['content'] }}"
    if layout == "jinja":
        (tmp_path / "chat_template.jinja").write_text(template)
    elif layout == "json":
        (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    elif layout == "tokenizer_config":
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    else:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(
            {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]}))
    assert read_chat_template(tmp_path) == template


def test_cli_chat_and_convert_arguments(llava_folder, tmp_path, capsys):
    folder, _, _ = llava_folder
    image = tmp_path / "image.png"
    real_images()[0].save(image)
    assert main(["chat", "--model", str(folder), "--image", str(image), "What is it?", "--max-new-tokens", "3"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer == vlmkit.load(folder).chat(image, "What is it?", max_new_tokens=3).strip()
    for args in (["convert", str(folder), "--out", str(tmp_path / "x")],
                 ["convert", "--from", "hf", "--to", "hf", str(folder), "--out", str(tmp_path / "x")]):
        assert main(args) == 2
        assert "give exactly one of --from hf" in capsys.readouterr().err
    assert main(["convert", "--from", "hf", str(folder), "--out", str(tmp_path / "y")]) == 0
    assert main(["convert", "--from", "hf", str(folder), "--out", str(tmp_path / "y")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["convert", "--from", "hf", str(folder), "--out", str(tmp_path / "y"), "--overwrite"]) == 0
