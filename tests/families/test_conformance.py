"""The conformance suite: every family, the same checks (cases.py holds the table).

For the families vlmkit imports, against transformers on tiny random checkpoints that behave like released ones
(their real processors, tokenizers that add BOS, several images per prompt):

- the processor's ``input_ids`` equal transformers' processor's for the same prompt and images;
- ``Pipeline.score`` equals transformers' per-token log-probabilities within 1e-4;
- greedy generation gives transformers' greedy tokens;
- a conversation of several turns is laid out as the folder's chat template does it (or, where the reference
  processor takes one prompt, refused by name);
- the vlmkit checkpoint ``convert --from hf`` writes scores the same, and ``convert --to hf`` of it loads in the
  family's transformers class with the original's logits.

For every generative family, imported or trained in vlmkit:

- a left-padded batch generates what each prompt generates alone, and the KV cache changes nothing;
- a packed batch gives the loss and gradients of the same samples padded;
- every parameter a loss can reach receives a gradient.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import vlmkit
from vlmkit.batch import Batch, MediaInputs
from vlmkit.data.collate import collate, collate_packed
from vlmkit.data.conversations import ConversationDataset, Sample
from vlmkit.errors import DataError
from vlmkit.family import get_family
from vlmkit.generation import GenerationConfig, generate
from vlmkit.pipeline import Pipeline

from cases import CASES, HF_CASES, images

pytestmark = pytest.mark.usefixtures("single_thread")

GREEDY_TOKENS = 8


@pytest.fixture(scope="module")
def pipes(hf_folder, tmp_path_factory):
    """Factory: case -> (Pipeline, transformers model or None, transformers processor or None), built once."""
    built = {}

    def get(case):
        if case.name not in built:
            if case.folder:
                folder, model, processor = hf_folder(case.folder)
                built[case.name] = (vlmkit.load(folder), model, processor)
            else:
                built[case.name] = (from_scratch(case.preset), None, None)
        return built[case.name]

    return get


def from_scratch(preset_name: str) -> Pipeline:
    """The tiny preset built from scratch with a small tokenizer, its gates opened (a fresh cross-attention model
    would otherwise ignore its images and every check on them would pass vacuously)."""
    from vlmkit.presets import get_preset

    preset = get_preset(preset_name)
    family = get_family(preset.model.family)
    texts = ["what colour is the small circle? it is red.", "how many squares are there? two squares."] * 8
    tokenizer = family.new_tokenizer(texts, 320)
    torch.manual_seed(0)
    cfg, model, processor = family.new_model(preset.model, preset.processor, tokenizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "alpha" in name or name.endswith("gate"):
                p.fill_(0.5)
    return Pipeline(model.eval(), processor, cfg)


def prompts_of(case, pipe):
    """(raw prompt, images) pairs of a row: its own, or for a from-scratch preset questions in vlmkit's layout."""
    pics = images()
    if case.prompts:
        return [(p, [pics[i] for i in idx]) for p, idx in case.prompts]
    return [("<image>\nWhat colour is the small circle?", [pics[0]]), ("<image>\nHow many squares are there?",
                                                                        [pics[2]]), ("Hello", [])]


def hf_only(case):
    if not case.folder:
        pytest.skip("a vlmkit-trained family has no transformers reference")


# ------------------------------------------------------------------------------------------------ against transformers


@pytest.mark.parametrize("case", HF_CASES, ids=str)
def test_input_ids_equal_transformers_processor(pipes, case):
    pipe, _, hf_proc = pipes(case)
    for prompt, imgs in prompts_of(case, pipe):
        ours = pipe.processor.prompt(prompt, pipe.processor.prepare_images(imgs)).ids
        assert ours == case.hf_inputs(hf_proc, prompt, imgs)["input_ids"][0].tolist(), prompt


@pytest.mark.parametrize("case", HF_CASES, ids=str)
def test_a_prompt_already_holding_bos_gets_no_second_bos(pipes, case):
    """A prompt that already begins with the tokenizer's BOS (text rendered by a chat template, passed to score,
    generate, eval or serve) is tokenised without the special tokens, transformers' documented call for it
    (``add_special_tokens=False``): never BOS twice."""
    pipe, _, hf_proc = pipes(case)
    bos = pipe.processor.tokenizer.bos_token
    if not bos:
        pytest.skip(f"{case}'s tokenizer has no BOS")
    for prompt, imgs in prompts_of(case, pipe):
        bos_id = pipe.processor.tokenizer.bos_id
        ours = pipe.processor.prompt(bos + prompt, pipe.processor.prepare_images(imgs)).ids
        plain = pipe.processor.prompt(prompt, pipe.processor.prepare_images(imgs)).ids
        assert not any(a == b == bos_id for a, b in zip(ours, ours[1:])), prompt
        assert ours.count(bos_id) <= plain.count(bos_id), prompt
        theirs = case.hf_inputs(hf_proc, bos + prompt, imgs, add_special_tokens=False)["input_ids"][0].tolist()
        if theirs.count(bos_id) > plain.count(bos_id):  # the processor writes BOS itself (after the images): the
            theirs = case.hf_inputs(hf_proc, prompt, imgs)["input_ids"][0].tolist()  # prompt's is read as if absent
        assert ours == theirs, prompt


@pytest.mark.parametrize("case", HF_CASES, ids=str)
def test_score_equals_transformers(pipes, case):
    pipe, ref, hf_proc = pipes(case)
    for prompt, imgs in prompts_of(case, pipe):
        ours = pipe.score(imgs, prompt, case.continuation)
        theirs = case.reference(case, ref, hf_proc, prompt, case.continuation, imgs)
        assert len(ours) == len(theirs) > 0, prompt
        torch.testing.assert_close(torch.tensor(ours), theirs.float(), rtol=0, atol=1e-4, msg=prompt)


@pytest.mark.parametrize("case", HF_CASES, ids=str)
def test_greedy_tokens_equal_transformers(pipes, case):
    pipe, ref, hf_proc = pipes(case)
    prompt, imgs = prompts_of(case, pipe)[0]
    inputs = case.hf_inputs(hf_proc, prompt, imgs)
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=GREEDY_TOKENS, do_sample=False)
    theirs = cut_at(out[0, inputs["input_ids"].shape[1]:].tolist(), ref.generation_config.eos_token_id)
    ours = greedy(pipe, [(prompt, imgs)])[0]
    assert ours == theirs and len(ours) > 0


TURNS = [{"role": "user", "content": "What colour is the small circle?"},
         {"role": "assistant", "content": "It is red."}, {"role": "user", "content": "How many squares are there?"}]


@pytest.mark.parametrize("case", HF_CASES, ids=str)
def test_multi_turn_chat_is_the_reference_template_or_refused(pipes, case):
    """A conversation of several turns (the image with the first question) lays out as the folder's chat template
    does through transformers' processor; a family whose reference processor takes one prompt refuses it by name.
    A folder without a template (the tiny IDEFICS and SmolVLM ones) is refused by its family's layout, or laid out
    in vlmkit's template as a single question is."""
    pipe, _, hf_proc = pipes(case)
    media = pipe.processor.prepare_images(images()[:1] if case.images else [])
    template = getattr(hf_proc, "chat_template", None)
    if not case.images:  # a text LM: its tokenizer's template, with string contents
        theirs = hf_proc.apply_chat_template(TURNS, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert pipe.processor.chat(TURNS, media).ids == list(theirs["input_ids"])
        return
    if case.single_turn:
        with pytest.raises(DataError, match=rf"this family \({pipe.family.name}\) answers one prompt"):
            pipe.processor.chat(TURNS, media)
        return
    if not template:
        try:
            text = pipe.processor.decode(pipe.processor.chat(TURNS, media).ids)
        except DataError as e:
            assert "no chat template" in str(e)
        else:
            at = [text.index(t["content"]) for t in TURNS]
            assert at == sorted(at), text
        return
    structured = [{"role": t["role"], "content": ([{"type": "image", "image": images()[0]}] if i == 0 else []) +
                   [{"type": "text", "text": t["content"]}]} for i, t in enumerate(TURNS)]
    theirs = hf_proc.apply_chat_template(structured, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert pipe.processor.chat(TURNS, media).ids == list(theirs["input_ids"][0])


def cut_at(tokens: list[int], eos) -> list[int]:
    stops = set(eos if isinstance(eos, list) else [eos]) - {None}
    return tokens[:next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]


@pytest.mark.parametrize("case", HF_CASES, ids=str)
def test_conversions_both_ways_keep_the_numbers(pipes, case, tmp_path):
    """convert --from hf gives a checkpoint that scores as the folder does; convert --to hf of that checkpoint loads
    in the family's transformers class and gives the original's logits."""
    from vlmkit.convert.hf import convert_from_hf, convert_to_hf

    pipe, ref, hf_proc = pipes(case)
    folder = pipe.meta["source"]
    convert_from_hf(folder, tmp_path / "vlmkit")
    mine = vlmkit.load(tmp_path / "vlmkit")
    prompt, imgs = prompts_of(case, pipe)[0]
    assert mine.score(imgs, prompt, case.continuation) == pipe.score(imgs, prompt, case.continuation)
    export_class = get_family(case.family).export_class(pipe.config)  # Pixtral-12B's: LLaVA's class
    convert_to_hf(tmp_path / "vlmkit", tmp_path / "hf")
    import transformers

    back = getattr(transformers, export_class).from_pretrained(tmp_path / "hf").eval()
    inputs = case.hf_inputs(hf_proc, prompt, imgs)
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, ref(**inputs).logits, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------ every family


def greedy(pipe, requests, use_cache: bool = True) -> list[list[int]]:
    """Greedy tokens (up to EOS) of raw prompts, generated as one left-padded batch."""
    encoded = [pipe.processor.prompt(p, pipe.processor.prepare_images(imgs)) for p, imgs in requests]
    media = MediaInputs.cat([e.media for e in encoded])
    tok = pipe.processor.tokenizer
    return generate(pipe.model, [e.ids for e in encoded], media, tok.eos_id, tok.pad_id,
                    GenerationConfig(max_new_tokens=GREEDY_TOKENS), use_cache=use_cache)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_batched_generation_equals_one_at_a_time(pipes, case):
    pipe, _, _ = pipes(case)
    requests = prompts_of(case, pipe)
    alone = [greedy(pipe, [r])[0] for r in requests]
    assert greedy(pipe, requests) == alone
    assert any(len(a) > 1 for a in alone)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cached_generation_equals_uncached(pipes, case):
    pipe, _, _ = pipes(case)
    requests = prompts_of(case, pipe)
    assert greedy(pipe, requests, use_cache=True) == greedy(pipe, requests, use_cache=False)


def samples(tmp_path, single_turn: bool, with_images: bool = True) -> list[Sample]:
    """Four training samples of different lengths on images of different sizes (tiled and native-resolution
    families give each its own number of tokens); one question each for families that train on one; without
    images for a text-only LM."""
    paths = []
    for i, im in enumerate(images()[:3]):
        paths.append(tmp_path / f"im{i}.png")
        im.save(paths[-1])
    qa = [("What colour is the small circle?", "It is red."), ("How many squares?", "Two squares."),
          ("Describe the image.", "A blue triangle left of a green star and a yellow square."), ("Is it red?", "yes")]
    convs = []
    for k in range(len(qa)):
        pairs = qa[k:k + 1] if single_turn else qa[:k + 1]
        turns = []
        for j, (q, a) in enumerate(pairs):
            image = "<image>\n" if j == 0 and with_images else ""
            turns += [{"from": "human", "value": image + q}, {"from": "gpt", "value": a}]
        convs.append(turns)
    return [Sample(id=str(i), images=[paths[i % len(paths)]] if with_images else [], conversations=c,
                   source=f"sample {i}") for i, c in enumerate(convs)]


def loss_and_grads(model, batch: Batch):
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out.loss.backward()
    return out.loss.detach(), out.n_tokens, {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None}


def training_items(case, pipe, tmp_path):
    ds = ConversationDataset(samples(tmp_path, case.single_turn, case.images), pipe.processor)
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_packed_batch_equals_padded(pipes, case, tmp_path):
    pipe, _, _ = pipes(case)
    items = training_items(case, pipe, tmp_path)
    lengths = sorted(len(x) for x in items)
    pad_id = pipe.processor.tokenizer.pad_id
    padded, packed = collate(items, pad_id), collate_packed(items, pad_id, lengths[-1] + lengths[0])
    assert packed.input_ids.shape[0] < len(items), "the samples were not packed"
    model = pipe.model.train()
    for m in model.modules():  # BatchNorm's batch statistics over reordered images are the same numbers, not the
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):  # same floats: use its running ones (a frozen tower's)
            m.eval()
    try:
        loss_a, n_a, grads_a = loss_and_grads(model, padded)
        loss_b, n_b, grads_b = loss_and_grads(model, packed)
        # the proof can fail: the same rows without their documents (samples see each other, positions run on)
        leaky = dataclasses.replace(packed, position_ids=None, document_ids=None, segment_ids=None)
        _, _, grads_c = loss_and_grads(model, leaky)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    assert n_a == n_b > 0
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-5, msg=name)
    assert max(float((grads_c[n] - grads_a[n]).abs().max()) for n in grads_a) > 1e-3


@pytest.mark.parametrize("case", CASES, ids=str)
def test_every_parameter_receives_a_gradient(pipes, case, tmp_path):
    pipe, _, _ = pipes(case)
    batch = collate(training_items(case, pipe, tmp_path), pipe.processor.tokenizer.pad_id)
    model = pipe.model.train()
    try:
        _, _, grads = loss_and_grads(model, batch)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    names = [n for n, p in model.named_parameters() if not any(k in n for k in case.no_gradient)]
    missing = [n for n in names if n not in grads or not torch.isfinite(grads[n]).all()]
    assert not missing, f"no (finite) gradient reaches {missing[:8]}"
    assert not [n for n in names if not grads[n].any() and "bias" not in n][:1], "an all-zero gradient"


def test_every_generative_family_has_a_row():
    """A new family is one row of cases.py: the imported ones a transformers row, every one some row."""
    from vlmkit.family import FAMILIES

    generative = {f.name for f in FAMILIES.all() if f.capabilities.generate}
    assert generative <= {c.family for c in CASES}, "add the family to tests/families/cases.py"
    imported = {f.name for f in FAMILIES.all() if f.capabilities.generate and f.hf is not None}
    assert imported <= {c.family for c in HF_CASES}, "add the family's tiny Hugging Face folder to HF_CASES"
