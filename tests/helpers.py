"""Small helpers the tests share: images as a model takes them, a forward pass from plain tensors, and the
text-to-image recipe tests' data, quiet training and in-process images API."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from vlmkit.batch import Batch, MediaInputs


def fixed_media(pixels: torch.Tensor, tokens: int) -> MediaInputs:
    """Fixed-size images [n, C, H, W], each filling ``tokens`` LM positions."""
    return MediaInputs(pixels, [tokens] * len(pixels))


def forward(model, input_ids, media: MediaInputs | None = None, cache=None, logits_to_keep: int = 0, **fields):
    """``model`` on a Batch of ``input_ids`` (a tensor or a list of ids), ``media`` and any other Batch fields."""
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor([input_ids])
    return model(Batch(ids, media=media, **fields), cache=cache, logits_to_keep=logits_to_keep)


def pairs(pixels: torch.Tensor, input_ids: torch.Tensor) -> Batch:
    """A dual encoder's batch: images [B, C, H, W] and their texts [B', T]."""
    return Batch(input_ids, media=MediaInputs(pixels, [0] * len(pixels)))


def slots(processor, n: int) -> MediaInputs:
    """``n`` fixed-size images of ``processor`` as its text sees them (token counts, no pixels)."""
    return processor.placeholders([None] * n)


def encode_prompt(processor, text: str, n_images: int = 0, where: str = "prompt") -> list[int]:
    return processor.prompt(text, slots(processor, n_images), where).ids


def encode_chat(processor, question, n_images: int = 0, where: str = "prompt") -> list[int]:
    return processor.chat(question, slots(processor, n_images), where).ids


def encode_conversation(processor, conversation, n_images: int = 0, where: str = "sample"):
    enc = processor.supervised(conversation, slots(processor, n_images), where)
    return enc.ids, enc.labels


def quiet(fn, *args, **kw):
    """``fn(*args, **kw)`` (a ``train`` or an evaluation) without progress bars or log lines, on one thread: module
    fixtures run before the function-scoped ``single_thread`` fixture."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kw, progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)


def t2i_shapes(out, n: int = 60, pairs: int = 240, val_pairs: int = 16):
    """A ShapesWorld folder of ``n`` scenes at 64 px with ``pairs`` text-to-image training pairs and ``val_pairs``
    held-out ones (seed 3), the data every text-to-image recipe test trains on; returns ``out``."""
    from vlmkit.data.shapes import generate_shapes
    from vlmkit.eval.judge.pairs import write_t2i_pairs

    generate_shapes(out, n=n, seed=3, size=64, progress=False)
    write_t2i_pairs(out, pairs, seed=3)
    write_t2i_pairs(out, val_pairs, seed=3, split="val")
    return out


@contextmanager
def images_api(checkpoint):
    """(the openai module, a client) of the official ``openai`` client talking to vlmkit's app for ``checkpoint``
    in process (starlette's TestClient, an engine started and stopped around it); skips when the test or serve
    extras are missing."""
    import pytest

    openai = pytest.importorskip("openai", reason="the API test uses the official openai client (test extra)")
    pytest.importorskip("fastapi", reason="the API test needs the serve extra")
    from starlette.testclient import TestClient

    import vlmkit
    from vlmkit.serve.api import create_app
    from vlmkit.serve.engine import Engine

    engine = Engine(vlmkit.load(checkpoint), max_new_tokens=8)
    engine.start()
    try:
        with TestClient(create_app(engine, api_key="k", request_timeout=60)) as http:
            yield openai, openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=http,
                                        max_retries=0)
    finally:
        engine.stop()


def assert_api_images_equal_pipelines(client, model: str, checkpoint, prompt: str, **sampling) -> None:
    """Two images drawn through ``POST /v1/images/generations`` (``sampling``: vlmkit's extra fields) are, pixel
    for pixel, the ones ``Pipeline.generate_image`` draws with the same options."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    import vlmkit

    out = client.images.generate(model=model, prompt=prompt, n=2, response_format="b64_json", extra_body=sampling)
    want = vlmkit.load(checkpoint).generate_image(prompt, n=2, **sampling)
    assert len(out.data) == 2
    for got, ref in zip(out.data, want):
        image = Image.open(io.BytesIO(base64.b64decode(got.b64_json))).convert("RGB")
        assert image.size == ref.size and np.array_equal(np.asarray(image), np.asarray(ref))
