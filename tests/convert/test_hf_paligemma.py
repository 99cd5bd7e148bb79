"""PaliGemma end to end from a Hugging Face folder: ``vlmkit.load(folder)`` gives the same input_ids and pixels
as transformers' PaliGemmaProcessor (BOS after the images, "\\n" after the prompt), the same logits, loss and
greedy tokens as PaliGemmaForConditionalGeneration (prefix-LM attention: bidirectional over image + prompt,
causal over the suffix; 1-indexed positions), in batches with left padding too, the score() contract
(per-token log-probabilities of the processor's ``suffix``, its EOS included), ``vlmkit convert --from hf`` to a
checkpoint that scores the same, and named refusals (a Gemma 3 LM among them; PaliGemma 2's Gemma 2 is
tests/convert/test_hf_paligemma2.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import vlmkit
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.batch import Batch

from helpers import forward
from hf_fixtures import real_images

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["caption en", "<image>answer en What colour is the small circle?",
           "<image><image>Compare: how many squares?"]


def images_for(prompt):
    return real_images()[:max(1, prompt.count("<image>"))]  # without a placeholder: one image, put in front


def reference_logprobs(model, processor, images, prompt, continuation):
    """transformers' per-token log-probabilities of the processor's suffix (its labels: suffix + EOS)."""
    inputs = processor(text=prompt, images=images, suffix=continuation, return_tensors="pt")
    labels = inputs.pop("labels")[0]
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    keep = labels[1:] != -100
    logp = torch.log_softmax(logits[:-1][keep].float(), -1)
    return logp.gather(-1, labels[1:][keep, None]).squeeze(-1), inputs


@pytest.mark.parametrize("prompt", PROMPTS)
def test_input_ids_pixels_and_logits_equal_transformers(paligemma_folder, prompt):
    folder, ref, hf_proc = paligemma_folder
    pipe = vlmkit.load(folder)
    images = images_for(prompt)
    theirs = hf_proc(text=prompt, images=images, return_tensors="pt")
    theirs.pop("labels")
    inputs = pipe.processor.prepare_images(images)
    enc = pipe.processor.prompt(prompt, inputs)
    ids = enc.ids
    assert ids == theirs["input_ids"][0].tolist()
    assert ids[-1] == hf_proc.tokenizer.convert_tokens_to_ids("\n") or hf_proc.tokenizer.decode(ids[-1:]) == "\n"
    torch.testing.assert_close(inputs.pixel_values, theirs["pixel_values"], rtol=0, atol=1e-5)
    # the whole prompt is the prefix: transformers' token_type_ids == 0 everywhere
    assert enc.prompt_len == len(ids) == int((theirs["token_type_ids"][0] == 0).sum())
    prompt_mask = torch.arange(len(ids))[None] < enc.prompt_len
    with torch.no_grad():
        ours = forward(pipe.model, ids, inputs, prompt_mask=prompt_mask).logits
        causal = forward(pipe.model, ids, inputs, prompt_mask=torch.zeros_like(prompt_mask)).logits  # no prefix
        ref_logits = ref(**theirs).logits
    torch.testing.assert_close(ours, ref_logits, rtol=0, atol=1e-4)
    assert (causal - ref_logits).abs().max() > 1e-3  # the prefix-LM mask is what makes them equal


def test_loss_with_suffix_labels_equals_transformers(paligemma_folder):
    """The prompt (transformers' token_type_ids == 0) as the batch's prompt_mask, labels on the suffix: the same
    loss. The processor's supervised layout of that question and answer gives the same ids, labels and prompt."""
    folder, ref, hf_proc = paligemma_folder
    pipe = vlmkit.load(folder)
    images = images_for(PROMPTS[1])
    inputs = hf_proc(text=PROMPTS[1], images=images, suffix=" It is red.", return_tensors="pt")
    media = pipe.processor.prepare_images(images)
    enc = pipe.processor.supervised([{"role": "user", "content": PROMPTS[1]},
                                     {"role": "assistant", "content": " It is red."}], media)
    assert enc.ids == inputs["input_ids"][0].tolist() and enc.labels == inputs["labels"][0].tolist()
    assert enc.prompt_len == int((inputs["token_type_ids"][0] == 0).sum())
    prompt_mask = inputs["token_type_ids"] == 0
    with torch.no_grad():
        theirs = ref(**inputs).loss
        ours = forward(pipe.model, inputs["input_ids"], media, labels=inputs["labels"], prompt_mask=prompt_mask).loss
        causal = forward(pipe.model, inputs["input_ids"], media, labels=inputs["labels"]).loss
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert abs(float(causal - theirs)) > 1e-4  # the prompt mask is what makes them equal


def test_chat_uses_paligemmas_prompt_layout(paligemma_folder):
    """A folder without a chat template: chat() lays the question out as PaliGemmaProcessor does."""
    folder, _, hf_proc = paligemma_folder
    pipe = vlmkit.load(folder)
    images = images_for(PROMPTS[0])
    inputs = pipe.processor.prepare_images(images)
    theirs = hf_proc(text="What is it?", images=images)["input_ids"][0]
    assert pipe.processor.chat("What is it?", inputs).ids == list(theirs)
    assert pipe.chat(images, "What is it?", max_new_tokens=4) == pipe.generate(images, "What is it?", max_new_tokens=4)


def test_prefix_lm_mask_on_a_hand_made_case(paligemma_folder):
    """Row 0: 1 pad + 2 prompt tokens + 1 suffix token; row 1: 3 prompt tokens + 1 suffix token (the first 3
    positions are the prompt: prompt_mask = arange(T) < 3)."""
    from vlmkit.nn import causal_mask, with_prompt

    attn = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    prompt = torch.arange(4)[None].expand(2, 4) < 3
    mask = with_prompt(causal_mask(4, attn), prompt, attention_mask=attn)
    assert mask.int().squeeze(1).tolist() == [
        [[1, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 1]],  # no row sees the pad (its own row: unread)
        [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]]
    after_cache = causal_mask(1, torch.ones(1, 5), offset=4)  # a decoding step: causal
    assert after_cache.int().flatten().tolist() == [1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="the prompt is read at a prefill"):  # no prompt after a filled cache
        with_prompt(after_cache, torch.ones(1, 1, dtype=torch.bool))
    per_row = with_prompt(causal_mask(3), torch.arange(3)[None] < torch.tensor([[1], [3]]))
    assert per_row.int().squeeze(1).tolist() == [[[1, 0, 0], [1, 1, 0], [1, 1, 1]], [[1, 1, 1]] * 3]

    # PaliGemma's model at a decoding step (a filled cache) reads no prompt: the step's logits are the same with
    # and without a prompt_mask (with_prompt above would refuse the step's mask)
    model = vlmkit.load(paligemma_folder[0]).model
    ids = torch.tensor([[2, 10, 11, 12, 13]])

    def step(prompt_mask):
        cache = model.new_cache(1, 8)
        with torch.no_grad():
            model(Batch(ids[:, :4], prompt_mask=torch.ones(1, 4, dtype=torch.bool)), cache=cache)
            return model(Batch(ids[:, 4:], attention_mask=torch.ones(1, 5), prompt_mask=prompt_mask),
                         cache=cache).logits

    torch.testing.assert_close(step(torch.ones(1, 1, dtype=torch.bool)), step(None), rtol=0, atol=0)


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_a_gemma3_lm_is_refused_by_name(paligemma_folder, tmp_path):
    folder = _copy(paligemma_folder[0], tmp_path)
    _edit_json(folder / "config.json", lambda c: c["text_config"].update(model_type="gemma3_text"))
    with pytest.raises(ConfigError, match=r"config\.json: text_config\.model_type 'gemma3_text' is not implemented"):
        vlmkit.load(folder)


@pytest.mark.parametrize("file, edit, error, message", [
    ("config.json", lambda c: c["vision_config"].update(model_type="clip_vision_model"), ConfigError,
     r"config\.json: vision_config\.model_type 'clip_vision_model' is not implemented for PaliGemma"),
    ("config.json", lambda c: c["text_config"].update(final_logit_softcapping=30.0), ConfigError,
     r"config\.json: text_config\.final_logit_softcapping 30\.0"),
    ("config.json", lambda c: c.update(projection_dim=32), ConfigError,
     r"config\.json: projection_dim 32 must equal text_config\.hidden_size 48"),
    ("config.json", lambda c: c["text_config"].update(intermediate_size=64), CheckpointError,
     r"language_model\.model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight has shape"),
    ("config.json", lambda c: c["vision_config"].update(patch_size=14), CheckpointError,
     r"patch_embedding\.weight has shape"),
    ("processor_config.json", lambda c: c["image_processor"].update(image_seq_length=9), ConfigError,
     r"processor_config\.json: image_seq_length 9 does not match the model's 16 tokens per image"),
    ("tokenizer_config.json", lambda c: c.pop("bos_token"), CheckpointError, r"PaliGemma's prompts need a bos_token"),
])
def test_bad_folders_are_refused_by_name(paligemma_folder, tmp_path, file, edit, error, message):
    folder = _copy(paligemma_folder[0], tmp_path)
    _edit_json(folder / file, edit)
    with pytest.raises(error, match=message):
        vlmkit.load(folder)


def test_missing_tokenizer_is_refused_by_name(paligemma_folder, tmp_path):
    folder = _copy(paligemma_folder[0], tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no tokenizer\.json"):
        vlmkit.load(folder)
