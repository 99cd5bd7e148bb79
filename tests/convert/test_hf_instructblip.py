"""InstructBLIP end to end from a Hugging Face folder: ``vlmkit.load(folder)`` gives the same input_ids, pixels and
qformer_input_ids (the prompt through the Q-Former's own BERT WordPiece tokenizer) as transformers'
InstructBlipProcessor, the same logits, loss and greedy tokens as InstructBlipForConditionalGeneration with a
Llama (Vicuna) LM, in left-padded batches too; the score() contract with the Q-Former reading the prompt and
never the continuation; training samples whose instruction is their question; ``vlmkit convert --from hf``; and
named refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer

import vlmkit
from vlmkit.cli import main
from vlmkit.data.conversations import ConversationDataset, Sample, group_by_image
from vlmkit.errors import CheckpointError, ConfigError, DataError
from vlmkit.data.collate import collate, collate_packed

from helpers import forward
from hf_fixtures import real_images

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["What colour is the small circle?", "Describe the image.", "How many squares are there?"]


@pytest.fixture(scope="module")
def pipe(instructblip_folder):
    return vlmkit.load(instructblip_folder[0])


def ours_and_theirs_instruction(pipe, inputs, theirs):
    """vlmkit's qformer ids and mask cut to transformers' length (vlmkit pads every image's to one length)."""
    n = theirs["qformer_input_ids"].shape[1]
    ids, mask = inputs.extra["qformer_input_ids"], inputs.extra["qformer_attention_mask"]
    assert ids.shape == (len(inputs), pipe.processor.cfg.qformer_max_length) and not mask[:, n:].any()
    return (ids[:, :n], mask[:, :n]), (theirs["qformer_input_ids"], theirs["qformer_attention_mask"])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_input_ids_qformer_ids_pixels_and_logits_equal_transformers(instructblip_folder, pipe, prompt):
    _, ref, hf_proc = instructblip_folder
    images = real_images()[:1]
    theirs = hf_proc(text=prompt, images=images, return_tensors="pt")
    enc = pipe.processor.prompt(prompt, pipe.processor.prepare_images(images))
    ids, inputs = enc.ids, enc.media  # the images with the instruction the layout added
    assert ids == theirs["input_ids"][0].tolist()
    (ours_q, ours_m), (their_q, their_m) = ours_and_theirs_instruction(pipe, inputs, theirs)
    assert ours_q.tolist() == their_q.tolist() and ours_m.tolist() == their_m.tolist()
    torch.testing.assert_close(inputs.pixel_values, theirs["pixel_values"], rtol=0, atol=1e-5)
    with torch.no_grad():
        ours = forward(pipe.model, ids, inputs).logits
        ref_logits = ref(**theirs).logits
        other = pipe.processor.prompt(PROMPTS[(PROMPTS.index(prompt) + 1) % 3],
                                      pipe.processor.prepare_images(images)).media  # another instruction
        asked_otherwise = forward(pipe.model, ids, other).logits
    torch.testing.assert_close(ours, ref_logits, rtol=0, atol=1e-4)
    assert (asked_otherwise - ref_logits).abs().max() > 1e-3  # the Q-Former reads the instruction


def reference_logprobs(model, processor, images, prompt, continuation, qformer_text=None):
    """transformers' per-token log-probabilities of the continuation (the tokens of prompt + continuation after
    the prompt's), the Q-Former reading ``qformer_text`` (the prompt: InstructBlipProcessor given the prompt)."""
    n = processor(text=prompt, images=images, return_tensors="pt")["input_ids"].shape[1]
    full = processor(text=prompt + continuation, images=images, return_tensors="pt")
    instruction = processor(text=prompt if qformer_text is None else qformer_text, images=images, return_tensors="pt")
    full["qformer_input_ids"] = instruction["qformer_input_ids"]
    full["qformer_attention_mask"] = instruction["qformer_attention_mask"]
    with torch.no_grad():
        logits = model(**full).logits[0]
    logp = torch.log_softmax(logits[n - 1:-1].float(), -1)
    return logp.gather(-1, full["input_ids"][0, n:, None]).squeeze(-1)


def test_loss_with_labels_equals_transformers(instructblip_folder, pipe):
    _, ref, hf_proc = instructblip_folder
    images = real_images()[:1]
    inputs = hf_proc(text=PROMPTS[0] + " Red.", images=images, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100
    ours_inputs = pipe.processor.prompt(PROMPTS[0] + " Red.", pipe.processor.prepare_images(images)).media
    with torch.no_grad():
        theirs = ref(**inputs, labels=labels).loss
        ours = forward(pipe.model, inputs["input_ids"], ours_inputs, labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_chat_and_rank_read_the_question(pipe):
    images = real_images()[:1]
    assert pipe.chat(images, "<image>\nWhat is it?", max_new_tokens=4) == pipe.generate(images, "What is it?",
                                                                                        max_new_tokens=4)
    ranked = pipe.rank(images, PROMPTS[0], [" red", " blue"], normalize=False)
    assert ranked == pytest.approx([sum(pipe.score(images, PROMPTS[0], c)) for c in (" red", " blue")], abs=1e-4)


def test_a_model_without_its_instruction_is_refused(pipe):
    media = pipe.processor.prepare_images(real_images()[:1])  # the pixels, no layout added an instruction
    assert "qformer_input_ids" not in media.extra
    with pytest.raises(ValueError, match=r"reads each image's instruction \(InstructBLIP\): pass the processor's "
                                         r"MediaInputs"):
        pipe.model.encode_media(media)


def _sample(tmp_path, i, question, answer):
    path = tmp_path / f"im{i}.png"
    real_images()[i % 3].save(path)
    return Sample(id=str(i), images=[path], conversations=[{"from": "human", "value": f"<image>\n{question}"},
                                                           {"from": "gpt", "value": answer}])


def test_training_samples_read_their_own_question(instructblip_folder, pipe, tmp_path):
    """Two samples on one image: each item's Q-Former reads its own question (transformers' processor given the
    question), the LM ids are the processor's for the question and " " + answer + EOS, the loss transformers'."""
    _, ref, hf_proc = instructblip_folder
    samples = [_sample(tmp_path, 0, PROMPTS[0], "Red."), _sample(tmp_path, 0, PROMPTS[2], "Two.")]
    ds = ConversationDataset(samples, pipe.processor)
    for item, (question, answer) in zip([ds[0], ds[1]], [(PROMPTS[0], "Red."), (PROMPTS[2], "Two.")]):
        theirs = hf_proc(text=f"{question} {answer}</s>", images=real_images()[:1], return_tensors="pt")
        instruction = hf_proc(text=question, images=real_images()[:1], return_tensors="pt")
        theirs["qformer_input_ids"] = instruction["qformer_input_ids"]
        theirs["qformer_attention_mask"] = instruction["qformer_attention_mask"]
        assert item.input_ids.tolist() == theirs["input_ids"][0].tolist()
        (ours_q, _), (their_q, _) = ours_and_theirs_instruction(pipe, item.media, instruction)
        assert ours_q.tolist() == their_q.tolist()
        labels = torch.tensor([item.labels.tolist()])
        with torch.no_grad():
            ours = forward(pipe.model, item.input_ids[None], item.media, labels=labels).loss
            torch.testing.assert_close(ours, ref(**theirs, labels=labels).loss, rtol=0, atol=1e-5)
    grouped = group_by_image(samples)
    with pytest.raises(DataError, match=r"grouped questions share one encoding of their image and prompt, which the "
                                        r"instructblip family does not allow .*; set data\.group_turns: 0"):
        ConversationDataset(grouped, pipe.processor)


def test_convert_from_hf_keeps_the_qformer_tokenizer(instructblip_folder, pipe, tmp_path):
    folder, _, _ = instructblip_folder
    out = tmp_path / "converted"
    assert main(["convert", "--from", "hf", str(folder), "--out", str(out)]) == 0
    assert (out / "qformer_tokenizer.json").is_file()
    converted = vlmkit.load(out)
    assert converted.config.family == "instructblip" and converted.processor.cfg.qformer_max_length == 64
    images = real_images()[:1]
    assert converted.score(images, PROMPTS[0], " Red.") == pytest.approx(pipe.score(images, PROMPTS[0], " Red."),
                                                                         abs=1e-6)
    (out / "qformer_tokenizer.json").unlink()  # the Q-Former would read the LM's tokenizer: its [PAD] is not there
    with pytest.raises(CheckpointError, match=r"qformer_pad_token '\[PAD\]' is not in the Q-Former tokenizer's "
                                              r"vocabulary \(the LM's: qformer_tokenizer\.json is missing\)"):
        vlmkit.load(out)


def test_an_instruction_longer_than_the_qformer_reads_is_refused(pipe):
    with pytest.raises(DataError, match=r"the instruction has \d+ Q-Former tokens, more than the processor's "
                                        r"qformer_max_length 64"):
        pipe.generate(real_images()[:1], " ".join(["what colour is the small circle?"] * 10))


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_bad_folders_are_refused_by_name(instructblip_folder, tmp_path):
    folder = _copy(instructblip_folder[0], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["qformer_config"]["vocab_size"] = 40
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"qformer\.word_embed|embeddings\.word_embeddings\.weight has shape"):
        vlmkit.load(folder)
    cfg["qformer_config"]["vocab_size"] = instructblip_folder[1].config.qformer_config.vocab_size
    (folder / "config.json").write_text(json.dumps(cfg))
    bigger = Tokenizer.from_file(str(folder / "qformer_tokenizer" / "tokenizer.json"))
    bigger.add_tokens([f"word{i}" for i in range(8)])
    bigger.save(str(folder / "qformer_tokenizer" / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"qformer_tokenizer/tokenizer\.json: \d+ tokens, more than the "
                                              r"Q-Former's qformer_config\.vocab_size \d+ in config\.json"):
        vlmkit.load(folder)
    (folder / "qformer_tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"Q-Former reads the instruction through its own tokenizer, but "
                                              r"qformer_tokenizer/tokenizer\.json is missing"):
        vlmkit.load(folder)
    cfg["text_config"]["model_type"] = "t5"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"text_config\.model_type 't5': encoder-decoder LMs"):
        vlmkit.load(folder)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.n_tokens, grads


def check_packed_equals_padded(model, items, pad_id, pack_length):
    """The items packed give the loss and gradients of the items padded one per row (each image with its own
    instruction), and the same rows under plain causal attention do not."""
    model.train()
    padded = collate(items, pad_id)
    packed = collate_packed(items, pad_id, pack_length)
    assert packed.input_ids.shape[0] < len(items), "the samples were not packed"
    assert packed.real_tokens == padded.real_tokens
    loss_a, n_a, grads_a = loss_and_grads(model, padded)
    loss_b, n_b, grads_b = loss_and_grads(model, packed)
    assert n_a == n_b > 0
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-5, msg=name)
    # the proof can fail: the same rows under plain causal attention (samples see each other, positions run on)
    # give gradients far outside that tolerance
    leaky = dataclasses.replace(packed, position_ids=None, document_ids=None, segment_ids=None)
    _, _, grads_c = loss_and_grads(model, leaky)
    assert max(float((grads_c[n] - grads_a[n]).abs().max()) for n in grads_a) > 1e-3


@pytest.mark.slow
def test_a_from_scratch_instructblip_on_a_cnn_tower_trains_packs_and_saves(tmp_path):
    """vlmkit's own InstructBLIP: tiny-llava's CNN tower, a Q-Former reading the instruction through the LM's
    tokenizer, segment-mode text with the image placeholder where the template puts it. Each item carries the
    user turn that carries its image as the instruction (a multi-turn sample: the first question); packing is
    exact; the checkpoint reads the LM's tokenizer for the Q-Former again (it writes no second one) and chat reads
    the question."""
    from vlmkit.checkpoint import write_model_files
    from vlmkit.config import apply_overrides, to_dict
    from vlmkit.family import processor_config_from_dict
    from vlmkit.models import build_model
    from vlmkit.presets import get_preset
    from vlmkit.processing import Processor, TextTokenizer, train_bpe

    torch.manual_seed(0)
    preset = get_preset("tiny-llava")
    tok = TextTokenizer(train_bpe(["what colour is the small circle? it is red. how many squares? two."] * 4, 300))
    qformer = {"width": 32, "depth": 2, "heads": 4, "mlp_dim": 64, "num_query_tokens": 6,
               "vocab_size": tok.vocab_size, "max_position_embeddings": 24}
    cfg = apply_overrides(preset.model, {"family": "instructblip", "lm.vocab_size": tok.vocab_size,
                                         "connector.kind": "qformer", "connector.qformer": qformer})
    model = build_model(cfg, tok.token_id(preset.processor.image_token))
    assert cfg.vision.arch == "cnn" and model.reads_instruction
    pcfg = processor_config_from_dict({**to_dict(preset.processor), "family": "instructblip", "image_seq_len": 6,
                                       "qformer_max_length": 24})
    processor = Processor(pcfg, tok)
    samples = [_sample(tmp_path, i, q, a) for i, (q, a) in enumerate(
        [(PROMPTS[0], "It is red."), (PROMPTS[2], "Two."), (PROMPTS[1], "A red circle and two squares.")])]
    samples[2].conversations += [{"from": "human", "value": "Is it red?"}, {"from": "gpt", "value": "yes"}]
    ds = ConversationDataset(samples, processor)
    items = [ds[i] for i in range(len(ds))]
    for item, question in zip(items, (PROMPTS[0], PROMPTS[2], PROMPTS[1])):
        ids = tok.tok.encode(question).ids
        assert item.media.extra["qformer_input_ids"][0, :len(ids)].tolist() == ids
        assert int(item.media.extra["qformer_attention_mask"].sum()) == len(ids)
    check_packed_equals_padded(model, items, tok.pad_id, max(len(x) for x in items) + 20)
    small = build_model(apply_overrides(cfg, {"connector.qformer.vocab_size": 10}), model.image_token_id)
    with pytest.raises(ValueError, match=r"instruction token id \d+ is outside the Q-Former's vocabulary "
                                         r"\(connector\.qformer\.vocab_size 10\)"):
        small.encode_media(items[0].media)

    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_model_files(folder, model.eval(), cfg, processor)
    # the Q-Former reads the LM's tokenizer.json: no second tokenizer is written, and none is needed to load it
    assert (folder / "tokenizer.json").is_file() and not (folder / "qformer_tokenizer.json").exists()
    pipe = vlmkit.load(folder)
    images = [samples[0].images[0]]
    enc = pipe.processor.chat(PROMPTS[0], pipe.processor.prepare_images(images))
    assert enc.media.extra["qformer_input_ids"][0, :len(tok.tok.encode(PROMPTS[0]).ids)].tolist() == \
        tok.tok.encode(PROMPTS[0]).ids
    assert isinstance(pipe.chat(images, PROMPTS[0], max_new_tokens=3), str)
