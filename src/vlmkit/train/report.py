"""Plots and markdown from a run's metrics.jsonl."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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
