"""The serving engine's continuous batching gives every request exactly what it would get alone
(Pipeline.chat), whichever requests share its batch and whenever they join or leave; images are encoded
once per content; stop strings, seeds, cancellation, timeouts and failures end one request, not the server."""

from __future__ import annotations

import random
import time

import pytest
import torch

from vlmkit.config import apply_overrides
from vlmkit.data.shapes import render_scene, sample_scene
from vlmkit.errors import ConfigError, DataError
from vlmkit.generation import GenerationConfig
from vlmkit.models import build_model
from vlmkit.pipeline import Pipeline
from vlmkit.presets import get_preset
from vlmkit.processing import Processor, TextTokenizer, train_bpe
from vlmkit.serve.engine import Engine, QueueFull

pytestmark = pytest.mark.usefixtures("single_thread")

QUESTIONS = ["what colour is it?", "how many squares are there in the picture?", "is it red?",
             "describe the image in one sentence.", "what shape is the small one?"]


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    preset = get_preset("tiny-llava")
    tok = TextTokenizer(train_bpe(["what colour is the small circle? it is red. how many squares? two."] * 4, 300))
    cfg = apply_overrides(preset.model, {"lm.vocab_size": tok.vocab_size})
    model = build_model(cfg, tok.token_id(preset.processor.image_token)).eval()
    proc = Processor(apply_overrides(preset.processor, {"image_seq_len": model.image_seq_len}), tok)
    return Pipeline(model, proc, cfg)


@pytest.fixture(scope="module")
def images():
    rng = random.Random(0)
    return [render_scene(sample_scene(rng, 64, 64, min_objects=1, max_objects=3)) for _ in range(5)]


def user(q):
    return [{"role": "user", "content": q}]


def test_requests_joining_a_running_batch_get_their_solo_answers(pipe, images):
    lengths = [40, 9, 17, 5, 25]
    solo = [pipe.chat(images[i], QUESTIONS[i], max_new_tokens=n) for i, n in enumerate(lengths)]
    engine = Engine(pipe, max_batch=3).start()  # five requests, three rows: two wait and join later
    try:
        first = engine.submit_chat(user(QUESTIONS[0]), [images[0]], GenerationConfig(max_new_tokens=lengths[0]))
        events = iter(first)
        head = next(events).text  # the first request is decoding before the others arrive
        streams = [engine.submit_chat(user(QUESTIONS[i]), [images[i]], GenerationConfig(max_new_tokens=lengths[i]))
                   for i in range(1, 5)]
        answers = [head + "".join(e.text for e in events)] + [s.text()[0] for s in streams]
    finally:
        engine.stop()
    assert answers == solo
    assert engine.stats.decode_steps < sum(lengths)  # rows shared decoding steps
    assert engine.stats.batch_size_sum / engine.stats.decode_steps > 1.5
    assert engine.stats.requests_finished == 5


def test_a_repeated_image_is_encoded_once_and_multi_turn_prompts_work(pipe, images):
    engine = Engine(pipe).start()
    try:
        a = engine.submit_chat(user("what colour is it?"), [images[0]], GenerationConfig(max_new_tokens=4)).text()
        b = engine.submit_chat(user("how many?"), [images[0].copy()], GenerationConfig(max_new_tokens=4)).text()
        convo = [{"role": "user", "content": "<image>\nwhat colour is it?"}, {"role": "assistant", "content": "red"},
                 {"role": "user", "content": "and the shape?"}]
        c, last = engine.submit_chat(convo, [images[0]], GenerationConfig(max_new_tokens=4)).text()
    finally:
        engine.stop()
    assert engine.stats.image_cache_misses == 1 and engine.stats.image_cache_hits == 2
    one = pipe.processor.placeholders([images[0]])
    ids = pipe.processor.chat(convo, one).ids
    assert last.prompt_tokens == len(ids) > len(pipe.processor.chat("and the shape?", one).ids)
    assert isinstance(a[0], str) and isinstance(b[0], str) and isinstance(c, str)


def test_stop_strings_seeds_and_sampling(pipe, images):
    engine = Engine(pipe).start()
    try:
        full, _ = engine.submit_chat(user(QUESTIONS[1]), [images[1]], GenerationConfig(max_new_tokens=30)).text()
        stop = full[5:7]
        cut, last = engine.submit_chat(user(QUESTIONS[1]), [images[1]],
                                       GenerationConfig(max_new_tokens=30, stop=[stop])).text()
        assert cut == full[:full.find(stop)] and last.finish_reason == "stop"
        sampled = [engine.submit_chat(user(QUESTIONS[2]), [images[2]],
                                      GenerationConfig(max_new_tokens=20, temperature=1.0, seed=s)).text()[0]
                   for s in (1, 1, 2)]
        assert sampled[0] == sampled[1] != sampled[2]
        assert sampled[0] == pipe.chat(images[2], QUESTIONS[2], max_new_tokens=20, temperature=1.0, seed=1)
    finally:
        engine.stop()


def test_cancel_timeout_queue_limit_and_bad_requests(pipe, images):
    engine = Engine(pipe, max_batch=1, max_queue=1, max_prompt_tokens=40, max_new_tokens=64)
    with pytest.raises(DataError, match="more than this server allows"):
        engine.submit_chat(user(QUESTIONS[0]), [images[0]], GenerationConfig(max_new_tokens=65))
    with pytest.raises(DataError, match="prompt has .* tokens, more than this server allows"):
        engine.submit_chat(user("red " * 100), [images[0]], GenerationConfig(max_new_tokens=4))
    with pytest.raises(DataError, match="placeholder"):
        engine.submit_chat(user("<image> <image> two?"), [images[0]], GenerationConfig(max_new_tokens=4))
    with pytest.raises(DataError, match="last message must be the user's"):
        engine.submit_chat([{"role": "assistant", "content": "hi"}], [], GenerationConfig(max_new_tokens=4))
    engine.submit_chat(user(QUESTIONS[0]), [images[0]], GenerationConfig(max_new_tokens=4))
    with pytest.raises(QueueFull):  # not started: the one queued request fills the queue
        engine.submit_chat(user(QUESTIONS[0]), [images[0]], GenerationConfig(max_new_tokens=4))
    engine.start()
    try:
        slow = engine.submit_chat(user(QUESTIONS[0]), [images[0]], GenerationConfig(max_new_tokens=64), timeout=1e-3)
        assert slow.text()[1].finish_reason == "timeout"
        gone = engine.submit_chat(user(QUESTIONS[0]), [images[0]], GenerationConfig(max_new_tokens=64))
        gone.cancel()
        assert gone.text()[1].finish_reason == "cancelled"
        ok = engine.submit_chat(user(QUESTIONS[2]), [images[2]], GenerationConfig(max_new_tokens=5)).text()[0]
        assert ok == pipe.chat(images[2], QUESTIONS[2], max_new_tokens=5)
    finally:
        engine.stop()


def test_a_failure_inside_the_model_ends_its_requests_and_the_engine_serves_on(pipe, images, monkeypatch):
    engine = Engine(pipe).start()
    try:
        original = pipe.model.encode_media
        monkeypatch.setattr(pipe.model, "encode_media", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        text, last = engine.submit_chat(user("what?"), [images[3]], GenerationConfig(max_new_tokens=4)).text()
        assert last.finish_reason == "error" and "boom" in last.error
        monkeypatch.setattr(pipe.model, "encode_media", original)
        ok, last = engine.submit_chat(user(QUESTIONS[4]), [images[4]], GenerationConfig(max_new_tokens=6)).text()
        assert last.finish_reason in ("stop", "length") and ok == pipe.chat(images[4], QUESTIONS[4], max_new_tokens=6)
    finally:
        engine.stop()


def test_a_dual_encoder_embeds_and_refuses_to_chat():
    from vlmkit.families.dual_encoder import train_caption_tokenizer
    from vlmkit.train.build import build_for_recipe
    from vlmkit.train.recipe import load_recipe

    tok = train_caption_tokenizer(["a red circle.", "two blue squares."] * 8, 300)
    cfg, model, processor = build_for_recipe(load_recipe("tiny-clip"), tok)
    engine = Engine(Pipeline(model.eval(), processor, cfg)).start()
    with pytest.raises(ConfigError, match="dual encoder"):
        engine.submit_chat(user("hi"), [], GenerationConfig())
    z = engine.embed_texts(["a red circle."])
    assert z.shape == (1, cfg.contrastive.embed_dim) and abs(float(z.norm()) - 1) < 1e-5
    engine.stop()


def test_stream_iterates_in_an_event_loop(pipe, images):
    import asyncio

    engine = Engine(pipe).start()

    async def main():
        stream = engine.submit_chat(user(QUESTIONS[3]), [images[3]], GenerationConfig(max_new_tokens=7))
        return "".join([e.text async for e in stream])

    try:
        assert asyncio.run(main()) == pipe.chat(images[3], QUESTIONS[3], max_new_tokens=7)
    finally:
        engine.stop()


def test_requests_ended_while_queued_are_never_prefilled(pipe, images):
    engine = Engine(pipe)
    gone = engine.submit_chat(user(QUESTIONS[0]), [images[0]], GenerationConfig(max_new_tokens=4))
    late = engine.submit_chat(user(QUESTIONS[1]), [images[1]], GenerationConfig(max_new_tokens=4), timeout=1e-6)
    gone.cancel()
    time.sleep(0.01)
    engine.start()
    try:
        assert gone.text()[1].finish_reason == "cancelled" and late.text()[1].finish_reason == "timeout"
        assert engine.stats.prompt_tokens_total == 0 and engine.stats.requests_finished == 2
    finally:
        engine.stop()


def test_per_row_decoding_state_merges_padded_and_is_taken_by_row():
    from vlmkit.nn.cache import merge_rows as _merge_rows
    from vlmkit.nn.cache import take_rows as _take_rows

    seen_a = torch.tensor([[[True, True, False]], [[True, False, False]]])  # [2, 1, S=3]
    seen_b = torch.tensor([[[True, True, True, True, True]]])  # [1, 1, S=5]
    merged = _merge_rows(seen_a, seen_b, 2, 1)
    assert merged.shape == (3, 1, 5) and merged.dtype == torch.bool
    assert merged[:2, :, 3:].sum() == 0 and torch.equal(merged[:2, :, :3], seen_a) and merged[2].all()
    # a batch without the state (no images): zeros of the other's shape; tuples merge element-wise
    kv = (torch.ones(1, 2, 4, 3), torch.ones(1, 2, 4, 3))
    both = _merge_rows(None, kv, 2, 1)
    assert both[0].shape == (3, 2, 4, 3) and both[0][:2].sum() == 0 and both[1][2].eq(1).all()
    assert _merge_rows(None, None, 2, 1) is None
    taken = _take_rows(both, torch.tensor([2, 0]))
    assert taken[0].shape == (2, 2, 4, 3) and taken[0][0].eq(1).all() and taken[0][1].eq(0).all()
