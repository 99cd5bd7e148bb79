"""The OpenAI-compatible HTTP API over a serving :class:`~vlmkit.serve.engine.Engine`.

``create_app(engine)`` returns a FastAPI app with OpenAI's routes and shapes, so the official clients work
against it unchanged:

- ``POST /v1/chat/completions``: OpenAI's request (messages with text and ``image_url`` parts, temperature,
  top_p, max_tokens, stop, seed, stream, n=1); a ``chat.completion`` object, or with ``stream`` server-sent
  ``chat.completion.chunk`` events ending in ``data: [DONE]``. Each image part becomes an ``<image>``
  placeholder where it stands in the message's text.
- ``POST /v1/embeddings`` (dual encoders): texts, and images given as base64 ``data:image/...`` URLs.
- ``POST /v1/images/generations`` (models that draw: ``Pipeline.can_generate_images``): OpenAI's images request
  (``prompt``, ``n``, ``size``, ``response_format`` b64_json; vlmkit's ``seed``, ``cfg_scale``, ``temperature``,
  ``top_k``, ``steps`` as extra fields), answered with base64 PNGs. A model that both reads and draws answers both
  APIs.
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format), ``GET /`` (the chat page).

Bodies are parsed and checked in :mod:`vlmkit.serve.parsing`, field by field, rather than by pydantic
models; this module holds the app and its routes. Every refusal is OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status and a message naming the field
(``messages[1].content[0].image_url``). Images are decoded strictly: base64 that does not decode, more than
``max_image_bytes`` bytes, a header declaring more than ``max_image_pixels`` pixels (checked before any pixel
is decoded: a decompression bomb is refused from its header) or a file PIL cannot read are 400s. No client
input reaches a 500; a failure inside the engine gives a 500 with a generic message, and the server keeps
serving. Remote image URLs are never fetched (the server has no network access), and local files only when
``allow_local_files``. With ``api_key`` the ``/v1`` routes need ``Authorization: Bearer <api_key>``;
``/health``, ``/metrics`` and the page stay open (probes and scrapers hold no key).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmkit.errors import ConfigError, DataError
from vlmkit.processing.image import MAX_IMAGE_PIXELS
from vlmkit.serve.engine import QueueFull
from vlmkit.serve.metrics import CONTENT_TYPE, Counter, Gauge, Histogram, render
from vlmkit.serve.parsing import (
    ApiError,
    ImageDecoder,
    embedding_inputs,
    error_body,
    parse_chat,
    parse_embeddings,
    parse_image_generation,
    parse_messages,
    read_json,
)

log = logging.getLogger("vlmkit.serve")

STATIC = Path(__file__).parent / "static" / "index.html"
# the engine ends a request at its deadline (at a token boundary); the API ends it itself this much later,
# when the engine could not (a request still waiting in the queue, a forward that does not return)
TIMEOUT_GRACE = 1.0
ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/images/generations", "/v1/models", "/health",
             "/metrics", "/")


# ---------------------------------------------------------------------------------------------- the app
class _Metrics:
    """The app's Prometheus series: requests and their latency, counted by :class:`_Observe`, and the
    engine's stats, read when scraped."""

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
            Counter("vlmkit_image_generation_requests_total", "Image generation requests drawn",
                    fn=lambda: stats().image_requests_total),
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


class _Server:
    """What the routes of one app share: the engine, the image decoder, the metrics and the app's limits."""

    def __init__(self, engine, images: ImageDecoder, metrics: _Metrics, api_key: str | None,
                 request_timeout: float | None, max_body_bytes: int):
        self.engine, self.images, self.metrics = engine, images, metrics
        self.api_key, self.request_timeout, self.max_body_bytes = api_key, request_timeout, max_body_bytes

    def check_key(self, request: Request) -> None:
        """A 401 unless the request carries ``Authorization: Bearer <api_key>`` (when the app has a key)."""
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           None, "invalid_api_key")

    async def read_json(self, request: Request):
        """The request's JSON body, within this app's ``max_body_bytes`` (:func:`parsing.read_json`)."""
        return await read_json(request, self.max_body_bytes)


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
    server = _Server(engine, images, metrics, api_key, request_timeout, max_body_bytes)
    _add_error_handlers(app)
    _add_chat_route(app, server)
    _add_embeddings_route(app, server)
    _add_images_route(app, server)
    _add_model_routes(app, server)
    _add_open_routes(app, server)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: refusals, unknown routes and methods, anything unexpected (a 500)."""

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


# ---------------------------------------------------------------------------------------------- the routes
def _add_chat_route(app: FastAPI, s: _Server) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        s.check_key(request)
        body = await s.read_json(request)
        engine = s.engine
        limit = engine.max_new_tokens
        messages, refs, gen, stream, include_usage = parse_chat(body, limit)
        if not engine.can_generate:
            what = ("draws images (POST /v1/images/generations)" if engine.can_generate_images else
                    "is a dual encoder: it embeds texts and images (POST /v1/embeddings)")
            raise ApiError(400, f"{engine.model_name} {what}; it does not chat", "model", "model_not_chat")
        pictures = await run_in_threadpool(s.images.decode_all, refs) if refs else []
        events = await _submit_chat(s, messages, pictures, gen)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if stream:
            chunks = _sse(events, rid, created, engine.model_name, s.request_timeout, include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _chat_completion(s, events, request, rid, created)


async def _submit_chat(s: _Server, messages: list[dict], pictures: list, gen):
    """Queue the request in the engine: its Stream of events. The engine's refusals are 400s, a full queue a
    429."""
    try:
        # images prepared and the prompt tokenised off the event loop; the stream delivers to it
        return await run_in_threadpool(s.engine.submit_chat, messages, pictures, gen,
                                       timeout=s.request_timeout, loop=asyncio.get_running_loop())
    except (DataError, ConfigError) as e:
        raise ApiError(400, str(e)) from None
    except QueueFull as e:
        raise ApiError(429, f"the server is busy: {e}", None, "queue_full") from None


async def _chat_completion(s: _Server, events, request: Request, rid: str, created: int):
    """The ``chat.completion`` object of a non-streamed request, once its answer is complete."""
    text, last = await _collect(events, request, s.request_timeout)
    if last.finish_reason == "disconnected":  # nobody reads this: 499 (nginx's) tells the metrics why
        return Response(status_code=499)
    if last.finish_reason == "timeout":
        raise ApiError(504, f"the answer took longer than this server allows ({s.request_timeout} s)", None,
                       "timeout")
    if last.finish_reason not in ("stop", "length"):
        _log_failure(last)
        raise ApiError(503 if last.finish_reason == "cancelled" else 500,
                       "the server is shutting down" if last.finish_reason == "cancelled"
                       else "internal server error while generating", None, "internal_error")
    usage = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
             "total_tokens": last.prompt_tokens + last.completion_tokens}
    return {"id": rid, "object": "chat.completion", "created": created, "model": s.engine.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": last.finish_reason}],
            "usage": usage}


def _add_embeddings_route(app: FastAPI, s: _Server) -> None:
    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        s.check_key(request)
        body = await s.read_json(request)
        items, fmt = parse_embeddings(body)
        engine = s.engine
        if not engine.can_embed:
            raise ApiError(400, f"{engine.model_name} is a generative vision-language model: it answers "
                           f"POST /v1/chat/completions; embeddings need a dual encoder (CLIP or SigLIP)",
                           "model", "model_not_embedding")
        is_image, texts, refs = embedding_inputs(items, isinstance(body["input"], list))
        pictures = await run_in_threadpool(s.images.decode_all, refs) if refs else []
        text_vectors, image_vectors, tokens = await run_in_threadpool(_embed, engine, texts, pictures)
        text_rows, image_rows = iter(text_vectors), iter(image_vectors)
        rows = [next(image_rows) if im else next(text_rows) for im in is_image]
        data = [{"object": "embedding", "index": i, "embedding": _encode_vector(v, fmt)}
                for i, v in enumerate(rows)]
        return {"object": "list", "data": data, "model": engine.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _add_images_route(app: FastAPI, s: _Server) -> None:
    @app.post("/v1/images/generations")
    async def images(request: Request):
        s.check_key(request)
        body = await s.read_json(request)
        engine = s.engine
        if not engine.can_generate_images:
            what = "answers POST /v1/chat/completions" if engine.can_generate else "embeds (POST /v1/embeddings)"
            raise ApiError(400, f"{engine.model_name} does not generate images: it {what}", "model",
                           "model_not_image_generation")
        h, w = engine.pipe.model.image_grid
        native = tuple(engine.processor.cfg.image_size)[::-1]  # (width, height)
        req = parse_image_generation(body, native)
        size = req.pop("size")
        created = int(time.time())
        try:
            pictures = await asyncio.wait_for(run_in_threadpool(engine.generate_image, **req),
                                              s.request_timeout + TIMEOUT_GRACE if s.request_timeout else None)
        except (DataError, ConfigError) as e:
            raise ApiError(400, str(e)) from None
        except asyncio.TimeoutError:
            raise ApiError(504, f"the images took longer than this server allows ({s.request_timeout} s)", None,
                           "timeout") from None
        data = [{"b64_json": _png_base64(im, size), "revised_prompt": None} for im in pictures]
        return {"created": created, "data": data, "output_format": "png", "size": f"{size[0]}x{size[1]}",
                "usage": {"input_tokens": 0, "output_tokens": h * w * len(pictures),
                          "total_tokens": h * w * len(pictures)}}


def _png_base64(image, size: tuple[int, int]) -> str:
    """A PIL image as base64 PNG, resized (nearest: the model's pixels kept) to ``size`` when it differs."""
    import io

    from PIL import Image

    if image.size != size:
        image = image.resize(size, Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _add_model_routes(app: FastAPI, s: _Server) -> None:
    @app.get("/v1/models")
    async def models(request: Request):
        s.check_key(request)
        return {"object": "list", "data": [_model_card(s.engine)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        s.check_key(request)
        if model_id != s.engine.model_name:
            raise ApiError(404, f"no model {model_id[:200]!r}; this server serves {s.engine.model_name!r}",
                           "model", "model_not_found")
        return _model_card(s.engine)


def _add_open_routes(app: FastAPI, s: _Server) -> None:
    """The routes that need no key: probes, scrapers and a browser opening the page hold none."""

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": s.engine.model_name, "queue_depth": s.engine.stats.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        return Response(render(s.metrics.all), media_type=CONTENT_TYPE)

    @app.get("/")
    async def page():
        if not STATIC.is_file():
            raise ApiError(404, "no chat page is installed (vlmkit/serve/static/index.html)", None,
                           "not_found")
        return FileResponse(STATIC, media_type="text/html")


# ---------------------------------------------------------------------------------------------- answers
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
        raise ApiError(400, str(e)) from None
    return t.float().tolist(), i.float().tolist(), _count_tokens(engine, texts)


def _count_tokens(engine, texts: list[str]) -> int:
    """Tokens of the texts as the text tower reads them."""
    processor = engine.processor
    if not texts:
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
    """OpenAI's model object, and what the model answers (the chat page shows its Draw button from it)."""
    return {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "vlmkit",
            "capabilities": {"chat": engine.can_generate, "embeddings": engine.can_embed,
                             "image_generation": engine.can_generate_images}}


__all__ = ["ApiError", "ImageDecoder", "create_app", "parse_chat", "parse_embeddings", "parse_messages"]
