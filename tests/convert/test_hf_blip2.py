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
from vlmkit.data.conversations import ConversationDataset, Sample
from vlmkit.errors import CheckpointError, ConfigError, DataError

from helpers import forward
from hf_fixtures import real_images

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
