"""IDEFICS end to end from a Hugging Face folder: ``vlmkit.load(folder)`` gives the same input_ids, pixels and
image_attention_mask as transformers' IdeficsProcessor (BOS as text, <fake_token_around_image> markers, spaces
stripped around images), the same logits, loss and greedy tokens as IdeficsForVisionText2Text (perceiver
resampler, gated cross-attention every 2 layers with qk norms and vector gates, decoupled embeddings), on prompts
with one image, text before the first image (tokens that see no image), and two images interleaved with text,
in batches with left padding too; the score() contract, ``vlmkit convert --from hf``, and named refusals.

IdeficsProcessor takes a prompt as a list of texts and images; vlmkit's prompt is the same list written as one
string with an ``<image>`` placeholder per image (:func:`as_idefics`)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import vlmkit
from vlmkit.errors import CheckpointError, ConfigError

from helpers import fixed_media, forward
from hf_fixtures import real_images

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["<image>What colour is the small circle?",
           "User: what is in the picture? <image> Answer:",  # the tokens before the image see none
           "Compare <image> and <image>: how many squares?",  # two images, text between them
           "<image><image>Describe both."]  # consecutive images share a marker


def as_idefics(prompt: str, images: list) -> list:
    """IdeficsProcessor's list for a vlmkit prompt: its non-empty pieces with the images between them (in front
    when it has no placeholder)."""
    if "<image>" not in prompt:
        return list(images) + [prompt]
    items = []
    for i, piece in enumerate(prompt.split("<image>")):
        if i > 0:
            items.append(images[i - 1])
        if piece:
            items.append(piece)
    return items


def images_for(prompt: str) -> list:
    return real_images()[:max(1, prompt.count("<image>"))]


def reference_logprobs(model, processor, images, prompt, continuation):
    """transformers' per-token log-probabilities of the continuation, the lmms-eval way (the tokens of prompt +
    continuation after those of the prompt alone), and its inputs."""
    n = processor(text=as_idefics(prompt, images), return_tensors="pt")["input_ids"].shape[1]
    full = processor(text=as_idefics(prompt + continuation, images), return_tensors="pt")
    with torch.no_grad():
        logits = model(**full).logits[0]
    logp = torch.log_softmax(logits[n - 1:-1].float(), -1)
    return logp.gather(-1, full["input_ids"][0, n:, None]).squeeze(-1), full, n


@pytest.mark.parametrize("prompt", PROMPTS)
def test_inputs_media_mask_and_logits_equal_transformers(idefics_folder, prompt):
    folder, ref, hf_proc = idefics_folder
    pipe = vlmkit.load(folder)
    images = images_for(prompt)
    theirs = hf_proc(text=as_idefics(prompt, images), return_tensors="pt")
    inputs = pipe.processor.prepare_images(images)
    ids = pipe.processor.prompt(prompt, inputs).ids
    assert ids == theirs["input_ids"][0].tolist()
    torch.testing.assert_close(inputs.pixel_values, theirs["pixel_values"][0], rtol=0, atol=1e-5)
    ids = torch.tensor([ids])
    assert pipe.model.media_mask(ids).tolist() == theirs["image_attention_mask"].bool().tolist()
    with torch.no_grad():
        ours = forward(pipe.model, ids, inputs).logits
        ref_logits = ref(**theirs).logits
        others = forward(pipe.model, ids, pipe.processor.prepare_images(real_images()[2:] * len(images))).logits
    torch.testing.assert_close(ours, ref_logits, rtol=0, atol=1e-4)
    # the media mask is what makes them equal: other images change every token from the first image on, and
    # none before it
    first = int((ids[0] == pipe.model.image_token_id).nonzero()[0])
    torch.testing.assert_close(others[:, :first], ours[:, :first], rtol=0, atol=1e-6)
    assert (others[:, first:] - ours[:, first:]).abs().amax(-1).min() > 1e-3


def test_image_attention_mask_of_the_processor_gives_the_same_logits(idefics_folder):
    """Batch(extras={"image_attention_mask": ...}) takes IdeficsProcessor's mask as it is; here it is the one vlmkit
    computes, and a different one (every token sees the first image) changes the logits."""
    folder, _, hf_proc = idefics_folder
    pipe = vlmkit.load(folder)
    images = images_for(PROMPTS[2])
    theirs = hf_proc(text=as_idefics(PROMPTS[2], images), return_tensors="pt")
    inputs = pipe.processor.prepare_images(images)
    with torch.no_grad():
        ours = forward(pipe.model, theirs["input_ids"], inputs).logits
        given = forward(pipe.model, theirs["input_ids"], inputs,
                        extras={"image_attention_mask": theirs["image_attention_mask"]}).logits
        first_only = torch.zeros_like(theirs["image_attention_mask"])
        first_only[..., 0] = 1
        other = forward(pipe.model, theirs["input_ids"], inputs, extras={"image_attention_mask": first_only}).logits
    torch.testing.assert_close(given, ours, rtol=0, atol=0)
    assert (other - ours).abs().max() > 1e-3


def test_media_mask_follows_idefics_rule_on_hand_made_sequences():
    """IdeficsProcessor's own mask function on sequences with several images and EOS tokens (after an EOS a token
    sees no image until the next one), against vlmkit's from the placeholders; and the packed case, where a
    token sees only images its self-attention sees (its own sample's)."""
    from transformers.models.idefics.processing_idefics import (image_attention_mask_for_packed_input_ids_pt,
                                                                incremental_to_binary_attention_mask)

    from vlmkit.models.flamingo import image_visibility
    from vlmkit.nn import document_mask

    IMG, EOS = 7, 2

    class Tok:
        eos_token_id = EOS

        def convert_tokens_to_ids(self, token):
            return IMG

    ids = torch.tensor([[5, 7, 5, 5, 2, 5, 7, 5, 2, 5],
                        [7, 7, 5, 2, 2, 5, 5, 5, 5, 7],
                        [5, 5, 5, 5, 5, 5, 5, 5, 7, 5]])
    incremental, _ = image_attention_mask_for_packed_input_ids_pt(ids.clone(), Tok())
    theirs = incremental_to_binary_attention_mask(incremental, "pt", num_classes=3).bool()
    ours = image_visibility(ids, IMG, only_last=True, reset_token_id=EOS)
    assert ours.tolist() == theirs.tolist()
    assert not ours[0, 5].any() and image_visibility(ids, IMG)[0, 5, 0]  # without the EOS rule it sees
    every = image_visibility(ids, IMG, only_last=False)
    assert every[1, 5].tolist() == [True, True, False] and every[0, 9].tolist() == [True, True, False]
    # packed: two samples in row 0, each with its own image; the second's tokens never see the first's
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]])
    row = torch.tensor([[5, 7, 5, 5, 5, 5, 5, 7, 5, 5]])
    packed = image_visibility(row, IMG, visible=document_mask(docs)[:, 0])
    assert packed[0, :, 0].tolist() == [False, True, True, True] + [False] * 6
    assert packed[0, :, 1].tolist() == [False] * 7 + [True] * 3


def test_loss_with_labels_equals_transformers(idefics_folder):
    """The loss over transformers' logits (its own ``loss`` reshapes the logits to config.vocab_size columns,
    which is wrong with additional_vocab_size > 0: the head has vocab_size + additional_vocab_size outputs)."""
    folder, ref, hf_proc = idefics_folder
    pipe = vlmkit.load(folder)
    images = images_for(PROMPTS[2])
    inputs = hf_proc(text=as_idefics(PROMPTS[2] + " Two squares.", images), return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[:, :6] = -100
    with torch.no_grad():
        logits = ref(**inputs).logits
        theirs = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
        ours = forward(pipe.model, inputs["input_ids"], pipe.processor.prepare_images(images), labels=labels)
    assert ours.n_tokens == int((labels[0, 1:] != -100).sum())
    torch.testing.assert_close(ours.loss, theirs, rtol=0, atol=1e-5)


def test_a_decoding_step_without_its_prefill_state_is_refused(idefics_folder):
    """A cache that lost the prefill's image states (cache.extra) would silently drop the images: refused."""
    pipe = vlmkit.load(idefics_folder[0])
    cache = pipe.model.new_cache(1, 16)
    cache.advance(3)
    with pytest.raises(ValueError, match=r"the KV cache carries no image states of its prefill"):
        forward(pipe.model, torch.tensor([[5]]), cache=cache)


def test_conversation_is_laid_out_as_the_processor_lays_out_its_text(idefics_folder):
    """Training tokenises a conversation as IdeficsProcessor tokenises the rendered text (BOS, markers), and
    supervises the replies only."""
    folder, _, hf_proc = idefics_folder
    pipe = vlmkit.load(folder)
    conversation = [{"from": "human", "value": "<image>\nWhat colour is the small circle?"},
                    {"from": "gpt", "value": "It is red."}]
    images = real_images()[:1]
    enc = pipe.processor.supervised(conversation, pipe.processor.prepare_images(images))
    ids, labels = enc.ids, enc.labels
    rendered = "".join(s.text for s in pipe.processor.layout.template.render(
        [{"role": "user", "content": "<image>\nWhat colour is the small circle?"},
         {"role": "assistant", "content": "It is red."}]))
    assert ids == hf_proc(text=as_idefics(rendered, images), return_tensors="pt")["input_ids"][0].tolist()
    supervised = pipe.processor.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert "It is red." in supervised and "colour" not in supervised


def test_a_from_scratch_flamingo_with_a_cnn_tower_is_its_lm_until_the_gates_open(tokenizer):
    """build_model(family flamingo, vision.arch cnn): the gates start at zero, so the logits are the bare LM's, and
    the gates get gradients; open gates make the images matter for the tokens from the image on."""
    from vlmkit.config import LanguageConfig, VisionConfig
    from vlmkit.models import build_model
    from vlmkit.models.flamingo import CrossAttentionConfig, FlamingoConfig, PerceiverConfig

    torch.manual_seed(0)
    cfg = FlamingoConfig(family="flamingo",
                         vision=VisionConfig(arch="cnn", image_size=(16, 16), patch_size=4, width=16),
                         lm=LanguageConfig(vocab_size=tokenizer.vocab_size, width=32, depth=2, heads=4, kv_heads=2,
                                           mlp_dim=64, max_seq_len=64),
                         xattn=CrossAttentionConfig(every=1, perceiver=PerceiverConfig(depth=1, heads=2, head_dim=8,
                                                                                       n_latents=4)))
    image = tokenizer.token_id("<image>")
    model = build_model(cfg, image).eval()
    ids = torch.tensor([[5, image, 6, 7, 8]])
    pixels = fixed_media(torch.randn(1, 3, 16, 16), 1)
    with torch.no_grad():
        bare = model.lm.lm_head(model.lm.lm(model.lm.embed_tokens(ids)))
        torch.testing.assert_close(forward(model, ids, pixels).logits, bare, rtol=0, atol=0)
    loss = forward(model, ids, pixels, labels=ids).loss
    loss.backward()
    gates = [p for n, p in model.named_parameters() if "alpha" in n]
    assert len(gates) == 4 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)
    with torch.no_grad():
        for p in gates:
            p.fill_(1.0)
        a, b = forward(model, ids, pixels).logits, forward(model, ids, fixed_media(torch.randn(1, 3, 16, 16), 1)).logits
    assert (a - b)[:, 1:].abs().max() > 1e-4 and torch.equal(a[:, 0], b[:, 0])


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def _drop_added_token(data, token):
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != token]


@pytest.mark.parametrize("file, edit, error, message", [
    ("config.json", lambda c: c.update(cross_layer_interval=3), ConfigError,
     r"config\.json: cross_layer_interval 3 must divide num_hidden_layers 4"),
    ("config.json", lambda c: c.update(alpha_type="matrix"), ConfigError, r"config\.json: alpha_type 'matrix'"),
    ("config.json", lambda c: c.update(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
     ConfigError, r"config\.json \(the LLaMA LM\): rope_type 'linear' \(RoPE scaling\) is not implemented"),
    ("config.json", lambda c: c.update(hidden_act="relu"), ConfigError, r"hidden_act 'relu' is not implemented"),
    ("config.json", lambda c: c["vision_config"].update(hidden_act="relu"), ConfigError,
     r"config\.json \(vision_config\): hidden_act 'relu' is not implemented"),
    ("config.json", lambda c: c.update(additional_vocab_size=0), ConfigError,
     r"config\.json: vocab_size \+ additional_vocab_size = 200 rows, but the tokenizer has 202 tokens"),
    ("config.json", lambda c: c.update(intermediate_size=64), CheckpointError,
     r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight has shape"),
    ("config.json", lambda c: c.update(qk_layer_norms=False), CheckpointError,
     r"unexpected \['model\.gated_cross_attn_layers\.0\.cross_attn\.k_layer_norm\.weight'"),
    ("config.json", lambda c: c["perceiver_config"].update(resampler_n_latents=4), CheckpointError,
     r"model\.perceiver_resampler\.latents has shape \(3, 32\), the config implies \(4, 32\)"),
    ("processor_config.json", lambda c: c["image_processor"].update(size={"height": 28, "width": 28}), ConfigError,
     r"processor_config\.json: images of \(28, 28\) pixels, but the tower of config\.json takes \(30, 30\)"),
    ("tokenizer_config.json", lambda c: c.pop("bos_token"), CheckpointError, r"IDEFICS' prompts need a bos_token"),
    ("tokenizer.json", lambda c: _drop_added_token(c, "<image>"), CheckpointError,
     r"tokenizer\.json has no token '<image>'"),
])
def test_bad_folders_are_refused_by_name(idefics_folder, tmp_path, file, edit, error, message):
    folder = _copy(idefics_folder[0], tmp_path)
    _edit_json(folder / file, edit)
    with pytest.raises(error, match=message):
        vlmkit.load(folder)


def test_missing_tokenizer_is_refused_by_name(idefics_folder, tmp_path):
    folder = _copy(idefics_folder[0], tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no tokenizer\.json"):
        vlmkit.load(folder)


def test_config_defaults_are_transformers():
    """Keys missing from config.json are read as transformers' IdeficsConfig defaults."""
    from vlmkit.convert.hf.idefics import DEFAULTS, PERCEIVER_DEFAULTS, VISION_DEFAULTS

    cfg = transformers.IdeficsConfig()
    for defaults, ref in ((DEFAULTS, cfg), (VISION_DEFAULTS, cfg.vision_config), (PERCEIVER_DEFAULTS,
                                                                                  cfg.perceiver_config)):
        assert {k: getattr(ref, k) for k in defaults} == defaults


@pytest.mark.slow
def test_a_recipe_fine_tunes_the_imported_model(idefics_folder, tmp_path):
    """init_from an IDEFICS folder: the conversations are laid out as IdeficsProcessor's text, the loss goes down,
    and the checkpoint chats."""
    from vlmkit.data.shapes import generate_shapes
    from vlmkit.processing.idefics import IdeficsLayout
    from vlmkit.processing.image import ImageProcessor
    from vlmkit.train.loop import train
    from vlmkit.train.recipe import load_recipe

    generate_shapes(tmp_path / "shapes", n=24, seed=5, size=48, progress=False)
    recipe = load_recipe("tiny-llava", [
        f"data.path={tmp_path / 'shapes'}", f"init_from={idefics_folder[0]}", "data.group_turns=0",
        "data.val_samples=8", "train.batch_size=8", "train.log_every=1", "train.eval_every=1000",
        "train.precompute_frozen_vision=false",
        "stages=[{name: instruct, train: [connector, lm], steps: 20, lr: 3.0e-3}]"])
    res = train(recipe, tmp_path / "run", progress=False, log=lambda m: None)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    tuned = vlmkit.load(res.checkpoint)
    # the family decides the processor now (no image_processor name): IdeficsProcessor's layout, fixed-size images
    assert tuned.config.family == "flamingo" and tuned.processor.family.name == "flamingo"
    assert type(tuned.processor.layout) is IdeficsLayout and type(tuned.processor.images) is ImageProcessor
    assert isinstance(tuned.chat(tmp_path / "shapes" / "images" / "000000.png", "What shape is it?",
                                 max_new_tokens=4), str)
