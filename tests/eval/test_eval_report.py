"""`vlmkit eval report`: runs side by side in one table (headline and 95% interval per model and task, "—" where a
run has no such task, † where it is incomplete), notes that say when runs are not comparable, a plot, and bad
input refused by file name."""

from __future__ import annotations

import json

import pytest

from vlmkit.cli import main
from vlmkit.errors import DataError
from vlmkit.eval.report import compare_results


def _results(path, model, tasks, split="test", limit=None, endpoint=None):
    res = {"model": {"path": model, "fingerprint": "0" * 64}, "config": {"split": split, "limit": limit},
           "tasks": {name: {"metric": metric, "metrics": {metric: value}, "ci95": {metric: ci}, "n": n,
                            "n_errors": errors} for name, (metric, value, ci, n, errors) in tasks.items()}}
    if endpoint:
        res["model"]["endpoint"] = {"api": "openai-chat-completions", "base_url": endpoint, "model": model}
    path.write_text(json.dumps(res))
    return path


def test_a_table_of_models_by_tasks_with_intervals_and_notes(tmp_path):
    a = _results(tmp_path / "a.json", "runs/tiny/checkpoint", {
        "pope": ("accuracy", 0.875, [0.8, 0.95], 90, 0), "mme": ("total", 1234.5, [1100.0, 1300.25], 40, 0)})
    b = _results(tmp_path / "b.json", "my-model", {"pope": ("accuracy", 0.5, [0.4, 0.6], 88, 2)},
                 endpoint="http://127.0.0.1:8000/v1")
    c = _results(tmp_path / "c.json", "runs/tiny/checkpoint", {"pope": ("accuracy", 0.9, [0.8, 1.0], 9, 0)},
                 limit=9)
    out = compare_results([a, b, c], tmp_path / "cmp.md")
    lines = out.read_text().splitlines()
    assert lines[2:7] == [
        "| model | pope (accuracy) | mme (total) |", "|---|---|---|",
        "| checkpoint | 0.8750 [0.8000, 0.9500] | 1234.5 [1100.0, 1300.2] |",
        "| my-model @ http://127.0.0.1:8000/v1 | 0.5000 [0.4000, 0.6000] † | — |",
        "| checkpoint #2 | 0.9000 [0.8000, 1.0000] | — |"]
    text = out.read_text()
    assert "| my-model @ http://127.0.0.1:8000/v1 | `" in text and "| pope 88 | 2 |" in text
    assert "**pope** is not compared like for like" in text and "limit 9" in text  # c ran 9 samples only
    assert "**mme**" not in text
    assert (tmp_path / "cmp.png").stat().st_size > 5000


def test_names_and_bad_input(tmp_path, capsys):
    a = _results(tmp_path / "a.json", "x", {"pope": ("accuracy", 0.5, [0.4, 0.6], 10, 0)})
    assert main(["eval", "report", str(a), str(a), "--names", "left,right", "--out", str(tmp_path / "t.md")]) == 0
    assert "| left | 0.5000" in (tmp_path / "t.md").read_text() and "| right | 0.5000" in (tmp_path / "t.md").read_text()
    with pytest.raises(DataError, match="--names gives 1 name"):
        compare_results([a, a], tmp_path / "t.md", names=["one"])
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"loss": 1.0}))
    for path, why in [(tmp_path / "bad.json", "bad.json: not valid JSON"), (tmp_path / "none.json", "file not found"),
                      (tmp_path / "other.json", "not a `vlmkit eval` results file")]:
        capsys.readouterr()
        assert main(["eval", "report", str(a), str(path), "--out", str(tmp_path / "u.md")]) == 2
        assert why in capsys.readouterr().err
    assert not (tmp_path / "u.md").exists()  # nothing written when an input is refused


def test_vlmkit_tasks_lists_every_task_with_its_metric_and_files(capsys):
    from vlmkit.eval.tasks import TASKS

    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name, task in TASKS.items():
        assert f"{name}  [{task.metric}]" in out
        assert task.data.split()[0] in out
    assert {"mme", "hallusionbench", "textvqa", "chartqa", "docvqa", "infovqa", "ocrbench"} <= set(TASKS)
