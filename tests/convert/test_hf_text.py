"""Text-only language models (the text family) against transformers, on each tiny folder of
tests/hf_folders.py's TEXT_FOLDERS (Llama, Mistral, Qwen2, Gemma, Phi-1.5/2, Phi-3): what the conformance table does
not check. A prompt the chat template rendered (BOS and all) scores as transformers scores it with
add_special_tokens=False, with one BOS; chat answers as transformers' greedy generation on apply_chat_template's ids;
images are refused naming the folder; the export loads in the folder's own transformers class; the serving engine
answers joined requests as alone; ``vlmkit eval`` runs a multiple-choice task without images; a recipe fine-tunes
a folder; unsupported variants are refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_fixtures import real_images

import vlmkit
from vlmkit.cli import main
from vlmkit.convert.hf import convert_from_hf
from vlmkit.errors import ConfigError, DataError
from vlmkit.generation import GenerationConfig
from vlmkit.serve.engine import Engine

transformers = pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")

from hf_folders import TEXT_FOLDERS

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = sorted(TEXT_FOLDERS)
QUESTION = "What colour is the small circle?"
TURNS = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "It is red."},
         {"role": "user", "content": "How many squares are there?"}]


@pytest.fixture(scope="module")
def pipes(hf_folder):
    """name -> (folder, Pipeline, transformers model, its tokenizer), loaded once per module."""
    loaded = {}

    def get(name):
        if name not in loaded:
            folder, model, tok = hf_folder(name)
            loaded[name] = (folder, vlmkit.load(folder), model, tok)
        return loaded[name]

    return get


def logprobs(model, ids: list[int], start: int) -> torch.Tensor:
    """transformers' log-probabilities of ids[start:] given what comes before them."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits[start - 1:-1].float(), -1).gather(-1, torch.tensor(ids[start:])[:, None])[:, 0]


@pytest.mark.parametrize("name", NAMES)
def test_a_folder_loads_as_the_text_family(pipes, name):
    _, pipe, ref, _ = pipes(name)
    assert pipe.family.name == "text" and pipe.config.hf_model_type == ref.config.model_type
    assert pipe.family.export_class(pipe.config) == type(ref).__name__
    assert pipe.can_generate and pipe.model.module_groups().keys() == {"lm"}


@pytest.mark.parametrize("name", NAMES)
def test_a_rendered_chat_prompt_scores_as_transformers_with_one_bos(pipes, name):
    """The chat template's text scored as a raw prompt: where the template wrote the BOS, transformers' documented
    call for such text is add_special_tokens=False and no second BOS appears; where it did not (Phi-3's), the
    tokenizer adds its special tokens as to any raw prompt."""
    _, pipe, ref, tok = pipes(name)
    text = tok.apply_chat_template(TURNS, add_generation_prompt=True, tokenize=False)
    ours = pipe.processor.prompt(text, pipe.processor.prepare_images([])).ids
    has_bos = tok.bos_token is not None and text.startswith(tok.bos_token)
    assert ours == tok(text, add_special_tokens=not has_bos)["input_ids"]
    if has_bos:
        assert ours.count(tok.bos_token_id) == 1
    n = len(ours)
    full = pipe.processor.continuation(text, " It is red.", pipe.processor.prepare_images([]))
    assert full.prompt_len == n
    torch.testing.assert_close(torch.tensor(pipe.score([], text, " It is red.")), logprobs(ref, full.ids, n),
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_a_raw_prompt_already_starting_with_bos_gets_no_second_bos(pipes, name):
    _, pipe, ref, tok = pipes(name)
    if tok.bos_token is None or tok(QUESTION)["input_ids"][0] != tok.bos_token_id:
        pytest.skip("the tokenizer adds no BOS")
    prompt = tok.bos_token + QUESTION
    marked = pipe.processor.prompt(prompt, pipe.processor.prepare_images([])).ids
    assert marked == tok(prompt, add_special_tokens=False)["input_ids"] and marked.count(tok.bos_token_id) == 1
    full = tok(prompt + " It is red.", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(torch.tensor(pipe.score([], prompt, " It is red.")),
                               logprobs(ref, full, len(marked)), rtol=0, atol=1e-4)
    ids = torch.tensor([marked])
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert pipe.generate([], prompt, max_new_tokens=4) == tok.decode(out[0, len(marked):], skip_special_tokens=True)


@pytest.mark.parametrize("name", NAMES)
def test_chat_answers_as_transformers_greedy_on_its_template(pipes, name):
    _, pipe, ref, tok = pipes(name)
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    assert pipe.processor.chat(QUESTION, pipe.processor.prepare_images([])).ids == ids[0].tolist()
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    eos = ref.generation_config.eos_token_id
    new = new[:next((i for i, t in enumerate(new) if t == eos), len(new))]
    assert pipe.chat(None, QUESTION, max_new_tokens=6) == tok.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("name", NAMES)
def test_images_are_refused_naming_the_folder(pipes, name):
    folder, pipe, _, _ = pipes(name)
    image = real_images()[0]
    match = rf"{folder.name}.* is a text-only language model: it reads no images"
    for call in (lambda: pipe.chat(image, QUESTION), lambda: pipe.generate([image], QUESTION),
                 lambda: pipe.score([image, image], QUESTION, " red"),
                 lambda: pipe.processor.supervised([{"from": "human", "value": "<image>\nhi"},
                                                    {"from": "gpt", "value": "yo"}],
                                                   pipe.processor.prepare_images([image]))):
        with pytest.raises(DataError, match=match):
            call()


@pytest.mark.parametrize("name", NAMES)
def test_export_loads_in_the_folders_own_class_with_the_same_logits_and_ids(pipes, name, tmp_path):
    folder, pipe, ref, tok = pipes(name)
    convert_from_hf(folder, tmp_path / "vlmkit")
    assert main(["convert", "--to", "hf", str(tmp_path / "vlmkit"), "--out", str(tmp_path / "hf")]) == 0
    back = getattr(transformers, type(ref).__name__).from_pretrained(tmp_path / "hf").eval()
    back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = tok.apply_chat_template(TURNS, add_generation_prompt=True, tokenize=False)
    assert back_tok(QUESTION)["input_ids"] == tok(QUESTION)["input_ids"]
    assert back_tok.apply_chat_template(TURNS, add_generation_prompt=True, tokenize=False) == text
    ids = torch.tensor([tok(text + " It is red.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-4)
    assert vlmkit.load(tmp_path / "hf").score([], QUESTION, " It is red.") == pytest.approx(
        pipe.score([], QUESTION, " It is red."), abs=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_joined_requests_answer_as_alone(pipes, name):
    _, pipe, _, _ = pipes(name)
    questions, lengths = [QUESTION, "How many squares?", "Describe the image."], [12, 5, 8]
    solo = [pipe.chat(None, q, max_new_tokens=n) for q, n in zip(questions, lengths)]
    engine = Engine(pipe).start()
    try:
        first = iter(engine.submit_chat([{"role": "user", "content": questions[0]}], [],
                                        GenerationConfig(max_new_tokens=lengths[0])))
        head = next(first)
        rest = [engine.submit_chat([{"role": "user", "content": questions[i]}], [],
                                   GenerationConfig(max_new_tokens=lengths[i])) for i in (1, 2)]
        answers = [head.text + "".join(e.text for e in first)] + [s.text()[0] for s in rest]
    finally:
        engine.stop()
    assert answers == solo


def test_the_http_api_answers_a_text_model_and_refuses_an_image(pipes):
    from fastapi.testclient import TestClient

    from vlmkit.serve.api import create_app

    _, pipe, _, _ = pipes("qwen2")
    engine = Engine(pipe).start()
    try:
        client = TestClient(create_app(engine))
        body = {"model": "m", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 5,
                "temperature": 0}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == pipe.chat(None, QUESTION, max_new_tokens=5)
        import base64
        import io

        buf = io.BytesIO()
        real_images()[0].save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        body["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": url}},
                                          {"type": "text", "text": QUESTION}]
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and "text-only language model" in r.text, r.text
    finally:
        engine.stop()


def test_eval_runs_a_multiple_choice_task_without_images(pipes, tmp_path):
    folder = pipes("llama")[0]
    rows = [{"id": i, "question": q, "options": ["red", "blue", "green"], "answer": a}
            for i, (q, a) in enumerate([("What colour is the sky?", 1), ("What colour is grass?", 2),
                                        ("What colour is a tomato?", 0)])]
    (tmp_path / "choice_test.json").write_text(json.dumps(rows))
    out = tmp_path / "results.json"
    assert main(["eval", "--model", str(folder), "--tasks", "multiple_choice", "--data", str(tmp_path),
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())["tasks"]["multiple_choice"]
    assert result["n"] == 3 and 0 <= result["metrics"]["accuracy"] <= 1
    records = [json.loads(x) for x in (tmp_path / "predictions_multiple_choice.jsonl").read_text().splitlines()]
    assert [r["images"] for r in records] == [[], [], []]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "phi", "phi3"])
def test_a_recipe_fine_tunes_a_text_folder(pipes, name, tmp_path):
    from vlmkit.train.loop import train
    from vlmkit.train.recipe import load_recipe

    folder = pipes(name)[0]
    qa = [("What colour is the small circle?", "It is red."), ("How many squares are there?", "Two squares."),
          ("What shape is blue?", "The triangle."), ("Is there a star?", "No.")]
    rows = [{"id": i, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            for i, (q, a) in enumerate(qa * 4)]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text(json.dumps(rows))
    (data / "val.json").write_text(json.dumps(rows[:4]))
    recipe = load_recipe("tiny-llava", [
        f"data.path={data}", f"init_from={folder}", "data.group_turns=0", "data.val_samples=4",
        "train.batch_size=8", "train.log_every=1", "train.eval_every=1000", "train.precompute_frozen_vision=false",
        "stages=[{name: instruct, train: [lm], steps: 15, lr: 3.0e-3}]"])
    res = train(recipe, tmp_path / "run", progress=False, log=lambda m: None)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert len(losses) == 15 and sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    tuned = vlmkit.load(res.checkpoint)
    assert tuned.family.name == "text" and isinstance(tuned.chat(None, qa[0][0], max_new_tokens=4), str)


# ---------------------------------------------------------------------------------------------- refusals


def edited(folder, tmp_path, edit):
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 6, "long_factor": [1.0] * 6,
            "original_max_position_embeddings": 64}


@pytest.mark.parametrize("name, edit, error, match", [
    ("phi3", lambda c: c.update(rope_parameters=LONGROPE), ConfigError,
     (r"rope_type 'longrope' \(Phi-3's long-context RoPE of the 128k variants\) is not implemented for phi3 in "
      r"vlmkit; supported: default")),
    ("phi3", lambda c: (c.pop("rope_parameters"), c.update(rope_scaling={"type": "su"})), ConfigError,
     r"rope_type 'su' .* is not implemented for phi3"),
    ("phi", lambda c: c.update(hidden_act="gelu_fast"), ConfigError,
     r"hidden_act 'gelu_fast' is not implemented for phi; supported: gelu_new"),
    ("phi", lambda c: c["rope_parameters"].update(partial_rotary_factor=0.3), ConfigError,
     r"partial_rotary_factor 0.3 rotates 3 of the 12 dims"),
    ("llama", lambda c: c.update(model_type="gpt2"), ConfigError,
     r"model_type 'gpt2' is not a family vlmkit imports; supported: .*llama.*phi3"),
])
def test_unsupported_variants_are_refused_by_name(hf_folder, name, edit, error, match, tmp_path):
    with pytest.raises(error, match=match):
        vlmkit.load(edited(hf_folder(name)[0], tmp_path, edit))


def test_a_base_model_without_a_chat_template_refuses_chat_but_generates(hf_folder, tmp_path):
    out = tmp_path / "base"
    shutil.copytree(hf_folder("phi")[0], out)
    for f in out.glob("chat_template*"):
        f.unlink()
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    pipe = vlmkit.load(out)
    with pytest.raises(DataError, match=r"base.* has no chat template \(a base model\): generate or score a raw "
                                        r"prompt"):
        pipe.chat(None, QUESTION)
    assert isinstance(pipe.generate([], QUESTION, max_new_tokens=3), str)


def test_a_parallel_block_lm_exports_as_phi_and_never_as_persimmon(pipes, tmp_path):
    """A Phi LM built without a source type exports as Phi; the shared LM export (Persimmon's for rotary with
    LayerNorms) refuses a parallel block by field instead of writing a sequential model."""
    import dataclasses

    from vlmkit.convert.hf.lm import lm_config_to_hf
    from vlmkit.convert.hf.text import export_text

    _, pipe, ref, _ = pipes("phi")
    export_text(pipe.model, dataclasses.replace(pipe.config, hf_model_type=""), pipe.processor, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["PhiForCausalLM"]
    back = transformers.PhiForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-4)
    with pytest.raises(ConfigError, match=r"parallel_block True \(Persimmon has False\); head_bias True"):
        lm_config_to_hf(pipe.config.lm)


def test_every_model_type_is_read_by_one_family():
    """The text family reads every LM_TYPES type (a type added there is read with no change to the family); no two
    families claim one model_type (the lookup by model_type would silently take one of them)."""
    from vlmkit.convert.hf.lm import LM_TYPES
    from vlmkit.family import FAMILIES

    claimed: dict[str, str] = {}
    for family in FAMILIES.all():
        for kind in family.hf.model_types if family.hf is not None else ():
            assert kind not in claimed, f"model_type {kind!r}: {claimed[kind]} and {family.name}"
            claimed[kind] = family.name
    assert {claimed[t] for t in (*LM_TYPES, "phi", "phi3")} == {"text"}



def test_generation_stops_at_every_end_token_of_generation_config_as_transformers(hf_folder, tmp_path):
    """generation_config.json's eos_token_id list (Gemma 3's [<eos>, <end_of_turn>], Phi-3's three ids): transformers'
    generate stops at any of them, and so do chat(), generate() and the serving engine; the export writes the list.
    Here the token that greedy decoding of a chat prompt reaches third is made an end token: the answer stops before
    it, where it would otherwise go on."""
    folder, ref, _ = hf_folder("llama")
    question = "What colour is the small circle?"
    free = vlmkit.load(folder)
    ids = free.processor.chat(question, free.processor.prepare_images([])).ids
    with torch.no_grad():
        greedy = ref.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, len(ids):]
    stop = int(greedy[2])
    assert stop not in greedy[:2].tolist() and stop != free.processor.tokenizer.eos_id
    dst = tmp_path / "stops"
    shutil.copytree(folder, dst)
    gen_cfg = json.loads((dst / "generation_config.json").read_text())
    gen_cfg["eos_token_id"] = [free.processor.tokenizer.eos_id, stop]
    (dst / "generation_config.json").write_text(json.dumps(gen_cfg))
    pipe = vlmkit.load(dst)
    assert pipe.processor.stop_ids == (free.processor.tokenizer.eos_id, stop)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
    with torch.no_grad():
        out = theirs.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    assert out == greedy[:3].tolist()  # transformers ends on the stop token
    answer = pipe.processor.tokenizer.decode(out[:2])
    assert pipe.chat(None, question, max_new_tokens=6) == answer != free.chat(None, question, max_new_tokens=6)
    engine = Engine(pipe).start()
    try:
        events = list(engine.submit_chat([{"role": "user", "content": question}], [],
                                         GenerationConfig(max_new_tokens=6)))
    finally:
        engine.stop()
    assert "".join(e.text for e in events) == answer and events[-1].finish_reason == "stop"
    assert main(["convert", "--from", "hf", str(dst), "--out", str(tmp_path / "ours")]) == 0
    assert vlmkit.load(tmp_path / "ours").processor.stop_ids == pipe.processor.stop_ids
    assert main(["convert", "--to", "hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    written = json.loads((tmp_path / "back" / "generation_config.json").read_text())["eos_token_id"]
    assert written == list(pipe.processor.stop_ids)
