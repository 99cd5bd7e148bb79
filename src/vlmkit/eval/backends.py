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
import heapq
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


@dataclass
class _Job:
    """A request on its way: what it asks, then (after its first step) its body and cache key, and its attempts."""

    index: int
    images: object
    question: str
    max_new_tokens: int
    temperature: float
    body: dict | None = None
    key: str | None = None
    attempt: int = 0


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
    can_generate_images = False  # nor draws images

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
        self._asked: set[str] = set()  # the cache keys this stream has asked (or is asking)
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
        are running, so images are encoded when their request starts. A request waiting for its retry holds no
        slot: its back-off is scheduled, and the slot serves other requests meanwhile. A request identical to one
        already asked in this stream (same images, question and settings) is asked once. Ctrl-C stops the stream;
        what finished is already cached."""
        self._asked, self._done = set(), {}
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai")
        running: dict = {}  # future -> its _Job
        delayed: list = []  # heap of (when a retry is due, tie-break, its _Job)
        waiters: dict[str, list[int]] = {}  # cache key -> indices of the requests identical to the one asking
        todo, exhausted = enumerate(requests), False
        try:
            while True:
                while delayed and delayed[0][0] <= time.monotonic() and len(running) < self.concurrency:
                    job = heapq.heappop(delayed)[2]
                    running[pool.submit(self._attempt, job)] = job
                while not exhausted and len(running) < self.concurrency:
                    nxt = next(todo, None)
                    if nxt is None:
                        exhausted = True
                        break
                    job = _Job(nxt[0], nxt[1][0], nxt[1][1], max_new_tokens, temperature)
                    running[pool.submit(self._attempt, job)] = job
                if not running and not delayed:
                    break
                due = max(0.0, delayed[0][0] - time.monotonic()) if delayed else None
                if not running:  # only retries are left, none due yet
                    time.sleep(due)
                    continue
                finished, _ = wait(running, timeout=due, return_when=FIRST_COMPLETED)
                for fut in finished:
                    job = running.pop(fut)
                    yield from self._settle(job, fut.result(), delayed, waiters)
        finally:  # also on Ctrl-C or when the caller stops iterating: drop what has not started
            pool.shutdown(wait=False, cancel_futures=True)

    def _settle(self, job: _Job, outcome: tuple, delayed: list, waiters: dict) -> list[Answer]:
        """The answers one finished step of ``job`` settles (its own, and those of identical requests waiting for
        it); a step that must be retried goes back on the ``delayed`` heap instead."""
        kind = outcome[0]
        if kind == "retry":
            heapq.heappush(delayed, (time.monotonic() + outcome[1], job.index, job))
            return []
        if kind == "duplicate":
            if job.key not in self._done:
                waiters.setdefault(job.key, []).append(job.index)
                return []
            return [Answer(job.index, *self._done[job.key])]
        answer, error, cached = (outcome[1], None, outcome[2]) if kind == "answer" else (None, outcome[1], False)
        out = [Answer(job.index, answer, error, cached)]
        if job.key is not None:
            self._done[job.key] = (answer, error)
            out += [Answer(i, answer, error) for i in waiters.pop(job.key, [])]
        return out

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

    def _attempt(self, job: _Job) -> tuple:
        """One step of a request, in a worker thread: ``("answer", text, cached)``, ``("failed", why)``,
        ``("retry", seconds to wait)`` or ``("duplicate",)`` (an identical request of the stream is being asked).
        The first step builds the request (encoding its images) and looks in the cache; an answer is cached at
        once, so a run interrupted later keeps it; failures are not cached (a resumed run asks again)."""
        if job.key is None:
            try:
                job.body = self.request_body(job.images, job.question, job.max_new_tokens, job.temperature)
            except DataError as e:  # an unreadable image, placeholders that do not match: this sample fails
                return ("failed", str(e))
            job.images, job.key = None, self.cache_key(job.body)
            with self._lock:
                if job.key in self._asked:
                    return ("duplicate",)
                self._asked.add(job.key)
            cached = self._cached(job.key)
            if cached is not None:
                return ("answer", cached, True)
        try:
            answer = self._post(json.dumps(job.body).encode("utf-8"))
        except _Failed as e:
            return ("failed", str(e))
        except _Retryable as e:
            if job.attempt >= self.retries:
                n = job.attempt + 1
                return ("failed", f"{e} (gave up after {n} attempt{'s' if n > 1 else ''})")
            wait_s = self.backoff * 2 ** job.attempt
            if e.retry_after is not None:
                wait_s = max(wait_s, min(e.retry_after, MAX_RETRY_AFTER))
            job.attempt += 1
            return ("retry", wait_s)
        self._store(job.key, answer)
        return ("answer", answer, False)

    # ------------------------------------------------------------------ HTTP
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
