"""The OpenAI-compatible HTTP API over a serving :class:`~vlmkit.serve.engine.Engine`.

``create_app(engine)`` returns a FastAPI app with OpenAI's routes and shapes, so the official clients work
against it unchanged:

- ``POST /v1/chat/completions``: OpenAI's request (messages with text and ``image_url`` parts, temperature,
  top_p, max_tokens, stop, seed, stream, n=1); a ``chat.completion`` object, or with ``stream`` server-sent
  ``chat.completion.chunk`` events ending in ``data: [DONE]``. Each image part becomes an ``<image>``
  placeholder where it stands in the message's text.
- ``POST /v1/embeddings`` (dual encoders): texts, and images given as base64 ``data:image/...`` URLs.
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format), ``GET /`` (the chat page).

Bodies are parsed and checked here, field by field, rather than by pydantic models: every refusal is
OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status and a message
naming the field (``messages[1].content[0].image_url``). Images are decoded strictly: base64 that does not
decode, more than ``max_image_bytes`` bytes, a header declaring more than ``max_image_pixels`` pixels
(checked before any pixel is decoded: a decompression bomb is refused from its header) or a file PIL cannot
read are 400s. No client input reaches a 500; a failure inside the engine gives a 500 with a generic
message, and the server keeps serving. Remote image URLs are never fetched (the server has no network
access), and local files only when ``allow_local_files``. With ``api_key`` the ``/v1`` routes need
``Authorization: Bearer <api_key>``; ``/health``, ``/metrics`` and the page stay open (probes and scrapers
hold no key).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import math
import re
import threading
import time
import uuid
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from vlmkit.errors import ConfigError, DataError
from vlmkit.generation import GenerationConfig
from vlmkit.processing.image import MAX_IMAGE_PIXELS
from vlmkit.serve.engine import QueueFull
from vlmkit.serve.metrics import CONTENT_TYPE, Counter, Gauge, Histogram, render

log = logging.getLogger("vlmkit.serve")

STATIC = Path(__file__).parent / "static" / "index.html"
PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")  # RFC 3986
# formats a request's image may be in; the others PIL knows (EPS runs Ghostscript, TIFF and the rarer ones
# carry more parser surface than a chat image needs) are refused
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_STOP = 4
MAX_EMBED_INPUTS = 2048
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
# the engine ends a request at its deadline (at a token boundary); the API ends it itself this much later,
# when the engine could not (a request still waiting in the queue, a forward that does not return)
TIMEOUT_GRACE = 1.0
# request fields OpenAI defines that this server does not implement: refused unless at their default
UNSUPPORTED = {
    "tools": lambda v: not v, "functions": lambda v: not v, "tool_choice": lambda v: v in ("none", "auto"),
    "function_call": lambda v: v in ("none", "auto"), "logprobs": lambda v: v is False,
    "top_logprobs": lambda v: v in (0,), "logit_bias": lambda v: not v,
    "presence_penalty": lambda v: v in (0, 0.0), "frequency_penalty": lambda v: v in (0, 0.0),
    "response_format": lambda v: v == {"type": "text"},
}
ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics", "/")
_OPEN_LOCK = threading.Lock()  # warnings.catch_warnings changes process-wide state: one header read at a time


class ApiError(Exception):
    """A refusal in OpenAI's error shape."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(error_body(self.status, self.message, self.param, self.code), self.status,
                            headers=headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ApiError.TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


# ---------------------------------------------------------------------------------------------- field checks
def _kind(v) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _text(v, where: str, empty: bool = True) -> str:
    if not isinstance(v, str):
        raise _bad(f"{where} must be a string, got {_kind(v)}", where)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"{where} is not valid Unicode (a lone surrogate escape such as \\ud800)", where) from None
    if not empty and not v:
        raise _bad(f"{where} must not be empty", where)
    return v


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"{key} must be a number, got {_kind(v)}", key)
    try:
        v = float(v)
    except OverflowError:  # an integer beyond any float
        v = math.inf if v > 0 else -math.inf
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise _bad(f"{key} must be in {interval}, got {v!r}", key)
    return v


def _integer(body: dict, key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"{key} must be an integer, got {_kind(v)}", key)
    return v


def _object(body, where: str = "the request body") -> dict:
    if not isinstance(body, dict):
        param = None if where == "the request body" else where
        raise _bad(f"{where} must be a JSON object, got {_kind(body)}", param)
    return body


# ---------------------------------------------------------------------------------------------- images
class ImageDecoder:
    """Image URLs of a request -> RGB PIL images, refusing what is too big, malformed or not allowed."""

    def __init__(self, allow_local_files: bool, max_image_bytes: int, max_image_pixels: int,
                 max_request_pixels: int):
        self.allow_local_files = allow_local_files
        self.max_bytes, self.max_pixels = max_image_bytes, max_image_pixels
        self.max_request_pixels = max_request_pixels

    def decode_all(self, refs: list[tuple[str, str]]) -> list[Image.Image]:
        """[(where, url)] -> images; the pixels of a request's images together are bounded too."""
        out, total = [], 0
        for where, url in refs:
            im = self.decode(url, where, self.max_request_pixels - total)
            total += im.width * im.height
            out.append(im)
        return out

    def decode(self, url: str, where: str, budget: int | None = None) -> Image.Image:
        if url.startswith("data:"):
            return self._open(self._data_url(url, where), where, budget)
        match = SCHEME.match(url)
        scheme = match.group(1).lower() if match else ""
        if scheme in ("http", "https"):
            raise _bad(f"{where}: remote image URLs are not fetched (this server has no network access); "
                       f"send the image as a base64 data URL (data:image/png;base64,...)", where,
                       "unsupported_image_url")
        if scheme not in ("", "file") or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):
            raise _bad(f"{where}: unsupported URL scheme {scheme!r}; send the image as a base64 data URL "
                       f"(data:image/png;base64,...)", where, "unsupported_image_url")
        if not self.allow_local_files:
            raise _bad(f"{where}: local image files are not served (the server was started without "
                       f"allow_local_files); send the image as a base64 data URL", where,
                       "unsupported_image_url")
        try:
            path = Path(unquote(urlparse(url).path) if scheme == "file" else url)
            if not path.is_file():
                raise _bad(f"{where}: no image file at {path}", where, "image_not_found")
            size = path.stat().st_size
        except (OSError, ValueError) as e:  # a name too long, a NUL byte
            raise _bad(f"{where}: cannot read {str(path)[:200]!r}: {e}", where, "image_not_found") from None
        if size > self.max_bytes:
            raise _bad(f"{where}: the image file has {size} bytes, more than {self.max_bytes}", where,
                       "image_too_large")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise _bad(f"{where}: cannot read {path}: {e}", where, "image_not_found") from None
        return self._open(data, where, budget)

    def _data_url(self, url: str, where: str) -> bytes:
        header, comma, payload = url.partition(",")
        media, *params = header[len("data:"):].split(";")
        if not comma or not media.lower().startswith("image/") or [p.lower() for p in params] != ["base64"]:
            raise _bad(f"{where}: a data URL must be data:image/<type>;base64,<data>, got "
                       f"{header[:60]!r}", where, "invalid_image_url")
        if len(payload) > 4 * -(-self.max_bytes // 3):
            raise _bad(f"{where}: the image has more than {self.max_bytes} bytes", where, "image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise _bad(f"{where}: the data URL's base64 does not decode: {e}", where,
                       "invalid_base64") from None
        if len(data) > self.max_bytes:
            raise _bad(f"{where}: the image has {len(data)} bytes, more than {self.max_bytes}", where,
                       "image_too_large")
        if not data:
            raise _bad(f"{where}: the data URL holds no image", where, "invalid_image")
        return data

    def _open(self, data: bytes, where: str, budget: int | None) -> Image.Image:
        try:
            with _OPEN_LOCK, warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
            with im:
                w, h = im.size
                if w * h > self.max_pixels:
                    raise _bad(f"{where}: the image is {w}x{h} = {w * h} pixels, more than {self.max_pixels}",
                               where, "image_too_large")
                if budget is not None and w * h > budget:
                    raise _bad(f"{where}: the request's images hold more than {self.max_request_pixels} "
                               f"pixels together", where, "image_too_large")
                im.load()
                return im.convert("RGB")
        except ApiError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _bad(f"{where}: refused as a decompression bomb: {e}", where, "image_too_large") from None
        except MemoryError:
            raise _bad(f"{where}: the image is too large to decode", where, "image_too_large") from None
        except Exception as e:  # noqa: BLE001 - whatever PIL raises on a malformed or truncated file
            reason = "not an image in a supported format (PNG, JPEG, WebP, GIF, BMP)" \
                if isinstance(e, Image.UnidentifiedImageError) else f"cannot decode the image: {e}"
            raise _bad(f"{where}: {reason}", where, "invalid_image") from None


# ---------------------------------------------------------------------------------------------- requests
def parse_messages(value) -> tuple[list[dict], list[tuple[str, str]]]:
    """OpenAI messages -> the engine's [{"role", "content": str}] with "<image>" placeholders, and the image
    URLs in reading order as [(field path, url)]."""
    if not isinstance(value, list):
        raise _bad(f"messages must be an array, got {_kind(value)}", "messages")
    if not value:
        raise _bad("messages must not be empty", "messages")
    messages, refs = [], []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        _object(m, where)
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(ROLES)}, got "
                       f"{role[:50] if isinstance(role, str) else _kind(role)!r}", f"{where}.role")
        if "name" in m and m["name"] is not None:
            _text(m["name"], f"{where}.name")
        content = m.get("content")
        if isinstance(content, str):
            text = _text(content, f"{where}.content")
            _no_placeholder(text, f"{where}.content")
        elif isinstance(content, list):
            text = _parts(content, f"{where}.content", role, refs)
        else:
            raise _bad(f"{where}.content must be a string or an array of parts, got {_kind(content)}",
                       f"{where}.content")
        messages.append({"role": role, "content": text})
    return messages, refs


def _no_placeholder(text: str, where: str) -> None:
    if PLACEHOLDER in text:
        raise _bad(f"{where} contains {PLACEHOLDER!r}, which marks an image in this server's prompts; send "
                   f"images as image_url parts", where)


def _parts(parts: list, where: str, role: str, refs: list) -> str:
    if not parts:
        raise _bad(f"{where} must not be an empty array", where)
    pieces: list[tuple[str, str]] = []
    for j, part in enumerate(parts):
        w = f"{where}[{j}]"
        _object(part, w)
        kind = part.get("type")
        if kind == "text":
            text = _text(part.get("text"), f"{w}.text")
            _no_placeholder(text, f"{w}.text")
            pieces.append(("text", text))
        elif kind == "image_url":
            if role != "user":
                raise _bad(f"{w}: images go in user messages, not {role} ones", w)
            spec = part.get("image_url")
            _object(spec, f"{w}.image_url")
            url = _text(spec.get("url"), f"{w}.image_url.url", empty=False)
            if spec.get("detail") is not None:
                _text(spec["detail"], f"{w}.image_url.detail")
            refs.append((f"{w}.image_url", url))
            pieces.append(("image", PLACEHOLDER))
        else:
            raise _bad(f"{w}.type must be 'text' or 'image_url', got "
                       f"{kind if isinstance(kind, str) else _kind(kind)!r}", f"{w}.type")
    out = ""
    for k, (kind, piece) in enumerate(pieces):
        prev = pieces[k - 1][0] if k else None
        if kind == "text" and prev == "text":
            out += "\n"  # text parts are lines of one message
        elif kind == "text" and prev == "image" and not piece.startswith("\n"):
            out += "\n"  # "<image>\nquestion": an image on its own line, as vlmkit's chat() lays it out
        out += piece
    return out


def parse_chat(body: dict, engine_max_tokens: int | None):
    """A chat request body -> (messages, image refs, GenerationConfig, stream, include_usage)."""
    _object(body)
    if body.get("model") is not None:
        _text(body["model"], "model")
    messages, refs = parse_messages(body.get("messages"))
    for key, ok in UNSUPPORTED.items():
        if body.get(key) is not None and not _safe(ok, body[key]):
            raise _bad(f"{key} is not supported by this server", key, "unsupported_parameter")
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise _bad(f"n must be 1 (one answer per request), got {n}", "n")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    max_tokens = _integer(body, "max_tokens")
    alias = _integer(body, "max_completion_tokens")
    if max_tokens is not None and alias is not None and max_tokens != alias:
        raise _bad(f"max_tokens ({max_tokens}) and max_completion_tokens ({alias}) disagree", "max_tokens")
    key = "max_tokens" if max_tokens is not None else "max_completion_tokens"
    max_tokens = max_tokens if max_tokens is not None else alias
    limit = engine_max_tokens or 256
    if max_tokens is None:
        max_tokens = min(256, limit)
    elif max_tokens < 1 or max_tokens > limit:
        raise _bad(f"{key} must be in [1, {limit}] (this server's limit), got {max_tokens}", key)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [_text(stop, "stop", empty=False)]
    elif isinstance(stop, list):
        if len(stop) > MAX_STOP:
            raise _bad(f"stop holds at most {MAX_STOP} strings, got {len(stop)}", "stop")
        stop = [_text(s, f"stop[{i}]", empty=False) for i, s in enumerate(stop)]
    else:
        raise _bad(f"stop must be a string or an array of strings, got {_kind(stop)}", "stop")
    seed = _integer(body, "seed")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise _bad(f"seed must be in [-2**63, 2**64 - 1], got {seed}", "seed")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad(f"stream must be a boolean, got {_kind(stream)}", "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        _object(options, "stream_options")
        include_usage = options.get("include_usage")
        if include_usage is not None and not isinstance(include_usage, bool):
            raise _bad(f"stream_options.include_usage must be a boolean, got {_kind(include_usage)}",
                       "stream_options.include_usage")
    if body.get("user") is not None:
        _text(body["user"], "user")
    gen = GenerationConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                           seed=seed)
    return messages, refs, gen, bool(stream), bool(include_usage)


def _safe(check, value) -> bool:
    try:
        return bool(check(value))
    except Exception:  # noqa: BLE001 - an unhashable or odd value is simply not the default
        return False


def parse_embeddings(body) -> tuple[list[str], str]:
    _object(body)
    if body.get("model") is not None:
        _text(body["model"], "model")
    inp = body.get("input")
    if isinstance(inp, str):
        items = [_text(inp, "input", empty=False)]
    elif isinstance(inp, list):
        if not inp:
            raise _bad("input must not be empty", "input")
        if len(inp) > MAX_EMBED_INPUTS:
            raise _bad(f"input holds at most {MAX_EMBED_INPUTS} items, got {len(inp)}", "input")
        if any(isinstance(x, (int, list)) and not isinstance(x, bool) for x in inp):
            raise _bad("input must be strings (token arrays are not supported)", "input")
        items = [_text(x, f"input[{i}]", empty=False) for i, x in enumerate(inp)]
    else:
        raise _bad(f"input must be a string or an array of strings, got {_kind(inp)}", "input")
    fmt = body.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise _bad(f"encoding_format must be 'float' or 'base64', got "
                   f"{fmt if isinstance(fmt, str) else _kind(fmt)!r}", "encoding_format")
    if body.get("dimensions") is not None:
        raise _bad("dimensions is not supported (the model's embedding size is fixed)", "dimensions",
                   "unsupported_parameter")
    if body.get("user") is not None:
        _text(body["user"], "user")
    return items, fmt


# ---------------------------------------------------------------------------------------------- the app
class _Metrics:
    def __init__(self, engine):
        stats = lambda: engine.stats  # noqa: E731
        self.requests = Counter("vlmkit_requests_total", "HTTP requests by endpoint and status",
                                ("endpoint", "status"))
        self.latency = Histogram("vlmkit_request_latency_seconds",
                                 "HTTP request latency (streams: until the last event)", ("endpoint",))
        self.all = [
            self.requests, self.latency,
            Counter("vlmkit_generated_tokens_total", "Tokens generated",
                    fn=lambda: stats().generated_tokens_total),
            Counter("vlmkit_prompt_tokens_total", "Prompt tokens prefilled",
                    fn=lambda: stats().prompt_tokens_total),
            Gauge("vlmkit_queue_depth", "Requests waiting for a batch slot", fn=lambda: stats().queue_depth),
            Gauge("vlmkit_running_requests", "Requests in the running batch", fn=lambda: stats().running),
            Gauge("vlmkit_batch_size", "Mean decode batch size (batch_size_sum / decode_steps)",
                  fn=lambda: stats().batch_size_sum / max(stats().decode_steps, 1)),
            Counter("vlmkit_decode_steps_total", "Decoding steps (one forward of the running batch)",
                    fn=lambda: stats().decode_steps),
            Counter("vlmkit_decoded_rows_total", "Rows of all decoding steps (their batch sizes summed)",
                    fn=lambda: stats().batch_size_sum),
            Counter("vlmkit_image_cache_hits_total", "Images whose features came from the cache",
                    fn=lambda: stats().image_cache_hits),
            Counter("vlmkit_image_cache_misses_total", "Images encoded by the tower",
                    fn=lambda: stats().image_cache_misses),
        ]


class _Observe:
    """ASGI middleware: every HTTP request counted by endpoint and status, and timed."""

    def __init__(self, app, metrics: _Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def observed(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in ENDPOINTS else "other"
            if path.startswith("/v1/models/"):
                endpoint = "/v1/models"
            self.metrics.requests.inc(endpoint=endpoint, status=str(status[0]))
            self.metrics.latency.observe(time.perf_counter() - start, endpoint=endpoint)


def create_app(engine, *, api_key: str | None = None, allow_local_files: bool = False,
               max_image_bytes: int = 20 * 2**20, max_image_pixels: int = MAX_IMAGE_PIXELS,
               request_timeout: float | None = 120.0, max_body_bytes: int = 50 * 2**20,
               max_request_pixels: int | None = None) -> FastAPI:
    """The HTTP app over a started ``engine`` (module docstring). ``max_request_pixels`` bounds the pixels of
    one request's images together (default: ``max_image_pixels``), so that many small but highly compressed
    images in one body cannot decode to gigabytes."""
    app = FastAPI(title="vlmkit", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = _Metrics(engine)
    images = ImageDecoder(allow_local_files, max_image_bytes, max_image_pixels,
                          max_request_pixels if max_request_pixels is not None else max_image_pixels)
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(_Observe, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path[:200]}"
            return ApiError(404, message, None, "not_found").response()
        if exc.status_code == 405:
            return ApiError(405, f"{request.method} is not allowed on {request.url.path[:200]}", None,
                            "method_not_allowed").response()
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return ApiError(400, f"{where or 'the request'}: {first.get('msg', 'invalid')}", where).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return ApiError(500, "internal server error", None, "internal_error").response()

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           None, "invalid_api_key")

    async def read_json(request: Request):
        declared = request.headers.get("content-length")
        body = request.stream().__aiter__()
        if declared is not None:
            if not declared.isdigit():
                raise _bad("the Content-Length header is not a number")
            if int(declared) > max_body_bytes:
                await _drain(body, max_body_bytes)
                raise ApiError(413, f"the request body has {declared} bytes, more than this server takes "
                               f"({max_body_bytes})", None, "request_too_large")
        chunks, size = [], 0
        try:
            async for chunk in body:
                size += len(chunk)
                if size > max_body_bytes:
                    await _drain(body, max_body_bytes)
                    raise ApiError(413, f"the request body is larger than this server takes "
                                   f"({max_body_bytes} bytes)", None, "request_too_large")
                chunks.append(chunk)
        except ClientDisconnect:
            raise _bad("the client disconnected before sending the whole body") from None
        raw = b"".join(chunks)
        if not raw.strip():
            raise _bad("the request body is empty; send a JSON object")
        try:
            return json.loads(raw, parse_constant=_refuse_constant)
        except RecursionError:
            raise _bad("the request body is nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, too many digits
            raise _bad(f"the request body is not valid JSON: {str(e)[:200]}") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = await read_json(request)
        messages, refs, gen, stream, include_usage = parse_chat(body, getattr(engine, "max_new_tokens", None))
        if not engine.can_generate:
            raise _bad(f"{engine.model_name} is a dual encoder: it embeds texts and images "
                       f"(POST /v1/embeddings); it does not chat", "model", "model_not_chat")
        pictures = await run_in_threadpool(images.decode_all, refs) if refs else []
        try:
            # images prepared and the prompt tokenised off the event loop; the stream delivers to it
            events = await run_in_threadpool(engine.submit_chat, messages, pictures, gen, timeout=request_timeout,
                                             loop=asyncio.get_running_loop())
        except (DataError, ConfigError) as e:
            raise _bad(str(e)) from None
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", None, "queue_full") from None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if stream:
            chunks = _sse(events, rid, created, engine.model_name, request_timeout, include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, last = await _collect(events, request, request_timeout)
        if last.finish_reason == "disconnected":  # nobody reads this: 499 (nginx's) tells the metrics why
            return Response(status_code=499)
        if last.finish_reason == "timeout":
            raise ApiError(504, f"the answer took longer than this server allows ({request_timeout} s)", None,
                           "timeout")
        if last.finish_reason not in ("stop", "length"):
            _log_failure(last)
            raise ApiError(503 if last.finish_reason == "cancelled" else 500,
                           "the server is shutting down" if last.finish_reason == "cancelled"
                           else "internal server error while generating", None, "internal_error")
        usage = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                 "total_tokens": last.prompt_tokens + last.completion_tokens}
        return {"id": rid, "object": "chat.completion", "created": created, "model": engine.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": last.finish_reason}],
                "usage": usage}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        check_key(request)
        body = await read_json(request)
        items, fmt = parse_embeddings(body)
        if not engine.can_embed:
            raise _bad(f"{engine.model_name} is a generative vision-language model: it answers "
                       f"POST /v1/chat/completions; embeddings need a dual encoder (CLIP or SigLIP)", "model",
                       "model_not_embedding")
        is_image = [x.startswith("data:image/") for x in items]
        texts = [x for x, im in zip(items, is_image) if not im]
        refs = [(f"input[{i}]" if isinstance(body["input"], list) else "input", x)
                for i, (x, im) in enumerate(zip(items, is_image)) if im]
        pictures = await run_in_threadpool(images.decode_all, refs) if refs else []
        text_vectors, image_vectors, tokens = await run_in_threadpool(_embed, engine, texts, pictures)
        text_rows, image_rows = iter(text_vectors), iter(image_vectors)
        rows = [next(image_rows) if im else next(text_rows) for im in is_image]
        data = [{"object": "embedding", "index": i, "embedding": _encode_vector(v, fmt)}
                for i, v in enumerate(rows)]
        return {"object": "list", "data": data, "model": engine.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [_model_card(engine)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        check_key(request)
        if model_id != engine.model_name:
            raise ApiError(404, f"no model {model_id[:200]!r}; this server serves {engine.model_name!r}",
                           "model", "model_not_found")
        return _model_card(engine)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_name, "queue_depth": engine.stats.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        return Response(render(metrics.all), media_type=CONTENT_TYPE)

    @app.get("/")
    async def page():
        if not STATIC.is_file():
            raise ApiError(404, "no chat page is installed (vlmkit/serve/static/index.html)", None,
                           "not_found")
        return FileResponse(STATIC, media_type="text/html")

    return app


# ---------------------------------------------------------------------------------------------- helpers
def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


async def _drain(body, limit: int) -> None:
    """Read and drop (up to twice ``limit``) the rest of a refused body, so that a client still sending it
    reads the 413 rather than a reset connection."""
    seen = 0
    try:
        async for chunk in body:
            seen += len(chunk)
            if seen > 2 * limit:
                break
    except Exception:  # noqa: BLE001 - the client went away or the stream was read: nothing left to drain
        pass


def _log_failure(last) -> None:
    if last.finish_reason == "error":
        log.error("generation failed inside the engine: %s", getattr(last, "error", ""))


def _chunk(rid: str, created: int, model: str, delta: dict, finish: str | None = None) -> str:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _next(it, deadline: float | None):
    """The stream's next event, or None once ``deadline`` (loop time) has passed."""
    if deadline is None:
        return await it.__anext__()
    remaining = deadline - asyncio.get_running_loop().time()
    if remaining <= 0:
        return None
    try:
        return await asyncio.wait_for(it.__anext__(), remaining)
    except asyncio.TimeoutError:
        return None


async def _sse(events, rid: str, created: int, model: str, timeout: float | None, include_usage: bool):
    """The stream's events as OpenAI's chunks: the role, the pieces, the finish reason (timeout included), the
    usage when asked for, [DONE]; a failure inside the engine is an error event. A client that goes away
    cancels the request (its batch slot is freed at the next token)."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout + TIMEOUT_GRACE
    it, finished = events.__aiter__(), False
    try:
        yield _chunk(rid, created, model, {"role": "assistant"})
        while True:
            ev = await _next(it, deadline)
            if ev is None:  # the engine did not end the request in time: end it here
                yield _chunk(rid, created, model, {}, "timeout")
                break
            if ev.text:
                yield _chunk(rid, created, model, {"content": ev.text})
            if ev.finish_reason is None:
                continue
            finished = True
            if ev.finish_reason in ("stop", "length", "timeout"):
                yield _chunk(rid, created, model, {}, ev.finish_reason)
                if include_usage:
                    usage = {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                             "total_tokens": ev.prompt_tokens + ev.completion_tokens}
                    last = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": usage}
                    yield f"data: {json.dumps(last)}\n\n"
            else:
                _log_failure(ev)
                message = ("the server is shutting down" if ev.finish_reason == "cancelled"
                           else "internal server error while generating")
                yield "data: " + json.dumps(error_body(500, message, None, "internal_error")) + "\n\n"
            break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            events.cancel()


async def _collect(events, request: Request, timeout: float | None):
    """(the whole answer, the last event) of a non-streamed request; a "timeout" event when it runs over
    ``timeout`` seconds. A client that disconnects meanwhile cancels the request."""

    async def gather():
        parts, it = [], events.__aiter__()
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout + TIMEOUT_GRACE
        while True:
            ev = await _next(it, deadline)
            if ev is None:
                events.cancel()
                return "".join(parts), _Ended("timeout")
            parts.append(ev.text)
            if ev.finish_reason is not None:
                return "".join(parts), ev

    async def gone():
        while True:
            message = await request.receive()
            if message.get("type") == "http.disconnect":
                return

    work, watch = asyncio.ensure_future(gather()), asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is stopping this handler
        work.cancel()
        events.cancel()
        raise
    finally:
        watch.cancel()
    if work not in done:  # the client went away: free the slot; nobody reads this answer
        events.cancel()
        work.cancel()
        return "", _Ended("disconnected")
    return work.result()


class _Ended:
    """The last event of a request that the API ended itself (timeout, client gone)."""

    def __init__(self, reason: str):
        self.finish_reason, self.prompt_tokens, self.completion_tokens, self.error = reason, 0, 0, ""


def _embed(engine, texts: list[str], pictures: list):
    import torch

    try:
        t = engine.embed_texts(texts) if texts else torch.zeros(0, 0)
        i = engine.embed_images(pictures) if pictures else torch.zeros(0, 0)
    except (DataError, ConfigError) as e:
        raise _bad(str(e)) from None
    return t.float().tolist(), i.float().tolist(), _count_tokens(engine, texts)


def _count_tokens(engine, texts: list[str]) -> int:
    """Tokens of the texts as the text tower reads them (0 when the engine does not expose its processor)."""
    processor = getattr(engine, "processor", None)
    if processor is None or not texts:
        return 0
    try:
        rows, _ = processor.tokenize_texts(texts)
        return sum(len(r) for r in rows)
    except Exception:  # noqa: BLE001 - usage is informative; never fail a request over it
        return 0


def _encode_vector(v: list[float], fmt: str):
    if fmt == "float":
        return v
    import numpy as np

    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")


def _model_card(engine) -> dict:
    return {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "vlmkit"}


__all__ = ["ApiError", "ImageDecoder", "create_app", "parse_chat", "parse_embeddings", "parse_messages"]
