"""``POST /v1/images/generations`` through the official ``openai`` client's ``images.generate``: the PNGs equal
Pipeline.generate_image's for the same seed (and resized as asked), the same server chats with the same model, every
bad field is a 400 naming it, and a model that does not draw refuses by name."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

import vlmkit
from vlmkit.serve.engine import Engine

from conftest import API_KEY, JANUS_PROMPT as PROMPT, serve, started

pytest.importorskip("fastapi", reason="the API tests need the serve extra: pip install 'vlmkit[serve]'")
openai = pytest.importorskip("openai", reason="the API tests use the official openai client (test extra)")
httpx = pytest.importorskip("httpx", reason="the API tests need httpx (test extra)")

from PIL import Image  # noqa: E402

from vlmkit.serve.api import create_app  # noqa: E402

@pytest.fixture(scope="module")
def janus_server(janus_checkpoint):
    with started(Engine(vlmkit.load(janus_checkpoint), max_new_tokens=16)) as engine:
        with serve(create_app(engine, api_key=API_KEY, request_timeout=60)) as srv:
            yield srv


@pytest.fixture(scope="module")
def client(janus_server):
    return openai.OpenAI(base_url=f"{janus_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def pixels(b64: str, size=(64, 64)) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG" and image.size == size
    return np.asarray(image.convert("RGB"))


def test_images_equal_the_pipelines_for_the_same_seed(client, janus_checkpoint):
    out = client.images.generate(model="tiny-janus", prompt=PROMPT, n=2, size="64x64", response_format="b64_json",
                                 extra_body={"seed": 11, "cfg_scale": 3.0, "top_k": 40})
    assert len(out.data) == 2 and out.created > 0
    want = vlmkit.load(janus_checkpoint).generate_image(PROMPT, n=2, seed=11, cfg_scale=3.0, top_k=40)
    for got, ref in zip(out.data, want):
        assert np.array_equal(pixels(got.b64_json), np.asarray(ref))
    again = client.images.generate(prompt=PROMPT, n=2, response_format="b64_json",
                                   extra_body={"seed": 11, "cfg_scale": 3.0, "top_k": 40})
    assert [d.b64_json for d in again.data] == [d.b64_json for d in out.data]


def test_a_larger_size_is_the_image_resized_nearest(client, janus_checkpoint):
    out = client.images.generate(prompt=PROMPT, size="128x128", extra_body={"seed": 2})
    ref = vlmkit.load(janus_checkpoint).generate_image(PROMPT, seed=2)[0].resize((128, 128), Image.NEAREST)
    assert np.array_equal(pixels(out.data[0].b64_json, (128, 128)), np.asarray(ref))


def test_the_model_that_draws_also_chats(client):
    answer = client.chat.completions.create(model="tiny-janus", max_tokens=4, temperature=0,
                                            messages=[{"role": "user", "content": "what colour"}])
    assert answer.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, param", [
    ({"n": 0}, "n"), ({"n": 9}, "n"), ({"size": "100x50"}, "size"), ({"size": "2048x2048"}, "size"),
    ({"size": 64}, "size"), ({"response_format": "url"}, "response_format"), ({"prompt": ""}, "prompt"),
    ({"prompt": None}, "prompt"), ({"cfg_scale": -1}, "cfg_scale"), ({"temperature": 3}, "temperature"),
    ({"top_k": -2}, "top_k"), ({"seed": "x"}, "seed"), ({"output_format": "webp"}, "output_format"),
    ({"steps": 1001}, "steps"), ({"steps": 2.5}, "steps"),
])
def test_bad_fields_are_400s_naming_them(janus_server, body, param):
    with httpx.Client(base_url=janus_server.url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        r = http.post("/v1/images/generations", json={"prompt": PROMPT, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_steps_for_an_autoregressive_model_is_a_400_saying_why(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt=PROMPT, extra_body={"steps": 8})
    assert "draws its codes one at a time" in str(e.value)


def test_a_prompt_holding_an_image_placeholder_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="<image> a red circle")
    assert "reads no image" in str(e.value)


def test_the_count_is_in_the_metrics(janus_server, client):
    client.images.generate(prompt=PROMPT, extra_body={"seed": 1})
    text = httpx.get(f"{janus_server.url}/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("vlmkit_image_generation_requests_total"))
    assert float(line.split()[-1]) >= 1


def test_a_model_that_does_not_draw_refuses(server):
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as e:
        c.images.generate(prompt=PROMPT)
    assert "does not generate images" in str(e.value)
