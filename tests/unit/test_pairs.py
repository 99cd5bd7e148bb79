"""Image-caption pairs (data/pairs.py): CSV/TSV (open_clip's columns) and COCO captions files, their errors and
--skip-bad-samples; PairDataset's batches (one caption per image, picked by batch position) and truncation."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vlmkit.processing.text import TextProcessorConfig
from vlmkit.data.conversations import ReadReport
from vlmkit.data.pairs import PairDataset, read_pairs
from vlmkit.errors import DataError
from vlmkit.processing import Processor
from vlmkit.families.dual_encoder import train_caption_tokenizer
from vlmkit.train.stream import BatchStream

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 128, 128),
           (255, 255, 255)]
CAPTIONS = ["a red square", "a green circle", "a blue triangle", "a yellow star", "a cyan diamond",
            "a magenta square", "a grey circle", "a white star"]


def write_images(folder, n: int = 4) -> list[str]:
    """n plain-colour 8x8 PNGs in folder/img/, one colour each -> their paths relative to ``folder``."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.new("RGB", (8, 8), COLOURS[i]).save(folder / "img" / f"{i}.png")
        names.append(f"img/{i}.png")
    return names


def write_table(path, header: list[str], rows: list[list[str]], sep: str = ",") -> None:
    lines = [sep.join(header)] + [sep.join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def images(tmp_path):
    return write_images(tmp_path)


@pytest.fixture(scope="module")
def processor():
    """A CLIP-style caption processor: <s> ... </s>, padded with <pad>, context 10 tokens, 8x8 images."""
    tok = train_caption_tokenizer(CAPTIONS * 3, vocab_size=300)
    cfg = TextProcessorConfig(family="clip", image_size=(8, 8), image_token="", max_length=10, pad_token="<pad>", eos_token="</s>",
                          bos_token="<s>")
    return Processor(cfg, tok)


# ------------------------------------------------------------------------------------------------ read_pairs


def test_csv_and_tsv_pick_the_separator_from_the_extension(tmp_path, images):
    rows = [[im, CAPTIONS[i]] for i, im in enumerate(images)]
    write_table(tmp_path / "pairs.csv", ["image", "caption"], rows)
    write_table(tmp_path / "pairs.tsv", ["image", "caption"], rows, sep="\t")
    for name in ("pairs.csv", "pairs.tsv"):
        pairs = read_pairs(tmp_path / name)
        assert [p.image for p in pairs] == [tmp_path / im for im in images]  # relative to the pairs file
        assert [p.caption for p in pairs] == CAPTIONS[:4]
        assert pairs[0].source == f"row 2 of {tmp_path / name}"  # the header is line 1
    # a tab file read with a comma is one column: the error says which separator was used and how to set one
    (tmp_path / "tabs.csv").write_text((tmp_path / "pairs.tsv").read_text())
    with pytest.raises(DataError, match=r"no column 'image' .*separator ','.*data.csv_separator"):
        read_pairs(tmp_path / "tabs.csv")


def test_explicit_separator_and_custom_columns(tmp_path, images):
    rows = [[CAPTIONS[i], "x", im] for i, im in enumerate(images)]
    write_table(tmp_path / "pairs.txt", ["title", "other", "filepath"], rows, sep="|")
    pairs = read_pairs(tmp_path / "pairs.txt", image_key="filepath", caption_key="title", separator="|")
    assert [(p.image.name, p.caption) for p in pairs] == [(f"{i}.png", CAPTIONS[i]) for i in range(4)]
    # quoted captions with the separator inside (csv module rules)
    (tmp_path / "quoted.csv").write_text(f'image,caption\n{images[0]},"a red square, on black"\n')
    assert read_pairs(tmp_path / "quoted.csv")[0].caption == "a red square, on black"


@pytest.mark.parametrize("key, option", [("image_key", "data.csv_image_key"), ("caption_key", "data.csv_caption_key")])
def test_unknown_column_lists_the_columns_and_names_the_option(tmp_path, images, key, option):
    write_table(tmp_path / "pairs.csv", ["filepath", "title"], [[images[0], "a red square"]])
    other = "caption_key" if key == "image_key" else "image_key"
    kw = {key: "nope", other: "title" if other == "caption_key" else "filepath"}
    with pytest.raises(DataError) as e:
        read_pairs(tmp_path / "pairs.csv", **kw)
    msg = str(e.value)
    assert "'nope'" in msg and option in msg and "['filepath', 'title']" in msg and "pairs.csv" in msg


def test_coco_captions_json_gives_one_pair_per_caption(tmp_path, images):
    coco = {"images": [{"id": 7, "file_name": images[0]}, {"id": 9, "file_name": images[1]}],
            "annotations": [{"id": 1, "image_id": 7, "caption": "a red square"},
                            {"id": 2, "image_id": 9, "caption": "a green circle"},
                            {"id": 3, "image_id": 7, "caption": "red, square"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    pairs = read_pairs(tmp_path / "captions.json")
    assert [(p.image, p.caption) for p in pairs] == [(tmp_path / images[0], "a red square"),
                                                      (tmp_path / images[1], "a green circle"),
                                                      (tmp_path / images[0], "red, square")]
    coco["annotations"].append({"id": 4, "image_id": 11, "caption": "nothing"})
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match="annotation 3 refers to image_id 11"):
        read_pairs(tmp_path / "captions.json")
    (tmp_path / "captions.json").write_text("[]")
    with pytest.raises(DataError, match="expected a COCO captions object"):
        read_pairs(tmp_path / "captions.json")


def test_missing_image_names_file_row_and_column_or_is_skipped_and_counted(tmp_path, images):
    rows = [[images[0], "a red square"], ["img/missing.png", "a green circle"], [images[2], "a blue triangle"]]
    write_table(tmp_path / "pairs.csv", ["image", "caption"], rows)
    with pytest.raises(DataError) as e:
        read_pairs(tmp_path / "pairs.csv")
    msg = str(e.value)
    # the missing file is on line 3 (header line 1, first row line 2)
    assert f"row 3 of {tmp_path / 'pairs.csv'}" in msg and "missing.png" in msg and "column 'image'" in msg
    assert "--skip-bad-samples" in msg
    report = ReadReport()
    pairs = read_pairs(tmp_path / "pairs.csv", skip_bad=True, report=report)
    assert [p.caption for p in pairs] == ["a red square", "a blue triangle"]
    assert (report.rows, report.skipped) == (3, 1)
    assert len(report.reasons) == 1 and "row 3" in report.reasons[0] and "missing.png" in report.reasons[0]


def test_empty_caption_is_an_error_or_skipped(tmp_path, images):
    write_table(tmp_path / "pairs.csv", ["image", "caption"], [[images[0], "a red square"], [images[1], "  "]])
    with pytest.raises(DataError, match=r"row 3 of .*pairs.csv: column 'caption' is empty"):
        read_pairs(tmp_path / "pairs.csv")
    write_table(tmp_path / "pairs.csv", ["image", "caption"], [["", "a red square"]])
    with pytest.raises(DataError, match=r"row 2 of .*: column 'image' is empty"):
        read_pairs(tmp_path / "pairs.csv")
    report = ReadReport()
    write_table(tmp_path / "pairs.csv", ["image", "caption"], [[images[0], "a red square"], [images[1], "  "]])
    assert len(read_pairs(tmp_path / "pairs.csv", skip_bad=True, report=report)) == 1
    assert (report.rows, report.skipped) == (2, 1)


def test_image_root_replaces_the_pairs_files_folder(tmp_path):
    root = tmp_path / "imgs"
    names = write_images(root, 2)
    (tmp_path / "meta").mkdir()
    write_table(tmp_path / "meta" / "pairs.csv", ["image", "caption"], [[names[0], "a"], [names[1], "b"]])
    with pytest.raises(DataError, match="image file not found"):  # relative to meta/ by default
        read_pairs(tmp_path / "meta" / "pairs.csv")
    pairs = read_pairs(tmp_path / "meta" / "pairs.csv", image_root=root)
    assert [p.image for p in pairs] == [root / n for n in names]
    with pytest.raises(DataError, match="pairs file not found"):
        read_pairs(tmp_path / "nope.csv")


# ----------------------------------------------------------------------------------------------- PairDataset


def three_captions_each(tmp_path, n: int = 8):
    """n images, each with 3 distinct captions (rows interleaved as ShapesWorld writes them: image-major)."""
    names = write_images(tmp_path, n)
    rows = [[im, f"{k} {CAPTIONS[i]}"] for i, im in enumerate(names) for k in range(3)]
    write_table(tmp_path / "pairs.csv", ["image", "caption"], rows)
    return read_pairs(tmp_path / "pairs.csv")


def test_batches_hold_each_image_once_with_one_of_its_captions(tmp_path, processor):
    pairs = three_captions_each(tmp_path)
    ds = PairDataset(pairs, processor, seed=3)
    assert len(ds) == 8 and ds.n_captions == 24  # indexed by image, not by caption
    assert ds.truncated == 0 and all(len({tuple(r) for r in caps}) == 3 for caps in ds.captions)
    own = [{tuple(r) for r in caps} for caps in ds.captions]  # each image's caption ids
    # the stream train_contrastive draws from, with a batch size that does not divide the 8 images: batches
    # would otherwise straddle epochs and repeat an image (a plain stream does within 12 batches)
    stream = BatchStream(len(ds), 3, seed=0, drop_last=True)
    plain = BatchStream(len(ds), 3, seed=0)
    assert any(len(set(plain.next())) < 3 for _ in range(12))
    for _ in range(12):
        position = stream.position
        idx = stream.next()
        b = ds.batch(idx, position)
        assert b.media.pixel_values.shape == (3, 3, 8, 8) and b.input_ids.shape[0] == 3
        assert len(set(idx)) == 3
        # no two rows of the batch show the same image (every image has its own colour)
        flat = b.media.pixel_values.flatten(1)
        assert all(not torch.equal(flat[a], flat[c]) for a in range(3) for c in range(a + 1, 3))
        for row, i in zip(b.input_ids.tolist(), idx):  # each caption belongs to its image
            ids = tuple(t for t in row if t != processor.tokenizer.pad_id)
            assert ids in own[i]


def test_caption_pick_is_a_function_of_the_batch_position(tmp_path, processor):
    pairs = three_captions_each(tmp_path)
    ds = PairDataset(pairs, processor, seed=0)
    idx = list(range(8))
    assert torch.equal(ds.batch(idx, 5).input_ids, ds.batch(idx, 5).input_ids)
    # a fresh dataset (a resumed run) picks the same captions for the same position
    assert torch.equal(PairDataset(pairs, processor, seed=0).batch(idx, 5).input_ids, ds.batch(idx, 5).input_ids)
    # and the picks vary across positions: over 10 positions every image shows more than one of its captions
    seen = [set() for _ in idx]
    for pos in range(10):
        for i, row in enumerate(ds.batch(idx, pos).input_ids.tolist()):
            seen[i].add(tuple(row))
    assert all(len(s) >= 2 for s in seen), [len(s) for s in seen]
    assert any(not torch.equal(ds.batch(idx, p).input_ids, ds.batch(idx, 0).input_ids) for p in range(1, 4))
    # without a position (validation): always the first caption
    first = [ds.captions[i][0] for i in idx]
    assert ds.batch(idx).input_ids.tolist() == processor.pad_texts(first).tolist()


def test_long_captions_are_counted_and_keep_end_of_text(tmp_path, processor):
    names = write_images(tmp_path, 3)
    long = "a red square and a green circle and a blue triangle and a yellow star and a white star"
    write_table(tmp_path / "pairs.csv", ["image", "caption"], [[names[0], long], [names[1], "a red square"],
                                                               [names[2], long + " again"]])
    ds = PairDataset(read_pairs(tmp_path / "pairs.csv"), processor)
    assert ds.truncated == 2
    tok = processor.tokenizer
    long_ids, short_ids = ds.captions[0][0], ds.captions[1][0]
    assert len(long_ids) == processor.cfg.max_length == 10
    assert long_ids[0] == tok.bos_id and long_ids[-1] == tok.eos_id  # cut inside, special tokens kept
    assert short_ids[0] == tok.bos_id and short_ids[-1] == tok.eos_id and len(short_ids) < 10
    assert len(tok.encode(long)) > 10  # really longer than the context
    with pytest.raises(DataError, match="no image-caption pairs"):
        PairDataset([], processor)
