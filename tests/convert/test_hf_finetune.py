"""Fine-tuning imported families: a conversation is tokenised as the family's own processor tokenises its text
(the folder's chat template rendered as transformers renders it), only the assistant replies are supervised,
and vlmkit's loss equals transformers' on the same ids and labels; a recipe with ``init_from`` fine-tunes a
Hugging Face folder, its loss goes down, and the result exports back to transformers."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import vlmkit
from vlmkit.cli import main
from vlmkit.data.shapes import generate_shapes
from vlmkit.errors import ConfigError, DataError
from vlmkit.processing import IGNORE
from vlmkit.processing.chat import JinjaTemplate, normalize_messages
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe

from helpers import forward
from hf_fixtures import real_images

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

FOLDERS = {"llava": "llava_folder", "llava_next": "next_folder", "llava_onevision": "ov_folder",
           "qwen2_vl": "qwen_folder", "idefics3": "idefics3", "qwen2_5_vl": "qwen25_folder", "idefics2": "idefics2", "internvl": "internvl_folder",
           "mistral3": "mistral3_folder", "gemma3": "gemma3_folder"}
CONVERSATION = [{"from": "human", "value": "<image>\nWhat colour is the small circle?"},
                {"from": "gpt", "value": "It is red."},
                {"from": "human", "value": "And how many squares?"}, {"from": "gpt", "value": "Two squares."}]


def structured(conversation):
    """The same conversation as transformers' processors take it (image parts, text parts)."""
    roles = {"human": "user", "gpt": "assistant"}
    out = []
    for turn in conversation:
        text = turn["value"].replace("<image>\n", "")
        parts = [{"type": "image"}] if "<image>" in turn["value"] else []
        out.append({"role": roles[turn["from"]], "content": parts + [{"type": "text", "text": text}]})
    return out


@pytest.mark.parametrize("family", sorted(FOLDERS))
def test_conversation_ids_labels_and_loss_equal_transformers(request, family):
    folder, ref, hf_proc = request.getfixturevalue(FOLDERS[family])
    pipe = vlmkit.load(folder)
    images = real_images()[:1]
    enc = pipe.processor.supervised(CONVERSATION, pipe.processor.prepare_images(images))
    ids, labels = enc.ids, enc.labels
    # the conversation renders as transformers renders it, and tokenises to its processor's ids
    template = pipe.processor.cfg.chat_template_jinja
    assert template, f"the {family} fixture folder has a chat template"
    text = hf_proc.apply_chat_template(structured(CONVERSATION), tokenize=False)
    tok = pipe.processor.tokenizer
    ours = JinjaTemplate(template, pipe.processor.cfg.image_token, tok.bos_token, tok.eos_token)
    assert ours.render(normalize_messages(CONVERSATION, "test")) == text
    bos = tok.bos_token
    theirs = hf_proc(text=text, images=images, return_tensors="pt", add_special_tokens=not (bos and
                                                                                          text.startswith(bos)))
    assert theirs["input_ids"][0].tolist() == ids
    # only the replies are supervised: each reply's tokens, with the template's end-of-turn markup after it
    supervised = tok.decode([t for t in labels if t != IGNORE], skip_special_tokens=False)
    assert "It is red." in supervised and "Two squares." in supervised
    assert "colour" not in supervised and "many" not in supervised
    # the loss on those labels equals transformers'
    y = torch.tensor([labels])
    with torch.no_grad():
        ours = forward(pipe.model, ids, enc.media, labels=y).loss
        expected = ref(**theirs, labels=y).loss
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_paligemma_trains_on_its_prompt_and_suffix(paligemma_folder):
    """PaliGemma's conversation is its processor's prompt and suffix: the same ids, labels and loss."""
    folder, ref, hf_proc = paligemma_folder
    pipe = vlmkit.load(folder)
    images = real_images()[:1]
    conversation = [{"from": "human", "value": "<image>\ncaption en"}, {"from": "gpt", "value": "a red circle"}]
    enc = pipe.processor.supervised(conversation, pipe.processor.prepare_images(images))
    ids, labels = enc.ids, enc.labels
    theirs = hf_proc(text="<image>caption en", images=images, suffix="a red circle", return_tensors="pt")
    assert ids == theirs["input_ids"][0].tolist() and labels == theirs["labels"][0].tolist()
    # the prompt (attended both ways) is transformers' token_type_ids == 0; the batch says it (prompt_mask)
    prompt_mask = torch.arange(len(ids))[None] < enc.prompt_len
    assert prompt_mask.tolist() == (theirs["token_type_ids"] == 0).tolist()
    with torch.no_grad():
        ours = forward(pipe.model, ids, enc.media, labels=torch.tensor([labels]), prompt_mask=prompt_mask).loss
        torch.testing.assert_close(ours, ref(**theirs).loss, rtol=0, atol=1e-5)
    with pytest.raises(DataError, match=r"trains on one question and its answer"):
        pipe.processor.supervised(CONVERSATION, pipe.processor.prepare_images(images))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    data = tmp_path_factory.mktemp("finetune") / "shapes"
    generate_shapes(data, n=24, seed=5, size=48, progress=False)
    return data


def fine_tune(folder, data, out, steps: int = 20) -> tuple[list[float], object]:
    recipe = load_recipe("tiny-llava", [
        f"data.path={data}", f"init_from={folder}", "data.group_turns=0", "data.val_samples=8",
        "train.batch_size=8", "train.log_every=1", "train.eval_every=1000", "train.precompute_frozen_vision=false",
        f"stages=[{{name: instruct, train: [connector, lm], steps: {steps}, lr: 3.0e-3}}]"])
    res = train(recipe, out, progress=False, log=lambda m: None)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], res


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FOLDERS) + ["paligemma", "paligemma2"])
def test_a_recipe_fine_tunes_each_imported_family(request, family, shapes, tmp_path):
    folder = request.getfixturevalue(FOLDERS.get(family, f"{family}_folder"))[0]
    losses, res = fine_tune(folder, shapes, tmp_path / "run")
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    tuned = vlmkit.load(res.checkpoint)
    assert tuned.processor.cfg.text_mode == "whole" and tuned.model.training is False
    assert isinstance(tuned.chat(shapes / "images" / "000000.png", "What shape is it?", max_new_tokens=4), str)


@pytest.mark.slow
def test_a_fine_tuned_llava_exports_back_to_transformers(llava_folder, shapes, tmp_path):
    _, res = fine_tune(llava_folder[0], shapes, tmp_path / "run", steps=3)
    assert main(["convert", "--to", "hf", str(res.checkpoint), "--out", str(tmp_path / "hf")]) == 0
    tuned = vlmkit.load(res.checkpoint)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    proc = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    image = shapes / "images" / "000000.png"
    theirs = proc(text="USER: <image>\nWhat shape is it? ASSISTANT:", images=[Image.open(image)],
                  return_tensors="pt")
    inputs = tuned.processor.prepare_images([image])
    with torch.no_grad():
        torch.testing.assert_close(hf(**theirs).logits, forward(tuned.model, theirs["input_ids"], inputs).logits,
                                   rtol=0, atol=1e-4)


# the refusal names the family (its Capabilities.shared_prefix), no longer why it attends its own way (M-RoPE
# positions, prefix-LM attention)
@pytest.mark.parametrize("fixture, match", [("qwen_folder", "qwen2_vl"), ("paligemma_folder", "paligemma"),
                                            ("qwen25_folder", "qwen2_5_vl")])
def test_grouped_questions_are_refused_where_the_family_attends_its_own_way(request, fixture, match, shapes,
                                                                           tmp_path):
    recipe = load_recipe("tiny-llava", [f"data.path={shapes}", f"init_from={request.getfixturevalue(fixture)[0]}",
                                        "data.group_turns=4", "train.precompute_frozen_vision=false",
                                        "stages=[{name: instruct, train: [connector, lm], steps: 1}]"])
    with pytest.raises(ConfigError, match=rf"data.group_turns 4: grouped questions share one prompt prefix at plain "
                                          rf"positions .*the {match} family reads each question its own way"):
        train(recipe, tmp_path / "run", progress=False, log=lambda m: None)


def test_init_from_refuses_model_overrides(llava_folder):
    with pytest.raises(ConfigError, match=r"model overrides \['lm.depth'\] with init_from .*: the weights fix the "
                                          r"architecture"):
        load_recipe("tiny-llava", [f"init_from={llava_folder[0]}", "model.lm.depth=4"])


def test_replies_are_found_by_generation_marks_or_by_prefix_and_otherwise_refused():
    def template(mark: bool, stable: bool) -> str:
        reply = "{{ '\\n' + message['content'] }}"
        if mark:
            reply = "{% generation %}" + reply + "{% endgeneration %}"
        head = "{{ '<|im_start|>' + message['role'] + (' ' if message['role'] == 'assistant' and not STABLE else '') }}"
        return ("{% for message in messages %}" + head.replace("STABLE", str(stable)) +
                "{% if message['role'] == 'assistant' %}" + reply + "{% else %}{{ '\\n' + message['content'] }}"
                "{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>"
                "assistant\\n' }}{% endif %}").replace("message['content']", "message['content'][0]['text']")

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]
    for mark, stable, replies in ((True, False, ["\nhello", "\nbye"]),
                                  (False, True, ["hello<|im_end|>\n", "bye<|im_end|>\n"])):
        text, spans = JinjaTemplate(template(mark, stable), "<image>", None, "</s>").render_with_spans(messages, "t")
        assert [text[a:b] for a, b in spans] == replies
    with pytest.raises(DataError, match=r"t: the chat template renders earlier turns differently once turn 1 is "
                                        r"added"):
        JinjaTemplate(template(False, False), "<image>", None, "</s>").render_with_spans(messages, "t")
    # Phi-3's: EOS after a conversation's last turn (no generation prompt), so the conversation up to the first
    # reply ends in an EOS the whole one has only at its end: the first reply stops before it, the last has it
    phi3 = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'][0]['text'] + "
            "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}"
            "{{ eos_token }}{% endif %}")
    text, spans = JinjaTemplate(phi3, "<image>", None, "</s>").render_with_spans(messages, "t")
    assert [text[a:b] for a, b in spans] == ["hello<|end|>\n", "bye<|end|>\n</s>"]
    # a template that writes an earlier reply differently once the conversation goes on is still refused
    rewritten = phi3.replace("message['content'][0]['text']",
                             "(message['content'][0]['text'] if loop.last or message['role'] != 'assistant' "
                             "else 'x')")
    with pytest.raises(DataError, match=r"turn 1 is added"):
        JinjaTemplate(rewritten, "<image>", None, "</s>").render_with_spans(messages, "t")
