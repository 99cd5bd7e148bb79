"""LLaVA-style conversation datasets: reading, validation, turn grouping and tokenisation.

A file is a JSON list of records ``{"id", "image" | "images", "conversations": [{"from", "value"}, ...]}``
with image paths relative to the file (or to ``image_root``). Every row is checked when the file is read;
a bad row raises :class:`~vlmkit.errors.DataError` naming the file and row, or is skipped and counted when
``skip_bad=True``.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import torch

from vlmkit.batch import IGNORE, Encoded, MediaInputs
from vlmkit.data.collate import Item
from vlmkit.errors import DataError
from vlmkit.processing import Processor
from vlmkit.processing.chat import normalize_messages


@dataclass
class Sample:
    """One training example: a conversation about zero or more images."""

    id: str
    images: list[Path]
    conversations: list[dict]
    type: str = ""
    source: str = ""  # "file row N" for error messages
    # group_by_image's merged questions: each turn sees the image and itself only (see share_prefix)
    independent_turns: bool = False


@dataclass
class ReadReport:
    rows: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)


CAPTION_PROMPT = "Describe the image."


def read_conversations(path: str | Path, image_root: str | Path | None = None, skip_bad: bool = False,
                       check_images: bool = True, report: ReadReport | None = None) -> list[Sample]:
    """Read and validate a LLaVA-format JSON file, or a COCO-captions file (as caption conversations)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if isinstance(rows, dict) and "annotations" in rows and "images" in rows:
        rows = coco_captions_to_conversations(rows, path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of LLaVA records or a COCO captions object, "
                        f"got {type(rows).__name__}")
    root = Path(image_root) if image_root else path.parent
    report = report if report is not None else ReadReport()
    samples = []
    for i, row in enumerate(rows):
        where = f"row {i} of {path}"
        report.rows += 1
        try:
            samples.append(_parse_row(row, i, root, where, check_images))
        except DataError as e:
            if not skip_bad:
                raise
            report.skipped += 1
            report.reasons.append(str(e))
    return samples


def coco_captions_to_conversations(coco: dict, path: Path) -> list[dict]:
    """COCO captions ({"images": [...], "annotations": [...]}) -> one caption conversation per annotation."""
    try:
        files = {im["id"]: im["file_name"] for im in coco["images"]}
        return [{"id": f"caption-{a['id']}", "image": files[a["image_id"]], "type": "caption",
                 "conversations": [{"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
                                   {"from": "gpt", "value": a["caption"]}]} for a in coco["annotations"]]
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: not a COCO captions file (images need id and file_name; annotations need "
                        f"image_id and caption): missing {e}") from e


def _parse_row(row, i: int, root: Path, where: str, check_images: bool) -> Sample:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    if "image" in row and "images" in row:
        raise DataError(f"{where}: give either 'image' or 'images', not both")
    images = row.get("images", [row["image"]] if row.get("image") is not None else [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(f"{where}: 'image'/'images' must be a path or a list of paths")
    paths = [root / p for p in images]
    if check_images:
        for p in paths:
            if not p.is_file():
                raise DataError(f"{where}: image file not found: {p}")
    convs = row.get("conversations")
    messages = normalize_messages(convs, where)
    n_ph = sum(m["content"].count("<image>") for m in messages)
    if n_ph != len(paths):
        raise DataError(f"image placeholder count {n_ph} != images {len(paths)} in {where}")
    return Sample(id=str(row.get("id", i)), images=paths, conversations=convs, type=str(row.get("type", "")),
                  source=where)


def group_by_image(samples: list[Sample], max_turns: int = 8, seed: int = 0) -> list[Sample]:
    """Merge single-image, single-question samples about the same image into one sequence each.

    The image and the prompt before the question are encoded once for all its questions, which makes
    from-scratch training several times more sample-efficient per second. The merged turns are
    *independent* (``Sample.independent_turns``): ConversationDataset lays them out with :func:`share_prefix`,
    so each question attends only to the shared prefix and to itself, at the positions it would have alone,
    and the loss is exactly that of the single-turn samples. Were they ordinary turns, questions would give
    each other away: ShapesWorld asks "is A left of B?" next to "is B left of A?", and a model trained on
    such conversations answers the second from the first and the first at chance (docs/design.md).
    Question order is shuffled deterministically; groups hold at most ``max_turns`` questions.
    Multi-image or multi-turn samples are kept as they are, and so are captions (type ``caption``).
    """
    rng = random.Random(seed)
    groups: OrderedDict[Path, list[Sample]] = OrderedDict()
    out: list[Sample] = []
    for s in samples:
        if len(s.images) == 1 and len(s.conversations) == 2 and s.type != "caption":
            groups.setdefault(s.images[0], []).append(s)
        else:
            out.append(s)
    for image, members in groups.items():
        rng.shuffle(members)
        n_chunks = -(-len(members) // max_turns)
        bounds = [round(k * len(members) / n_chunks) for k in range(n_chunks + 1)]  # even sizes: less padding
        for start, stop in pairwise(bounds):
            chunk = members[start:stop]
            turns = []
            for k, s in enumerate(chunk):
                human, gpt = s.conversations
                q = human.get("value", human.get("content", "")).replace("<image>\n", "").replace("<image>", "")
                turns.append({"from": "human", "value": ("<image>\n" + q) if k == 0 else q})
                turns.append({"from": "gpt", "value": gpt.get("value", gpt.get("content", ""))})
            out.append(Sample(id="+".join(s.id for s in chunk), images=[image], conversations=turns,
                              source=chunk[0].source, independent_turns=True))
    return out


def single_turns(sample: Sample) -> list[list[dict]]:
    """A grouped sample's questions as the single-turn conversations they came from (image in each)."""
    out = []
    for human, gpt in zip(sample.conversations[::2], sample.conversations[1::2]):
        q = human.get("value", "").replace("<image>\n", "").replace("<image>", "")
        out.append([{"from": "human", "value": "<image>\n" + q}, gpt])
    return out


def share_prefix(encoded: list[Encoded]) -> Encoded:
    """Lay out single-turn encodings that share a prefix (the same image and template) as one sequence.

    Returns ids, labels, positions and segments: the longest common unsupervised prefix once (segment 0), then each
    sample's remainder (segment k = 1, 2, ...) at the positions it has on its own. A token may attend to earlier
    tokens of segment 0 and of its own segment (:func:`collate` builds that mask), so every remainder sees exactly
    what it would see alone and the losses are those of the separate samples. The first token of each remainder is
    unsupervised (the prefix stops before any label), so the one-token shift of the loss never crosses from one
    remainder into the next.
    """
    if any(e.labels and e.labels[0] != IGNORE for e in encoded):
        raise ValueError("share_prefix: a sample is supervised from its first token, so it has no prompt to share")
    first = encoded[0].ids
    n = min(len(e.ids) for e in encoded)
    for e in encoded:
        k = next((i for i, t in enumerate(e.labels) if t != IGNORE), len(e.labels))
        n = min(n, k - 1)  # the token before the first label stays in the remainder too
        n = next((i for i in range(n) if e.ids[i] != first[i]), n)
    n = max(n, 0)
    ids, labels, pos, seg = list(first[:n]), [IGNORE] * n, list(range(n)), [0] * n
    for k, e in enumerate(encoded, start=1):
        ids += e.ids[n:]
        labels += e.labels[n:]
        pos += range(n, len(e.ids))
        seg += [k] * (len(e.ids) - n)
    return Encoded(ids, labels, n, encoded[0].media, pos, seg)


class ConversationDataset(torch.utils.data.Dataset):
    """Tokenised samples with their images as :class:`~vlmkit.data.collate.Item`; a sample's prepared images are
    cached after first use (small datasets).

    A sample's text is encoded from its images' placeholders (their token counts: the pixels are not read where the
    family does not need them for that). With ``load_images = False`` items carry only the image paths (the training
    loop looks up precomputed features of a frozen tower, train/frozen_features.py)."""

    def __init__(self, samples: list[Sample], processor: Processor, cache_images: bool = True):
        self.samples = samples
        self.processor = processor
        self.load_images = True
        self.inputs_cache: dict[tuple, MediaInputs] | None = {} if cache_images else None
        self.encoded = [self._encode(s) for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _placeholders(self, s: Sample) -> MediaInputs:
        """What the text needs of the sample's images; prepared images when the family reads them for it (then
        kept as the sample's inputs)."""
        key = tuple(s.images)
        if self.inputs_cache is not None and key in self.inputs_cache:
            return self.inputs_cache[key]
        media = self.processor.placeholders(list(s.images), s.source)
        if media.pixel_values.numel() and self.inputs_cache is not None:
            self.inputs_cache[key] = media
        return media

    def _encode(self, s: Sample) -> Encoded:
        media = self._placeholders(s)
        if not s.independent_turns:
            return self.processor.supervised(s.conversations, media, s.source)
        if not self.processor.family.capabilities.shared_prefix:
            raise DataError(f"{s.source}: grouped questions share one encoding of their image and prompt, which the "
                            f"{self.processor.family.name} family does not allow (its attention or what its image "
                            f"encoder reads differs per question); set data.group_turns: 0")
        out = share_prefix([self.processor.supervised(c, media, s.source) for c in single_turns(s)])
        if out.ids[:out.prompt_len].count(self.processor.image_token_id) != sum(media.tokens):
            raise DataError(f"{s.source}: the grouped questions do not share their image prefix")
        return out

    def _inputs(self, s: Sample) -> MediaInputs:
        """A sample's images as its processor gives them to the model, cached (prepared together: a family may lay
        out a prompt's images jointly)."""
        key = tuple(s.images)
        if self.inputs_cache is not None and key in self.inputs_cache:
            return self.inputs_cache[key]
        inputs = self.processor.prepare_images(list(s.images), s.source)
        if self.inputs_cache is not None:
            self.inputs_cache[key] = inputs
        return inputs

    def __getitem__(self, i: int) -> Item:
        return self._item(self.samples[i], self.encoded[i])

    def encode(self, s: Sample) -> Item:
        """The item of a sample that is not in the dataset (a streamed one, whose images may be PIL images)."""
        return self._item(s, self._encode(s))

    def _item(self, s: Sample, enc: Encoded) -> Item:
        media = None
        if self.load_images:  # the images, with what the layout added to them (InstructBLIP's instruction)
            media = self._inputs(s)
            added = {k: v for k, v in enc.media.extra.items() if k not in media.extra}
            if added:
                media = dataclasses.replace(media, extra={**media.extra, **added})
        n = len(enc.ids)
        pos = enc.positions if enc.positions is not None else range(n)
        seg = enc.segments if enc.segments is not None else [0] * n
        return Item(torch.tensor(enc.ids, dtype=torch.long), torch.tensor(enc.labels, dtype=torch.long),
                    torch.tensor(list(pos), dtype=torch.long), torch.tensor(seg, dtype=torch.long), enc.prompt_len,
                    media, list(s.images))
