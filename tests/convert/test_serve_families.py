"""Continuous batching is exact for every generative family: requests with images of different sizes (so
AnyRes, image splitting and native-resolution families give them different token counts), joining a batch that
is already decoding, get the answers Pipeline.chat gives each alone. Qwen2-VL's M-RoPE offsets and PaliGemma's
prefix-LM prefill travel with their rows."""

from __future__ import annotations

import pytest

import vlmkit
from vlmkit.generation import GenerationConfig
from vlmkit.serve.engine import Engine

from hf_fixtures import real_images

pytest.importorskip("transformers", reason="transformers (a test extra) builds the families' tiny checkpoints")
pytestmark = pytest.mark.usefixtures("single_thread")

FOLDERS = {"llava": "llava_folder", "llava_next": "next_folder", "llava_onevision": "ov_folder",
           "qwen2_vl": "qwen_folder", "idefics3": "idefics3", "paligemma": "paligemma_folder",
           "blip2": "blip2_folder", "instructblip": "instructblip_folder", "flamingo": "idefics_folder",
           "mllama": "mllama_folder", "fuyu": "fuyu_folder", "qwen2_5_vl": "qwen25_folder", "idefics2": "idefics2", "internvl": "internvl_folder",
           "mistral3": "mistral3_folder", "gemma3": "gemma3_folder", "paligemma2": "paligemma2_folder"}
QUESTIONS = ["What colour is the small circle?", "How many squares?", "Describe the image."]


@pytest.mark.parametrize("family", sorted(FOLDERS))
def test_joined_requests_answer_as_alone(request, family):
    pipe = vlmkit.load(request.getfixturevalue(FOLDERS[family])[0])
    images = real_images()  # 72x48, 40x60, 64x64
    lengths = [12, 5, 8]
    solo = [pipe.chat(images[i], QUESTIONS[i], max_new_tokens=n) for i, n in enumerate(lengths)]
    engine = Engine(pipe).start()
    try:
        first = iter(engine.submit_chat([{"role": "user", "content": QUESTIONS[0]}], [images[0]],
                                        GenerationConfig(max_new_tokens=lengths[0])))
        head = next(first)
        rest = [engine.submit_chat([{"role": "user", "content": QUESTIONS[i]}], [images[i]],
                                   GenerationConfig(max_new_tokens=lengths[i])) for i in (1, 2)]
        answers = [head.text + "".join(e.text for e in first)] + [s.text()[0] for s in rest]
    finally:
        engine.stop()
    assert answers == solo


def test_one_image_asked_two_things_by_instructblip_answers_each_as_alone(instructblip_folder):
    """InstructBLIP's image features depend on the question (its Q-Former reads it): the engine's feature cache
    keys them by image and instruction, so the second question does not reuse the first one's features."""
    pipe = vlmkit.load(instructblip_folder[0])
    image = real_images()[0]
    solo = [pipe.chat(image, q, max_new_tokens=6) for q in QUESTIONS[:2]]
    engine = Engine(pipe).start()
    try:
        streams = [engine.submit_chat([{"role": "user", "content": q}], [image], GenerationConfig(max_new_tokens=6))
                   for q in QUESTIONS[:2]]
        answers = [s.text()[0] for s in streams]
    finally:
        engine.stop()
    assert answers == solo
    assert engine.stats.image_cache_misses == 2
