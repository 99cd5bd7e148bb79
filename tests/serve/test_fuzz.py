"""1,000 malformed and hostile requests (seeded) against the live server: every answer is a 4xx in OpenAI's
error shape, none is a 5xx or a dropped connection, and a valid request still answers afterwards.

The requests: JSON bodies with bytes flipped and cut, wrong types at every field, out-of-range numbers, broken
base64, PNG headers declaring 100000x100000 pixels, real decompression bombs, truncated and fake images, image
URLs of every scheme, unicode junk (lone surrogates, controls, invalid UTF-8), deeply nested JSON, oversized
bodies, wrong methods, unknown routes and missing keys. Each request is invalid by construction: the valid
base request gets at least one defect."""

from __future__ import annotations

import base64
import collections
import copy
import io
import json
import random
import struct
import time
import zlib
from urllib.parse import quote

import pytest

pytest.importorskip("fastapi", reason="the API tests need the serve extra: pip install 'vlmkit[serve]'")
httpx = pytest.importorskip("httpx", reason="the API tests need httpx (test extra)")

from PIL import Image  # noqa: E402

N = 1000
SEED = 20240611
MAX_BODY = 1 << 20  # the main server's limit (conftest.py)


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR declaring width x height RGB pixels (valid CRC) and a little IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 256)
    chunks = b""
    for kind, payload in ((b"IHDR", ihdr), (b"IDAT", idat)):
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        chunks += struct.pack(">I", len(payload)) + kind + payload + crc
    return b"\x89PNG\r\n\x1a\n" + chunks


class Bank:
    """Images made once: a valid PNG, noisy PNG/JPEG files to truncate, real decompression bombs (black
    images above the server's 1 Mpixel limit that compress to a few kB) and an oversized payload."""

    def __init__(self, rng: random.Random):
        noise = Image.frombytes("RGB", (48, 48), rng.randbytes(48 * 48 * 3))
        self.valid = data_url(encode(noise, "PNG"))
        self.files = {"PNG": encode(noise, "PNG"), "JPEG": encode(noise, "JPEG")}
        sizes = ((1001, 1000), (4000, 4000), (1, 2_000_000))
        self.bombs = [encode(Image.new("L", size), "PNG") for size in sizes]
        self.oversized = rng.randbytes(210_000)


JUNK_POOLS = [
    "abcdefghijklmnopqrstuvwxyz <>{}[]\"'\\/:;,.",
    "".join(chr(c) for c in range(0, 32)),  # control characters, NUL included
    "\u202e\u202d\u200b\u200f\ufeff\u0301\u0336",  # bidi overrides, zero width, combining marks
    "日本語中文한국어ไทยעבריתالعربية",
    "🦄💩🇺🇳👩‍👩‍👧‍👦🏳️‍🌈",
    "\ud800\udbff\udc00\udfff",  # lone surrogates: valid JSON escapes, not valid Unicode text
    "\U0010ffff\U0001d518\uffff\ufffe",
]


def junk(rng: random.Random, n: int | None = None) -> str:
    n = rng.randint(0, 40) if n is None else n
    return "".join(rng.choice(rng.choice(JUNK_POOLS)) for _ in range(n))


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**63, -(2**64), 10**40, rng.randint(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, -1e-308, rng.uniform(-1e6, 1e6)])
    if kind in (4, 5):
        return junk(rng)
    if kind == 6:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {junk(rng, rng.randint(0, 8)): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def base_body(bank: Bank) -> dict:
    """A valid request: every case below breaks it somewhere."""
    return {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": bank.valid}}, {"type": "text", "text": "What is it?"}]}],
        "max_tokens": 4, "temperature": 0}


# (path into the base body, the types valid there: a replacement of another type is a defect)
FIELDS = [
    (("model",), (str, type(None))), (("messages",), (list,)), (("messages", 0), (dict,)),
    (("messages", 0, "role"), ()), (("messages", 0, "content"), (str, list)),
    (("messages", 0, "content", 0), (dict,)), (("messages", 0, "content", 0, "type"), ()),
    (("messages", 0, "content", 0, "image_url"), (dict,)),
    (("messages", 0, "content", 0, "image_url", "url"), ()),
    (("messages", 0, "content", 1), (dict,)), (("messages", 0, "content", 1, "text"), (str,)),
    (("temperature",), (int, float, type(None))), (("top_p",), (int, float, type(None))),
    (("max_tokens",), (int, type(None))), (("seed",), (int, type(None))), (("n",), (type(None),)),
    (("stop",), (str, list, type(None))), (("stream",), (bool, type(None))),
    (("stream_options",), (dict, type(None))),
]
WRONG = [True, False, 0, 1, -1, 1.5, 10**30, "", "x", "1", [], [1], ["a"], {}, {"a": 1}, None]
BAD_VALUES = {
    "temperature": [-1e-9, -1, 2.0001, 1e308, float("inf"), float("nan"), 10**400],
    "top_p": [0, -0.5, 1.0001, 1e10, float("-inf")],
    "max_tokens": [0, -1, -(10**20), 65, 10**6, 10**40, 2**63],
    "seed": [2**64, -(2**63) - 1, 10**100],
    "n": [0, 2, -1, 10**9],
    "stop": [["a", "b", "c", "d", "e"], [""], [1], [None], ""],
}


def put(body, path, value):
    for key in path[:-1]:
        body = body[key]
    body[path[-1]] = value


def wrong_value(rng, path, valid):
    if path[-1] in ("role", "type"):  # any string but the allowed ones, or not a string
        return rng.choice([junk(rng, rng.randint(1, 12)), "tool", "function", "image", 5, None, [], {}])
    if path[-1] == "url":  # a URL that is not a data URL of an image, or not a string
        return rng.choice([5, None, [], {}, "", junk(rng, rng.randint(1, 30)), "javascript:alert(1)"])
    if path[-1] == "n":
        return rng.choice([v for v in WRONG if v is not None and v != 1 and v is not True])
    choices = [v for v in WRONG if not isinstance(v, valid) or (isinstance(v, bool) and bool not in valid
                                                                  and int in valid)]
    return copy.deepcopy(rng.choice(choices))


def image_url_case(rng: random.Random, bank: Bank) -> str:
    kind = rng.randrange(10)
    if kind == 0:  # base64 that does not decode: a bad character, or a bad length
        s = base64.b64encode(rng.randbytes(rng.randint(1, 300))).decode().rstrip("=")
        if len(s) % 4 == 0:
            s = s[:-1]
        i = rng.randrange(len(s) + 1)
        if len(s) % 4:  # already a bad length: anything, or nothing, inserted
            bad = rng.choice(["%", "*", " ", "\n", "é", "-", "_", "=", ""])
        else:
            bad = rng.choice("%* \né")
        return "data:image/png;base64," + s[:i] + bad + s[i:]
    if kind == 1:  # a PNG header declaring a huge image
        w, h = rng.choice([(100_000, 100_000), (2**31 - 1, 2**31 - 1), (rng.randint(1001, 60000), 20_000),
                           (1, rng.randint(1_000_001, 2**30))])
        return data_url(png_header(w, h))
    if kind == 2:  # a real decompression bomb
        return data_url(rng.choice(bank.bombs))
    if kind == 3:  # a real image cut in its first half
        fmt = rng.choice(list(bank.files))
        data = bank.files[fmt]
        return data_url(data[:rng.randint(0, len(data) // 2)], f"image/{fmt.lower()}")
    if kind == 4:  # the magic bytes of an image format, then noise
        magic = rng.choice([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM",
                            b"RIFF\x00\x00\x00\x00WEBP", b"%!PS-Adobe-3.0 EPSF-3.0\n", b"II*\x00", b""])
        return data_url(magic + rng.randbytes(rng.randint(0, 400)))
    if kind == 5:
        return data_url(bank.oversized)
    if kind == 6:  # other media types and malformed data URLs
        return rng.choice(["data:text/html;base64,PGgxPg==", "data:image/png,raw", "data:;base64,", "data:",
                           "data:image/png;base64", "data:image/png;charset=utf-8;base64,AAAA",
                           "data:image/svg+xml;base64," + base64.b64encode(b"<svg/>").decode(),
                           "data:image/png;base64,"])
    if kind == 7:  # URLs the server must not follow
        return rng.choice(["http://127.0.0.1:1/x.png", "https://example.com/a.png", "file:///etc/passwd",
                           "/etc/passwd", "../../etc/shadow", "ftp://x/y.png", "gopher://x", "C:\\x.png",
                           "file://" + "a" * 5000, "\x00", "//example.com/a.png"])
    if kind == 8:
        return junk(rng, rng.randint(1, 50))
    return "data:image/png;base64," + base64.b64encode(rng.randbytes(rng.randint(0, 2000))).decode()


class Fuzzer:
    def __init__(self, rng: random.Random, bank: Bank, key: str):
        self.rng, self.bank, self.key = rng, bank, key

    def request(self) -> tuple[str, str, dict, str, bytes | None]:
        """(category, method, path, headers, body)."""
        rng = self.rng
        auth = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        kinds = {"mutated_json": 12, "wrong_type": 16, "bad_value": 10, "image": 20, "unicode": 8,
                 "nested": 6, "random_json": 6, "conversation": 6, "embeddings": 6, "http": 10}
        kind = rng.choices(list(kinds), weights=list(kinds.values()))[0]
        body = base_body(self.bank)
        if kind == "mutated_json":  # bytes flipped, then cut before the closing brace
            raw = bytearray(json.dumps(dict({"n": 2}, **body)).encode())
            for _ in range(rng.randint(0, 6)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            return kind, "POST", "/v1/chat/completions", auth, bytes(raw[:rng.randrange(len(raw) - 1)])
        if kind == "wrong_type":
            for _ in range(rng.randint(1, 3)):
                path, valid = rng.choice(FIELDS)
                try:
                    put(body, path, wrong_value(rng, path, valid))
                except (KeyError, IndexError, TypeError):
                    pass  # an earlier replacement removed the path: that one is the defect
        elif kind == "bad_value":
            key = rng.choice(list(BAD_VALUES))
            body[key] = rng.choice(BAD_VALUES[key])
        elif kind == "image":
            body["messages"][0]["content"][0]["image_url"]["url"] = image_url_case(rng, self.bank)
        elif kind == "unicode":  # lone surrogates in a text field, or junk where an enum is expected
            where = rng.choice(["text", "role", "type", "stop", "model"])
            bad = junk(rng, rng.randint(1, 20)) + "\ud800|" + junk(rng, 3)  # "|": no low surrogate pairs it
            if where == "text":
                body["messages"][0]["content"][1]["text"] = bad
            elif where == "role":
                body["messages"][0]["role"] = junk(rng, rng.randint(1, 20))
            elif where == "type":
                body["messages"][0]["content"][1]["type"] = junk(rng, rng.randint(1, 20))
            else:
                body[where] = bad
            ascii_only = rng.random() < 0.5
            text = json.dumps(body, ensure_ascii=ascii_only)
            return kind, "POST", "/v1/chat/completions", auth, text.encode("utf-8", "surrogatepass")
        elif kind == "nested":
            d = rng.choice([50, 500, 5_000, 50_000, 200_000])
            opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
            where = rng.choice(["body", "messages", "content", "max_tokens"])
            nest = opener * d + "1" + closer * d if opener == '{"a":' else opener * d + closer * d
            if rng.random() < 0.3:
                nest = nest[:len(nest) // 2]  # unbalanced
            if where == "body":
                raw = nest
            else:  # the nesting as the messages, or (messages missing) as another field
                rest = json.dumps({k: v for k, v in body.items() if k != "messages"})
                raw = rest[:-1] + f', "{where}": {nest}}}'
            return kind, "POST", "/v1/chat/completions", auth, raw.encode()
        elif kind == "random_json":
            value = random_json(self.rng)
            body = value if not isinstance(value, dict) or "messages" not in value else [value]
        elif kind == "conversation":  # well-typed but not a conversation the model can answer
            case = rng.randrange(5)
            msgs = body["messages"]
            if case == 0:
                body["messages"] = []
            elif case == 1:
                body["messages"] = msgs + [{"role": "assistant", "content": "hi"}]
            elif case == 2:
                body["messages"] = [{"role": "assistant", "content": [msgs[0]["content"][0]]}] + msgs
            elif case == 3:
                msgs[0]["content"][1]["text"] = "look at <image> here"
            else:
                msgs[0]["content"] = []
        elif kind == "embeddings":  # the server's model is generative: every embeddings request is refused
            emb = rng.choice([{"input": random_json(rng)}, {"input": "hello"},
                              {"input": ["a", self.bank.valid]},
                              {"input": [], "encoding_format": "float"}, {"input": [[1, 2, 3]]},
                              {"input": "x", "encoding_format": "hex"}, {"input": "x", "dimensions": 8},
                              random_json(rng)])
            return kind, "POST", "/v1/embeddings", auth, json.dumps(emb).encode()
        else:
            return self.http_case(body, auth)
        return kind, "POST", "/v1/chat/completions", auth, json.dumps(body).encode()

    def http_case(self, body: dict, auth: dict):
        rng = self.rng
        case = rng.randrange(6)
        raw = json.dumps(body).encode()
        if case == 0:
            return "http", rng.choice(["GET", "PUT", "DELETE", "PATCH"]), "/v1/chat/completions", auth, raw
        if case == 1:
            path = rng.choice(["/v1/", "/v2/chat/completions", "/v1/chat", "/admin", "/v1/models/x/y/../../z",
                               "/%00", "/v1/" + quote(junk(rng, 10).encode("utf-8", "surrogatepass"), ""),
                               "/" + "a" * 4000])
            return "http", rng.choice(["GET", "POST"]), path, auth, raw
        if case == 2:  # no key, a wrong key, another scheme
            headers = rng.choice([{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer"},
                                  {"Authorization": f"Basic {self.key}"},
                                  {"Authorization": f"Bearer {self.key}x"},
                                  {"Authorization": f"bearer  {self.key[:-1]}"}])
            return "http", "POST", rng.choice(["/v1/chat/completions", "/v1/embeddings"]), headers, raw
        if case == 3:  # over the body limit
            return "http", "POST", "/v1/chat/completions", auth, b" " * (MAX_BODY + rng.randint(1, 100_000))
        if case == 4:
            return "http", "POST", "/v1/models", auth, raw
        return "http", "POST", "/v1/chat/completions", dict(auth, **{"Content-Type": "text/plain"}), b"hello"


def test_fuzz_every_answer_is_a_4xx(server, engine):
    rng = random.Random(SEED)
    fuzzer = Fuzzer(rng, Bank(rng), server.api_key)
    seen: collections.Counter = collections.Counter()
    statuses: collections.Counter = collections.Counter()
    took: collections.Counter = collections.Counter()
    start = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for i in range(N):
            kind, method, path, headers, body = fuzzer.request()
            t0 = time.monotonic()
            try:
                r = http.request(method, path, headers=headers, content=body)
            except httpx.HTTPError as e:  # a dropped connection, a reset, a server that stopped answering
                pytest.fail(f"request {i} ({kind}, {method} {path[:60]}) got no answer: {e!r}")
            seen[kind] += 1
            took[kind] += time.monotonic() - t0
            statuses[r.status_code] += 1
            context = (f"request {i} ({kind}, {method} {path[:60]}, body {body[:300]!r}): "
                       f"{r.status_code} {r.text[:300]}")
            assert 400 <= r.status_code < 500, context
            if method != "HEAD":
                error = r.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"], context
        elapsed = time.monotonic() - start
        # a valid request still answers, and no 5xx was counted by the server
        valid = base_body(fuzzer.bank)
        auth = {"Authorization": f"Bearer {server.api_key}"}
        r = http.post("/v1/chat/completions", json=valid, headers=auth)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        metrics = http.get("/metrics").text
    assert not [line for line in metrics.splitlines() if line.startswith("vlmkit_requests_total")
                and 'status="5' in line]
    assert engine.stats.queue_depth == 0 and engine.stats.running == 0
    print(f"\n{N} fuzzed requests in {elapsed:.1f} s; statuses {dict(sorted(statuses.items()))}; "
          f"kinds (count, seconds) {[(k, n, round(took[k], 2)) for k, n in seen.items()]}")
    assert {400, 401, 404, 405, 413} <= set(statuses)
    assert elapsed < 60, f"the fuzz took {elapsed:.1f} s"
