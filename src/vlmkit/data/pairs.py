"""Image-caption pairs for contrastive training: CSV/TSV files (open_clip's convention) and COCO captions.

A CSV or TSV file has a header row; one column holds the image path (relative to the file, or to ``image_root``)
and one the caption, named by ``image_key`` and ``caption_key`` (open_clip's ``--csv-img-key`` and
``--csv-caption-key``; ShapesWorld's ``pairs_{split}.csv`` uses ``image`` and ``caption``). The separator follows
the extension (``.tsv``: tab, otherwise comma) unless given. A COCO captions JSON gives one pair per caption.

Every row is checked when the file is read: a missing image file or an empty caption raises
:class:`~vlmkit.errors.DataError` naming the file, the row and the column, or, with ``skip_bad``, is skipped and
counted in the :class:`~vlmkit.data.conversations.ReadReport`. Unknown column names are always an error that
lists the file's columns.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmkit.batch import Batch, MediaInputs
from vlmkit.data.conversations import ReadReport
from vlmkit.errors import DataError


@dataclass(frozen=True)
class Pair:
    image: Path
    caption: str
    source: str = ""  # "row N of FILE", for messages


def read_pairs(path: str | Path, image_key: str = "image", caption_key: str = "caption", separator: str = "",
               image_root: str | Path | None = None, skip_bad: bool = False,
               report: ReadReport | None = None) -> list[Pair]:
    """Read and check an image-caption file (CSV, TSV or COCO captions JSON) -> pairs."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file not found: {path}")
    root = Path(image_root) if image_root else path.parent
    report = report if report is not None else ReadReport()
    if path.suffix.lower() == ".json":
        rows = _coco_rows(path)
        image_key, caption_key, first_row = "file_name", "caption", 0
    else:
        rows = _csv_rows(path, image_key, caption_key, separator)
        first_row = 2  # line numbers as an editor shows them: the header is line 1
    pairs = []
    for i, row in enumerate(rows):
        where = f"row {i + first_row} of {path}" if first_row else f"caption {i} of {path}"
        report.rows += 1
        try:
            pairs.append(_parse(row, image_key, caption_key, root, where))
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{e} (pass --skip-bad-samples to skip and count such rows)") from None
            report.skipped += 1
            report.reasons.append(str(e))
    return pairs


def _csv_rows(path: Path, image_key: str, caption_key: str, separator: str) -> list[dict]:
    sep = separator or ("\t" if path.suffix.lower() == ".tsv" else ",")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=sep)
        columns = reader.fieldnames or []
        for key, option in ((image_key, "data.csv_image_key"), (caption_key, "data.csv_caption_key")):
            if key not in columns:
                raise DataError(f"{path}: no column {key!r} ({option}); its columns are {columns} "
                                f"(separator {sep!r}; data.csv_separator sets another)")
        return list(reader)


def _coco_rows(path: Path) -> list[dict]:
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if not (isinstance(coco, dict) and "images" in coco and "annotations" in coco):
        raise DataError(f"{path}: expected a COCO captions object with 'images' and 'annotations'")
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    rows = []
    for i, ann in enumerate(coco["annotations"]):
        if ann.get("image_id") not in files:
            raise DataError(f"{path}: annotation {i} refers to image_id {ann.get('image_id')!r}, not in 'images'")
        rows.append({"file_name": files[ann["image_id"]], "caption": ann.get("caption")})
    return rows


def _parse(row: dict, image_key: str, caption_key: str, root: Path, where: str) -> Pair:
    image, caption = row.get(image_key), row.get(caption_key)
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}: column {image_key!r} is empty; it must name an image file")
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"{where}: column {caption_key!r} is empty; every image needs a caption")
    file = root / image.strip()
    if not file.is_file():
        raise DataError(f"{where}: image file not found: {file} (column {image_key!r}; paths are relative to the "
                        f"pairs file unless data.image_root is set)")
    return Pair(file, caption.strip(), where)


class PairDataset:
    """Pairs -> batches of (pixels, caption ids) through the model's Processor, indexed by *image*: an image with
    several captions (COCO has 5, ShapesWorld 3) is one item, and each time it is drawn one of its captions is
    picked by a generator seeded with the batch's position (so a resumed run draws the same ones). A batch
    therefore never holds two captions of one image, which the contrastive losses would count as negatives
    of each other.

    Captions are tokenised once, up front, so that those longer than the text tower's context are counted before
    training starts (``truncated``); images are decoded and transformed once and kept in memory."""

    def __init__(self, pairs: list[Pair], processor, seed: int = 0, cache_images: bool = True):
        if not pairs:
            raise DataError("no image-caption pairs to train on")
        self.processor = processor
        self.seed = seed
        ids, self.truncated = processor.tokenize_texts([p.caption for p in pairs], where="captions")
        self.n_captions = len(pairs)
        by_image: dict[Path, list[int]] = {}
        for k, p in enumerate(pairs):
            by_image.setdefault(p.image, []).append(k)
        self.images = list(by_image)
        self.captions = [[ids[k] for k in ks] for ks in by_image.values()]
        self.sources = [pairs[ks[0]].source for ks in by_image.values()]
        self.cache_images = cache_images
        self._pixels: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> torch.Tensor:
        if i in self._pixels:
            return self._pixels[i]
        x = self.processor.prepare_images([self.images[i]], where=self.sources[i]).pixel_values[0]
        if self.cache_images:
            self._pixels[i] = x
        return x

    def batch(self, indices: list[int], position: int | None = None, part: tuple[int, int] = (0, 1)) -> Batch:
        """A Batch of images ``indices`` (``media``: pixels [B, C, H, W]) and their captions (``input_ids`` [B, T]),
        each image with one of its captions:
        drawn with a generator seeded by (seed, ``position``), or the first caption when ``position`` is None.
        ``part`` (rank, world): only every world-th pair from rank, with the captions the whole batch would give
        them (a process of a multi-process run builds its share of the global batch)."""
        if position is None:
            picks = [0] * len(indices)
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + position)
            picks = torch.randint(0, 2**31 - 1, (len(indices),), generator=g).tolist()
        rank, world = part
        indices, picks = indices[rank::world], picks[rank::world]
        rows = [self.captions[i][k % len(self.captions[i])] for i, k in zip(indices, picks)]
        pixels = torch.stack([self.image(i) for i in indices])
        media = MediaInputs(pixels, [0] * len(indices))
        return Batch(self.processor.pad_texts(rows), media=media, n_samples=len(indices))


__all__ = ["Pair", "PairDataset", "read_pairs"]
