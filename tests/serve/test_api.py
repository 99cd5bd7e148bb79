"""The OpenAI-compatible API (serve/api.py) against the real Engine on tiny real checkpoints, through the
official ``openai`` client: greedy answers equal Pipeline's token for token (text, images, several turns),
streaming concatenates to the same answer, stop strings, seeds, embeddings equal Pipeline's, and every refusal
is OpenAI's error shape with the status and a message naming the field."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import random
import re
import struct
import time
import zlib

import pytest

pytest.importorskip("fastapi", reason="the API tests need the serve extra: pip install 'vlmkit[serve]'")
openai = pytest.importorskip("openai", reason="the API tests use the official openai client (test extra)")
httpx = pytest.importorskip("httpx", reason="the API tests need httpx (test extra)")

from PIL import Image  # noqa: E402

from vlmkit.generation import GenerationConfig, generate  # noqa: E402
from vlmkit.serve.api import create_app  # noqa: E402

# the main server's limits (conftest.py): bodies, image bytes and pixels, the engine's max_tokens
MAX_BODY, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_NEW_TOKENS = 1 << 20, 200_000, 1_000_000, 64
QUESTION = "What shape is in the image?"


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def connect(url: str, key: str = "-", **kw):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60, **kw)


@pytest.fixture(scope="module")
def client(server):
    return connect(server.url, server.api_key)


@pytest.fixture(scope="module")
def http(server):
    auth = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.Client(base_url=server.url, headers=auth, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def image_url(image_path):
    return data_url(image_path.read_bytes())


def chat(client, content, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="any", messages=[{"role": "user", "content": content}], **kw)


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def test_the_limits_here_are_the_servers(server, engine):
    assert server.limits == {"max_body_bytes": MAX_BODY, "max_image_bytes": MAX_IMAGE_BYTES,
                             "max_image_pixels": MAX_IMAGE_PIXELS} and engine.max_new_tokens == MAX_NEW_TOKENS


# ------------------------------------------------------------------------------------------------ answers
@pytest.mark.parametrize("question", [QUESTION, "hello", "describe the picture in one sentence."])
def test_text_chat_equals_pipeline_chat(client, llava_pipe, question):
    out = chat(client, question, max_tokens=40)
    expected = llava_pipe.chat([], question, max_new_tokens=40)
    choice = out.choices[0]
    assert choice.message.content == expected and choice.message.role == "assistant"
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and out.model == "llava"
    prompt = llava_pipe.processor.chat(question, llava_pipe.processor.prepare_images([])).ids
    assert out.usage.prompt_tokens == len(prompt)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    # "length" exactly when the answer used every token it was allowed
    assert choice.finish_reason == ("length" if out.usage.completion_tokens == 40 else "stop")


def test_image_chat_equals_pipeline_chat(client, llava_pipe, image_path, image_url):
    out = chat(client, [image_part(image_url), text_part(QUESTION)], max_tokens=50)
    expected = llava_pipe.chat([image_path], QUESTION, max_new_tokens=50)
    assert out.choices[0].message.content == expected and len(expected) > 3
    inputs = llava_pipe.processor.prepare_images([image_path])
    assert out.usage.prompt_tokens == len(llava_pipe.processor.chat(QUESTION, inputs).ids)
    # an image part after the text stands where it is: the placeholder at the end of the question
    out = chat(client, [text_part("Look: "), image_part(image_url)], max_tokens=50)
    assert out.choices[0].message.content == llava_pipe.chat([image_path], "Look: <image>", max_new_tokens=50)


def test_conversation_equals_the_processor_prompt(client, llava_pipe, image_path, image_url):
    """System prompt, an earlier exchange, then an image in the second user turn: the prompt is the one the
    Processor builds from the same conversation, and the answer is generate()'s on it."""
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "a red circle."},
                {"role": "user",
                 "content": [text_part("and here?"), image_part(image_url), text_part("which?")]}]
    out = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=30)
    proc = llava_pipe.processor
    inputs = proc.prepare_images([image_path])
    as_text = messages[:3] + [{"role": "user", "content": "and here?<image>\nwhich?"}]
    ids = proc.chat(as_text, inputs).ids
    new = generate(llava_pipe.model, [ids], inputs, proc.tokenizer.eos_id, proc.tokenizer.pad_id,
                   GenerationConfig(max_new_tokens=30))[0]
    assert out.choices[0].message.content == proc.tokenizer.decode(new)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(new)


def test_unicode_text_reaches_the_model(client, llava_pipe):
    junk = "ⓗⓔⓛⓛⓞ \u202e🦄\u0000 ١٢٣ \ufeffé\u0301 𝔘𝔫𝔦"
    out = chat(client, junk, max_tokens=20)
    assert out.choices[0].message.content == llava_pipe.chat([], junk, max_new_tokens=20)


def test_streaming_concatenates_to_the_answer(client, image_url, http):
    for content, max_tokens in ((QUESTION, 50), ([image_part(image_url), text_part(QUESTION)], 50),
                                ("hello", 5)):
        whole = chat(client, content, max_tokens=max_tokens)
        chunks = list(chat(client, content, max_tokens=max_tokens, stream=True,
                           stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert "".join(pieces) == whole.choices[0].message.content
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == [whole.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
        assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    # the wire format: SSE data lines, [DONE] last
    body = {"model": "m", "messages": [{"role": "user", "content": QUESTION}], "stream": True,
            "max_tokens": 8, "temperature": 0}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    last = json.loads(events[-3][len("data: "):])
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and last["choices"][0]["delta"] == {}


def test_stop_strings(client, llava_pipe):
    full = llava_pipe.chat([], QUESTION, max_new_tokens=40)
    # a stop string whose first occurrence is well inside the answer
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full.find(full[i:i + 2]) == i
                and "\ufffd" not in full[i:i + 2])
    out = chat(client, QUESTION, max_tokens=40, stop=stop)
    expected = llava_pipe.chat([], QUESTION, max_new_tokens=40, stop=[stop])
    assert out.choices[0].message.content == full[:full.find(stop)] == expected
    assert out.choices[0].finish_reason == "stop"
    streamed = chat(client, QUESTION, max_tokens=40, stop=["\u2603", stop], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[:full.find(stop)]


def test_max_tokens_gives_length(client, llava_pipe):
    out = chat(client, QUESTION, max_tokens=3)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3
    assert out.choices[0].message.content == llava_pipe.chat([], QUESTION, max_new_tokens=3)
    # without max_tokens: the server's limit (64 here, under the default 256)
    out = chat(client, QUESTION)
    assert out.usage.completion_tokens <= MAX_NEW_TOKENS
    assert out.choices[0].message.content == llava_pipe.chat([], QUESTION, max_new_tokens=MAX_NEW_TOKENS)


def test_seed_reproduces_sampling(client, llava_pipe, image_url, image_path):
    content = [image_part(image_url), text_part(QUESTION)]
    a = chat(client, content, temperature=1.0, top_p=0.9, seed=7, max_tokens=20).choices[0].message.content
    b = chat(client, content, temperature=1.0, top_p=0.9, seed=7, max_tokens=20).choices[0].message.content
    assert a == b == llava_pipe.chat([image_path], QUESTION, temperature=1.0, top_p=0.9, seed=7,
                                     max_new_tokens=20)
    others = {chat(client, content, temperature=1.0, seed=s, max_tokens=20).choices[0].message.content
              for s in (8, 9, 10)}
    assert len(others | {a}) > 1  # sampling does depend on the seed


def test_local_files_only_when_allowed(engine, client, image_path, image_url, serve_app):
    out = chat(client, [image_part(image_url), text_part(QUESTION)], max_tokens=20)
    expected = out.choices[0].message.content
    with serve_app(create_app(engine, allow_local_files=True)) as srv:
        local = connect(srv.url)
        for url in (str(image_path), image_path.as_uri()):
            out = chat(local, [image_part(url), text_part(QUESTION)], max_tokens=20)
            assert out.choices[0].message.content == expected
        with pytest.raises(openai.BadRequestError) as e:
            chat(local, [image_part(str(image_path.parent / "missing.png")), text_part("q")])
        assert "messages[0].content[0].image_url: no image file at" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, [image_part(str(image_path)), text_part("q")])
    assert "local image files are not served" in e.value.body["message"]


def _animated_gif() -> bytes:
    frames = [Image.new("P", (20, 10), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


ODD_IMAGES = {  # valid images a client may send: each answers as its RGB conversion does through Pipeline
    "1x1": lambda: png_bytes(Image.new("RGB", (1, 1), (255, 0, 0))),
    "1x1000000": lambda: png_bytes(Image.new("L", (1, 1_000_000), 128)),
    "palette+transparency": lambda: _encoded(Image.new("P", (20, 10), 3), "PNG", transparency=3),
    "LA": lambda: png_bytes(Image.new("LA", (20, 10), (100, 50))),
    "16-bit": lambda: png_bytes(Image.new("I;16", (20, 10), 40000)),
    "CMYK JPEG": lambda: _encoded(Image.new("CMYK", (20, 10), (0, 100, 200, 0)), "JPEG"),
    "animated GIF": _animated_gif,
    "WebP": lambda: _encoded(Image.new("RGB", (20, 10), (0, 200, 0)), "WEBP"),
    "BMP": lambda: _encoded(Image.new("RGB", (20, 10), (0, 0, 200)), "BMP"),
}


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
@pytest.mark.parametrize("name", list(ODD_IMAGES))
def test_odd_but_valid_images_answer(client, llava_pipe, name):
    data = ODD_IMAGES[name]()
    out = chat(client, [image_part(data_url(data)), text_part(QUESTION)], max_tokens=8)
    with Image.open(io.BytesIO(data)) as im:
        expected = llava_pipe.chat([im.convert("RGB")], QUESTION, max_new_tokens=8)
    assert out.choices[0].message.content == expected


# ---------------------------------------------------------------------------------------------- other routes
def test_models(client, engine):
    assert [m.id for m in client.models.list().data] == [engine.model_name] == ["llava"]
    assert client.models.retrieve("llava").id == "llava"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_embeddings_equal_pipeline(clip_server, clip_pipe, image_path, image_url):
    c = connect(clip_server.url, clip_server.api_key)
    texts = ["a red circle.", "two blue squares and a triangle"]
    out = c.embeddings.create(model="clip", input=[texts[0], image_url, texts[1]], encoding_format="float")
    assert [d.index for d in out.data] == [0, 1, 2] and out.object == "list"
    want_t, want_i = clip_pipe.embed_texts(texts), clip_pipe.embed_images([image_path])
    for got, want in zip([out.data[0], out.data[1], out.data[2]], [want_t[0], want_i[0], want_t[1]]):
        assert len(got.embedding) == want.numel() == 32
        assert max(abs(a - b) for a, b in zip(got.embedding, want.tolist())) < 1e-5
    assert out.usage.prompt_tokens == out.usage.total_tokens > 0
    # the client's default (base64 float32, decoded by the client) gives the same numbers; one string works
    default = c.embeddings.create(model="clip", input=texts[1])
    assert max(abs(a - b) for a, b in zip(default.data[0].embedding, want_t[1].tolist())) < 1e-5
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model="clip", input=["ok", "data:image/png;base64,%%%"], encoding_format="float")
    assert "input[1]: the data URL's base64 does not decode" in e.value.body["message"]
    # a dual encoder does not chat
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, "hello")
    assert "dual encoder" in e.value.body["message"]


@pytest.mark.parametrize("fields, message", [
    ({"input": []}, "input must not be empty"),
    ({"input": [[1, 2, 3]]}, "token arrays are not supported"),
    ({"input": ["a", ""]}, "input[1] must not be empty"),
    ({"input": ["a", 5]}, "input must be strings"),
    ({"input": None}, "input must be a string or an array of strings, got null"),
    ({"input": ["a"] * 2049}, "input holds at most 2048 items"),
    ({"input": "a", "encoding_format": "hex"}, "encoding_format must be 'float' or 'base64'"),
    ({"input": "a", "dimensions": 8}, "dimensions is not supported"),
    ({"input": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}, "input: not an image"),
    ({"input": "\ud800"}, "input is not valid Unicode"),
])
def test_embeddings_refusals(clip_server, fields, message):
    r = httpx.post(f"{clip_server.url}/v1/embeddings", content=json.dumps(fields).encode(),
                   headers={"Authorization": f"Bearer {clip_server.api_key}"})
    assert r.status_code == 400 and message in r.json()["error"]["message"]


def test_embeddings_refused_by_a_generative_model(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="llava", input="hello", encoding_format="float")
    assert e.value.body["param"] == "model" and "embeddings need a dual encoder" in e.value.body["message"]
    assert "generative" in e.value.body["message"]


def test_health_metrics_and_page(server, http, client, engine):
    chat(client, "hello", max_tokens=2)
    h = httpx.get(f"{server.url}/health").json()  # no key needed
    assert h == {"status": "ok", "model": "llava", "queue_depth": 0}
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['vlmkit_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert samples["vlmkit_generated_tokens_total"] == engine.stats.generated_tokens_total > 0
    assert samples["vlmkit_prompt_tokens_total"] == engine.stats.prompt_tokens_total > 0
    assert samples["vlmkit_queue_depth"] == 0 and samples["vlmkit_running_requests"] == 0
    s = engine.stats
    assert samples["vlmkit_batch_size"] == pytest.approx(s.batch_size_sum / s.decode_steps) and s.decode_steps
    assert "vlmkit_image_cache_hits_total" in samples and "vlmkit_image_cache_misses_total" in samples
    lat = 'vlmkit_request_latency_seconds_bucket{endpoint="/v1/chat/completions",le='
    buckets = [(k, v) for k, v in samples.items() if k.startswith(lat)]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1][0].endswith('le="+Inf"}')
    assert counts[-1] == samples['vlmkit_request_latency_seconds_count{endpoint="/v1/chat/completions"}']
    assert samples['vlmkit_request_latency_seconds_sum{endpoint="/v1/chat/completions"}'] > 0
    for line in r.text.splitlines():  # every sample line: name{labels} value; HELP/TYPE comments
        assert re.fullmatch(r'# (HELP|TYPE) \w+ .+|\w+(\{(\w+="[^"]*",?)+\})? [-+0-9.eInf]+', line), line
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


# ------------------------------------------------------------------------------------------------ refusals
def test_api_key(server, client):
    for key in ("wrong", server.api_key + "x", server.api_key[:-1], "-"):
        with pytest.raises(openai.AuthenticationError) as e:
            chat(connect(server.url, key), "hello")
        assert e.value.status_code == 401 and "API key" in e.value.body["message"]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": []})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Basic {server.api_key}"})
    assert r.status_code == 401
    assert chat(client, "hello", max_tokens=1).choices[0].finish_reason in ("stop", "length")


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk declaring width x height (RGB, 8 bits), then a few bytes of IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\x00" * 64)
    idat_chunk = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return b"\x89PNG\r\n\x1a\n" + chunk + idat_chunk


def bomb_png(width: int, height: int) -> bytes:
    """A real, decodable PNG of width x height black pixels: a few kB that decode to width*height*3 bytes."""
    return png_bytes(Image.new("L", (width, height)))


def noise_png(side: int) -> bytes:
    """Random pixels: a PNG about as large as its pixels (3 bytes each)."""
    return png_bytes(Image.frombytes("RGB", (side, side), random.Random(side).randbytes(side * side * 3)))


U = {"role": "user", "content": "hello"}


def image_case(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [image_part(url), text_part("q")]}]}


BAD_REQUESTS = [
    # (the request's fields, the message must contain)
    ({}, "messages must be an array, got null"),
    ({"messages": []}, "messages must not be empty"),
    ({"messages": {"role": "user"}}, "messages must be an array, got an object"),
    ({"messages": ["hello"]}, "messages[0] must be a JSON object, got a string"),
    ({"messages": [{"role": "robot", "content": "hi"}]},
     "messages[0].role must be one of system, user, assistant"),
    ({"messages": [U, {"role": "user", "content": 5}]}, "messages[1].content must be a string or an array"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content must not be an empty array"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0].type must be"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
     "messages[0].content[0].text must be a string, got an integer"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "data:,"}]}]},
     "messages[0].content[0].image_url must be a JSON object"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].image_url.url must be a string, got null"),
    ({"messages": [{"role": "user", "content": "an <image> here"}]},
     "messages[0].content contains '<image>'"),
    ({"messages": [{"role": "assistant", "content": [image_part("data:image/png;base64,AAAA")]}, U]},
     "messages[0].content[0]: images go in user messages"),
    ({"messages": [U, {"role": "assistant", "content": "hi"}]}, "the last message must be the user's"),
    ({"messages": [{"role": "user", "content": "word " * 5000}]}, "tokens"),
    ({"messages": [U], "model": 5}, "model must be a string, got an integer"),
    ({"messages": [U], "temperature": "hot"}, "temperature must be a number, got a string"),
    ({"messages": [U], "temperature": 2.5}, "temperature must be in [0, 2], got 2.5"),
    ({"messages": [U], "temperature": True}, "temperature must be a number, got a boolean"),
    ({"messages": [U], "top_p": 0}, "top_p must be in (0, 1], got 0.0"),
    ({"messages": [U], "top_p": -1}, "top_p must be in (0, 1]"),
    ({"messages": [U], "max_tokens": 0}, f"max_tokens must be in [1, {MAX_NEW_TOKENS}]"),
    ({"messages": [U], "max_tokens": 10**30}, f"max_tokens must be in [1, {MAX_NEW_TOKENS}]"),
    ({"messages": [U], "max_tokens": -5}, "max_tokens must be in"),
    ({"messages": [U], "max_tokens": 1.5}, "max_tokens must be an integer, got a number"),
    ({"messages": [U], "max_completion_tokens": 100}, "max_completion_tokens must be in"),
    ({"messages": [U], "stop": ["a", "b", "c", "d", "e"]}, "stop holds at most 4 strings, got 5"),
    ({"messages": [U], "stop": [""]}, "stop[0] must not be empty"),
    ({"messages": [U], "stop": 5}, "stop must be a string or an array of strings"),
    ({"messages": [U], "seed": 2**70}, "seed must be in"),
    ({"messages": [U], "seed": "1"}, "seed must be an integer, got a string"),
    ({"messages": [U], "n": 2}, "n must be 1"),
    ({"messages": [U], "stream": "yes"}, "stream must be a boolean, got a string"),
    ({"messages": [U], "tools": [{"type": "function"}]}, "tools is not supported"),
    ({"messages": [U], "response_format": {"type": "json_object"}}, "response_format is not supported"),
    (image_case("data:image/png;base64,iVBORw0KGgo%%%"),
     "messages[0].content[0].image_url: the data URL's base64 does not decode"),
    (image_case("data:image/png;base64,iVBORw0KGgo"), "the data URL's base64 does not decode"),
    (image_case("data:text/plain;base64,aGVsbG8="), "a data URL must be data:image/<type>;base64,<data>"),
    (image_case("data:image/png,rawbytes"), "a data URL must be data:image/<type>;base64,<data>"),
    (image_case("https://example.com/cat.png"), "remote image URLs are not fetched"),
    (image_case("http://127.0.0.1/cat.png"), "remote image URLs are not fetched"),
    (image_case("ftp://example.com/cat.png"), "unsupported URL scheme 'ftp'"),
    (image_case("/etc/passwd"), "local image files are not served"),
    (image_case("file:///etc/passwd"), "local image files are not served"),
    (image_case(data_url(b"hello there")), "not an image in a supported format"),
    (image_case(data_url(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")),
     "not an image in a supported"),
    (image_case(data_url(bomb_png(1001, 1000))),
     f"the image is 1001x1000 = 1001000 pixels, more than {MAX_IMAGE_PIXELS}"),
    (image_case(data_url(png_header(100_000, 100_000))), "messages[0].content[0].image_url"),
    (image_case(data_url(noise_png(32)[:200])), "cannot decode the image"),
    (image_case(data_url(noise_png(300))), f"more than {MAX_IMAGE_BYTES}"),
    ({"messages": [{"role": "user", "content": [image_part(data_url(bomb_png(800, 800))),
                                                image_part(data_url(bomb_png(800, 800)))]}]},
     "messages[0].content[1].image_url: the request's images hold more than 1000000 pixels together"),
]


@pytest.mark.parametrize("fields, message", BAD_REQUESTS, ids=[f"{i}-{m[:40]}" for i, (_, m) in
                                                               enumerate(BAD_REQUESTS)])
def test_bad_request(client, fields, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/chat/completions", body=fields, cast_to=object)
    assert e.value.status_code == 400
    body = e.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    assert message in body["message"], body["message"]


@pytest.mark.parametrize("raw, message", [
    (b"{not json", "the request body is not valid JSON"),
    (b"", "the request body is empty"),
    (b"[1, 2]", "the request body must be a JSON object, got an array"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}', "temperature must be in"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content is not valid Unicode"),
    (b"\xff\xfe\x00garbage", "the request body is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "the request body is"),
    (b'{"max_tokens": 1' + b"0" * 5000 + b"}", "not valid JSON"),
])
def test_malformed_body(http, raw, message):
    r = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


def test_unknown_route_method_and_body_size(server, http, client):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        client.post("/nothing", body={}, cast_to=object)
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    # 413: declared by Content-Length, and sent chunked without one
    with pytest.raises(openai.APIStatusError) as e:
        chat(client, "x" * (MAX_BODY + 10))
    assert e.value.status_code == 413 and "more than this server takes" in e.value.body["message"]

    def chunks():
        for _ in range(MAX_BODY // 65536 + 4):
            yield b" " * 65536

    r = http.post("/v1/chat/completions", content=chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert chat(client, "hello", max_tokens=1).choices  # the connection pool and the server are fine


# ------------------------------------------------------------------------------------------------ the engine
def test_queue_full_is_429(switched, llava_pipe, serve_app, wait_until):
    engine, switch = switched
    with serve_app(create_app(engine, request_timeout=30)) as srv:
        c = connect(srv.url)
        switch.hold()  # the first request's prefill waits: it holds the one batch slot
        with httpx.Client(base_url=srv.url, timeout=60) as h:
            body = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 4}
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                first = pool.submit(h.post, "/v1/chat/completions", json=body)
                wait_until(switch.entered.is_set, what="the engine to take the first request")
                second = pool.submit(h.post, "/v1/chat/completions", json=body)
                wait_until(lambda: engine.stats.queue_depth == 1, what="the second request to wait")
                with pytest.raises(openai.RateLimitError) as e:
                    chat(c, "hello", max_tokens=4)
                assert e.value.status_code == 429 and "the queue is full" in e.value.body["message"]
                switch.release()
                expected = llava_pipe.chat([], "hello", max_new_tokens=4)
                for f in (first, second):
                    r = f.result(timeout=60)
                    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected
        assert chat(c, "hello", max_tokens=4).choices[0].message.content == expected


def test_timeout_is_504(switched, llava_pipe, serve_app, wait_until):
    engine, switch = switched
    with serve_app(create_app(engine, request_timeout=0.3)) as srv:
        c = connect(srv.url)
        # the engine's deadline: each forward takes 0.1 s, the answer would need 40
        switch.delay = 0.1
        start = time.monotonic()
        with pytest.raises(openai.InternalServerError) as e:
            chat(c, QUESTION, max_tokens=40)
        assert e.value.status_code == 504 and "longer than this server allows" in e.value.body["message"]
        assert e.value.body["type"] == "timeout_error" and time.monotonic() - start < 1.2
        chunks = list(chat(c, QUESTION, max_tokens=40, stream=True))
        assert chunks[-1].choices[0].finish_reason == "timeout"
        streamed = "".join(x.choices[0].delta.content or "" for x in chunks)
        assert llava_pipe.chat([], QUESTION, max_new_tokens=40).startswith(streamed)
        # a forward that does not return: the API's own deadline (request_timeout + 1 s) ends the request
        switch.delay = 0.0
        switch.hold()
        with pytest.raises(openai.InternalServerError) as e:
            chat(c, QUESTION, max_tokens=40)
        assert e.value.status_code == 504
        switch.release()
        wait_until(lambda: engine.stats.running == 0 and engine.stats.queue_depth == 0,
                   what="the engine to idle")
        with serve_app(create_app(engine)) as ok:
            c = connect(ok.url)
            assert chat(c, "hello", max_tokens=4).choices[0].message.content == \
                llava_pipe.chat([], "hello", max_new_tokens=4)


def test_engine_failure_is_500_and_the_server_keeps_serving(switched, llava_pipe, serve_app):
    engine, switch = switched
    with serve_app(create_app(engine)) as srv:
        c = connect(srv.url)
        switch.fail_next()
        with pytest.raises(openai.InternalServerError) as e:
            chat(c, "hello", max_tokens=4)
        assert e.value.status_code == 500
        assert e.value.body["message"] == "internal server error while generating"
        assert "injected" not in json.dumps(e.value.body)  # no internals leak to the client
        switch.fail_next()
        with pytest.raises(openai.APIError) as e:
            list(chat(c, "hello", max_tokens=4, stream=True))
        assert "internal server error" in e.value.message
        assert chat(c, "hello", max_tokens=4).choices[0].message.content == \
            llava_pipe.chat([], "hello", max_new_tokens=4)


def test_unexpected_error_before_the_queue_is_500(switched, llava_pipe, serve_app, monkeypatch):
    """An exception the engine does not expect while building the prompt: a generic 500 in OpenAI's shape."""
    engine, _ = switched
    monkeypatch.setattr(engine.processor, "chat", lambda *a, **k: 1 / 0)
    with serve_app(create_app(engine)) as srv:
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": [U]})
        assert r.status_code == 500
        assert r.json() == {"error": {"message": "internal server error", "type": "server_error",
                                      "param": None, "code": "internal_error"}}
        monkeypatch.undo()
        assert chat(connect(srv.url), "hello", max_tokens=4).choices[0].message.content == \
            llava_pipe.chat([], "hello", max_new_tokens=4)


def test_client_going_away_frees_the_slot(switched, serve_app, wait_until):
    """A client that disconnects (mid-stream, or while waiting for a whole answer) ends its request: the
    engine stops generating for it long before max_tokens."""
    engine, switch = switched
    with serve_app(create_app(engine)) as srv:
        switch.delay = 0.05  # 64 tokens would take over 3 s
        body = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
                "max_tokens": MAX_NEW_TOKENS}
        for stream in (True, False):
            before = engine.stats.generated_tokens_total
            with httpx.Client(base_url=srv.url, timeout=httpx.Timeout(60, read=0.4)) as h:
                if stream:
                    with h.stream("POST", "/v1/chat/completions", json=dict(body, stream=True)) as r:
                        for line in r.iter_lines():  # the role chunk, then the first piece of the answer
                            if '"content"' in line and '"role"' not in line:
                                break
                    # leaving the block closes the connection mid-stream
                else:
                    with pytest.raises(httpx.ReadTimeout):
                        h.post("/v1/chat/completions", json=body)
            wait_until(lambda: engine.stats.running == 0, timeout=5, what="the request to end")
            assert engine.stats.generated_tokens_total - before < MAX_NEW_TOKENS // 2
        # the abandoned whole answer is counted as nginx counts it: 499, client closed the request
        counted = 'vlmkit_requests_total{endpoint="/v1/chat/completions",status="499"} 1'
        wait_until(lambda: counted in httpx.get(f"{srv.url}/metrics").text, what="the 499 to be counted")


def test_metric_types_render_the_exposition_format():
    from vlmkit.serve.metrics import Counter, Gauge, Histogram, render

    c = Counter("x_total", "things", ("path",))
    c.inc(path='a"b\\c\nd')
    c.inc(2, path="z")
    h = Histogram("lat_seconds", "latency", buckets=(0.1, 1))
    for v in (0.05, 0.5, 0.5, 7):
        h.observe(v)
    g = Gauge("depth", "queue", fn=lambda: 3)
    assert render([c, h, g]).splitlines() == [
        "# HELP x_total things", "# TYPE x_total counter",
        'x_total{path="a\\"b\\\\c\\nd"} 1', 'x_total{path="z"} 2',
        "# HELP lat_seconds latency", "# TYPE lat_seconds histogram",
        'lat_seconds_bucket{le="0.1"} 1', 'lat_seconds_bucket{le="1"} 3', 'lat_seconds_bucket{le="+Inf"} 4',
        "lat_seconds_sum 8.05", "lat_seconds_count 4",
        "# HELP depth queue", "# TYPE depth gauge", "depth 3"]
    with pytest.raises(ValueError):
        c.inc(-1, path="a")
    with pytest.raises(ValueError):
        c.inc(other="a")
