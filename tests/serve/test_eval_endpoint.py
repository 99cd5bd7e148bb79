"""The README's comparison, end to end: one checkpoint evaluated directly and behind `vlmkit serve`'s
OpenAI-compatible API (as any endpoint would be) on the same tasks, then `vlmkit eval report` puts both runs in one
table. Greedy decoding through the server gives the checkpoint's own answers, so both rows must agree exactly."""

from __future__ import annotations

import json

from vlmkit.cli import main

from conftest import API_KEY


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_checkpoint_and_its_endpoint_compare_in_one_table(llava_checkpoint, server, engine, shapes, tmp_path,
                                                             monkeypatch, capsys):
    # mmbench: images held inside the benchmark's TSV (EmbeddedImage), sent as data URLs by the endpoint backend
    common = ["--tasks", "shapes_vqa,pope,mmbench", "--data", str(shapes), "--limit", "6", "--quiet"]
    assert main(["eval", "--model", str(llava_checkpoint), "--out", str(tmp_path / "ckpt" / "results.json"),
                 *common]) == 0
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    spec = f"openai:{server.url}/v1#{engine.model_name}"
    assert main(["eval", "--model", spec, "--out", str(tmp_path / "ep" / "results.json"), *common]) == 0
    for task in ("shapes_vqa", "pope", "mmbench"):
        direct, served = _rows(tmp_path / "ckpt" / f"predictions_{task}.jsonl"), _rows(
            tmp_path / "ep" / f"predictions_{task}.jsonl")
        assert [r["prediction"] for r in served] == [r["prediction"] for r in direct]
    capsys.readouterr()
    out = tmp_path / "comparison.md"
    assert main(["eval", "report", str(tmp_path / "ckpt" / "results.json"), str(tmp_path / "ep" / "results.json"),
                 "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"table": str(out), "plot": str(out.with_suffix(".png"))}
    table = out.read_text().splitlines()
    assert table[2] == "| model | shapes_vqa (exact_match) | pope (accuracy) | mmbench (circular_accuracy) |"
    rows = table[4:6]
    assert rows[0].startswith("| checkpoint |") and rows[1].startswith(f"| {engine.model_name} @ {server.url}/v1 |")
    assert rows[0].split("|")[2:] == rows[1].split("|")[2:]  # the same scores and intervals
    assert out.with_suffix(".png").stat().st_size > 5000
