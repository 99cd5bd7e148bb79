"""write_report (training_report.md + training_report.png from metrics.jsonl) and TensorBoardWriter."""

from __future__ import annotations

import json
import math
import sys

import pytest
from PIL import Image

from vlmkit.errors import ConfigError, DataError
from vlmkit.train.report import TensorBoardWriter, plot_loss, read_metrics, write_report

MODULES_ALIGN = [
    {"module": "vision", "trainable": False, "params": 1234567, "lr": 0.0},
    {"module": "connector", "trainable": True, "params": 98765, "lr": 0.001},
    {"module": "language", "trainable": False, "params": 7654321, "lr": 0.0},
]
MODULES_FINETUNE = [
    {"module": "vision", "trainable": False, "params": 1234567, "lr": 0.0},
    {"module": "connector", "trainable": True, "params": 98765, "lr": 2e-05},
    {"module": "language", "trainable": True, "params": 7654321, "lr": 2e-05},
]


def _write(path, recs, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + "".join(extra_lines))


def _full_run() -> list[dict]:
    recs = [{"event": "run", "step": 0, "world_size": 2, "packing": True, "pack_length": 512,
             "parameters": 8987653, "trainable": 98765, "recipe": "llava-two-stage", "preset": "tiny-llava",
             "lora": None}]
    recs.append({"event": "stage", "step": 0, "stage": "align", "modules": MODULES_ALIGN})
    for step in range(10, 110, 10):
        recs.append({"step": step, "stage": "align", "loss": 5.0 / (1 + step / 20), "lr": 1e-3,
                     "grad_norm": 1.5, "samples_per_second": 40.0 + step / 10,
                     "tokens_per_second": 9000.0 + step, "padding_fraction": 0.4 - step / 1000,
                     "elapsed": step * 0.5})
    recs.append({"step": 100, "stage": "align", "val_loss": 1.75})
    recs.append({"step": 100, "stage": "align", "elapsed": 50.0, "val_cell_accuracy": 0.89445,
                 "val_where_accuracy": 0.5})  # an objective's own validation (cell_labels)
    recs.append({"event": "stage", "step": 100, "stage": "finetune", "modules": MODULES_FINETUNE})
    for step in range(110, 210, 10):
        recs.append({"step": step, "stage": "finetune", "loss": 5.0 / (1 + step / 20),
                     "lr": 2e-5 * (210 - step) / 100, "grad_norm": 0.8, "samples_per_second": 55.5,
                     "tokens_per_second": 12345.6, "padding_fraction": 0.125, "elapsed": step * 0.5,
                     "recall@1": 0.3})
    recs[-1]["loss"] = 0.4321
    recs.append({"step": 150, "stage": "finetune", "val_loss": 0.9876, "recall@1": 0.5})
    recs.append({"step": 200, "stage": "finetune", "val_loss": 1.0123})
    return recs


def _check_png(path, min_px: int = 400):
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        assert im.width >= min_px and im.height >= min_px // 2


def test_report_full_run(tmp_path):
    _write(tmp_path / "metrics.jsonl", _full_run())
    md_path = write_report(tmp_path)
    assert md_path == tmp_path / "training_report.md"
    md = md_path.read_text()
    assert md.startswith("# Training report: llava-two-stage\n")
    for text in ("| steps | 200 |", "| final loss | 0.4321 |", "| best val loss | 0.9876 (step 150) |",
                 "| samples/s | 55.5 |", "| tokens/s | 12,346 |", "| padding fraction (end) | 0.125 |",
                 "| world size | 2 |", "| packing | yes (pack length 512) |", "| elapsed | 1 min 40 s |",
                 "| parameters | 8,987,653 |", "| trainable parameters | 98,765 |", "| LoRA | none |",
                 "| preset | `tiny-llava` |"):
        assert text in md, text
    # per stage: module params with thousands separators, trainable or frozen, lr
    assert "### Stage 1: `align` (steps 0–100)" in md
    assert "### Stage 2: `finetune` (steps 100–200)" in md
    align, finetune = md.split("### Stage 2")
    assert "| vision | 1,234,567 | frozen | — |" in align
    assert "| connector | 98,765 | trainable | 0.001 |" in align
    assert "| **total** | 8,987,653 | 98,765 trainable | |" in align
    assert "| language | 7,654,321 | trainable | 2e-05 |" in finetune
    assert "best val loss 1.7500 (step 100); validation at step 100: val_cell_accuracy 0.8944, " \
           "val_where_accuracy 0.5" in align
    assert "validation at" not in finetune  # its recall@1 is a training figure, not a val_ one
    assert "final loss 0.4321; best val loss 0.9876 (step 150)" in finetune
    assert "![training report](training_report.png)" in md
    _check_png(tmp_path / "training_report.png")
    # atomic writes leave no temporaries behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "training_report.md", "training_report.png"]


def test_report_title_and_rewrite(tmp_path):
    _write(tmp_path / "metrics.jsonl", _full_run())
    write_report(tmp_path, title="my run")
    write_report(tmp_path, title="my run")  # overwriting an existing report works
    assert (tmp_path / "training_report.md").read_text().startswith("# my run\n")


def test_report_old_style_metrics(tmp_path):
    """No run event, no padding fraction, no tokens/s, no val records: those rows and panels are left out."""
    recs = [{"event": "stage", "step": 0, "stage": "contrastive",
             "modules": [{"module": "vision", "trainable": True, "params": 5000, "lr": 0.0005}]}]
    recs += [{"step": s, "stage": "contrastive", "loss": 2.0 - s / 100, "lr": 5e-4, "grad_norm": 1.0,
              "logit_scale": 14.3, "samples_per_second": 120.0, "elapsed": s * 2.0} for s in (10, 20, 30)]
    recs.append({"step": 30, "stage": "contrastive", "elapsed": 60.0, "val_loss": 1.9,
                 "val_i2t_recall@1": 0.2})
    _write(tmp_path / "metrics.jsonl", recs)
    md = write_report(tmp_path).read_text()
    assert "| final loss | 1.7000 |" in md
    assert "best val loss 1.9000 (step 30); validation at step 30: val_i2t_recall@1 0.2" in md
    assert "| samples/s | 120.0 |" in md
    for absent in ("padding", "tokens/s", "world size", "packing", "parameters"):
        assert absent not in md, absent
    assert "| vision | 5,000 | trainable | 0.0005 |" in md
    assert md.startswith(f"# Training report: {tmp_path.name}\n")
    _check_png(tmp_path / "training_report.png")


def test_report_minimal_metrics(tmp_path):
    """Only loss records (the oldest format), then no step records at all: still a report, no crash."""
    _write(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}])
    md = write_report(tmp_path).read_text()
    assert "| final loss | 2.5000 |" in md and "## Stages" not in md
    _check_png(tmp_path / "training_report.png", min_px=300)
    _write(tmp_path / "metrics.jsonl", [{"event": "data", "step": 0, "images": 10}])
    md = write_report(tmp_path).read_text()
    assert "No step records yet." in md
    _check_png(tmp_path / "training_report.png", min_px=300)


def test_report_resumed_stage_announced_once(tmp_path):
    recs = _full_run()
    recs.insert(-5, {"event": "stage", "step": 160, "stage": "finetune", "modules": MODULES_FINETUNE})
    _write(tmp_path / "metrics.jsonl", recs)
    md = write_report(tmp_path).read_text()
    assert md.count("`finetune`") == 1 and "### Stage 3" not in md


def test_report_missing_file(tmp_path):
    with pytest.raises(DataError, match="metrics.jsonl"):
        write_report(tmp_path)
    assert not (tmp_path / "training_report.md").exists()


@pytest.mark.parametrize("bad, why", [('{"step": 3, "loss": 1.', "not valid JSON"),
                                      ("[1, 2]", "a JSON list")])
def test_report_bad_line(tmp_path, bad, why):
    good = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    _write(tmp_path / "metrics.jsonl", good, ["\n", bad + "\n"])  # line 3 blank, line 4 bad
    with pytest.raises(DataError, match=rf"metrics\.jsonl, line 4: {why}"):
        write_report(tmp_path)
    assert not (tmp_path / "training_report.md").exists() and not (tmp_path / "training_report.png").exists()


def test_plot_loss_and_read_metrics_still_work(tmp_path):
    _write(tmp_path / "metrics.jsonl", _full_run())
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == len(_full_run())
    plot_loss(tmp_path / "metrics.jsonl", tmp_path / "loss.png", title="t")
    _check_png(tmp_path / "loss.png")


def test_tensorboard_tags():
    tags = TensorBoardWriter.tags
    assert tags({"event": "stage", "step": 0, "stage": "a", "modules": []}) == {}
    assert tags({"step": 5, "stage": "a", "loss": 1.0, "lr": 1e-3, "packing": True, "note": "x"}) == {
        "train/loss": 1.0, "train/lr": 1e-3}
    assert tags({"step": 5, "stage": "a", "elapsed": 3.0, "val_loss": 2.0, "val_i2t_recall@1": 0.5}) == {
        "val/loss": 2.0, "val/elapsed": 3.0, "val/i2t_recall@1": 0.5}
    assert tags({"loss": 1.0}) == {}


def test_tensorboard_writer_round_trip(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with TensorBoardWriter(tmp_path / "tb") as tb:
        for rec in _full_run():
            tb.write(rec)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_second",
            "train/tokens_per_second", "train/padding_fraction", "train/elapsed", "train/recall@1",
            "val/loss", "val/recall@1"} <= tags
    assert not any("world_size" in t or "step" == t.split("/")[-1] for t in tags)
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(10, 210, 10))
    assert math.isclose(loss[-1].value, 0.4321, rel_tol=1e-6)
    val = acc.Scalars("val/loss")
    assert [(e.step, round(e.value, 4)) for e in val] == [(100, 1.75), (150, 0.9876), (200, 1.0123)]
    assert [e.step for e in acc.Scalars("val/recall@1")] == [150]


def test_tensorboard_missing_package(monkeypatch, tmp_path):
    # as if tensorboard were not installed: torch.utils.tensorboard's own `import tensorboard` fails
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(ConfigError, match=r"pip install 'vlmkit\[tensorboard\]'"):
        TensorBoardWriter(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()
