"""Evaluation backends besides a vlmkit checkpoint: any OpenAI-compatible chat-completions endpoint.

``vlmkit eval --model openai:BASE_URL#MODEL`` evaluates proprietary models and vLLM / SGLang servers the same way
a checkpoint is evaluated: :class:`OpenAIBackend` offers the one call the runner makes on a
:class:`~vlmkit.pipeline.Pipeline` (``chat_batch``). Each (images, question) is one chat-completions request, images
sent as base64 PNG data URLs. Requests run in a bounded thread pool; connection errors, timeouts, HTTP 429 and 5xx
are retried with exponential back-off, then the sample is recorded as failed (answer ``""``, its message in
``last_errors``) and the run goes on. Answers are cached on disk, one JSON file per request keyed by the sha256 of
the request body, so an interrupted run resumes without asking again. Standard library only.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vlmkit.errors import ConfigError, DataError
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

    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                im.load()
                image = im.copy()
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {image}: {e}") from e
    elif not isinstance(image, Image.Image):
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


class OpenAIBackend:
    """An OpenAI-compatible chat-completions endpoint that answers like a Pipeline (``chat_batch``).

    ``api_key`` defaults to the environment's ``OPENAI_API_KEY``; without one no Authorization header is sent
    (local vLLM / SGLang servers need none). ``concurrency`` requests are in flight at most; a request is tried
    ``1 + retries`` times, waiting ``backoff * 2**attempt`` seconds (or the server's Retry-After) in between;
    ``timeout`` bounds each attempt's connection and every read. With ``cache_dir``, answers are read from and
    written to it. After each ``chat_batch``, ``last_errors`` holds, per request, None or why it failed, and
    ``requests_sent`` counts the HTTP requests made so far (retries included).
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

    @classmethod
    def from_spec(cls, spec: str, **kwargs) -> OpenAIBackend:
        """From ``openai:BASE_URL#MODEL`` (see :func:`parse_model_spec`)."""
        base_url, model = parse_model_spec(spec)
        return cls(base_url, model, **kwargs)

    # ------------------------------------------------------------------ the Pipeline call
    def chat_batch(self, requests: list[tuple[object, str]], max_new_tokens: int = 16,
                   temperature: float = 0.0) -> list[str]:
        """[(images, question), ...] -> answers in the same order; a request that failed answers ``""`` and its
        message is in ``last_errors`` at the same index. Identical requests are asked once."""
        bodies = [self.request_body(images, question, max_new_tokens, temperature) for images, question in requests]
        keys = [request_key(b) for b in bodies]
        answers: dict[str, str] = {}
        errors: dict[str, str] = {}
        todo: dict[str, dict] = {}
        for key, body in zip(keys, bodies):
            if key in answers or key in todo:
                continue
            cached = self._cached(key)
            if cached is not None:
                answers[key] = cached
            else:
                todo[key] = body
        if todo:
            pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo)), thread_name_prefix="openai")
            try:
                futures = {key: pool.submit(self._ask, body) for key, body in todo.items()}
                for key, fut in futures.items():
                    answer, error = fut.result()
                    if error is None:
                        answers[key] = answer
                    else:
                        errors[key] = error
            except BaseException:  # e.g. Ctrl-C: drop what has not started; what finished is already cached
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown()
        self.last_errors = [errors.get(k) for k in keys]
        return [answers.get(k, "") for k in keys]

    def chat(self, images, question: str, max_new_tokens: int = 16, temperature: float = 0.0) -> str:
        """One question about ``images``; raises RuntimeError when the endpoint failed on it."""
        answer = self.chat_batch([(images, question)], max_new_tokens, temperature)[0]
        if self.last_errors[0] is not None:
            raise RuntimeError(self.last_errors[0])
        return answer

    def request_body(self, images, question: str, max_new_tokens: int, temperature: float) -> dict:
        """The chat-completions request body for one question (what the cache key is the hash of)."""
        return {"model": self.model, "messages": [{"role": "user", "content": message_content(images, question)}],
                "max_tokens": int(max_new_tokens), "temperature": float(temperature)}

    # ------------------------------------------------------------------ HTTP with retries
    def _ask(self, body: dict) -> tuple[str, str | None]:
        """(answer, None) or ("", why it failed after the retries). Runs in a worker thread and caches the answer
        at once, so a run interrupted later keeps it; failures are not cached (a resumed run asks again)."""
        data = json.dumps(body).encode("utf-8")
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                answer = self._post(data)
                self._store(request_key(body), answer)
                return answer, None
            except _Failed as e:
                return "", str(e)
            except _Retryable as e:
                if attempt == attempts - 1:
                    return "", f"{e} (gave up after {attempts} attempt{'s' if attempts > 1 else ''})"
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


def request_key(body: dict) -> str:
    """sha256 of a request body (model, messages, max_tokens, temperature) in a canonical JSON form."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _retry_after(headers) -> float | None:
    try:
        return float(headers.get("Retry-After")) if headers is not None and headers.get("Retry-After") else None
    except ValueError:  # an HTTP date: use the back-off
        return None


def _snippet(raw: bytes, n: int = 200) -> str:
    text = raw.decode("utf-8", "replace").strip().replace("\n", " ")
    return text if len(text) <= n else text[:n] + "..."
