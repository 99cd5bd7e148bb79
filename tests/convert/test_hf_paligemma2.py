"""PaliGemma 2 (PaliGemmaForConditionalGeneration on a Gemma 2 LM) from a Hugging Face folder: the same logits and
loss as transformers over a prompt and a suffix longer than the 6-token sliding window, with transformers' mask
order on the sliding layers (causal AND window, OR the prefix: the prompt sees all of itself, the suffix only the
window), the final-logit soft-capping PaliGemmaForConditionalGeneration applies, and named refusals. The
conformance table (tests/families/cases.py, row paligemma2) checks score, generation, BOS prompts and export."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

import vlmkit
from vlmkit.batch import Batch
from vlmkit.convert.hf.paligemma import paligemma_config_to_hf
from vlmkit.errors import ConfigError

from helpers import forward
from hf_fixtures import real_images

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["caption en", "<image>answer en What colour is the small circle?",
           "<image><image>Compare: how many squares?"]
SUFFIX = " It is a red circle next to a blue square."  # well past the window


def _inputs(folder, prompt):
    images = real_images()[:max(1, prompt.count("<image>"))]
    _, ref, hf_proc = folder
    pipe = vlmkit.load(folder[0])
    theirs = hf_proc(text=prompt, images=images, suffix=SUFFIX, return_tensors="pt")
    return pipe, ref, theirs, pipe.processor.prepare_images(images)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_and_loss_over_prompt_and_suffix_equal_transformers(paligemma2_folder, prompt):
    pipe, ref, theirs, media = _inputs(paligemma2_folder, prompt)
    ids, labels = theirs["input_ids"], theirs["labels"]
    prompt_mask = theirs["token_type_ids"] == 0
    assert int(prompt_mask.sum()) > 6 + 16 and int((~prompt_mask).sum()) > 6  # both outgrow the window
    enc = pipe.processor.continuation(prompt, SUFFIX, media)
    assert enc.ids == ids[0].tolist() and enc.prompt_len == int(prompt_mask.sum())
    with torch.no_grad():
        expected = ref(**theirs)
        ours = forward(pipe.model, ids, media, prompt_mask=prompt_mask).logits
        loss = forward(pipe.model, ids, media, labels=labels, prompt_mask=prompt_mask).loss
    torch.testing.assert_close(ours, expected.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(loss, expected.loss, rtol=0, atol=1e-5)
    assert float(expected.logits.abs().max()) <= 5.0  # final_logit_softcapping 5: PaliGemma applies it


def test_each_part_of_the_mask_is_needed(paligemma2_folder):
    """The checks above can fail: the prompt mask, the sliding window, and its order against the prefix (Gemma 3's
    order, the window applied after the image blocks, would cut the prompt's view of itself) each change logits."""
    pipe, ref, theirs, media = _inputs(paligemma2_folder, PROMPTS[1])
    ids, prompt_mask = theirs["input_ids"], theirs["token_type_ids"] == 0
    model = pipe.model
    with torch.no_grad():
        expected = ref(**theirs).logits

        def logits(**kw):
            return forward(model, ids, media, **kw).logits

        torch.testing.assert_close(logits(prompt_mask=prompt_mask), expected, rtol=0, atol=1e-4)
        gaps = {"causal": logits(prompt_mask=torch.zeros_like(prompt_mask))}
        own = model.attention

        def one_mask(batch, cache=None):  # one mask for every layer: the LM cuts the sliding layers' copy, prompt
            masks = own(batch, cache)     # pairs included
            return masks["full"] if isinstance(masks, dict) else masks

        try:
            model.attention = one_mask
            gaps["window after prefix"] = logits(prompt_mask=prompt_mask)
        finally:
            del model.attention
        kinds = [layer.kind for layer in model.lm.layers]
        try:
            for layer in model.lm.layers:
                layer.kind = "full"
            gaps["no window"] = logits(prompt_mask=prompt_mask)
        finally:
            for layer, kind in zip(model.lm.layers, kinds):
                layer.kind = kind
    for name, got in gaps.items():
        assert (got - expected).abs().max() > 1e-3, name
    prompt_len = int(prompt_mask.sum())  # the window cuts only the suffix's view
    torch.testing.assert_close(gaps["no window"][:, :prompt_len], expected[:, :prompt_len], rtol=0, atol=1e-4)


def test_sliding_mask_on_a_hand_made_case(paligemma2_folder):
    """10 tokens, the first 8 the prompt, a 6-token window: every prompt token sees the whole prompt; suffix token
    t sees keys t-5..t. The full layers' mask is the prefix-LM mask without the window."""
    model = vlmkit.load(paligemma2_folder[0]).model
    assert model.lm.cfg.sliding_window == 6
    masks = model.attention(Batch(torch.zeros(1, 10, dtype=torch.long),
                                  prompt_mask=torch.arange(10)[None] < 8))
    sliding, full = masks["sliding"][0, 0].int(), masks["full"][0, 0].int()
    assert sliding[:8, :8].all() and not sliding[:8, 8:].any()
    assert sliding[8].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 0]
    assert sliding[9].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert full[:8, :8].all() and full[9].all() and full[8].tolist() == [1] * 9 + [0]


def test_greedy_tokens_equal_transformers_generate(paligemma2_folder):
    pipe, ref, _, _ = _inputs(paligemma2_folder, PROMPTS[1])
    images = real_images()[:1]
    inputs = paligemma2_folder[2](text=PROMPTS[1], images=images, return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    ours = pipe.generate(images, PROMPTS[1], max_new_tokens=12)
    assert ours == paligemma2_folder[2].tokenizer.decode(out, skip_special_tokens=True)


def _copy_with(folder, tmp_path, edit):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    data = json.loads((dst / "config.json").read_text())
    edit(data)
    (dst / "config.json").write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["text_config"].update(model_type="gemma3_text"),
     (r"text_config\.model_type 'gemma3_text' is not implemented for PaliGemma; supported: gemma \(PaliGemma 1\), "
      r"gemma2 \(PaliGemma 2\)")),
    (lambda c: c["text_config"].update(sliding_window=None),
     r"text_config\.sliding_window null: PaliGemma 2 without sliding-window layers is not implemented"),
])
def test_unsupported_text_configs_are_refused_by_name(paligemma2_folder, tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        vlmkit.load(_copy_with(paligemma2_folder[0], tmp_path, edit))


def test_export_refuses_a_gemma3_lm(paligemma2_folder):
    cfg = vlmkit.load(paligemma2_folder[0]).config
    bad = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, qk_norm=True, qk_norm_kind="rmsnorm"))
    with pytest.raises(ConfigError, match=r"lm\.qk_norm: true: PaliGemma's LM is Gemma or Gemma 2"):
        paligemma_config_to_hf(bad, 5, 16)
