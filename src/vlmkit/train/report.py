"""Plots, a markdown report and TensorBoard scalars from a run's metrics.jsonl.

Records (one JSON object a line; any field may be missing in older runs):

- ``{"event": "run", "step": 0, "world_size", "packing", "pack_length", "parameters", "trainable", "recipe",
  "preset", "lora"}`` once at the start;
- ``{"event": "stage", "step", "stage", "modules": [{"module", "trainable", "params", "lr"}, ...]}`` at the
  start of each stage;
- step records ``{"step", "stage", "loss", "lr", "grad_norm", "samples_per_second", "tokens_per_second",
  "padding_fraction", "elapsed"}``;
- validation records ``{"step", "stage", "val_loss", "val_...": ...}``.

Unknown keys and events are ignored.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from vlmkit.errors import ConfigError, DataError


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, blank lines skipped.

    Raises DataError naming the file if it is missing, or the file and line number of a line that is not
    a JSON object."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        msg = f"{path}: no such file (a training run writes metrics.jsonl in its output folder)"
        raise DataError(msg) from None
    recs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}); "
                            "each line must be one JSON object") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}, line {n}: a JSON {type(rec).__name__}, expected one JSON object a line")
        recs.append(rec)
    return recs


def plot_loss(metrics_path: str | Path, png_path: str | Path, title: str = "training loss") -> None:
    """Training loss (and validation loss) against step, with stage boundaries marked; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    stages = [(r["step"], r["stage"]) for r in recs if r.get("event") == "stage"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="#1f77b4", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="#d62728", lw=1.2, ms=3)
    for step, name in stages:
        ax.axvline(step, color="gray", ls=":", lw=1)
        ax.text(step, ax.get_ylim()[1], f" {name}", va="top", ha="left", fontsize=8, color="gray")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (answer tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)


# ------------------------------------------------------------------------------------------------------------
# the full report: training_report.md + training_report.png


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Run:
    """A metrics.jsonl split into the run event, stage events, step records and validation records."""

    def __init__(self, recs: list[dict]):
        self.info: dict = {}
        self.stages: list[dict] = []
        self.steps: list[dict] = []
        self.vals: list[dict] = []
        self.checks: list[dict] = []  # validation records with figures other than val_loss (val_cell_accuracy, ...)
        for r in recs:
            event = r.get("event")
            if event == "run":
                self.info.update(r)  # a resumed run may write it again: the later values win
            elif event == "stage":
                # a resume re-announces the stage it resumes in: keep the stage's first announcement
                if not (self.stages and self.stages[-1].get("stage") == r.get("stage")):
                    self.stages.append(r)
            elif event is None and _is_number(r.get("step")):
                if _is_number(r.get("loss")):
                    self.steps.append(r)
                if _is_number(r.get("val_loss")):
                    self.vals.append(r)
                if _figures(r):
                    self.checks.append(r)

    def last(self, key: str, recs: list[dict] | None = None):
        for r in reversed(self.steps if recs is None else recs):
            if _is_number(r.get(key)):
                return r[key]
        return None

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of a step-record field; a NaN breaks the line where step records lack the field."""
        xs, ys = [], []
        for r in self.steps:
            if _is_number(r.get(key)):
                xs.append(r["step"])
                ys.append(float(r[key]))
            elif ys and not math.isnan(ys[-1]):
                xs.append(r["step"])
                ys.append(math.nan)
        return xs, ys

    def last_step(self) -> int | None:
        steps = [r["step"] for r in self.steps + self.vals]
        return max(steps) if steps else None

    def stage_steps(self, i: int) -> list[dict]:
        name = self.stages[i].get("stage")
        return [r for r in self.steps if r.get("stage") == name]

    def stage_vals(self, i: int) -> list[dict]:
        name = self.stages[i].get("stage")
        return [r for r in self.vals if r.get("stage") == name]


def _elapsed(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min {s:02d} s"


def _cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _best_val(vals: list[dict]) -> str | None:
    vals = [r for r in vals if not math.isnan(r["val_loss"])]
    if not vals:
        return None
    best = min(vals, key=lambda r: r["val_loss"])
    return f"{best['val_loss']:.4f} (step {best['step']:,})"


def _summary_rows(run: _Run) -> list[tuple[str, str]]:
    info = run.info
    rows: list[tuple[str, str]] = []
    if info.get("recipe") is not None:
        rows.append(("recipe", f"`{info['recipe']}`"))
    if info.get("preset") is not None:
        rows.append(("preset", f"`{info['preset']}`"))
    if _is_number(info.get("parameters")):
        rows.append(("parameters", f"{info['parameters']:,}"))
    if _is_number(info.get("trainable")):
        rows.append(("trainable parameters", f"{info['trainable']:,}"))
    if "lora" in info:
        lora = info["lora"]
        if isinstance(lora, dict):
            text = ", ".join(f"{k}={v}" for k, v in lora.items()) or "on"
        else:
            text = "none" if lora in (None, False) else str(lora)
        rows.append(("LoRA", text))
    if (step := run.last_step()) is not None:
        rows.append(("steps", f"{step:,}"))
    if (loss := run.last("loss")) is not None:
        rows.append(("final loss", f"{loss:.4f}"))
    if (best := _best_val(run.vals)) is not None:
        rows.append(("best val loss", best))
    if (sps := run.last("samples_per_second")) is not None:
        rows.append(("samples/s", f"{sps:,.1f}"))
    if (tps := run.last("tokens_per_second")) is not None:
        rows.append(("tokens/s", f"{tps:,.0f}"))
    if (pad := run.last("padding_fraction")) is not None:
        rows.append(("padding fraction (end)", f"{pad:.3f}"))
    if _is_number(info.get("world_size")):
        rows.append(("world size", f"{info['world_size']:,}"))
    if "packing" in info:
        text = "yes" if info["packing"] else "no"
        if info["packing"] and _is_number(info.get("pack_length")):
            text += f" (pack length {info['pack_length']:,})"
        rows.append(("packing", text))
    if (el := run.last("elapsed", run.steps + run.vals)) is not None:
        rows.append(("elapsed", _elapsed(el)))
    return rows


def _figures(rec: dict) -> dict:
    """A validation record's figures besides its loss (``val_cell_accuracy``, ``val_i2t_recall@1``, ...)."""
    return {k: v for k, v in rec.items() if k.startswith("val_") and k != "val_loss" and _is_number(v)}


def _lr(v) -> str:
    return f"{v:.3g}" if _is_number(v) else "—"


def _stage_section(run: _Run, i: int) -> list[str]:
    ev = run.stages[i]
    start = ev.get("step")
    end = run.stages[i + 1].get("step") if i + 1 < len(run.stages) else run.last_step()
    span = ""
    if _is_number(start) and _is_number(end):
        span = f" (steps {start:,}–{end:,})"
    lines = [f"### Stage {i + 1}: `{_cell(ev.get('stage', '?'))}`{span}", ""]
    facts = []
    if (loss := run.last("loss", run.stage_steps(i))) is not None:
        facts.append(f"final loss {loss:.4f}")
    if (best := _best_val(run.stage_vals(i))) is not None:
        facts.append(f"best val loss {best}")
    checks = [r for r in run.checks if r.get("stage") == ev.get("stage")]
    if checks:  # the stage's last validation, what the objective reports besides a loss
        figures = ", ".join(f"{k} {v:.4g}" for k, v in _figures(checks[-1]).items())
        facts.append(f"validation at step {checks[-1]['step']:,}: {figures}")
    if facts:
        lines += ["; ".join(facts), ""]
    modules = [m for m in ev.get("modules") or [] if isinstance(m, dict)]
    if modules:
        lines += ["| module | params | status | lr |", "|---|---:|---|---:|"]
        for m in modules:
            params = f"{m['params']:,}" if _is_number(m.get("params")) else "—"
            trains = m.get("trainable")
            status = "trainable" if trains else ("frozen" if trains is not None else "—")
            lr = _lr(m.get("lr")) if trains else "—"
            lines.append(f"| {_cell(m.get('module', '?'))} | {params} | {status} | {lr} |")
        counted = [m for m in modules if _is_number(m.get("params"))]
        if counted:
            total = sum(m["params"] for m in counted)
            trained = sum(m["params"] for m in counted if m.get("trainable"))
            lines.append(f"| **total** | {total:,} | {trained:,} trainable | |")
        lines.append("")
    return lines


def _markdown(run: _Run, title: str) -> str:
    lines = [f"# {title}", "", "## Run", ""]
    rows = _summary_rows(run)
    if rows:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in rows] + [""]
    else:
        lines += ["No step records yet.", ""]
    if run.stages:
        lines += ["## Stages", ""]
        for i in range(len(run.stages)):
            lines += _stage_section(run, i)
    lines += ["## Curves", "", "![training report](training_report.png)", ""]
    return "\n".join(lines)


def _panels(run: _Run) -> list[str]:
    """The panels the run has data for, in figure order: loss, throughput, padding, lr."""
    panels = []
    if run.steps or run.vals:
        panels.append("loss")
    if run.last("samples_per_second") is not None or run.last("tokens_per_second") is not None:
        panels.append("throughput")
    if run.last("padding_fraction") is not None:
        panels.append("padding")
    if run.last("lr") is not None:
        panels.append("lr")
    return panels


def _panel_axes(plt, n: int):
    """A figure with one axes per panel, two panels a row (one column for a single panel), spare axes removed;
    a figure without panels says so instead of staying blank."""
    ncols = 1 if n <= 1 else 2
    nrows = max(1, math.ceil(n / 2))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 3.8 * nrows), dpi=100, squeeze=False)
    axes = list(axes.flat)
    for ax in axes[n:]:
        fig.delaxes(ax)
    if not n:
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, "no step records yet", ha="center", va="center", fontsize=12, color="gray")
    return fig, axes


def _plot_loss(ax, run: _Run) -> None:
    """Train loss and validation loss; log scale when every value is positive."""
    xs, ys = run.series("loss")
    if xs:
        ax.plot(xs, ys, label="train loss", color="#1f77b4", lw=1.2)
    if run.vals:
        ax.plot([r["step"] for r in run.vals], [r["val_loss"] for r in run.vals], "o-",
                label="validation loss", color="#d62728", lw=1.2, ms=3)
    if all(v > 0 for v in ys if not math.isnan(v)) and all(r["val_loss"] > 0 for r in run.vals):
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.legend(fontsize=8, loc="upper right")


def _plot_throughput(ax, run: _Run) -> None:
    """Samples/s and tokens/s; tokens/s on a second y axis when both were recorded (their scales differ)."""
    handles = []
    xs, ys = run.series("samples_per_second")
    if any(not math.isnan(v) for v in ys):
        handles += ax.plot(xs, ys, color="#2ca02c", lw=1.2, label="samples/s")
        ax.set_ylabel("samples/s", color="#2ca02c")
    xs, ys = run.series("tokens_per_second")
    if any(not math.isnan(v) for v in ys):
        tax = ax.twinx() if handles else ax
        handles += tax.plot(xs, ys, color="#9467bd", lw=1.2, label="tokens/s")
        tax.set_ylabel("tokens/s", color="#9467bd")
    ax.set_title("throughput")
    ax.legend(handles=handles, fontsize=8, loc="lower right")


def _plot_padding(ax, run: _Run) -> None:
    """The padded share of the token slots, on [0, 1]."""
    ax.plot(*run.series("padding_fraction"), color="#ff7f0e", lw=1.2)
    ax.set_ylim(0, 1)
    ax.set_ylabel("padded / all token slots")
    ax.set_title("padding fraction (batches so far)")


def _plot_lr(ax, run: _Run) -> None:
    """The learning rate; log scale unless it reaches 0 (a warmup start, a decay to zero)."""
    xs, ys = run.series("lr")
    ax.plot(xs, ys, color="#8c564b", lw=1.2)
    if all(v > 0 for v in ys if not math.isnan(v)):
        ax.set_yscale("log")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate")


_PLOT_PANEL = {"loss": _plot_loss, "throughput": _plot_throughput, "padding": _plot_padding, "lr": _plot_lr}


def _mark_stages(ax, boundaries: list[tuple[int, str]], names: bool) -> None:
    """A dotted line at each stage's first step, named at the top of the axes when ``names``."""
    for step, name in boundaries:
        ax.axvline(step, color="gray", ls=":", lw=1)
        if names:
            ax.text(step, 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="top", ha="left",
                    fontsize=8, color="gray")


def _figure(run: _Run, title: str):
    """The report's figure and pyplot (the caller saves and closes it): a panel per group of fields the run
    recorded, each against the optimizer step with the stage boundaries marked (named on the loss panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(run)
    fig, axes = _panel_axes(plt, len(panels))
    boundaries = [(r["step"], str(r.get("stage", ""))) for r in run.stages if _is_number(r.get("step"))]
    for kind, ax in zip(panels, axes):
        _PLOT_PANEL[kind](ax, run)
        _mark_stages(ax, boundaries, names=kind == "loss")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig, plt


def _replace(path: Path, write) -> None:
    """write(tmp_path) then os.replace onto path, so a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(run_dir: str | Path, title: str | None = None) -> Path:
    """Write ``run_dir/training_report.md`` (run summary, per-stage module tables, the figure) and
    ``run_dir/training_report.png`` (loss, throughput, padding fraction, learning rate) from
    ``run_dir/metrics.jsonl``; return the .md path.

    Both files are replaced atomically. Panels and rows whose fields the run did not record are left out.
    Raises DataError if metrics.jsonl is missing or has a line that is not a JSON object."""
    run_dir = Path(run_dir)
    run = _Run(read_metrics(run_dir / "metrics.jsonl"))
    if title is None:
        name = run.info.get("recipe") or run.info.get("preset") or run_dir.resolve().name
        title = f"Training report: {name}"
    fig, plt = _figure(run, title)
    try:
        _replace(run_dir / "training_report.png", lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    md_path = run_dir / "training_report.md"
    text = _markdown(run, title)
    _replace(md_path, lambda tmp: tmp.write_text(text))
    return md_path


# ------------------------------------------------------------------------------------------------------------
# TensorBoard


class TensorBoardWriter:
    """Metrics records as TensorBoard scalars.

    A step record's numeric fields go to ``train/<field>``; ``val_loss`` to ``val/loss`` and ``val_<x>`` to
    ``val/<x>``; in a validation record (``val_`` fields and no training ``loss``) every other numeric field
    (``elapsed``, ``recall@1``, ...) goes under ``val/`` too. ``step`` is the x axis; event records (an
    ``"event"`` key), records without a step and non-numeric fields are skipped."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(f"TensorBoard logging needs the tensorboard package ({e}); "
                              "pip install 'vlmkit[tensorboard]'") from None
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    @staticmethod
    def tags(rec: dict) -> dict[str, float]:
        """The scalars ``write`` would log for a record, by tag."""
        if "event" in rec or not _is_number(rec.get("step")):
            return {}
        is_val = "loss" not in rec and any(k.startswith("val_") for k in rec)
        out = {}
        for key, v in rec.items():
            if key in ("step", "stage") or not _is_number(v):
                continue
            if key.startswith("val_"):
                out[f"val/{key[4:]}"] = float(v)
            else:
                out[f"{'val' if is_val else 'train'}/{key}"] = float(v)
        return out

    def write(self, rec: dict) -> None:
        for tag, v in self.tags(rec).items():
            self._writer.add_scalar(tag, v, global_step=int(rec["step"]))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
