"""Plot zero-shot top-1 and text->image recall@5 against training time for runs of quality.py.

    python experiments/contrastive/plot.py --run tiny-clip=runs/q-clip --run tiny-siglip=runs/q-siglip \
        --out docs/contrastive_curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=FOLDER")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=300.0, help="a vertical line at this many seconds")
    args = ap.parse_args()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.0))
    for spec in args.run:
        label, folder = spec.split("=", 1)
        curve = [json.loads(line) for line in (Path(folder) / "curve.jsonl").read_text().splitlines()]
        t = [c["train_seconds"] for c in curve]  # from the first validation (after any image-tower stage)
        for ax, key in zip(axes, ("zero_shot_top1", "t2i_r5")):
            ax.plot(t, [c[key] for c in curve], marker="o", markersize=3, label=label)
    titles = ("zero-shot top-1, held-out single objects (30 classes)", "text->image recall@5, held-out captions")
    for ax, title in zip(axes, titles):
        ax.axhline(0.9 if ax is axes[0] else 0.8, color="grey", linestyle=":", linewidth=1)
        ax.axvline(args.budget, color="grey", linestyle="--", linewidth=1)
        ax.set(title=title, xlabel="training seconds (2 CPU cores)", ylim=(0, 1), xlim=(0, None))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
