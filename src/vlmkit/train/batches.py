"""How each rank draws its share of a global batch of conversations, reproducibly and resumably: from an in-memory
dataset (:class:`LocalBatches`: a fixed number of samples, or a token budget) or streamed from WebDataset shards
(:class:`StreamedBatches`). The data order is a pure function of (seed, position); the position is saved with
every checkpoint."""

from __future__ import annotations

import contextlib
import json
import tarfile

from vlmkit.data.conversations import ConversationDataset, Sample
from vlmkit.errors import ConfigError
from vlmkit.train.distributed import DistInfo, shard_of
from vlmkit.train.recipe import Recipe
from vlmkit.train.stream import BatchStream


class LocalBatches:
    """This rank's micro-batches of a global batch drawn from a reproducible sample order.

    ``batch_tokens`` = 0: ``batch_size`` samples per micro-batch (a :class:`BatchStream` position counts batches).
    Otherwise a token budget: an optimizer step takes samples in stream order until the next would exceed
    ``batch_tokens`` (at least one per rank), split into ``grad_accum`` micro-batches; the position counts samples.
    Every rank draws the same global batch and keeps its share (:func:`shard_of`)."""

    def __init__(self, ds: ConversationDataset, recipe: Recipe, info: DistInfo, state: dict | None):
        t = recipe.train
        self.ds, self.info, self.grad_accum = ds, info, t.grad_accum
        self.budget = t.batch_tokens
        self.lengths = [len(e) for e in ds.encoded]
        if self.budget:
            self.stream = BatchStream(len(ds), 1, t.seed, state.get("sample_position", 0) if state else 0)
            self.carry: int | None = None
        else:
            if t.batch_size < info.world:
                raise ConfigError(f"train.batch_size {t.batch_size} < {info.world} processes: every rank needs a "
                                  f"sample (the batch is split across ranks)")
            self.stream = BatchStream(len(ds), t.batch_size, t.seed, state["stream_position"] if state else 0)

    @property
    def n_samples(self) -> int:
        return len(self.ds)

    def state(self) -> dict:
        if self.budget:
            return {"sample_position": self.stream.position - (self.carry is not None)}
        return {"stream_position": self.stream.position}

    def step(self) -> list[list[int]]:
        """Global sample indices of the next optimizer step, one list per micro-batch."""
        if not self.budget:
            return [self.stream.next() for _ in range(self.grad_accum)]
        chosen, tokens = [], 0
        need = self.info.world * self.grad_accum
        while True:
            i = self.carry if self.carry is not None else self.stream.next()[0]
            self.carry = None
            if len(chosen) >= need and tokens + self.lengths[i] > self.budget:
                self.carry = i  # first of the next step (its position is not consumed yet)
                break
            chosen.append(i)
            tokens += self.lengths[i]
        # deal the samples out longest first so that micro-batches and ranks get similar token counts
        order = sorted(chosen, key=lambda k: -self.lengths[k])
        return [order[m::self.grad_accum] for m in range(self.grad_accum)]

    def next_step(self) -> list[list]:
        """This rank's samples of each micro-batch of the next optimizer step."""
        return [self.local(ix) for ix in self.step()]

    def local(self, indices: list[int]) -> list:
        if self.budget:
            order = sorted(indices, key=lambda k: -self.lengths[k])
            return [self.ds[i] for i in order[self.info.rank::self.info.world]]
        return [self.ds[i] for i in shard_of(indices, self.info)]


class StreamedBatches:
    """This rank's micro-batches streamed from WebDataset shards (``data.shards``, data/shards.py): each rank reads
    its own shards through ``data.workers`` worker processes (which also tokenise and preprocess the images) and
    takes ``batch_size / world`` samples per micro-batch. The position (samples taken per rank) is saved with
    every checkpoint, so a resumed run streams on from exactly there."""

    def __init__(self, recipe: Recipe, processor, info: DistInfo, state: dict | None, log):
        from vlmkit.data.shards import ShardStream, read_index

        t, d = recipe.train, recipe.data
        if t.batch_size % info.world:
            raise ConfigError(f"train.batch_size {t.batch_size} is not a multiple of the {info.world} processes")
        self.per_rank, self.grad_accum = t.batch_size // info.world, t.grad_accum
        self.position = state.get("shard_position", 0) if state else 0
        index = read_index(d.shards)
        if index.kind != "conversations":
            raise ConfigError(f"data.shards {d.shards}: {index.kind} shards are for dual encoders; a vision-language "
                              f"model trains on conversation shards (vlmkit data shard DATA.json)")
        self.n_samples = index.samples
        encoder = ConversationDataset([], processor, cache_images=False)

        class Encoded(ShardStream):
            def __iter__(self):
                for rec in super().__iter__():
                    yield encoder.encode(rec["sample"])

        self.stream = Encoded(d.shards, seed=t.seed, shuffle_buffer=d.shuffle_buffer, rank=info.rank,
                              world_size=info.world, num_workers=d.workers, start=self.position,
                              on_error="skip" if d.skip_bad_samples else "fail", log=log)
        self._it = iter(self.stream.loader())

    def state(self) -> dict:
        return {"shard_position": self.position}

    def next_step(self) -> list[list]:
        out = []
        for _ in range(self.grad_accum):
            out.append([next(self._it) for _ in range(self.per_rank)])
            self.position += self.per_rank
        return out


def shard_samples(recipe: Recipe, limit: int = 100_000) -> list[Sample]:
    """Conversations of up to ``limit`` samples of the shards (their JSON members only), to train a tokenizer on."""
    from vlmkit.data.shards import read_index

    out = []
    for path in read_index(recipe.data.shards).paths:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json") and len(out) < limit:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        rec = json.loads(tar.extractfile(member).read())
                        out.append(Sample(id=member.name, images=[], conversations=rec["conversations"]))
        if len(out) >= limit:
            break
    return out


__all__ = ["LocalBatches", "StreamedBatches", "shard_samples"]
