"""WebDataset shards: write a dataset as tar shards, stream them back resumably and deterministically.

A shard folder holds ``shard-000000.tar``, ``shard-000001.tar``, ... and ``index.json``. Each tar is in the
WebDataset layout: a sample is a run of members sharing a key (a member's basename up to its first dot),
``{key}.json`` with the record and its images as ``{key}.0.png``, ``{key}.1.jpg``, ... (the original bytes and
extension). Keys are a zero-padded running index (``000000123``); a conversation's source id is inside its
JSON. ``index.json`` (format ``vlmkit-shards``, version 1) lists the shards with their sample counts and is
written last, atomically, after every shard has been renamed into place from a temporary name, so an
interrupted run never looks complete.

Why the stdlib ``tarfile`` rather than the ``webdataset`` package, for writing and for reading: training
needs an exact, resumable, deterministic stream: with workers and a shuffle buffer, sample k of a rank must
be a pure function of (seed, rank, world size, workers, k), and a resumed run must fast-forward to k without
decoding what it skips. That needs control of the order (shard permutation, shard-to-worker assignment,
shuffle-buffer draws) which webdataset's pipeline does not expose. The format is plain WebDataset, though:
the unit tests read our shards with the ``webdataset`` package itself and compare keys and bytes. Members are
written in sorted order with mtime, uid and gid 0, so the same input gives byte-identical shards.

The order of :class:`ShardStream`: epoch e permutes the shard list with a generator seeded by (seed, e); the
shards go round robin to the "slots" (rank, worker), slot ``j = rank * max(num_workers, 1) + worker``
getting ``shards[j::n_slots]``; each slot streams its shards' samples through a shuffle buffer seeded by
(seed, slot, e) that is drained at the end of the epoch, so every slot sees each of its samples exactly once
per epoch, and goes on to the next epoch endlessly. A DataLoader with W workers hands out their samples
round robin, one at a time, so sample k of a rank is sample k // W of worker k % W (a loader resumed at
``start`` runs worker ``(i + start) % W`` in its process i, as its round robin begins with process 0).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from vlmkit.data.conversations import ReadReport, Sample, read_conversations
from vlmkit.data.pairs import read_pairs
from vlmkit.errors import ConfigError, DataError
from vlmkit.processing.chat import normalize_messages
from vlmkit.processing.image import MAX_IMAGE_PIXELS, load_image
from vlmkit.utils import atomic_write_json

FORMAT = "vlmkit-shards"
VERSION = 1
KINDS = ("conversations", "pairs")
INDEX = "index.json"
KEY_DIGITS = 9
_SHARD_NAME = re.compile(r"shard-\d{6,}\.tar")


def _hint(folder) -> str:
    return f"run `vlmkit data shard SRC --out {folder}` to write one"


@dataclass
class ShardIndex:
    """A shard folder's ``index.json``; ``skipped`` and ``bytes`` are filled by :func:`write_shards` only."""

    folder: Path
    kind: str
    shards: list[dict]  # [{"name": "shard-000000.tar", "samples": 1000}, ...]
    samples: int
    source: str
    skipped: int = 0  # source rows skipped while writing (skip_bad)
    bytes: int = 0  # total size of the shards written

    @property
    def paths(self) -> list[Path]:
        return [self.folder / s["name"] for s in self.shards]

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "kind": self.kind,
                "shards": [{"name": s["name"], "samples": s["samples"]} for s in self.shards],
                "samples": self.samples, "source": self.source}


def read_index(folder: str | Path) -> ShardIndex:
    """Read and check ``folder/index.json``; a missing or invalid index raises DataError."""
    folder = Path(folder)
    path = folder / INDEX
    if not path.is_file():
        raise DataError(f"{folder} is not a vlmkit shard folder: no {INDEX} (an interrupted write leaves "
                        f"none); {_hint(folder)}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{folder} is not a vlmkit shard folder: {path} is not valid JSON ({e}); "
                        f"{_hint(folder)}") from e

    def bad(why: str) -> DataError:
        return DataError(f"{folder} is not a vlmkit shard folder: {path} {why}; {_hint(folder)}")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f"has no \"format\": \"{FORMAT}\"")
    if data.get("version") != VERSION:
        raise bad(f"has version {data.get('version')!r}; this vlmkit reads version {VERSION}")
    if data.get("kind") not in KINDS:
        raise bad(f"has kind {data.get('kind')!r}; valid: {', '.join(KINDS)}")
    shards = data.get("shards")
    if not isinstance(shards, list) or not shards:
        raise bad("lists no shards")
    for i, s in enumerate(shards):
        if not (isinstance(s, dict) and isinstance(s.get("name"), str) and "/" not in s["name"]
                and isinstance(s.get("samples"), int) and s["samples"] >= 0):
            raise bad(f"shard {i} is not {{\"name\": file name, \"samples\": count}}: {s!r}")
    total = sum(s["samples"] for s in shards)
    if data.get("samples") != total:
        raise bad(f"says {data.get('samples')!r} samples but its shards hold {total}")
    index = ShardIndex(folder, data["kind"], shards, total, str(data.get("source", "")))
    missing = [p.name for p in index.paths if not p.is_file()]
    if missing:
        raise DataError(f"{folder}: {INDEX} lists shards that are missing: {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}")
    return index


# ---------------------------------------------------------------------------------------------------- writing


def write_shards(src: str | Path, out: str | Path, samples_per_shard: int, *,
                 image_root: str | Path | None = None, csv_image_key: str = "image",
                 csv_caption_key: str = "caption", csv_separator: str = "", progress: bool = True,
                 skip_bad: bool = False, verify_images: bool = True, overwrite: bool = False) -> ShardIndex:
    """Write ``src`` as WebDataset shards of ``samples_per_shard`` samples into ``out`` (see the module doc).

    ``src`` is a pair CSV/TSV (by suffix; read with :func:`~vlmkit.data.pairs.read_pairs`) or else a LLaVA /
    COCO captions JSON file (:func:`~vlmkit.data.conversations.read_conversations`). Bad rows raise DataError
    naming the row, or are skipped and counted (``skip_bad``; ``ShardIndex.skipped``). ``verify_images``
    decodes every image once while writing (a row with an undecodable image is a bad row), so that streams
    never meet one: resuming fast-forwards without decoding and could not know to skip it. A folder that
    already holds an ``index.json`` is replaced only with ``overwrite``.
    """
    src, out = Path(src), Path(out)
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ConfigError(f"--samples-per-shard must be an int >= 1, got {samples_per_shard!r}")
    report = ReadReport()
    if src.suffix.lower() in (".csv", ".tsv"):
        kind = "pairs"
        pairs = read_pairs(src, csv_image_key, csv_caption_key, csv_separator, image_root, skip_bad, report)
        rows = [({"caption": p.caption}, [p.image], p.source) for p in pairs]
    else:
        kind = "conversations"
        samples = read_conversations(src, image_root, skip_bad=skip_bad, report=report)
        rows = [({"id": s.id, "conversations": s.conversations, "type": s.type, "n_images": len(s.images)},
                 s.images, s.source) for s in samples]
    if verify_images:
        rows = _verified(rows, skip_bad, report)
    if not rows:
        raise DataError(f"{src}: no samples to write ({report.skipped} of {report.rows} rows skipped as bad)")
    _prepare(out, overwrite)
    width = max(KEY_DIGITS, len(str(len(rows) - 1)))
    shards = []
    with tqdm(total=len(rows), desc="shards", unit="sample", disable=not progress) as bar:
        for n, start in enumerate(range(0, len(rows), samples_per_shard)):
            rows_n = rows[start:start + samples_per_shard]
            chunk = [(f"{start + i:0{width}d}", *row) for i, row in enumerate(rows_n)]
            name = f"shard-{n:06d}.tar"
            _write_shard(out, name, chunk)
            shards.append({"name": name, "samples": len(chunk)})
            bar.update(len(chunk))
    names = {s["name"] for s in shards}
    for stale in out.iterdir():  # shards of an earlier, longer write into this folder
        if _SHARD_NAME.fullmatch(stale.name) and stale.name not in names:
            stale.unlink()
    index = ShardIndex(out, kind, shards, len(rows), str(src), skipped=report.skipped)
    index.bytes = sum(p.stat().st_size for p in index.paths)
    atomic_write_json(out / INDEX, index.to_json())  # last: the folder is complete from here on
    return index


def _verified(rows: list, skip_bad: bool, report: ReadReport) -> list:
    good, checked = [], {}
    for row in rows:
        record, images, where = row
        try:
            for path in images:
                if path not in checked:
                    try:
                        load_image(path)
                        checked[path] = None
                    except DataError as e:
                        checked[path] = str(e)
                if checked[path] is not None:
                    raise DataError(f"{where}: {checked[path]}")
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{e} (pass --skip-bad-samples to skip and count such rows)") from None
            report.skipped += 1
            report.reasons.append(str(e))
            continue
        good.append(row)
    return good


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder")
    if (out / INDEX).exists():
        if not overwrite:
            raise DataError(f"{out} already holds shards ({INDEX}); pass overwrite=True (CLI: --overwrite) "
                            f"or choose another folder")
        (out / INDEX).unlink()  # first: an interrupted overwrite must not look complete
    out.mkdir(parents=True, exist_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_shard(out: Path, name: str, chunk: list) -> None:
    """One tar, written to a temporary name and renamed into place. chunk: [(key, record, images, where)]."""
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, record, images, where in chunk:
                members = {f"{key}.json": json.dumps(record, ensure_ascii=False).encode("utf-8")}
                for i, path in enumerate(images):
                    ext = Path(path).suffix.lower().lstrip(".") or "img"
                    try:
                        members[f"{key}.{i}.{ext}"] = Path(path).read_bytes()
                    except OSError as e:
                        raise DataError(f"{where}: cannot read image {path}: {e}") from e
                for member in sorted(members):
                    _add(tar, member, members[member])
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, out / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------------------- reading


class _Bad(Exception):
    """A sample (or the rest of a shard) that cannot be used; on_error decides."""


@dataclass
class _Entry:
    """A sample as read, before decoding: what the shuffle buffer holds."""

    epoch: int
    shard: str
    key: str
    record: dict
    images: list[tuple[str, bytes]] = field(default_factory=list)


def _identity(x):
    return x


class ShardStream(torch.utils.data.IterableDataset):
    """An endless, resumable, deterministic stream of a shard folder's samples (the order: module doc).

    Yields ``{"key", "shard", "sample"}``: for conversations a :class:`~vlmkit.data.conversations.Sample`
    whose ``images`` are loaded RGB PIL images and whose ``source`` is ``"key K of shard S"``; for pairs
    ``{"image": PIL image, "caption": str}``. Read it through :meth:`loader`, which runs ``num_workers``
    DataLoader workers (or is the stream itself for 0). ``start`` is the number of samples this rank has
    consumed already: each worker skips its share of them reading the tar members and replaying the shuffle
    buffer but decoding no image, so the stream goes on exactly where it stopped.

    Corrupt samples (bad JSON, a missing image member, a wrong number of image placeholders, an undecodable
    image) and the unreadable rest of a truncated tar are skipped, counted in ``skipped`` (per process: each
    worker counts its own) and logged one line each through ``log`` with ``on_error="skip"``, or raise
    DataError naming shard and key with ``on_error="fail"``. A sample whose image is corrupt is found only
    when decoded, so resuming past one is off by one; :func:`write_shards` decodes every image once (its
    ``verify_images``) so that only shards damaged after writing can hold one.
    """

    def __init__(self, folder: str | Path, *, seed: int = 0, shuffle_buffer: int = 1000, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, start: int = 0, on_error: str = "skip",
                 log: Callable[[str], object] = print):
        super().__init__()
        for name, value, low in (("world_size", world_size, 1), ("rank", rank, 0),
                                 ("num_workers", num_workers, 0), ("start", start, 0),
                                 ("shuffle_buffer", shuffle_buffer, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"ShardStream: {name} must be an int >= {low}, got {value!r}")
        if rank >= world_size:
            raise ConfigError(f"ShardStream: rank {rank} is not below world_size {world_size}")
        if on_error not in ("skip", "fail"):
            raise ConfigError(f"ShardStream: on_error must be 'skip' or 'fail', got {on_error!r}")
        self.index = read_index(folder)
        self.folder = self.index.folder
        self.seed, self.shuffle_buffer, self.on_error, self.log = seed, shuffle_buffer, on_error, log
        self.rank, self.world_size, self.num_workers, self.start = rank, world_size, num_workers, start
        self.workers_per_rank = max(num_workers, 1)
        self.n_slots = world_size * self.workers_per_rank
        n_shards = len(self.index.shards)
        if n_shards < self.n_slots:
            raise DataError(
                f"{self.folder} has {n_shards} shard(s), but {world_size} rank(s) x {self.workers_per_rank} "
                f"worker(s) need at least {self.n_slots} (one per rank and worker): write it again with "
                f"--samples-per-shard {max(1, self.index.samples // self.n_slots)} or less, or use fewer "
                f"workers")
        self._expected = {s["name"]: s["samples"] for s in self.index.shards}
        self.skipped = 0

    # --------------------------------------------------------------------------------- order

    def shards_for(self, epoch: int, worker: int = 0) -> list[str]:
        """The shards this rank's ``worker`` streams in ``epoch``, in order."""
        order = list(range(len(self.index.shards)))
        random.Random(f"vlmkit-shards/epoch:{self.seed}:{epoch}").shuffle(order)
        slot = self.rank * self.workers_per_rank + worker
        return [self.index.shards[i]["name"] for i in order[slot::self.n_slots]]

    def loader(self):
        """The DataLoader that reads this stream with ``num_workers`` workers, or the stream itself for 0."""
        if self.num_workers == 0:
            return self
        return torch.utils.data.DataLoader(self, batch_size=None, num_workers=self.num_workers,
                                           collate_fn=_identity)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        if self.num_workers == 0:
            if info is not None:
                raise DataError(f"ShardStream(num_workers=0) is read by {info.num_workers} DataLoader "
                                f"workers; give it num_workers={info.num_workers} and read stream.loader()")
            worker, skip = 0, self.start
        else:
            if info is None or info.num_workers != self.num_workers:
                got = info.num_workers if info else 0
                raise DataError(f"ShardStream(num_workers={self.num_workers}) is read with {got} workers; "
                                f"read it through stream.loader()")
            # The loader asks its workers in turn starting from worker 0, but sample `start` belongs to worker
            # start % W: DataLoader worker i plays worker (i + start) % W, which has had its share of `start`.
            worker = (info.id + self.start) % self.num_workers
            skip = len(range(worker, self.start, self.num_workers))
        raw = self._raw(worker)
        for _ in range(skip):  # fast-forward: read and shuffle, decode nothing
            next(raw)
        epoch, yielded, whole_epoch = -1, 0, False
        for entry in raw:
            if entry.epoch != epoch:
                if whole_epoch and not yielded:
                    shards = ", ".join(self.shards_for(epoch, worker))
                    raise DataError(f"{self.folder}: no sample of shards {shards} could be decoded in "
                                    f"epoch {epoch}")
                whole_epoch, epoch, yielded = epoch >= 0 or skip == 0, entry.epoch, 0
            try:
                sample = self._decode(entry)
            except _Bad as e:
                self._bad(entry.shard, entry.key, str(e))
                continue
            yielded += 1
            yield {"key": entry.key, "shard": entry.shard, "sample": sample}

    def _raw(self, worker: int) -> Iterator[_Entry]:
        """This slot's samples, undecoded, epoch after epoch, through the shuffle buffer."""
        slot = self.rank * self.workers_per_rank + worker
        epoch = 0
        while True:
            shards = self.shards_for(epoch, worker)
            rng = random.Random(f"vlmkit-shards/buffer:{self.seed}:{slot}:{epoch}")
            n = 0
            for entry in _shuffled(self._entries(shards, epoch), self.shuffle_buffer, rng):
                n += 1
                yield entry
            if n == 0:
                raise DataError(f"{self.folder}: shards {', '.join(shards)} hold no usable sample "
                                f"({self.skipped} skipped)")
            epoch += 1

    # ---------------------------------------------------------------------------- reading tars

    def _entries(self, shards: list[str], epoch: int) -> Iterator[_Entry]:
        for shard in shards:
            seen, last = 0, None
            try:
                for key, members in _groups(self.folder / shard):
                    seen, last = seen + 1, key
                    try:
                        yield self._parse(epoch, shard, key, members)
                    except _Bad as e:
                        self._bad(shard, key, str(e))
                expected = self._expected[shard]
                if seen != expected:
                    raise _Bad(f"the tar holds {seen} samples, {INDEX} says {expected} "
                               f"(truncated or corrupt)")
            except (_Bad, tarfile.TarError, EOFError, OSError) as e:
                lost = max(0, self._expected[shard] - seen)
                why = str(e) if isinstance(e, _Bad) else f"truncated or corrupt tar ({e})"
                self._bad(shard, last, f"{why}; {lost} sample(s) lost", count=lost, rest=True)

    def _parse(self, epoch: int, shard: str, key: str, members: dict[str, bytes]) -> _Entry:
        if "json" not in members:
            raise _Bad(f"no member {key}.json")
        try:
            record = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Bad(f"{key}.json is not valid JSON: {e}") from e
        if not isinstance(record, dict):
            raise _Bad(f"{key}.json holds {type(record).__name__}, not an object")
        if self.index.kind == "pairs":
            n = 1
            if not isinstance(record.get("caption"), str) or not record["caption"].strip():
                raise _Bad(f"{key}.json has no caption")
        else:
            n = record.get("n_images")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise _Bad(f"{key}.json has no image count n_images")
            try:
                messages = normalize_messages(record.get("conversations"), "the conversation")
            except DataError as e:
                raise _Bad(str(e)) from e
            n_ph = sum(m["content"].count("<image>") for m in messages)
            if n_ph != n:
                raise _Bad(f"image placeholder count {n_ph} != images {n}")
        images = []
        for i in range(n):
            names = sorted(s for s in members if s.startswith(f"{i}."))
            if len(names) != 1:
                found = "none" if not names else ", ".join(names)
                raise _Bad(f"expected one image member {key}.{i}.<ext>, found {found}")
            images.append((f"{key}.{names[0]}", members[names[0]]))
        return _Entry(epoch, shard, key, record, images)

    def _decode(self, entry: _Entry):
        images = [_open_image(name, data) for name, data in entry.images]
        if self.index.kind == "pairs":
            return {"image": images[0], "caption": entry.record["caption"].strip()}
        r = entry.record
        return Sample(id=str(r.get("id", entry.key)), images=images, conversations=r["conversations"],
                      type=str(r.get("type", "")), source=f"key {entry.key} of shard {entry.shard}")

    def _bad(self, shard: str, key: str | None, what: str, count: int = 1, rest: bool = False) -> None:
        """A bad sample, or (``rest``) the unreadable rest of a shard after ``key``: fail or count+log."""
        if rest:
            where = f"after key {key}" if key is not None else "from its start"
            if self.on_error == "fail":
                raise DataError(f"shard {shard} of {self.folder}, {where}: {what} "
                                f"(on_error='skip' skips the rest of such a shard and counts it)")
            self.log(f"skipping the rest of shard {shard} {where}: {what}")
        else:
            if self.on_error == "fail":
                raise DataError(f"shard {shard} of {self.folder}, key {key}: {what} "
                                f"(on_error='skip' skips and counts such samples)")
            self.log(f"skipping key {key} of shard {shard}: {what}")
        self.skipped += count


def _groups(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) for each run of members sharing a key, as WebDataset groups them."""
    key, members = None, {}
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            folder, _, base = info.name.rpartition("/")
            if "." not in base:
                continue  # WebDataset ignores members without an extension
            stem, suffix = base.split(".", 1)
            k = f"{folder}/{stem}" if folder else stem
            if k != key:  # before reading on: a tar cut inside this member keeps the sample before it
                if key is not None:
                    yield key, members
                key, members = k, {}
            members[suffix] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """WebDataset's shuffle buffer: once ``size`` items are held, each new one takes the place of a random
    one, which is yielded; the rest are shuffled and yielded at the end."""
    if size <= 1:
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        out, buf[i] = buf[i], item
        yield out
    rng.shuffle(buf)
    yield from buf


def _open_image(name: str, data: bytes) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise _Bad(f"image {name} has {im.width}x{im.height} pixels, more than {MAX_IMAGE_PIXELS}")
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _Bad(f"cannot decode image {name}: {e}") from e


__all__ = ["ShardIndex", "ShardStream", "read_index", "write_shards"]
