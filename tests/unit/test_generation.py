"""Generation: cache == no cache, batched == one at a time, eos, sampling, stop strings; Pipeline.score."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmkit.errors import ConfigError, DataError
from vlmkit.generation import GenerationConfig, generate, sample_next
from vlmkit.models import build_model
from vlmkit.pipeline import Pipeline

from helpers import fixed_media, forward

pytestmark = pytest.mark.usefixtures("single_thread")

NO_EOS = -1  # an id no token has: sequences run to max_new_tokens
QUESTIONS = ["<image>what?", "<image>\nhow many triangles are there in the picture?", "is it <image> red"]


@pytest.fixture(scope="module")
def setup(tiny_config, make_processor, tokenizer):
    """A random model whose greedy outputs vary from step to step and prompt to prompt.

    PyTorch's default init (each module's reset_parameters) and untied embeddings give logits with clear
    top-1 margins, so greedy decoding is not a near-tie coin flip and a wrong position or cache slot changes
    the tokens.
    """
    torch.manual_seed(1)
    model = build_model(tiny_config(connector="pixel_shuffle", tie=False), tokenizer.token_id("<image>"),
                        init=False).eval()  # weights left for a checkpoint: give them PyTorch's default init
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    processor = make_processor(image_seq_len=model.image_seq_len)
    one = fixed_media(torch.zeros(1, 3, 16, 16), model.image_seq_len)
    prompts = [processor.chat(q, one).ids for q in QUESTIONS]
    pixels = torch.randn(len(prompts), 3, 16, 16)
    return model, processor, prompts, pixels


def run(setup, gen: GenerationConfig, idx=None, eos=NO_EOS, use_cache=True):
    model, processor, prompts, pixels = setup
    idx = list(range(len(prompts))) if idx is None else idx
    media = fixed_media(pixels[idx], model.image_seq_len)
    return generate(model, [prompts[i] for i in idx], media, eos, processor.tokenizer.pad_id, gen,
                    use_cache=use_cache)


def test_prompts_have_different_lengths(setup):
    assert len({len(p) for p in setup[2]}) == len(QUESTIONS)


def test_cached_and_uncached_greedy_generation_agree(setup):
    gen = GenerationConfig(max_new_tokens=12)
    cached = run(setup, gen, use_cache=True)
    assert cached == run(setup, gen, use_cache=False)
    # the comparison only means something if the model's outputs depend on what came before
    assert all(len(set(seq)) >= 4 for seq in cached)
    assert len({tuple(seq) for seq in cached}) == len(cached)


def test_batched_generation_equals_one_at_a_time(setup):
    gen = GenerationConfig(max_new_tokens=10)
    batched = run(setup, gen)
    assert batched == [run(setup, gen, idx=[i])[0] for i in range(len(QUESTIONS))]


@pytest.mark.parametrize("n", [1, 3, 7])
def test_max_new_tokens_is_respected(setup, n):
    assert [len(s) for s in run(setup, GenerationConfig(max_new_tokens=n))] == [n] * len(QUESTIONS)


def test_eos_stops_only_its_sequence(setup):
    free = run(setup, GenerationConfig(max_new_tokens=10))
    seq = free[0]
    k = next(k for k in range(2, len(seq)) if seq[k] not in seq[:k])  # a token first produced at step k
    eos = seq[k]
    out = run(setup, GenerationConfig(max_new_tokens=10), eos=eos)
    assert out[0] == seq[:k]  # stopped, eos itself not returned
    for got, ref in zip(out[1:], free[1:]):
        assert got == (ref[:ref.index(eos)] if eos in ref else ref)


def test_image_token_is_never_generated(setup):
    model = setup[0]
    with torch.no_grad():
        bias = torch.zeros(model.lm.lm_head.out_features)
        bias[model.image_token_id] = 1e4  # the model "wants" the image token at every step
        model.lm.lm_head.bias = torch.nn.Parameter(bias)
        try:
            out = run(setup, GenerationConfig(max_new_tokens=4))
        finally:
            model.lm.lm_head.bias = None
    assert all(model.image_token_id not in seq for seq in out)


def test_sampling_is_reproducible_per_seed(setup):
    def sample(seed):
        torch.manual_seed(1234 + seed)  # the global RNG must not matter
        return run(setup, GenerationConfig(max_new_tokens=8, temperature=5.0, seed=seed))

    state = torch.get_rng_state()
    first = run(setup, GenerationConfig(max_new_tokens=8, temperature=5.0, seed=0))
    assert torch.equal(torch.get_rng_state(), state), "a seeded call must use its own generator"
    assert sample(0) == sample(0) == first
    assert sample(0) != sample(1)
    assert sample(0) != run(setup, GenerationConfig(max_new_tokens=8))


def test_tiny_top_p_equals_greedy(setup):
    greedy = run(setup, GenerationConfig(max_new_tokens=8))
    assert run(setup, GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=3)) == greedy


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()[None].expand(400, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, 0.5, g).tolist()) == {0, 1}  # 0.4 < 0.5 <= 0.4 + 0.3
    assert set(sample_next(logits, 1.0, 0.75, g).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, 1.0, 1.0, g).tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("kw,field", [({"max_new_tokens": 0}, "max_new_tokens"),
                                      ({"temperature": -0.1}, "temperature"),
                                      ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")])
def test_invalid_generation_config_raises(setup, kw, field):
    with pytest.raises(ConfigError, match=field):
        GenerationConfig(**kw).validate()
    with pytest.raises(ConfigError, match=field):
        run(setup, GenerationConfig(**kw))


# ------------------------------------------------------------------------------------------------ Pipeline


def script_model(monkeypatch, model, prompt_len: int, script: list[int]) -> list[int]:
    """Make ``model`` emit ``script`` token by token (it still runs); returns the steps it was called at."""
    calls: list[int] = []
    forward = model.forward

    def scripted(batch, **kw):
        out = forward(batch, **kw)
        step = batch.attention_mask.shape[1] - prompt_len
        calls.append(step)
        logits = torch.full_like(out.logits, -1e4)  # [B, 1, V]
        logits[..., script[min(step, len(script) - 1)]] = 0.0
        out.logits = logits
        return out

    monkeypatch.setattr(model, "forward", scripted)
    return calls


@pytest.mark.parametrize("stop,expected", [(["."], "red circle"), (["circle. b"], "red "),
                                           (["zzz", "."], "red circle"), ([], "red circle. blue square")])
def test_stop_strings_cut_the_text_and_stop_generating(setup, monkeypatch, stop, expected):
    model, processor, _, _ = setup
    tok = processor.tokenizer
    script = tok.encode("red circle. blue square")
    prompt = "<image> the scene:"
    one = fixed_media(torch.zeros(1, 3, 16, 16), model.image_seq_len)
    calls = script_model(monkeypatch, model, len(processor.prompt(prompt, one).ids), script)
    pipe = Pipeline(model, processor)
    image = Image.new("RGB", (16, 16), (200, 0, 0))
    text = pipe.generate(image, prompt, max_new_tokens=len(script), stop=stop)
    assert text == expected
    hit = [j + 1 for j in range(len(script)) if any(s in tok.decode(script[:j + 1]) for s in stop)]
    n = hit[0] if hit else len(script)
    assert len(calls) == n  # no forward pass after the stop string appeared


def test_chat_batch_equals_separate_chats(setup):
    _, processor, _, _ = setup
    pipe = Pipeline(setup[0], processor)
    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (20, 12), (0, 0, 255))
    reqs = [(red, "what colour?"), ([red, blue], "<image> vs <image>: which is bigger?"), (None, "hello")]
    batched = pipe.chat_batch(reqs, max_new_tokens=5)
    assert batched == [pipe.chat(im, q, max_new_tokens=5) for im, q in reqs]


def test_score_equals_prefix_by_prefix_log_probs(setup):
    model, processor, _, _ = setup
    pipe = Pipeline(model, processor)
    image = Image.new("RGB", (16, 16), (0, 128, 255))
    prompt, continuation = "<image> the shape is", " a red circle"
    scores = pipe.score(image, prompt, continuation)

    media = processor.prepare_images([image])
    p_ids = processor.prompt(prompt, media).ids
    c_ids = processor.tokenizer.encode(continuation)
    assert len(scores) == len(c_ids) > 1
    assert all(s <= 0 for s in scores)
    with torch.no_grad():
        for j, (s, target) in enumerate(zip(scores, c_ids)):
            logits = forward(model, p_ids + c_ids[:j], media).logits[0, -1]  # prediction of token j
            assert s == pytest.approx(float(torch.log_softmax(logits, -1)[target]), abs=1e-5)


def test_score_rejects_placeholders_in_continuation_and_empty_prompt(setup):
    pipe = Pipeline(setup[0], setup[1])
    with pytest.raises(DataError, match="must not contain image placeholders"):
        pipe.score(None, "hi", "look <image>")
    with pytest.raises(DataError, match="non-empty prompt"):
        pipe.score(None, "", "hi")
    assert pipe.score(None, "hi", "") == []


def test_embedding_a_generative_model_is_refused_by_name(setup):
    pipe = Pipeline(setup[0], setup[1])
    with pytest.raises(DataError, match=r"embed_images needs a dual encoder \(CLIP or SigLIP\)"):
        pipe.embed_images([Image.new("RGB", (16, 16))])
    with pytest.raises(DataError, match=r"embed_texts needs a dual encoder"):
        pipe.embed_texts(["a red circle"])
