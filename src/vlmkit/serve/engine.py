"""The serving engine: continuous batching over a vlmkit Pipeline's model, in one background thread.

Requests wait in a bounded queue. At every token boundary the engine admits waiting requests into the running
batch (up to ``max_batch``), and sequences that finished leave it, so a short answer never waits for a long one
and a new request never waits for the batch to drain:

- **admission**: the new requests' images go through the tower together, except those whose content hash is
  in the feature cache (a repeated image is encoded once); their prompts are prefilled together (left-padded,
  as :func:`~vlmkit.generation.generate` does) into a KV cache of their own, and their first tokens sampled;
- **joining**: the running batch's KV cache and the new one are aligned on the right and stacked. Every row
  keeps its own length through the attention mask (left padding): positions come from the mask, so a row's
  results do not depend on which rows share the batch. Rows that finish are dropped from the cache, and columns
  that only padding uses are trimmed away;
- **decoding**: one forward of all rows per step, each row sampled with its own temperature, top-p and seed;
  end of sequence, stop strings, ``max_new_tokens``, timeouts and cancellation end a row.

The prompt is built by the same Processor as training and evaluation (``Processor.chat``). Results reach
the caller through a :class:`Stream` of :class:`Delta` events, consumed synchronously or with ``async for``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from vlmkit.batch import Batch, Features, MediaInputs, item_key
from vlmkit.errors import ConfigError, DataError
from vlmkit.generation import GenerationConfig, left_pad, sample_next
from vlmkit.nn import KVCache


class QueueFull(Exception):
    """The engine's queue holds ``max_queue`` requests already (the API answers 429)."""


@dataclass
class Delta:
    """A piece of an answer. The last one has ``finish_reason``: stop, length, timeout, cancelled or error."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


@dataclass
class EngineStats:
    queue_depth: int = 0
    running: int = 0
    requests_total: int = 0
    requests_finished: int = 0
    generated_tokens_total: int = 0
    prompt_tokens_total: int = 0
    decode_steps: int = 0
    batch_size_sum: int = 0
    image_cache_hits: int = 0
    image_cache_misses: int = 0
    image_requests_total: int = 0  # POST /v1/images/generations requests drawn


class Stream:
    """The events of one request. Iterate it (blocking) or ``async for`` it; a stream made inside a running event
    loop delivers to that loop. ``cancel()`` ends the request at the next token boundary."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        if loop is None:
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_running_loop()
        self._loop = loop
        self._aqueue: asyncio.Queue | None = None
        if loop is not None:  # an asyncio.Queue is bound to its loop on first use, from that loop's thread
            self._aqueue = asyncio.Queue()
        self._queue: queue.Queue = queue.Queue()
        self.cancelled = False

    def put(self, event: Delta) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening any more
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, event)
        else:
            self._queue.put(event)

    def cancel(self) -> None:
        self.cancelled = True

    def __iter__(self):
        while True:
            event = self._queue.get()
            yield event
            if event.finish_reason is not None:
                return

    async def __aiter__(self):
        if self._aqueue is None:
            raise RuntimeError("this Stream was created outside an event loop: iterate it synchronously")
        while True:
            event = await self._aqueue.get()
            yield event
            if event.finish_reason is not None:
                return

    def text(self) -> tuple[str, Delta]:
        """Block until done: (the whole answer, the last event)."""
        parts, last = [], None
        for last in self:
            parts.append(last.text)
        return "".join(parts), last


@dataclass
class _Request:
    prompt: list[int]
    singles: list[MediaInputs]  # each image as the processor prepares it
    keys: list[str]  # their content hashes
    gen: GenerationConfig
    stream: Stream
    deadline: float | None
    new: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded answer already sent
    generator: torch.Generator | None = None
    last: int = 0  # the sampled token the next decoding step feeds


class Engine:
    """Continuous batching over ``pipeline`` (module docstring). ``start()`` runs the loop in a thread."""

    def __init__(self, pipeline, max_batch: int = 16, max_queue: int = 64, max_prompt_tokens: int = 4096,
                 max_new_tokens: int = 1024, image_cache_size: int = 256):
        if max_batch < 1 or max_queue < 1:
            raise ConfigError(f"max_batch ({max_batch}) and max_queue ({max_queue}) must be >= 1")
        self.pipe = pipeline
        self.model = pipeline.model
        self.processor = pipeline.processor
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        self.image_cache_size = image_cache_size
        self.stats = EngineStats()
        self.model_name = str(pipeline.meta.get("name") or pipeline.config.family)
        self._pending: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._features: OrderedDict[str, object] = OrderedDict()
        self._running: list[_Request] = []
        self._cache: KVCache | None = None
        self._attn: torch.Tensor | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self._lock = threading.Lock()  # the model: one forward at a time (embeddings come from request threads)
        tok = self.processor.tokenizer
        self.stop_ids, self.pad_id = frozenset(self.processor.stop_ids), tok.pad_id

    @property
    def can_generate(self) -> bool:
        return self.pipe.can_generate

    @property
    def can_embed(self) -> bool:
        return self.pipe.can_embed

    @property
    def can_generate_images(self) -> bool:
        return self.pipe.can_generate_images

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        if self._thread is None and self.can_generate:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="vlmkit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # ------------------------------------------------------------------------------------------ requests
    def submit_chat(self, messages: list[dict], images: list, gen: GenerationConfig,
                    timeout: float | None = None, loop: asyncio.AbstractEventLoop | None = None) -> Stream:
        """Queue a chat request; returns its Stream. The images are prepared and the prompt tokenised here, in
        the caller's thread: an async server calls this from a worker thread and passes its event ``loop``, to
        which the Stream then delivers."""
        if not self.can_generate:
            raise ConfigError(f"{self.model_name} is a dual encoder: it embeds (POST /v1/embeddings), it does not chat")
        gen.validate()
        if gen.max_new_tokens > self.max_new_tokens:
            raise DataError(f"max_tokens {gen.max_new_tokens} is more than this server allows ({self.max_new_tokens})")
        enc = self.processor.chat(messages, self.processor.prepare_images(images, "request"), "request")
        prompt = enc.ids
        singles = enc.media.split()  # each image with what the prompt added to it (InstructBLIP's instruction)
        keys = [item_key(_image_key(im), single) for im, single in zip(images, singles)]
        if len(prompt) > self.max_prompt_tokens:
            raise DataError(f"the prompt has {len(prompt)} tokens, more than this server allows "
                            f"({self.max_prompt_tokens})")
        stream = Stream(loop)
        req = _Request(prompt, singles, keys, gen, stream, time.monotonic() + timeout if timeout else None)
        if gen.seed is not None:
            req.generator = torch.Generator().manual_seed(gen.seed)
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._pending.append(req)
            self.stats.requests_total += 1
            self.stats.queue_depth = len(self._pending)
            self._cond.notify_all()
        return stream

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        with self._lock:
            return self.pipe.embed_texts(texts)

    @torch.no_grad()
    def embed_images(self, images: list) -> torch.Tensor:
        with self._lock:
            return self.pipe.embed_images(images)

    def generate_image(self, prompt: str, **options) -> list:
        """Pipeline.generate_image under the model's lock: the images of one request, drawn between the chat
        batch's decoding steps (a request's whole grid at once; the chat batch waits meanwhile)."""
        with self._lock, torch.inference_mode():
            self.stats.image_requests_total += 1
            return self.pipe.generate_image(prompt, **options)

    # ------------------------------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._pending and not self._running:
                    self._cond.wait(timeout=1.0)
                if self._stop:
                    break
                now = time.monotonic()
                for req in [r for r in self._pending if r.stream.cancelled or (r.deadline and now > r.deadline)]:
                    self._pending.remove(req)  # ended while waiting: no prefill for nobody
                    self._finish(req, "cancelled" if req.stream.cancelled else "timeout")
                room = self.max_batch - len(self._running)
                admitted = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
                self.stats.queue_depth = len(self._pending)
            try:
                with self._lock, torch.inference_mode():
                    if admitted:
                        self._admit(admitted)
                    if self._running:
                        self._decode_step()
            except Exception as e:  # a failure inside the model ends the requests it touched, not the server
                touched = {id(r): r for r in admitted + self._running}  # admitted ones may have joined already
                for req in touched.values():
                    self._finish(req, "error", error=f"{type(e).__name__}: {e}")
                self._running, self._cache, self._attn = [], None, None
                self.stats.running = 0
        for req in list(self._running) + list(self._pending):
            self._finish(req, "cancelled", error="the server is shutting down")

    def _features_of(self, reqs: list[_Request]):
        """Image features of the admitted requests, in their reading order: cached ones looked up, the others
        encoded in one batch and cached. Returns None when no request has an image."""
        singles: dict[str, MediaInputs] = {}
        for r in reqs:
            for k, single in zip(r.keys, r.singles):
                if k not in self._features and k not in singles:
                    singles[k] = single
        if singles:
            self.stats.image_cache_misses += len(singles)
            encoded = self.model.encode_media(MediaInputs.cat(list(singles.values())))
            for k, f in zip(singles, encoded.split()):
                self._features[k] = f
        keys = [k for r in reqs for k in r.keys]
        self.stats.image_cache_hits += len(keys) - len(singles)
        for k in keys:
            self._features.move_to_end(k)
        feats = [self._features[k] for k in keys]
        while len(self._features) > self.image_cache_size:
            self._features.popitem(last=False)
        return Features.cat(feats) if feats else None

    def _admit(self, reqs: list[_Request]) -> None:
        ids, attn = left_pad([r.prompt for r in reqs], self.pad_id)
        feats = self._features_of(reqs)
        cache = self.model.new_cache(len(reqs), ids.shape[1])
        batch = Batch(ids, attention_mask=attn, prompt_mask=attn.bool(), features=feats)
        out = self.model(batch, cache=cache, logits_to_keep=1)
        for r in reqs:
            self.stats.prompt_tokens_total += len(r.prompt)
        self._join(reqs, cache, attn)
        self._sample_and_emit(reqs, out.logits[:, -1])

    def _join(self, reqs: list[_Request], cache: KVCache, attn: torch.Tensor) -> None:
        """Stack the new rows' cache under the running batch's, both aligned on the right (module docstring)."""
        if self._cache is None:
            self._cache, self._attn, self._running = cache, attn, list(reqs)
            self.stats.running = len(self._running)
            return
        B_old, B_new = len(self._running), len(reqs)
        merged = KVCache.stack(self._cache, cache)
        C = merged.length
        a = torch.zeros(B_old + B_new, C, dtype=self._attn.dtype)
        a[:B_old, C - self._attn.shape[1]:] = self._attn
        a[B_old:, C - attn.shape[1]:] = attn
        self._cache, self._attn, self._running = merged, a, self._running + list(reqs)
        self.stats.running = len(self._running)

    def _decode_step(self) -> None:
        B = len(self._running)
        if self._cache.length + 1 > self._cache.max_len:  # grow the buffers
            self._cache = self._cache.grow(2 * self._cache.max_len)
        nxt = torch.tensor([[r.last] for r in self._running], dtype=torch.long)
        self._attn = torch.cat([self._attn, torch.ones(B, 1, dtype=self._attn.dtype)], dim=1)
        out = self.model(Batch(nxt, attention_mask=self._attn), cache=self._cache, logits_to_keep=1)
        self.stats.decode_steps += 1
        self.stats.batch_size_sum += B
        self._sample_and_emit(list(self._running), out.logits[:, -1])

    def _sample_and_emit(self, reqs: list[_Request], logits: torch.Tensor) -> None:
        """Sample each row's next token, send the new text, and drop the rows that finished."""
        logits = logits.clone()
        logits[:, list(self.model.reserved_token_ids)] = float("-inf")  # image slots come from the processor alone
        now = time.monotonic()
        done: list[tuple[_Request, str]] = []
        decode = self.processor.tokenizer.decode
        for i, r in enumerate(reqs):
            if r.stream.cancelled:
                done.append((r, "cancelled"))
                continue
            if r.deadline is not None and now > r.deadline:
                done.append((r, "timeout"))
                continue
            t = int(sample_next(logits[i:i + 1], r.gen.temperature, r.gen.top_p, r.generator)[0])
            if t in self.stop_ids:  # EOS or another end token: flush what was held back
                self._send(r, decode(r.new), final=True)
                done.append((r, "stop"))
                continue
            r.new.append(t)
            r.last = t
            self.stats.generated_tokens_total += 1
            text = decode(r.new)
            cut = _stop_at(text, r.gen.stop)
            if cut is not None:
                self._send(r, text[:cut], final=True)
                done.append((r, "stop"))
                continue
            final = len(r.new) >= r.gen.max_new_tokens
            self._send(r, text, final=final)
            if final:
                done.append((r, "length"))
        for r, reason in done:
            self._finish(r, reason)
        if done:
            gone = {id(r) for r, _ in done}
            keep = [i for i, r in enumerate(self._running) if id(r) not in gone]
            self._drop_rows(keep)

    def _send(self, r: _Request, text: str, final: bool) -> None:
        """Send the part of ``text`` not sent yet; while a row runs, hold back what could still become a stop
        string, and an incomplete UTF-8 character."""
        hold = 0 if final else max((len(s) - 1 for s in r.gen.stop), default=0)
        end = len(text) - hold
        if not final:
            while end > r.sent and text[end - 1] == "\ufffd":
                end -= 1
        if end > r.sent:
            r.stream.put(Delta(text[r.sent:end]))
            r.sent = end

    def _finish(self, r: _Request, reason: str, error: str = "") -> None:
        r.stream.put(Delta("", reason, len(r.prompt), len(r.new), error))
        self.stats.requests_finished += 1

    def _drop_rows(self, keep: list[int]) -> None:
        self._running = [self._running[i] for i in keep]
        self.stats.running = len(self._running)
        if not keep:
            self._cache, self._attn = None, None
            return
        idx = torch.tensor(keep, dtype=torch.long)
        attn = self._attn[idx]
        first = int(attn.any(0).long().argmax())  # columns before it hold only padding now
        self._cache = self._cache.select(idx, drop_columns=first)
        self._attn = attn[:, first:]


def _image_key(image) -> str:
    """Content hash of an image (mode, size and pixels): the same picture sent twice is encoded once."""
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _stop_at(text: str, stop: list[str]) -> int | None:
    cuts = [text.find(s) for s in stop if s and s in text]
    return min(cuts) if cuts else None


__all__ = ["Delta", "Engine", "EngineStats", "QueueFull", "Stream"]
