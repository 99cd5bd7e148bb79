"""BLIP-2 end to end from a Hugging Face folder: ``vlmkit.load(folder)`` gives the same input_ids and pixels as
transformers' Blip2Processor (the query tokens before the prompt's BOS, no placeholder in the prompt), the same
logits, loss and greedy tokens as Blip2ForConditionalGeneration with an OPT LM (LayerNorms, ReLU MLP, biases,
learned positions offset by 2), in batches with left padding too, the score() contract, training ids that are
the processor's, ``vlmkit convert --from hf`` to a checkpoint that scores the same, and named refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import vlmkit
from vlmkit.cli import main
from vlmkit.data.conversations import ConversationDataset, Sample
from vlmkit.errors import CheckpointError, ConfigError, DataError
from vlmkit.generation import GenerationConfig, generate

from helpers import forward
from hf_fixtures import real_images, reference_logprobs

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["", "Question: what colour is the small circle? Answer:", "Describe the image."]


@pytest.fixture(scope="module")
def pipe(blip2_folder):
    return vlmkit.load(blip2_folder[0])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_input_ids_pixels_and_logits_equal_transformers(blip2_folder, pipe, prompt):
    _, ref, hf_proc = blip2_folder
    images = real_images()[:1]
    theirs = hf_proc(text=prompt, images=images, return_tensors="pt")
    inputs = pipe.processor.prepare_images(images)
    ids = pipe.processor.prompt(prompt, inputs).ids
    assert ids == theirs["input_ids"][0].tolist()
    assert ids[:7] == [ref.config.image_token_index] * 6 + [hf_proc.tokenizer.bos_token_id]  # queries, then BOS
    torch.testing.assert_close(inputs.pixel_values, theirs["pixel_values"], rtol=0, atol=1e-5)
    with torch.no_grad():
        ours = forward(pipe.model, ids, inputs).logits
        ref_logits = ref(**theirs).logits
        other = forward(pipe.model, ids, pipe.processor.prepare_images(real_images()[1:2])).logits
    torch.testing.assert_close(ours, ref_logits, rtol=0, atol=1e-4)
    assert (other - ref_logits).abs().max() > 1e-3  # the image is read


@pytest.mark.parametrize("prompt, continuation", [
    (PROMPTS[1], " red"), (PROMPTS[2], " A blue triangle left of a green star."), (PROMPTS[0], "a picture")])
def test_score_equals_transformers_logprobs(blip2_folder, pipe, prompt, continuation):
    _, ref, hf_proc = blip2_folder
    images = real_images()[2:3]
    theirs = reference_logprobs(ref, hf_proc, images, prompt, continuation)
    ours = pipe.score(images, prompt, continuation)
    assert len(ours) == len(theirs) > 0
    torch.testing.assert_close(torch.tensor(ours), theirs, rtol=0, atol=1e-4)


def test_loss_with_labels_equals_transformers(blip2_folder, pipe):
    _, ref, hf_proc = blip2_folder
    images = real_images()[:1]
    inputs = hf_proc(text=PROMPTS[1] + " red", images=images, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[:, :-2] = -100
    with torch.no_grad():
        theirs = ref(**inputs, labels=labels).loss
        ours = forward(pipe.model, inputs["input_ids"], pipe.processor.prepare_images(images), labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_greedy_generation_equals_transformers(blip2_folder, pipe):
    _, ref, hf_proc = blip2_folder
    for prompt, image in zip(PROMPTS, real_images()):
        inputs = hf_proc(text=prompt, images=[image], return_tensors="pt")
        out = ref.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                           suppress_tokens=[ref.config.image_token_index])  # vlmkit never generates it
        new = out[0, inputs["input_ids"].shape[1]:]
        assert len(new) == 8 and len(set(new.tolist())) > 2  # eight tokens, not one repeated
        assert pipe.generate(image, prompt, max_new_tokens=8) == hf_proc.tokenizer.decode(new, skip_special_tokens=True)


def test_batched_left_padded_generation_equals_transformers(blip2_folder, pipe, monkeypatch):
    """transformers pads between the query tokens and the prompt ([images, pads, BOS, text]), vlmkit in front of
    the row: the same real tokens at the same positions."""
    _, ref, hf_proc = blip2_folder
    prompts, images = PROMPTS[1:], real_images()[:2]
    monkeypatch.setattr(hf_proc.tokenizer, "padding_side", "left")  # the processor is shared: undone after
    inputs = hf_proc(text=prompts, images=images, padding="longest", return_tensors="pt")
    assert (inputs["attention_mask"] == 0).any()  # the batch is padded
    out = ref.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                           suppress_tokens=[ref.config.image_token_index])  # vlmkit never generates it
    expected = hf_proc.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert pipe.chat_batch([(im, p) for im, p in zip(images, prompts)], max_new_tokens=8) == expected
    assert [pipe.generate(im, p, max_new_tokens=8) for im, p in zip(images, prompts)] == expected


def test_generation_without_cache_equals_cached(pipe):
    proc, tok = pipe.processor, pipe.processor.tokenizer
    items = [(proc.prepare_images([im]), p) for im, p in zip(real_images(), PROMPTS)]
    prompts = [proc.encode_prompt(p, inputs) for inputs, p in items]
    pixels = type(items[0][0]).cat([inputs for inputs, _ in items])
    gen = GenerationConfig(max_new_tokens=8)
    cached = generate(pipe.model, prompts, pixels, tok.eos_id, tok.pad_id, gen)
    uncached = generate(pipe.model, prompts, pixels, tok.eos_id, tok.pad_id, gen, use_cache=False)
    assert cached == uncached and all(len(c) > 0 for c in cached)


def test_chat_lays_the_question_out_as_the_processor(blip2_folder, pipe):
    """No chat template: the question is the prompt, after the images; a placeholder in it (as LLaVA-format
    questions and the server write) is dropped, the images go first anyway. A raw prompt with one is refused."""
    _, _, hf_proc = blip2_folder
    images = real_images()[:1]
    inputs = pipe.processor.prepare_images(images)
    theirs = hf_proc(text="What is it?", images=images)["input_ids"][0]
    assert pipe.processor.chat("<image>\nWhat is it?", inputs).ids == list(theirs)
    assert pipe.chat(images, "What is it?", max_new_tokens=4) == pipe.generate(images, "What is it?",
                                                                               max_new_tokens=4)
    with pytest.raises(DataError, match=r"writes each image's tokens before the prompt itself; the prompt must not "
                                        r"contain '<image>'"):
        pipe.generate(images, "<image>What is it?")


def test_training_sample_is_the_processors_prompt_and_continuation(blip2_folder, pipe, tmp_path):
    """A question and its answer train as the prompt and its continuation (" " + answer + EOS), with the ids
    transformers' processor gives that text and the loss transformers computes on those labels."""
    _, ref, hf_proc = blip2_folder
    path = tmp_path / "im.png"
    real_images()[0].save(path)
    sample = Sample(id="0", images=[path], conversations=[
        {"from": "human", "value": "<image>\nWhat colour is the small circle?"}, {"from": "gpt", "value": "Red."}])
    item = ConversationDataset([sample], pipe.processor)[0]
    theirs = hf_proc(text="What colour is the small circle? Red.</s>", images=[real_images()[0]],
                     return_tensors="pt")
    assert item.input_ids.tolist() == theirs["input_ids"][0].tolist()
    n_prompt = len(hf_proc(text="What colour is the small circle?", images=[real_images()[0]])["input_ids"][0])
    labels = theirs["input_ids"].clone()
    labels[:, :n_prompt] = -100
    assert item.labels.tolist() == labels[0].tolist()
    assert item.labels[-1] == hf_proc.tokenizer.eos_token_id
    with torch.no_grad():
        ours = forward(pipe.model, item.input_ids[None], item.media, labels=item.labels[None]).loss
        torch.testing.assert_close(ours, ref(**theirs, labels=labels).loss, rtol=0, atol=1e-5)


def test_convert_from_hf_writes_a_checkpoint_that_scores_the_same(blip2_folder, pipe, tmp_path):
    folder, _, _ = blip2_folder
    out = tmp_path / "converted"
    assert main(["convert", "--from", "hf", str(folder), "--out", str(out)]) == 0
    images = real_images()[:1]
    converted = vlmkit.load(out)
    assert converted.meta.get("format") == "vlmkit"
    assert converted.config.family == "blip2" and converted.processor.cfg.image_processor == "blip2"
    assert converted.config.lm.pos_embed == "learned"
    assert converted.score(images, PROMPTS[1], " red") == pytest.approx(pipe.score(images, PROMPTS[1], " red"),
                                                                       abs=1e-6)
    assert converted.generate(images, PROMPTS[1], max_new_tokens=8) == pipe.generate(images, PROMPTS[1],
                                                                                     max_new_tokens=8)


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


@pytest.mark.parametrize("file, edit, error, message", [
    ("config.json", lambda c: c["text_config"].update(model_type="t5"), ConfigError,
     r"config\.json: text_config\.model_type 't5': encoder-decoder LMs \(BLIP-2 and InstructBLIP with Flan-T5\) "
     r"are not implemented"),
    ("config.json", lambda c: c["qformer_config"].update(use_qformer_text_input=True), ConfigError,
     r"config\.json: qformer_config\.use_qformer_text_input .* is not supported"),
    ("config.json", lambda c: c["text_config"].update(word_embed_proj_dim=32), ConfigError,
     r"config\.json \(text_config\): word_embed_proj_dim 32 != hidden_size 48"),
    ("config.json", lambda c: c["vision_config"].update(qkv_bias=False), ConfigError,
     r"config\.json: vision_config\.qkv_bias: false is not implemented"),
    ("config.json", lambda c: c["vision_config"].update(model_type="clip_vision_model"), ConfigError,
     r"config\.json: vision_config\.model_type 'clip_vision_model'; supported: blip_2_vision_model"),
    ("config.json", lambda c: c.pop("image_token_index"), ConfigError, r"missing key 'image_token_index'"),
    ("config.json", lambda c: c["text_config"].update(ffn_dim=64), CheckpointError,
     r"language_model\.model\.decoder\.layers\.0\.fc[12]\.weight has shape"),
    ("config.json", lambda c: c["vision_config"].update(hidden_size=40, num_attention_heads=4), CheckpointError,
     r"vision_model\.(embeddings|encoder|post_layernorm)\S* has shape"),
    ("processor_config.json", lambda c: c.update(num_query_tokens=5), ConfigError,
     r"processor_config\.json: num_query_tokens 5 does not match config\.json's num_query_tokens 6"),
    ("processor_config.json", lambda c: c.pop("num_query_tokens"), ConfigError,
     r"processor_config\.json: no num_query_tokens: Blip2Processor then writes no image tokens"),
])
def test_bad_folders_are_refused_by_name(blip2_folder, tmp_path, file, edit, error, message):
    folder = _copy(blip2_folder[0], tmp_path)
    _edit_json(folder / file, edit)
    with pytest.raises(error, match=message):
        vlmkit.load(folder)
