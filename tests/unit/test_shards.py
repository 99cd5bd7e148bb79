"""WebDataset shards (data/shards.py): writing (layout, determinism, atomicity, bad rows, CLI), and the
resumable stream (round trips, order, resume without decoding, ranks and workers, corrupt samples and tars),
plus compatibility with the webdataset package itself."""

from __future__ import annotations

import io
import itertools
import json
import re
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vlmkit.data import shards as shards_mod
from vlmkit.data.conversations import read_conversations
from vlmkit.data.pairs import read_pairs
from vlmkit.data.shapes import generate_shapes
from vlmkit.cli import main
from vlmkit.data.shards import ShardStream, read_index, write_shards
from vlmkit.errors import DataError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small ShapesWorld: train.json has 47 questions about 6 images, pairs_train.csv 18 captions."""
    folder = tmp_path_factory.mktemp("shapes") / "sw"
    generate_shapes(folder, n=8, size=32, progress=False)
    return folder


@pytest.fixture(scope="module")
def conv_shards(world, tmp_path_factory):
    return write_shards(world / "train.json", tmp_path_factory.mktemp("conv") / "shards", 8, progress=False)


@pytest.fixture(scope="module")
def pair_shards(world, tmp_path_factory):
    return write_shards(world / "pairs_train.csv", tmp_path_factory.mktemp("pairs") / "shards", 4,
                        progress=False)


def take(stream: ShardStream, n: int) -> list[dict]:
    return list(itertools.islice(iter(stream.loader()), n))


def tar_members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def all_keys(index) -> list[str]:
    return [name.split(".")[0] for p in index.paths for name, _ in tar_members(p) if name.endswith(".json")]


def pixels(image) -> np.ndarray:
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    return np.asarray(image.convert("RGB"))


def copy_shards(index, dest):
    shutil.copytree(index.folder, dest)
    return read_index(dest)


def rewrite_tar(path, edit) -> None:
    """Rewrite a tar with ``edit(members) -> members`` applied to its [(name, bytes)]."""
    members = edit(tar_members(path))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# -------------------------------------------------------------------------------------------------- writing


def test_layout_index_and_members(world, conv_shards):
    index = conv_shards
    assert index.kind == "conversations" and index.samples == 47 and index.skipped == 0
    assert [s["name"] for s in index.shards] == [f"shard-{i:06d}.tar" for i in range(6)]
    assert [s["samples"] for s in index.shards] == [8] * 5 + [7]
    on_disk = json.loads((index.folder / "index.json").read_text())
    assert on_disk == {"format": "vlmkit-shards", "version": 1, "kind": "conversations",
                       "shards": index.shards, "samples": 47, "source": str(world / "train.json")}
    assert index.bytes == sum(p.stat().st_size for p in index.paths)
    rows = json.loads((world / "train.json").read_text())
    members = tar_members(index.paths[1])
    assert [name for name, _ in members[:4]] == ["000000008.0.png", "000000008.json",
                                                 "000000009.0.png", "000000009.json"]
    assert members[0][1] == (world / rows[8]["image"]).read_bytes()  # the original bytes
    record = json.loads(members[1][1])
    assert record == {"id": rows[8]["id"], "conversations": rows[8]["conversations"], "type": rows[8]["type"],
                      "n_images": 1}
    with tarfile.open(index.paths[0]) as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in tar.getmembers()} == {(0, 0, 0, "", "")}


def test_same_input_gives_byte_identical_shards(world, tmp_path):
    a = write_shards(world / "train.json", tmp_path / "a", 10, progress=False)
    b = write_shards(world / "train.json", tmp_path / "b", 10, progress=False)
    assert [p.read_bytes() for p in a.paths] == [p.read_bytes() for p in b.paths]
    c = write_shards(world / "train.json", tmp_path / "c", 11, progress=False)
    assert a.paths[0].read_bytes() != c.paths[0].read_bytes()


def test_pairs_records_and_coco_captions(world, pair_shards, tmp_path):
    assert pair_shards.kind == "pairs" and pair_shards.samples == 18 and len(pair_shards.shards) == 5
    name, data = tar_members(pair_shards.paths[0])[1]
    first = read_pairs(world / "pairs_train.csv")[0]
    assert name == "000000000.json" and json.loads(data) == {"caption": first.caption}
    coco = write_shards(world / "captions_train.json", tmp_path / "coco", 100, progress=False)
    assert coco.kind == "conversations" and coco.samples == 18
    records = [json.loads(d) for n, d in tar_members(coco.paths[0]) if n.endswith(".json")]
    assert {r["type"] for r in records} == {"caption"} and records[0]["id"].startswith("caption-")


def test_bad_rows_fail_naming_the_row_or_are_skipped_and_counted(tmp_path):
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    turns = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
    rows = [{"id": "a", "image": "ok.png", "conversations": turns},
            {"id": "b", "image": "missing.png", "conversations": turns},
            {"id": "c", "image": "broken.png", "conversations": turns}]
    src = tmp_path / "data.json"
    src.write_text(json.dumps(rows))
    with pytest.raises(DataError, match="row 1 of .*missing.png"):
        write_shards(src, tmp_path / "out", 2, progress=False)
    src.write_text(json.dumps([rows[0], rows[2]]))
    with pytest.raises(DataError, match="row 1 of .*broken.png"):  # images are decoded once while writing
        write_shards(src, tmp_path / "out", 2, progress=False)
    assert not (tmp_path / "out").exists()
    src.write_text(json.dumps(rows))
    index = write_shards(src, tmp_path / "out", 2, progress=False, skip_bad=True)
    assert (index.samples, index.skipped) == (1, 2)
    unverified = write_shards(src, tmp_path / "raw", 2, progress=False, skip_bad=True, verify_images=False)
    assert (unverified.samples, unverified.skipped) == (2, 1)


def test_an_interrupted_write_leaves_no_index_and_no_temporary_files(world, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    calls = []
    real = shards_mod._add

    def failing_add(tar, name, data):
        calls.append(name)
        if len(calls) == 21:  # in the middle of the second shard
            raise RuntimeError("disk full")
        real(tar, name, data)

    monkeypatch.setattr(shards_mod, "_add", failing_add)
    with pytest.raises(RuntimeError, match="disk full"):
        write_shards(world / "train.json", out, 8, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]  # no index.json, no .tmp
    with pytest.raises(DataError, match="not a vlmkit shard folder"):
        read_index(out)
    monkeypatch.setattr(shards_mod, "_add", real)
    assert write_shards(world / "train.json", out, 8, progress=False).samples == 47  # and it can be rerun
    with pytest.raises(DataError, match="already holds shards"):
        write_shards(world / "train.json", out, 8, progress=False)
    fewer = write_shards(world / "train.json", out, 20, progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["index.json"] + [s["name"] for s in fewer.shards]


def test_vlmkit_data_shard_command(world, tmp_path, capsys):
    pairs = read_pairs(world / "pairs_train.csv")
    lines = ["filepath\ttitle"] + [f"{p.image}\t{p.caption}" for p in pairs] + ["nowhere.png\ta lost image"]
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    common = ["--csv-image-key", "filepath", "--csv-caption-key", "title", "--quiet"]
    assert main(["data", "shard", str(tmp_path / "pairs.tsv"), "--out", str(tmp_path / "out"),
                 "--samples-per-shard", "5", "--skip-bad-samples", *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    index = read_index(tmp_path / "out")
    assert summary == {"out": str(tmp_path / "out"), "kind": "pairs", "shards": 4, "samples": 18,
                       "bytes": sum(p.stat().st_size for p in index.paths), "skipped": 1}
    assert main(["data", "shard", str(tmp_path / "pairs.tsv"), "--out", str(tmp_path / "out2"), *common]) == 2
    assert re.search(r"row 20 of .*nowhere.png", capsys.readouterr().err)
    assert not (tmp_path / "out2" / "index.json").exists()


# -------------------------------------------------------------------------------------------------- reading


def test_conversations_round_trip_every_sample_once_per_epoch(world, conv_shards):
    source = {s.id: s for s in read_conversations(world / "train.json")}
    n = conv_shards.samples
    items = take(ShardStream(conv_shards.folder, shuffle_buffer=10, log=lambda _: None), 2 * n)
    for epoch in (items[:n], items[n:]):
        assert sorted(it["sample"].id for it in epoch) == sorted(source)
    assert [it["key"] for it in items[:n]] != sorted(it["key"] for it in items[:n])  # shuffled
    for it in items[:n]:
        s, src = it["sample"], source[it["sample"].id]
        assert s.conversations == src.conversations and s.type == src.type
        assert s.source == f"key {it['key']} of shard {it['shard']}"
        assert len(s.images) == 1 and s.images[0].mode == "RGB"
        assert np.array_equal(pixels(s.images[0]), pixels(src.images[0]))


def test_pairs_round_trip(world, pair_shards):
    source = Counter((p.caption, pixels(p.image).tobytes()) for p in read_pairs(world / "pairs_train.csv"))
    items = take(ShardStream(pair_shards.folder, shuffle_buffer=5, seed=3), pair_shards.samples)
    got = Counter((it["sample"]["caption"], pixels(it["sample"]["image"]).tobytes()) for it in items)
    assert got == source


def test_multi_image_jpeg_and_text_only_samples(tmp_path):
    Image.new("RGB", (6, 4), (10, 200, 30)).save(tmp_path / "a.JPG", quality=80)
    Image.new("RGB", (5, 5), (0, 0, 255)).save(tmp_path / "b.png")
    rows = [{"id": "two", "images": ["a.JPG", "b.png"], "type": "compare",
             "conversations": [{"from": "human", "value": "<image>\n<image>\nSame colour?"},
                               {"from": "gpt", "value": "no"}]},
            {"id": "text",
             "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            {"id": 7, "image": "b.png", "conversations": [{"from": "human", "value": "<image> colour?"},
                                                          {"from": "gpt", "value": "blue"}]}]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    index = write_shards(tmp_path / "data.json", tmp_path / "out", 1, progress=False)
    members = tar_members(index.paths[0])
    assert [n for n, _ in members] == ["000000000.0.jpg", "000000000.1.png", "000000000.json"]
    assert members[0][1] == (tmp_path / "a.JPG").read_bytes()
    assert members[1][1] == (tmp_path / "b.png").read_bytes()
    assert [n for n, _ in tar_members(index.paths[1])] == ["000000001.json"]
    got = {it["sample"].id: it["sample"] for it in take(ShardStream(index.folder, shuffle_buffer=0), 3)}
    assert got["text"].images == [] and got["7"].images[0].size == (5, 5)
    assert [pixels(im).tobytes() for im in got["two"].images] == [pixels(tmp_path / "a.JPG").tobytes(),
                                                                  pixels(tmp_path / "b.png").tobytes()]
    assert got["two"].type == "compare"


@pytest.mark.parametrize("workers", [0, 2])
def test_order_is_a_function_of_the_seed(conv_shards, workers):
    def keys(seed):
        return [it["key"] for it in take(ShardStream(conv_shards.folder, seed=seed, shuffle_buffer=10,
                                                     num_workers=workers), 60)]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1)


def test_the_shuffle_buffer_depends_on_the_seed(world, tmp_path):
    one = write_shards(world / "train.json", tmp_path / "one", 100, progress=False)  # one shard: one order
    orders = {seed: [it["key"] for it in take(ShardStream(one.folder, seed=seed, shuffle_buffer=10), 47)]
              for seed in (0, 1)}
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])
    plain = [it["key"] for it in take(ShardStream(one.folder, seed=0, shuffle_buffer=0), 47)]
    assert plain == sorted(plain)  # no buffer: the shard's own order


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_continues_exactly_where_the_stream_stopped(conv_shards, workers):
    def stream(start):
        return ShardStream(conv_shards.folder, seed=5, shuffle_buffer=10, num_workers=workers, start=start)

    full = take(stream(0), 110)  # more than two epochs
    for k in (1, 13, 50, 97):
        tail = take(stream(k), len(full) - k)
        assert [(it["key"], it["shard"]) for it in tail] == [(it["key"], it["shard"]) for it in full[k:]]
    assert all(a["sample"].conversations == b["sample"].conversations for a, b in zip(tail, full[97:]))


def test_resume_does_not_decode_the_skipped_samples(conv_shards, monkeypatch):
    opened = []
    real_open = Image.open

    def counting_open(*args, **kwargs):
        opened.append(1)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    items = take(ShardStream(conv_shards.folder, shuffle_buffer=10, start=60), 5)
    assert len(items) == 5 and len(opened) == 5  # one image each; the 60 skipped ones were never opened


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("world_size,workers", [(2, 0), (2, 2), (1, 3)])
def test_ranks_and_workers_cover_every_sample_once_per_epoch(conv_shards, world_size, workers):
    seen_keys, seen_shards = [], []
    for rank in range(world_size):
        stream = ShardStream(conv_shards.folder, seed=1, shuffle_buffer=6, rank=rank, world_size=world_size,
                             num_workers=workers)
        w = max(workers, 1)
        plans = [stream.shards_for(0, worker) for worker in range(w)]
        sizes = [sum(s["samples"] for s in conv_shards.shards if s["name"] in plan) for plan in plans]
        items = take(stream, max(sizes) * w)
        for worker, (plan, size) in enumerate(zip(plans, sizes)):
            mine = items[worker::w][:size]  # the loader takes one sample from each worker in turn
            assert {it["shard"] for it in mine} == set(plan)
            seen_keys += [it["key"] for it in mine]
            seen_shards += plan
    assert sorted(seen_shards) == sorted(s["name"] for s in conv_shards.shards)  # each shard to one slot
    assert sorted(seen_keys) == all_keys(conv_shards)  # each sample exactly once


def test_fewer_shards_than_ranks_times_workers_is_an_error(pair_shards):
    with pytest.raises(DataError, match=r"5 shard\(s\), but 2 rank\(s\) x 3 worker\(s\) need at least 6"):
        ShardStream(pair_shards.folder, world_size=2, num_workers=3)
    with pytest.raises(DataError, match="loader"):
        next(iter(ShardStream(pair_shards.folder, num_workers=2)))  # workers promised, none used


def _broken_png(members, key):
    return [(n, b"\x89PNG\r\n\x1a\n" + d[8:40]) if n == f"{key}.0.png" else (n, d) for n, d in members]


def _bad_json(members, key):
    return [(n, b'{"id": "x", "conv') if n == f"{key}.json" else (n, d) for n, d in members]


def _no_image(members, key):
    return [(n, d) for n, d in members if n != f"{key}.0.png"]


def _no_placeholder(members, key):
    def edit(d):
        r = json.loads(d)
        r["conversations"][0]["value"] = r["conversations"][0]["value"].replace("<image>", "")
        return json.dumps(r).encode()

    return [(n, edit(d)) if n == f"{key}.json" else (n, d) for n, d in members]


@pytest.mark.parametrize("corrupt,reason", [(_broken_png, "cannot decode image 000000010.0.png"),
                                            (_bad_json, "000000010.json is not valid JSON"),
                                            (_no_image, "one image member 000000010.0.<ext>, found none"),
                                            (_no_placeholder, "image placeholder count 0 != images 1")])
def test_a_corrupt_sample_is_skipped_counted_and_logged_or_fails(conv_shards, tmp_path, corrupt, reason):
    index = copy_shards(conv_shards, tmp_path / "shards")
    rewrite_tar(index.paths[1], lambda members: corrupt(members, "000000010"))
    logs = []
    stream = ShardStream(index.folder, shuffle_buffer=10, log=logs.append)
    items = take(stream, index.samples)
    keys = [it["key"] for it in items[:index.samples - 1]]
    assert sorted(keys) == [k for k in all_keys(conv_shards) if k != "000000010"]
    assert stream.skipped == len(logs) >= 1
    assert all(line.startswith("skipping key 000000010 of shard shard-000001.tar: ") and reason in line
               for line in logs), logs
    failing = ShardStream(index.folder, shuffle_buffer=10, on_error="fail")
    with pytest.raises(DataError, match=r"shard shard-000001.tar of .*, key 000000010: .*"):
        take(failing, index.samples)
    with pytest.raises(DataError) as e:
        take(failing, index.samples)
    assert reason in str(e.value)


def test_a_truncated_tar_skips_the_rest_of_its_shard(conv_shards, tmp_path):
    index = copy_shards(conv_shards, tmp_path / "shards")
    path = index.paths[2]  # keys 000000016 to 000000023
    with tarfile.open(path) as tar:
        cut = tar.getmember("000000019.0.png").offset_data + 10  # inside the first member of a sample
    path.write_bytes(path.read_bytes()[:cut])
    logs = []
    stream = ShardStream(index.folder, shuffle_buffer=0, log=logs.append)
    lost = {f"0000000{k}" for k in range(19, 24)}
    n = index.samples - len(lost)
    items = take(stream, n + 1)  # one epoch, and the first sample of the next
    assert sorted(it["key"] for it in items[:n]) == sorted(set(all_keys(conv_shards)) - lost)
    assert stream.skipped == 5 and len(logs) == 1, logs
    assert logs[0].startswith("skipping the rest of shard shard-000002.tar after key 000000018: truncated or "
                              "corrupt tar (unexpected end of data); 5 sample(s) lost")
    with pytest.raises(DataError, match="shard shard-000002.tar of .*, after key 000000018: truncated"):
        take(ShardStream(index.folder, on_error="fail"), 2 * index.samples)


def test_a_tar_cut_between_samples_is_caught_by_the_index_count(conv_shards, tmp_path):
    index = copy_shards(conv_shards, tmp_path / "shards")
    rewrite_tar(index.paths[0], lambda members: members[:-2])  # tarfile sees a complete, shorter archive
    logs = []
    stream = ShardStream(index.folder, shuffle_buffer=0, log=logs.append)
    items = take(stream, index.samples - 1)
    assert "000000007" not in {it["key"] for it in items}
    assert stream.skipped == 1 and "holds 7 samples, index.json says 8" in logs[0]
    assert logs[0].startswith("skipping the rest of shard shard-000000.tar after key 000000006: ")


def test_missing_or_invalid_index(conv_shards, tmp_path):
    with pytest.raises(DataError, match=r"not a vlmkit shard folder: no index.json.*vlmkit data shard"):
        read_index(tmp_path)
    with pytest.raises(DataError, match="not a vlmkit shard folder"):
        ShardStream(tmp_path)
    (tmp_path / "index.json").write_text("{oops")
    with pytest.raises(DataError, match="not valid JSON"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not a vlmkit shard folder.*format"):
        read_index(tmp_path)
    index = copy_shards(conv_shards, tmp_path / "copy")
    index.paths[3].unlink()
    with pytest.raises(DataError, match="missing: shard-000003.tar"):
        read_index(index.folder)


def test_the_webdataset_package_reads_our_shards(conv_shards, pair_shards):
    wds = pytest.importorskip("webdataset")
    for index in (conv_shards, pair_shards):
        urls = [str(p) for p in index.paths]
        ours = [(name, data) for p in index.paths for name, data in tar_members(p)]
        theirs = list(wds.WebDataset(urls, shardshuffle=False))
        assert [s["__key__"] for s in theirs] == all_keys(index)
        flat = [(f"{s['__key__']}.{ext}", s[ext]) for s in theirs for ext in sorted(s)
                if not ext.startswith("__")]
        assert flat == ours
        decoded = next(iter(wds.WebDataset(urls, shardshuffle=False).decode("pil")))
        assert isinstance(decoded["json"], dict) and decoded["0.png"].size == (32, 32)
