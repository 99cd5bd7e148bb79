"""Evaluation backends besides a vlmkit checkpoint: any OpenAI-compatible chat-completions endpoint.

``vlmkit eval --model openai:BASE_URL#MODEL`` evaluates proprietary models and vLLM / SGLang servers the same way
a checkpoint is evaluated. :class:`OpenAIBackend` answers a whole task as a stream (:meth:`~OpenAIBackend.stream`):
``concurrency`` requests are in flight at once, each built (images encoded as base64 PNG data URLs) in its worker
only when it starts, so a large benchmark is never held encoded in memory, and answers come back as they finish,
so one slow or failing request never holds up the others. Connection errors, timeouts, HTTP 429 and 5xx are
retried with exponential back-off; a request that still fails is reported as failed (never as an answer). Answers
are cached on disk, one JSON file per request keyed by the sha256 of the endpoint's URL and the full request
body, so an interrupted run resumes without asking again and another endpoint never gets this one's answers.
``chat_batch`` (a Pipeline's call) is the same stream collected in order. Standard library only.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from vlmkit.errors import ConfigError, DataError
from vlmkit.eval.readers import EmbeddedImage
from vlmkit.utils import atomic_write_json

SPEC_PREFIX = "openai:"
IMAGE_PLACEHOLDER = "<image>"  # where an image goes in a vlmkit question (as Pipeline.chat reads it)
MAX_RETRY_AFTER = 60.0  # seconds: the longest Retry-After a server's 429/503 is honoured for


def is_endpoint_spec(model) -> bool:
    """Whether ``model`` names an endpoint (``openai:...``) rather than a checkpoint folder."""
    return isinstance(model, str) and model.startswith(SPEC_PREFIX)


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``"openai:http://host:port/v1#model-name"`` -> (``"http://host:port/v1"``, ``"model-name"``)."""
    example = "e.g. openai:http://127.0.0.1:8000/v1#my-model"
    if not is_endpoint_spec(spec):
        raise ConfigError(f"model spec {spec!r} must start with {SPEC_PREFIX!r}: openai:BASE_URL#MODEL, {example}")
    base_url, sep, model = spec[len(SPEC_PREFIX):].partition("#")
    if not sep or not model.strip():
        raise ConfigError(f"model spec {spec!r} names no model: expected openai:BASE_URL#MODEL, {example}")
    url = urllib.parse.urlsplit(base_url)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise ConfigError(f"model spec {spec!r}: base URL {base_url!r} must be http(s)://HOST[:PORT][/PATH], "
                          f"{example}")
    return base_url.rstrip("/"), model.strip()


def image_data_url(image) -> str:
    """A path or PIL image -> ``data:image/png;base64,...`` (re-encoded as PNG whatever the file's format)."""
    from PIL import Image

    if isinstance(image, EmbeddedImage):  # held inside a benchmark file: decoded here, in the request's worker
        image = image.open()
    elif isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                im.load()
                image = im.copy()
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {image}: {e}") from e
    if not isinstance(image, Image.Image):
        raise DataError(f"an image must be a path or a PIL image, got {type(image).__name__}")
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
        image = image.convert("RGB")  # e.g. CMYK or YCbCr JPEGs: PNG cannot hold those modes
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def message_content(images, question: str) -> list[dict]:
    """The user message's parts: the images where the question's ``<image>`` placeholders are, else in front."""
    images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
    n = question.count(IMAGE_PLACEHOLDER)
    if n and n != len(images):
        raise DataError(f"question has {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s) were "
                        f"given; use one placeholder per image, or none to put the images first: {question!r}")
    parts: list[dict] = []
    if not n:
        parts += [{"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in images]
        return parts + [{"type": "text", "text": question}]
    for i, text in enumerate(question.split(IMAGE_PLACEHOLDER)):
        if text.strip():
            parts.append({"type": "text", "text": text.strip()})
        if i < n:
            parts.append({"type": "image_url", "image_url": {"url": image_data_url(images[i])}})
    return parts


class _Retryable(Exception):
    """A failure worth asking again (connection error, timeout, HTTP 429 or 5xx)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Failed(Exception):
    """A failure asking again would not fix (HTTP 4xx other than 429, a reply without an answer)."""


@dataclass
class Answer:
    """One request's outcome: its index in the stream, the answer (None when it failed), why it failed, and whether
    it came from the cache."""

    index: int
    answer: str | None
    error: str | None = None
    cached: bool = False


class OpenAIBackend:
    """An OpenAI-compatible chat-completions endpoint that answers like a Pipeline (``chat_batch``) or as a stream.

    ``api_key`` defaults to the environment's ``OPENAI_API_KEY``; without one no Authorization header is sent
    (local vLLM / SGLang servers need none). ``concurrency`` requests are in flight at most; a request is tried
    ``1 + retries`` times, waiting ``backoff * 2**attempt`` seconds (or the server's Retry-After, at most
    ``MAX_RETRY_AFTER``) in between; ``timeout`` bounds each attempt's connection and every read. With
    ``cache_dir``, answers are read from and written to it. After each ``chat_batch``, ``last_errors`` holds, per
    request, None or why it failed; ``requests_sent`` counts the HTTP requests made so far (retries included).
    """

    can_generate, can_embed, can_score = True, False, False  # it answers chats; it neither embeds nor scores

    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 4,
                 retries: int = 3, timeout: float = 60.0, backoff: float = 1.0,
                 cache_dir: str | Path | None = None):
        if concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
        if retries < 0:
            raise ConfigError(f"retries must be 0 or more, got {retries}")
        if timeout <= 0 or backoff < 0:
            raise ConfigError(f"timeout must be > 0 and backoff >= 0 seconds, got timeout={timeout}, "
                              f"backoff={backoff}")
        self.base_url, self.model = base_url.rstrip("/"), model
        self.url = self.base_url + "/chat/completions"
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.concurrency, self.retries, self.timeout, self.backoff = concurrency, retries, timeout, backoff
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.last_errors: list[str | None] = []
        self.requests_sent = 0
        self._lock = threading.Lock()
        self._pending: dict[str, threading.Event] = {}  # cache key -> set when the request asking it is done
        self._done: dict[str, tuple[str | None, str | None]] = {}  # this stream's outcomes, by cache key

    @classmethod
    def from_spec(cls, spec: str, **kwargs) -> OpenAIBackend:
        """From ``openai:BASE_URL#MODEL`` (see :func:`parse_model_spec`)."""
        base_url, model = parse_model_spec(spec)
        return cls(base_url, model, **kwargs)

    # ------------------------------------------------------------------ the calls
    def stream(self, requests, max_new_tokens: int = 16, temperature: float = 0.0) -> Iterator[Answer]:
        """``requests`` (an iterable of (images, question)) -> an :class:`Answer` per request, in the order they
        finish. At most ``concurrency`` requests are in flight, and only as many are taken from ``requests`` as
        are running, so images are encoded when their request starts. A request identical to one already asked
        in this stream (same images, question and settings) is asked once. Ctrl-C stops the stream; what finished
        is already cached."""
        self._pending, self._done = {}, {}
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai")
        running: dict = {}
        todo = enumerate(requests)
        try:
            while True:
                for index, (images, question) in todo:
                    running[pool.submit(self._answer, images, question, max_new_tokens, temperature)] = index
                    if len(running) >= self.concurrency:
                        break
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    answer, error, cached = fut.result()
                    yield Answer(running.pop(fut), answer, error, cached)
        finally:  # also on Ctrl-C or when the caller stops iterating: drop what has not started
            pool.shutdown(wait=False, cancel_futures=True)

    def chat_batch(self, requests: list[tuple[object, str]], max_new_tokens: int = 16,
                   temperature: float = 0.0) -> list[str]:
        """[(images, question), ...] -> answers in the same order; a request that failed answers ``""`` and its
        message is in ``last_errors`` at the same index (the evaluation runner uses :meth:`stream`, which never
        mistakes a failure for an answer)."""
        answers: list[str] = [""] * len(requests)
        errors: list[str | None] = [None] * len(requests)
        for a in self.stream(requests, max_new_tokens, temperature):
            answers[a.index] = a.answer if a.answer is not None else ""
            errors[a.index] = a.error
        self.last_errors = errors
        return answers

    def chat(self, images, question: str, max_new_tokens: int = 16, temperature: float = 0.0) -> str:
        """One question about ``images``; raises RuntimeError when the endpoint failed on it."""
        answer = self.chat_batch([(images, question)], max_new_tokens, temperature)[0]
        if self.last_errors[0] is not None:
            raise RuntimeError(self.last_errors[0])
        return answer

    def request_body(self, images, question: str, max_new_tokens: int, temperature: float) -> dict:
        """The chat-completions request body for one question."""
        return {"model": self.model, "messages": [{"role": "user", "content": message_content(images, question)}],
                "max_tokens": int(max_new_tokens), "temperature": float(temperature)}

    def cache_key(self, body: dict) -> str:
        """What an answer is cached under: the endpoint's URL and the full request body (see :func:`request_key`)."""
        return request_key(body, self.url)

    def _answer(self, images, question: str, max_new_tokens: int, temperature: float):
        """(answer, None, cached) or (None, why it failed, False): the cache, else the endpoint, asked once per
        distinct request of the stream. Runs in a worker thread; an answer is cached at once, so a run interrupted
        later keeps it; failures are not cached (a resumed run asks again)."""
        try:
            body = self.request_body(images, question, max_new_tokens, temperature)
        except DataError as e:  # an unreadable image, placeholders that do not match: this sample fails
            return None, str(e), False
        key = self.cache_key(body)
        with self._lock:
            first = key not in self._pending
            if first:
                self._pending[key] = threading.Event()
            event = self._pending[key]
        if not first:  # the same request is being (or was) asked by another worker: its outcome is this one's
            event.wait()
            answer, error = self._done[key]
            return answer, error, False
        try:
            cached = self._cached(key)
            answer, error = (cached, None) if cached is not None else self._ask(body, key)
            self._done[key] = (answer, error)
            return answer, error, cached is not None
        finally:
            self._done.setdefault(key, (None, "the request was interrupted"))
            event.set()

    # ------------------------------------------------------------------ HTTP with retries
    def _ask(self, body: dict, key: str) -> tuple[str | None, str | None]:
        """(answer, None) or (None, why it failed after the retries); the answer is cached under ``key``."""
        data = json.dumps(body).encode("utf-8")
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                answer = self._post(data)
                self._store(key, answer)
                return answer, None
            except _Failed as e:
                return None, str(e)
            except _Retryable as e:
                if attempt == attempts - 1:
                    return None, f"{e} (gave up after {attempts} attempt{'s' if attempts > 1 else ''})"
                wait = self.backoff * 2 ** attempt
                if e.retry_after is not None:
                    wait = max(wait, min(e.retry_after, MAX_RETRY_AFTER))
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _post(self, data: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        with self._lock:
            self.requests_sent += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = _snippet(e.read() if e.fp is not None else b"")
            message = f"POST {self.url}: HTTP {e.code} {e.reason}{': ' + detail if detail else ''}"
            if e.code == 429 or e.code >= 500:
                raise _Retryable(message, _retry_after(e.headers)) from e
            raise _Failed(message) from e
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError) or isinstance(e, TimeoutError):
                raise _Retryable(f"POST {self.url}: timed out after {self.timeout:g} s") from e
            raise _Retryable(f"POST {self.url}: {type(reason).__name__}: {reason}") from e
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Failed(f"POST {self.url}: the reply has no choices[0].message.content: {_snippet(raw)}") from e
        if isinstance(content, list):  # some servers answer in parts, like the request's content
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return "" if content is None else str(content)

    # ------------------------------------------------------------------ cache
    def _cache_path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.json"

    def _cached(self, key: str) -> str | None:
        if self.cache_dir is None:
            return None
        try:
            entry = json.loads(self._cache_path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent (or unreadable: ask again and rewrite it)
            return None
        answer = entry.get("answer") if isinstance(entry, dict) else None
        return answer if isinstance(answer, str) else None

    def _store(self, key: str, answer: str) -> None:
        if self.cache_dir is not None:
            atomic_write_json(self._cache_path(key), {"key": key, "model": self.model, "url": self.url,
                                                      "answer": answer})


def request_key(body: dict, url: str) -> str:
    """sha256 of the endpoint's URL and a request body (model, messages, max_tokens, temperature) in a canonical
    JSON form: two endpoints serving a model of the same name never share answers."""
    canonical = json.dumps({"url": url, "body": body}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _retry_after(headers) -> float | None:
    try:
        return float(headers.get("Retry-After")) if headers is not None and headers.get("Retry-After") else None
    except ValueError:  # an HTTP date: use the back-off
        return None


def _snippet(raw: bytes, n: int = 200) -> str:
    text = raw.decode("utf-8", "replace").strip().replace("\n", " ")
    return text if len(text) <= n else text[:n] + "..."
