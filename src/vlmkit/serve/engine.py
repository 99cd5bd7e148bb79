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

The prompt is built by the same Processor as training and evaluation (``encode_chat_messages``). Results reach
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

from vlmkit.errors import ConfigError, DataError
from vlmkit.generation import GenerationConfig, left_pad, sample_next
from vlmkit.nn import KVCache
from vlmkit.processing.image import ImageInputs


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
    singles: list[ImageInputs]  # each image as the processor prepares it
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
        self.model_name = str(pipeline.meta.get("name") or getattr(pipeline.config, "family", "vlmkit"))
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
        self.eos_id, self.pad_id = tok.eos_id, tok.pad_id

    @property
    def is_dual_encoder(self) -> bool:
        return self.pipe.is_dual_encoder

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        if self._thread is None and not self.is_dual_encoder:
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
        if self.is_dual_encoder:
            raise ConfigError(f"{self.model_name} is a dual encoder: it embeds (POST /v1/embeddings), it does not chat")
        gen.validate()
        if gen.max_new_tokens > self.max_new_tokens:
            raise DataError(f"max_tokens {gen.max_new_tokens} is more than this server allows ({self.max_new_tokens})")
        singles = [self.processor.prepare_images([im], "request") for im in images]
        keys = [_image_key(im) for im in images]
        inputs = ImageInputs.cat(singles) if singles else self.processor.prepare_images([])
        prompt = self.processor.encode_chat_messages(messages, inputs, "request")
        added = [k for k in inputs.extra if k not in (singles[0].extra if singles else {})]
        if added:  # what the prompt adds to each image (InstructBLIP's instruction) is part of its features
            singles = [ImageInputs(s.pixel_values, s.tokens, {**s.extra, **{k: inputs.extra[k][i:i + 1] for k in added}},
                                   s.texts) for i, s in enumerate(singles)]
            keys = [_extra_key(key, s.extra, added) for key, s in zip(keys, singles)]
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
        singles: dict[str, ImageInputs] = {}
        for r in reqs:
            for k, single in zip(r.keys, r.singles):
                if k not in self._features and k not in singles:
                    singles[k] = single
        if singles:
            self.stats.image_cache_misses += len(singles)
            encoded = self.model.encode_images(ImageInputs.cat(list(singles.values())))
            tokens = [sum(s.tokens) for s in singles.values()]
            for k, f in zip(singles, _split(encoded, tokens, getattr(self.model, "features_per_image", False))):
                self._features[k] = f
        keys = [k for r in reqs for k in r.keys]
        self.stats.image_cache_hits += len(keys) - len(singles)
        for k in keys:
            self._features.move_to_end(k)
        feats = [self._features[k] for k in keys]
        while len(self._features) > self.image_cache_size:
            self._features.popitem(last=False)
        return _join(feats) if feats else None

    def _admit(self, reqs: list[_Request]) -> None:
        ids, attn = left_pad([r.prompt for r in reqs], self.pad_id)
        feats = self._features_of(reqs)
        cache = self.model.lm.new_cache(len(reqs), ids.shape[1])
        prefix = {"prefix_len": ids.shape[1]} if getattr(self.model, "prefix_lm", False) else {}
        out = self.model(ids, attention_mask=attn, cache=cache, image_features=feats, logits_to_keep=1, **prefix)
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
        old, C_old, C_new = self._cache, self._cache.length, cache.length
        C = max(C_old, C_new)
        cap = max(old.max_len - C_old, 64) + C
        B_old, B_new = len(self._running), len(reqs)
        merged = KVCache(len(old.k), B_old + B_new, old.k[0].shape[1], old.k[0].shape[3], cap,
                         old.k[0].device, old.k[0].dtype)
        for layer in range(len(old.k)):
            for src, dst in ((old.k, merged.k), (old.v, merged.v)):
                dst[layer][:B_old, :, C - C_old:C] = src[layer][:, :, :C_old]
            for src, dst in ((cache.k, merged.k), (cache.v, merged.v)):
                dst[layer][B_old:, :, C - C_new:C] = src[layer][:, :, :C_new]
        merged.length = C
        a = torch.zeros(B_old + B_new, C, dtype=self._attn.dtype)
        a[:B_old, C - C_old:] = self._attn
        a[B_old:, C - C_new:] = attn
        merged.extra = {k: _merge_rows(old.extra.get(k), cache.extra.get(k), B_old, B_new)
                        for k in {**old.extra, **cache.extra}}
        self._cache, self._attn, self._running = merged, a, self._running + list(reqs)
        self.stats.running = len(self._running)

    def _decode_step(self) -> None:
        cache, B = self._cache, len(self._running)
        if cache.length + 1 > cache.max_len:  # grow the buffers
            grown = KVCache(len(cache.k), B, cache.k[0].shape[1], cache.k[0].shape[3], 2 * cache.max_len,
                            cache.k[0].device, cache.k[0].dtype)
            for layer in range(len(cache.k)):
                grown.k[layer][:, :, :cache.length] = cache.k[layer][:, :, :cache.length]
                grown.v[layer][:, :, :cache.length] = cache.v[layer][:, :, :cache.length]
            grown.length, grown.extra = cache.length, cache.extra
            self._cache = cache = grown
        nxt = torch.tensor([[r.last] for r in self._running], dtype=torch.long)
        self._attn = torch.cat([self._attn, torch.ones(B, 1, dtype=self._attn.dtype)], dim=1)
        out = self.model(nxt, attention_mask=self._attn, cache=cache, logits_to_keep=1)
        self.stats.decode_steps += 1
        self.stats.batch_size_sum += B
        self._sample_and_emit(list(self._running), out.logits[:, -1])

    def _sample_and_emit(self, reqs: list[_Request], logits: torch.Tensor) -> None:
        """Sample each row's next token, send the new text, and drop the rows that finished."""
        logits = logits.clone()
        logits[:, self.model.image_token_id] = float("-inf")  # an image slot can only come from the processor
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
            if t == self.eos_id:  # flush what was held back
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
        cache, attn = self._cache, self._attn[idx]
        first = int(attn.any(0).long().argmax())  # columns before it hold only padding now
        C = cache.length
        for layer in range(len(cache.k)):
            cache.k[layer] = cache.k[layer][idx]
            cache.v[layer] = cache.v[layer][idx]
            if first:
                cache.k[layer][:, :, :C - first] = cache.k[layer][:, :, first:C].clone()
                cache.v[layer][:, :, :C - first] = cache.v[layer][:, :, first:C].clone()
        cache.extra = {k: _take_rows(v, idx) for k, v in cache.extra.items()}
        cache.length = C - first
        self._attn = attn[:, first:]


def _image_key(image) -> str:
    """Content hash of an image (mode, size and pixels): the same picture sent twice is encoded once."""
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _extra_key(image_key: str, extra: dict, names: list[str]) -> str:
    """The feature-cache key of an image read with what its prompt adds (e.g. an instruction's ids)."""
    h = hashlib.sha256(image_key.encode())
    for k in names:
        h.update(k.encode())
        h.update(extra[k].cpu().numpy().tobytes())
    return h.hexdigest()


def _split(features, tokens: list[int], per_image: bool = False) -> list:
    """Encoded features of several images -> one entry per image: ``tokens`` rows each of the flat features a
    splice family gives, or (``per_image``: models whose ``features_per_image`` says that encode_images gives one
    entry of dim 0 per image, the cross-attention families) one entry of dim 0 each."""
    from vlmkit.models.mllama import MllamaImageStates
    from vlmkit.models.qwen2_vl import Qwen2VLImageFeatures

    if isinstance(features, Qwen2VLImageFeatures):
        parts = features.features.split(tokens)
        return [Qwen2VLImageFeatures(p, features.grid_thw[i:i + 1]) for i, p in enumerate(parts)]
    if isinstance(features, MllamaImageStates):
        return [MllamaImageStates(features.states[i:i + 1], features.num_tiles[i:i + 1]) for i in range(len(features))]
    if per_image:
        return list(features.split(1))
    flat = features.reshape(-1, features.shape[-1])
    return list(flat.split(tokens))


def _join(parts: list):
    from vlmkit.models.mllama import MllamaImageStates
    from vlmkit.models.qwen2_vl import Qwen2VLImageFeatures

    if isinstance(parts[0], Qwen2VLImageFeatures):
        return Qwen2VLImageFeatures(torch.cat([p.features for p in parts]), torch.cat([p.grid_thw for p in parts]))
    if isinstance(parts[0], MllamaImageStates):
        return MllamaImageStates(torch.cat([p.states for p in parts]), torch.cat([p.num_tiles for p in parts]))
    return torch.cat(parts)


def _merge_rows(a, b, rows_a: int, rows_b: int):
    """Two batches' per-row decoding state (``KVCache.extra`` values: tensors with the rows on dim 0, or tuples /
    lists of them, or None) -> the state of the stacked batch. Tensors are zero-padded (False for masks) to the
    larger size of every other dim: padded image keys are masked keys; a side without the state (None) gets zeros,
    the state of a row with no images (M-RoPE delta 0, no image seen)."""
    if a is None and b is None:
        return None
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        n = len(a if a is not None else b)
        merged = [_merge_rows(None if a is None else a[i], None if b is None else b[i], rows_a, rows_b)
                  for i in range(n)]
        return type(a if a is not None else b)(merged)
    ref = a if a is not None else b
    a = ref.new_zeros((rows_a, *ref.shape[1:])) if a is None else a
    b = ref.new_zeros((rows_b, *ref.shape[1:])) if b is None else b
    size = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]
    return torch.cat([_pad_to(a, size), _pad_to(b, size)])


def _pad_to(t: torch.Tensor, size: list[int]) -> torch.Tensor:
    """``t`` [B, ...] in the top-left corner of zeros (False) [B, *size]."""
    if list(t.shape[1:]) == size:
        return t
    out = t.new_zeros((t.shape[0], *size))
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _take_rows(x, idx: torch.Tensor):
    """Per-row decoding state (as :func:`_merge_rows`) of the rows ``idx``."""
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return type(x)(_take_rows(v, idx) for v in x)
    return x[idx]


def _stop_at(text: str, stop: list[str]) -> int | None:
    cuts = [text.find(s) for s in stop if s and s in text]
    return min(cuts) if cuts else None


__all__ = ["Delta", "Engine", "EngineStats", "QueueFull", "Stream"]
