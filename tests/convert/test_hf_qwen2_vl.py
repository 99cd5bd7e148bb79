"""Qwen2-VL end to end from a Hugging Face folder: ``vlmkit.load(folder)`` gives the same input_ids, pixel patches
and image grids as transformers' Qwen2VLProcessor for non-square images of different sizes (two in one prompt),
the same logits and greedy tokens as Qwen2VLForConditionalGeneration (M-RoPE position ids included, left-padded
batches too), the score() contract, the folder's chat template, ``vlmkit convert --from hf`` to a checkpoint that
scores the same, and named refusals of what vlmkit does not implement (videos, Qwen2.5-VL, ...).

transformers' Qwen2VLProcessor also holds a video processor, which needs torchvision (absent here), so
``AutoProcessor.from_pretrained`` cannot build it. The reference processor is Qwen2VLProcessor without its
video half: its ``from_pretrained`` loads the image processor (AutoImageProcessor: the PIL backend) and the
tokenizer from the folder exactly as AutoProcessor would; text and image processing are Qwen2VLProcessor's own.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlmkit
from vlmkit.errors import CheckpointError, ConfigError, DataError
from vlmkit.models.qwen2_vl import mrope_position_ids
from vlmkit.nn import RotaryEmbedding
from vlmkit.batch import MediaInputs

from helpers import forward
from hf_fixtures import real_images, reference_logprobs
from hf_folders import QWEN2_VL_TEMPLATE as TEMPLATE

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _images():
    wide, tall, square = real_images()  # 72x48, 40x60, 64x64 (width x height)
    return {"wide": wide, "tall": tall, "square": square, "small": tall.resize((14, 10))}  # small: scaled up


# (prompt, image names): two non-square images of different sizes in one prompt; a chat-formatted prompt; an image
# below min_pixels (scaled up); text only
CASES = [
    (f"{IMAGE}{IMAGE}Compare the two pictures: how many squares?", ("wide", "tall")),
    (f"<|im_start|>user\n{IMAGE}What colour is the small circle?<|im_end|>\n<|im_start|>assistant\n", ("wide",)),
    (f"A caption: {IMAGE} and then {IMAGE} too", ("small", "square")),
    ("the quick brown fox", ()),
]


def images_for(names):
    imgs = _images()
    return [imgs[n] for n in names]


@pytest.mark.parametrize("prompt, names", CASES)
def test_input_ids_pixels_and_logits_equal_transformers(qwen_folder, prompt, names):
    folder, ref, hf_proc = qwen_folder
    pipe = vlmkit.load(folder)
    images = images_for(names)
    theirs = hf_proc(text=prompt, images=images or None, return_tensors="pt")
    inputs = pipe.processor.prepare_images(images)
    ids = pipe.processor.prompt(prompt, inputs).ids
    assert ids == theirs["input_ids"][0].tolist()
    if images:
        assert inputs.extra["image_grid_thw"].tolist() == theirs["image_grid_thw"].tolist()
        torch.testing.assert_close(inputs.pixel_values, theirs["pixel_values"], rtol=0, atol=1e-5)
    with torch.no_grad():
        ours = forward(pipe.model, ids, inputs).logits
        ref_logits = ref(**theirs).logits
    torch.testing.assert_close(ours, ref_logits, rtol=0, atol=1e-4)


def test_images_are_non_square_of_different_sizes_and_resized_both_ways(qwen_folder):
    """The cases above cover down- and up-scaling to different non-square grids (else they prove less)."""
    folder, _, _ = qwen_folder
    grids = vlmkit.load(folder).processor.prepare_images(images_for(("wide", "tall", "small"))).extra["image_grid_thw"]
    assert grids.tolist() == [[1, 10, 14], [1, 16, 10], [1, 4, 6]]  # 72x48 down, 40x60 rounded, 14x10 up


def test_mrope_positions_equal_get_rope_index_for_a_left_padded_batch(qwen_folder, monkeypatch):
    folder, ref, hf_proc = qwen_folder
    pipe = vlmkit.load(folder)
    monkeypatch.setattr(hf_proc.tokenizer, "padding_side", "left")  # the processor is shared: undone after
    (p0, n0), (p1, n1) = CASES[1], CASES[0]
    images = images_for(n0) + images_for(n1)
    theirs = hf_proc(text=[p0, p1], images=images, padding=True, return_tensors="pt")
    expected, deltas = ref.model.get_rope_index(theirs["input_ids"], theirs["mm_token_type_ids"],
                                                theirs["image_grid_thw"], attention_mask=theirs["attention_mask"])
    assert theirs["attention_mask"][0, 0] == 0  # the first prompt is padded
    ours, our_deltas = mrope_position_ids(theirs["input_ids"], pipe.model.image_token_id, theirs["image_grid_thw"],
                                          2, theirs["attention_mask"])
    assert torch.equal(ours, expected)
    assert our_deltas.tolist() == deltas[:, 0].tolist() and any(our_deltas)


def test_logits_depend_on_the_mrope_positions(qwen_folder):
    """Plain 1D positions give different logits: the parity above does exercise M-RoPE."""
    folder, ref, hf_proc = qwen_folder
    pipe = vlmkit.load(folder)
    prompt, names = CASES[0]
    inputs = pipe.processor.prepare_images(images_for(names))
    ids = torch.tensor([pipe.processor.prompt(prompt, inputs).ids])
    with torch.no_grad():
        mrope = forward(pipe.model, ids, inputs).logits
        plain = forward(pipe.model, ids, inputs, position_ids=torch.arange(ids.shape[1])[None]).logits
    assert (mrope - plain).abs().max() > 1e-2


def test_chat_uses_the_folders_template(qwen_folder):
    folder, _, hf_proc = qwen_folder
    pipe = vlmkit.load(folder)
    assert pipe.processor.cfg.chat_template_jinja == TEMPLATE
    images = images_for(("tall",))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    theirs = hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    theirs_ids = hf_proc(text=theirs, images=images)["input_ids"][0]
    inputs = pipe.processor.prepare_images(images)
    assert pipe.processor.chat("What is it?", inputs).ids == list(theirs_ids)


def _copy(folder, tmp_path, edit_config=None, edit_processor=None):
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    for name, edit in (("config.json", edit_config), ("preprocessor_config.json", edit_processor)):
        path = out / name
        if edit is not None and path.is_file():
            data = json.loads(path.read_text())
            edit(data)
            path.write_text(json.dumps(data))
    if edit_processor is not None:  # the image-processor settings are also nested in processor_config.json
        path = out / "processor_config.json"
        data = json.loads(path.read_text())
        if isinstance(data.get("image_processor"), dict):
            edit_processor(data["image_processor"])
            path.write_text(json.dumps(data))
    return out


def test_transformers_4_flat_config_loads_the_same(qwen_folder, tmp_path):
    """The Hub's 4.x layout: text keys at the top level, rope_scaling type "mrope", rope_theta at the top; the
    image processor's min_pixels / max_pixels instead of size."""
    folder, _, _ = qwen_folder

    def flatten(cfg):
        text = cfg.pop("text_config")
        rope = text.pop("rope_parameters")
        cfg.update({k: v for k, v in text.items() if k != "model_type"})
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
        cfg["vision_config"]["in_chans"] = cfg["vision_config"].pop("in_channels")

    def hub_pixels(cfg):
        size = cfg.pop("size")
        cfg.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])

    flat = _copy(folder, tmp_path, flatten, hub_pixels)
    assert "size" not in json.loads((flat / "processor_config.json").read_text())["image_processor"]
    prompt, names = CASES[0]
    images = images_for(names)
    assert vlmkit.load(flat).score(images, prompt, " Two squares.") == pytest.approx(
        vlmkit.load(folder).score(images, prompt, " Two squares."), abs=1e-6)


@pytest.mark.parametrize("saved_head", [False, True])
def test_tied_embeddings_as_transformers_ties_them(qwen_folder, tmp_path, saved_head):
    """tie_word_embeddings (Qwen2-VL-2B): the head is the token embedding. A saved lm_head.weight that differs
    from the embeddings is used untied, as transformers 5 does."""
    folder, _, hf_proc = qwen_folder
    tied = _copy(folder, tmp_path, lambda c: c.update(tie_word_embeddings=True))
    if not saved_head:
        tensors = load_file(tied / "model.safetensors")
        del tensors["lm_head.weight"]
        save_file(tensors, tied / "model.safetensors", metadata={"format": "pt"})
    ref = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tied).eval()
    is_tied = ref.lm_head.weight.data_ptr() == ref.model.language_model.embed_tokens.weight.data_ptr()
    assert is_tied != saved_head
    pipe = vlmkit.load(tied)
    assert pipe.config.lm.tie_embeddings == is_tied
    prompt, names = CASES[1]
    images = images_for(names)
    ours = pipe.score(images, prompt, " It is red.")
    theirs = reference_logprobs(ref, hf_proc, images, prompt, " It is red.")
    torch.testing.assert_close(torch.tensor(ours), theirs, rtol=0, atol=1e-4)


def test_a_qwen2_vl_tower_labelled_qwen2_5_vl_is_refused_by_name(qwen_folder, tmp_path):
    """model_type qwen2_5_vl is the Qwen2.5-VL family's (test_hf_qwen2_5_vl.py), which refuses Qwen2-VL's tower."""
    folder, _, _ = qwen_folder
    edited = _copy(folder, tmp_path, lambda c: c.update(model_type="qwen2_5_vl"))
    with pytest.raises(ConfigError, match=r"config\.json \(vision_config\): model_type 'qwen2_vl_vision' is not "
                                          r"Qwen2\.5-VL's tower"):
        vlmkit.load(edited)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["vision_config"].update(hidden_act="relu"), r"vision_config\): hidden_act 'relu' is not implemented"),
    (lambda c: c["text_config"]["rope_parameters"].update(rope_type="yarn", factor=2.0),
     r"text_config\): rope_type 'yarn' \(RoPE scaling\) is not implemented"),
    (lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[4, 2, 3]),
     r"text_config\): mrope_section \[4, 2, 3\] must be positive integers summing to head_dim / 2 = 8"),
    (lambda c: c["text_config"].update(use_sliding_window=True), r"use_sliding_window: true is not implemented"),
    (lambda c: c["vision_config"]["rope_parameters"].update(rope_type="dynamic"),
     r"vision_config\): rope_parameters\.rope_type 'dynamic' is not implemented"),
    (lambda c: c["vision_config"].update(hidden_size=48), r"vision_config\.hidden_size 48 .* must equal the text"),
])
def test_unimplemented_config_features_are_refused_by_name(qwen_folder, tmp_path, edit, message):
    folder, _, _ = qwen_folder
    with pytest.raises(ConfigError, match=r"config\.json.*" + message):
        vlmkit.load(_copy(folder, tmp_path, edit))


def test_weights_that_do_not_match_the_config_are_refused(qwen_folder, tmp_path):
    folder, _, _ = qwen_folder
    edited = _copy(folder, tmp_path, lambda c: c["vision_config"].update(mlp_ratio=3))
    with pytest.raises(CheckpointError, match=r"visual\.blocks\.0\.mlp\.fc1\.weight has shape \(64, 32\), the config "
                                              r"implies \(96, 32\)"):
        vlmkit.load(edited)


def test_processor_settings_that_do_not_match_the_tower_are_refused(qwen_folder, tmp_path):
    folder, _, _ = qwen_folder
    edited = _copy(folder, tmp_path, edit_processor=lambda c: c.update(patch_size=8))
    with pytest.raises(ConfigError, match=r"processor_config\.json: patch_size 8 does not match config\.json's "
                                          r"vision_config \(4\)"):
        vlmkit.load(edited)


def test_missing_tokenizer_is_refused_by_name(qwen_folder, tmp_path):
    folder, _, _ = qwen_folder
    edited = _copy(folder, tmp_path)
    (edited / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"edited has no tokenizer\.json"):
        vlmkit.load(edited)


def test_video_placeholders_are_refused(qwen_folder):
    folder, _, _ = qwen_folder
    pipe = vlmkit.load(folder)
    with pytest.raises(DataError, match=r"'<\|video_pad\|>' is a placeholder of an input kind vlmkit does not"):
        pipe.score([], "<|vision_start|><|video_pad|><|vision_end|>What happens?", " nothing")


def test_the_model_needs_image_grids(qwen_folder):
    folder, _, _ = qwen_folder
    pipe = vlmkit.load(folder)
    inputs = pipe.processor.prepare_images(images_for(("wide",)))
    with pytest.raises(ValueError, match="not from a bare pixel tensor"):  # the patches without their grid
        pipe.model.encode_media(MediaInputs(inputs.pixel_values, inputs.tokens))


def test_mrope_with_the_same_id_on_all_axes_is_plain_rope():
    """The additive M-RoPE option: [3, B, T] ids that agree on all axes (text) rotate as [B, T] ids do."""
    pos = torch.tensor([[0, 1, 2, 7], [0, 0, 3, 4]])
    plain = RotaryEmbedding(16, 50000.0)(pos)
    mrope = RotaryEmbedding(16, 50000.0, (3, 2, 3))
    for ours, theirs in zip(mrope(pos[None].expand(3, -1, -1)), plain):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"need a RotaryEmbedding with mrope_section"):
        RotaryEmbedding(16)(pos[None].expand(3, -1, -1))


def test_training_loss_runs_through_the_mrope_model(qwen_folder):
    folder, _, _ = qwen_folder
    pipe = vlmkit.load(folder)
    prompt, names = CASES[0]
    inputs = pipe.processor.prepare_images(images_for(names))
    ids = torch.tensor([pipe.processor.prompt(prompt + " Two squares.", inputs).ids])
    labels = ids.masked_fill(ids == pipe.model.image_token_id, -100)
    out = forward(pipe.model, ids, inputs, labels=labels)
    out.loss.backward()
    assert out.n_tokens == int((labels[:, 1:] != -100).sum()) and pipe.model.encoder.patch_embed.weight.grad is not None
