"""COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D), computed by ``pycocoevalcap``.

What this reproduces
    The official COCO caption evaluation (``pycocoevalcap/eval.py``, ``COCOEvalCap.evaluate``): both the
    predictions and the references are tokenised by the Stanford PTBTokenizer (``tokenizer/ptbtokenizer.py``:
    ``java -cp stanford-corenlp-3.4.1.jar edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase``,
    then the tokens in its ``PUNCTUATIONS`` list are dropped), and the tokenised captions go to the scorers:

    - ``Bleu(4)`` (``bleu/bleu.py``, ``BleuScorer.compute_score(option="closest")``): corpus BLEU from n-gram
      counts summed over all images, with the reference length closest to each prediction for the brevity
      penalty; keys ``Bleu_1`` .. ``Bleu_4``. The corpus value is *not* the mean of the per-image values.
    - ``Meteor()`` (``meteor/meteor.py``): METEOR 1.5 (``meteor-1.5.jar -l en -norm``, run by Java); the corpus
      value comes from the jar's aggregated statistics, not the mean of the per-image values.
    - ``Rouge()`` (``rouge/rouge.py``): ROUGE-L F-measure with beta = 1.2 against the best reference, mean
      over images.
    - ``Cider()`` (``cider/cider_scorer.py``): the COCO server's CIDEr, which is CIDEr-D (clipped n-gram
      counts, Gaussian length penalty sigma = 6, times 10). Its idf comes from the references of the images
      being scored, so a score depends on the whole set: one image alone always gets 0 (log 1 - log 1), and
      per-image CIDEr values are only meaningful within the call that produced them.

    The scorers are pycocoevalcap's own classes; only the tokenisation step is run here (same jar, same
    flags, same punctuation list), so that both sides go through one Java process and line breaks inside a
    caption cannot shift the captions against their ids (see below). The tests check the whole pipeline
    against pycocoevalcap's classes called directly, to 1e-9.

    SPICE (``spice/spice.py``) is left out: it downloads Stanford CoreNLP models at its first run, which
    cannot happen offline.

Edge cases
    - Ids present on one side only, an empty reference list, a reference that is blank (or only punctuation,
      so empty after tokenisation) or a non-string value raise :class:`~vlmkit.errors.DataError` naming the
      id; pycocoevalcap would fail on an ``assert`` or, for a blank reference, give ROUGE-L 1.0 to an empty
      prediction.
    - An empty prediction (or one that is only punctuation) is scored, not refused: it gets 0 from every
      metric, and its id is listed in :attr:`CaptionEvaluation.empty_predictions`.
    - Line breaks inside a caption (``\\r``, ``\\u2028``, ... any that ``str.splitlines`` knows) become spaces
      before tokenising. pycocoevalcap only replaces ``\\n``, and the PTBTokenizer then splits such a caption
      over two output lines, which silently pairs every later caption with the wrong id.
    - Java must be on ``PATH`` (checked with ``shutil.which("java")`` before anything runs); without it a
      :class:`JavaNotFoundError` says what to install.

``pycocoevalcap`` is imported only when scores are computed, so importing this module needs neither it nor
Java.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from vlmkit.errors import ConfigError, DataError, VlmkitError

CAPTION_METRICS: tuple[str, ...] = ("Bleu", "METEOR", "ROUGE_L", "CIDEr")
"""Scorer names accepted by ``metrics=``; "Bleu" yields the keys Bleu_1 .. Bleu_4 (the names of
``COCOEvalCap.eval``)."""

_ID_EXAMPLES = 5  # how many offending ids an error message lists


class JavaNotFoundError(VlmkitError, RuntimeError):
    """No ``java`` on PATH: the PTBTokenizer and METEOR jars of pycocoevalcap cannot run."""


@dataclass(frozen=True)
class CaptionEvaluation:
    """Result of :func:`evaluate_captions`.

    ``scores``: corpus-level values, keys as in ``COCOEvalCap.eval`` (Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr).
    ``per_image``: id -> the same keys for that image (``COCOEvalCap.imgToEval`` without ``image_id``), in the
    order of ``predictions``. ``tokenized_predictions`` / ``tokenized_references``: the captions as scored.
    ``empty_predictions``: ids whose prediction was empty after tokenisation (scored 0, not refused).
    """

    scores: dict[str, float]
    per_image: dict[Hashable, dict[str, float]]
    tokenized_predictions: dict[Hashable, str] = field(repr=False)
    tokenized_references: dict[Hashable, list[str]] = field(repr=False)
    empty_predictions: list[Hashable] = field(default_factory=list)


def caption_scores(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                   metrics: Collection[str] = CAPTION_METRICS) -> dict[str, float]:
    """Corpus-level COCO caption scores of ``predictions`` (id -> caption) against ``references``
    (id -> list of captions), as ``COCOEvalCap.evaluate`` reports them (without SPICE).

    Returns e.g. ``{"Bleu_1": ..., "Bleu_2": ..., "Bleu_3": ..., "Bleu_4": ..., "METEOR": ..., "ROUGE_L": ...,
    "CIDEr": ...}``; ``metrics`` picks a subset of :data:`CAPTION_METRICS` (METEOR alone takes ~10 s to load
    its paraphrase table). Per-image scores: :func:`evaluate_captions`.
    """
    return evaluate_captions(predictions, references, metrics).scores


def evaluate_captions(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                      metrics: Collection[str] = CAPTION_METRICS) -> CaptionEvaluation:
    """The COCO caption evaluation pipeline: PTB tokenisation of both sides, then the pycocoevalcap scorers
    named in ``metrics``. Returns corpus-level and per-image scores (see :class:`CaptionEvaluation`).

    Raises DataError for mismatched ids or unusable references, ConfigError for an unknown metric name,
    JavaNotFoundError without ``java`` on PATH, ImportError without pycocoevalcap.
    """
    chosen = _check_metrics(metrics)
    ids = _check_inputs(predictions, references)
    scorers = _load_scorers()  # ImportError before the Java check: the message says what to install first
    _require_java()

    flat = [predictions[i] for i in ids] + [ref for i in ids for ref in references[i]]
    tokens = ptb_tokenize(flat)
    res = {i: [tokens[k]] for k, i in enumerate(ids)}
    gts: dict[Hashable, list[str]] = {}
    pos = len(ids)
    for i in ids:
        n = len(references[i])
        gts[i] = tokens[pos:pos + n]
        pos += n
        for j, ref in enumerate(gts[i]):
            if not ref:
                raise DataError(f"references[{i!r}][{j}] = {references[i][j]!r} is empty after PTB tokenisation "
                                "(punctuation only); every reference must contain at least one word")

    scores: dict[str, float] = {}
    per_image: dict[Hashable, dict[str, float]] = {i: {} for i in ids}

    def record(name: str, corpus: float, images: Sequence[float]) -> None:
        scores[name] = float(corpus)
        for i, value in zip(ids, images):
            per_image[i][name] = float(value)

    for name in CAPTION_METRICS:  # the order of COCOEvalCap.evaluate
        if name not in chosen:
            continue
        if name == "Bleu":
            corpus, images = scorers["Bleu"](4).compute_score(gts, res, verbose=0)
            for n in range(4):
                record(f"Bleu_{n + 1}", corpus[n], images[n])
        elif name == "METEOR":
            meteor = scorers["METEOR"]()
            try:
                corpus, images = meteor.compute_score(gts, res)
            except ValueError as e:  # float("") on an empty line: the jar ended (e.g. no memory for -Xmx2G)
                raise RuntimeError(f"METEOR 1.5 (java -jar meteor-1.5.jar) stopped answering: {e}") from e
            finally:
                if meteor.lock.locked():  # left held by a failed compute_score; __del__ would wait for it forever
                    meteor.lock.release()
                del meteor  # its __del__ ends the Java process
            record("METEOR", corpus, images)
        else:
            corpus, images = scorers[name]().compute_score(gts, res)
            record(name, corpus, images)

    return CaptionEvaluation(scores=scores, per_image=per_image, tokenized_predictions={i: res[i][0] for i in ids},
                             tokenized_references=gts, empty_predictions=[i for i in ids if not res[i][0]])


def ptb_tokenize(captions: Sequence[str]) -> list[str]:
    """Tokenise ``captions`` as pycocoevalcap's ``PTBTokenizer.tokenize`` does: Stanford PTBTokenizer 3.4.1
    with ``-preserveLines -lowerCase``, then drop the tokens in its ``PUNCTUATIONS``; tokens joined by one
    space. One Java process for all captions; line breaks inside a caption become spaces first.
    """
    if not captions:
        return []
    from pycocoevalcap.tokenizer import ptbtokenizer  # noqa: PLC0415 (optional dependency)

    _require_java()
    jar = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    text = "".join(" ".join(c.splitlines()) + "\n" for c in captions)
    with tempfile.TemporaryDirectory(prefix="vlmkit-ptb-") as tmp:
        path = os.path.join(tmp, "captions.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        cmd = ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
               "-encoding", "utf-8", path]
        proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the PTBTokenizer ({' '.join(cmd[:4])}) exited with {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace').strip()[-2000:]}")
    lines = proc.stdout.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline ending the last line
    if len(lines) != len(captions):
        raise RuntimeError(f"the PTBTokenizer returned {len(lines)} lines for {len(captions)} captions; "
                           "captions and tokens cannot be paired")
    drop = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in drop) for line in lines]


def _require_java() -> None:
    if shutil.which("java") is None:
        raise JavaNotFoundError(
            "caption metrics need a Java runtime: pycocoevalcap runs the Stanford PTBTokenizer and METEOR 1.5 as "
            "Java jars, and no `java` was found on PATH. Install one (e.g. `apt-get install default-jre-headless`, "
            "Java 8 or newer) or put its bin/ folder on PATH.")


def _load_scorers() -> dict[str, type]:
    try:
        from pycocoevalcap.bleu.bleu import Bleu  # noqa: PLC0415 (optional dependency)
        from pycocoevalcap.cider.cider import Cider  # noqa: PLC0415
        from pycocoevalcap.meteor.meteor import Meteor  # noqa: PLC0415
        from pycocoevalcap.rouge.rouge import Rouge  # noqa: PLC0415
    except ImportError as e:
        raise ImportError("caption metrics need pycocoevalcap (the official COCO caption scorers): "
                          "pip install 'vlmkit[eval]' or pip install 'pycocoevalcap>=1.2'") from e
    return {"Bleu": Bleu, "METEOR": Meteor, "ROUGE_L": Rouge, "CIDEr": Cider}


def _check_metrics(metrics: Collection[str]) -> set[str]:
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [m for m in metrics if m not in CAPTION_METRICS]
    if unknown or not metrics:
        raise ConfigError(f"metrics={list(metrics)!r}: choose one or more of {list(CAPTION_METRICS)} "
                          "(SPICE is not available: it downloads models at run time)")
    return set(metrics)


def _examples(ids: Collection[Hashable]) -> str:
    shown = sorted(ids, key=repr)[:_ID_EXAMPLES]
    more = f" and {len(ids) - len(shown)} more" if len(ids) > len(shown) else ""
    return ", ".join(repr(i) for i in shown) + more


def _check_inputs(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> list:
    """The ids to score, in the order of ``predictions``; DataError naming the first problem found."""
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise DataError("predictions and references must be dicts: {id: caption} and {id: [caption, ...]}")
    if not predictions:
        raise DataError("predictions is empty: there is nothing to score")
    only_pred = predictions.keys() - references.keys()
    only_ref = references.keys() - predictions.keys()
    if only_pred or only_ref:
        parts = []
        if only_pred:
            parts.append(f"{len(only_pred)} id(s) have a prediction but no references: {_examples(only_pred)}")
        if only_ref:
            parts.append(f"{len(only_ref)} id(s) have references but no prediction: {_examples(only_ref)}")
        raise DataError("predictions and references must have the same ids; " + "; ".join(parts))
    ids = list(predictions)
    for i in ids:
        pred = predictions[i]
        if not isinstance(pred, str):
            raise DataError(f"predictions[{i!r}] must be a str (the generated caption), got {type(pred).__name__}")
        refs = references[i]
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise DataError(f"references[{i!r}] must be a list of reference captions, got {type(refs).__name__}")
        if len(refs) == 0:
            raise DataError(f"references[{i!r}] is an empty list: each id needs at least one reference caption")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise DataError(f"references[{i!r}][{j}] must be a str, got {type(ref).__name__}")
            if not ref.strip():
                raise DataError(f"references[{i!r}][{j}] is blank: every reference caption must contain words")
    return ids
