"""`vlmkit embed`: an .npy of the Pipeline's L2-normalised embeddings (float32, one row per image or text) and the
listing of the rows beside it; bad arguments exit 2 with the message on stderr and write nothing."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from vlmkit.cli import main
from vlmkit.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model(tiny_dual_encoder, tmp_path_factory):
    """The session's tiny-clip checkpoint (32-d embeddings, a 32-token text context) and a folder of image files."""
    ckpt, shapes = tiny_dual_encoder
    # a folder with nested class folders and a file that is not an image
    images = tmp_path_factory.mktemp("embed") / "images"
    for i, sub in enumerate(["b", "a", "a", "c/deep", "b"]):
        (images / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(shapes / "images" / f"{i:06d}.png", images / sub / f"{i}.png")
    (images / "a" / "readme.txt").write_text("not an image")
    return ckpt, images


def embed(capsys, *args) -> tuple[int, str, str]:
    code = main(["embed", *map(str, args), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_images_rows_equal_the_pipeline_in_listing_order(model, tmp_path, capsys):
    ckpt, images = model
    out = tmp_path / "emb" / "imgs.npy"
    code, stdout, err = embed(capsys, "--model", ckpt, "--images", images, "--out", out, "--batch-size", 2)
    assert code == 0, err
    listing = (tmp_path / "emb" / "imgs.images.txt").read_text().splitlines()
    expected_files = sorted(str(p) for p in images.rglob("*.png"))
    assert listing == expected_files and len(listing) == 5  # sorted paths, nested folders, no readme.txt
    z = np.load(out)
    assert z.dtype == np.float32 and z.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    pipe = Pipeline.from_pretrained(ckpt)
    np.testing.assert_allclose(z, pipe.embed_images(listing).numpy(), rtol=1e-5, atol=1e-6)
    # row i is the file on line i (the third row is the third file's embedding alone)
    np.testing.assert_allclose(z[2], pipe.embed_images([listing[2]])[0].numpy(), rtol=1e-5, atol=1e-6)
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary == {"out": str(out), "rows": 5, "dim": 32, "listing": str(tmp_path / "emb" / "imgs.images.txt")}
    assert sorted(p.name for p in (tmp_path / "emb").iterdir()) == ["imgs.images.txt", "imgs.npy"]  # no temp files


def test_texts_rows_equal_the_pipeline_in_line_order(model, tmp_path, capsys):
    ckpt, _ = model
    lines = ["a red circle", "two shapes: a blue square and a green star", "a red circle",
             "a very long caption " * 20]  # the last is longer than the 32-token context
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "txt.npy"
    code, stdout, err = embed(capsys, "--model", ckpt, "--texts", src, "--out", out, "--batch-size", 3)
    assert code == 0, err
    assert (tmp_path / "txt.texts.txt").read_text().splitlines() == lines
    z = np.load(out)
    assert z.dtype == np.float32 and z.shape == (4, 32)
    pipe = Pipeline.from_pretrained(ckpt)
    np.testing.assert_allclose(z, pipe.embed_texts(lines).numpy(), rtol=1e-5, atol=1e-6)
    truncated = pipe.last_truncated
    np.testing.assert_array_equal(z[0], z[2])  # same text, same row
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["rows"] == 4 and summary["dim"] == 32 and summary["truncated"] == truncated >= 1


@pytest.mark.parametrize("case, message", [
    ("both", "give exactly one of --images DIR or --texts FILE"),
    ("neither", "give exactly one of --images DIR or --texts FILE"),
    ("not_npy", r"--out .*emb.txt: the embeddings are written as a NumPy .npy file"),
    ("empty_folder", r"--images .*empty: no image files"),
    ("no_folder", r"--images .*missing: not a folder"),
    ("blank_line", r"--texts .*texts.txt: line 3 is empty"),
    ("no_file", r"--texts .*nope.txt: file not found"),
])
def test_errors_exit_2_with_the_message_and_write_nothing(model, tmp_path, capsys, case, message):
    ckpt, images = model
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no images here")
    (tmp_path / "texts.txt").write_text("a red circle\na blue square\n   \na green star\n")
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "emb.npy"
    args = {"both": ["--images", images, "--texts", tmp_path / "texts.txt"],
            "neither": [],
            "not_npy": ["--images", images, "--out", outdir / "emb.txt"],
            "empty_folder": ["--images", tmp_path / "empty"],
            "no_folder": ["--images", tmp_path / "missing"],
            "blank_line": ["--texts", tmp_path / "texts.txt"],
            "no_file": ["--texts", tmp_path / "nope.txt"]}[case]
    if "--out" not in args:
        args += ["--out", out]
    code, stdout, err = embed(capsys, "--model", ckpt, *args)
    assert code == 2
    assert err.startswith("vlmkit: error: ") and re.search(message, err), err
    assert stdout == ""
    assert list(outdir.iterdir()) == []  # no .npy, no listing, no temp file
