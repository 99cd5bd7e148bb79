"""``vlmkit eval report``: several evaluation runs side by side — one markdown table of models x tasks (each cell the
headline metric with its bootstrap 95% confidence interval) and a plot with a panel per task (a bar per model,
the interval as its error bar; panels keep their own scale, since MME's score and an accuracy do not share one).

Runs are compared as they are: the table's notes name each run's split, ``--limit`` and sample counts, and mark a
run that is incomplete (an endpoint failed on samples) or a task whose headline metric, split or limit differs
between runs, so a comparison that is not like for like says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmkit.errors import DataError
from vlmkit.utils import atomic_write_text


def load_results(path: str | Path) -> dict:
    """A results.json of ``vlmkit eval``, checked enough to compare (its model and tasks)."""
    path = Path(path)
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found (give the results.json files `vlmkit eval --out` wrote)") from e
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(res, dict) or not isinstance(res.get("tasks"), dict) or "model" not in res:
        raise DataError(f"{path}: not a `vlmkit eval` results file (it needs 'model' and 'tasks')")
    for name, r in res["tasks"].items():
        if not isinstance(r, dict) or "metric" not in r or "metrics" not in r:
            raise DataError(f"{path}: task {name!r} has no 'metric' / 'metrics'")
    return res


def model_label(res: dict) -> str:
    """The endpoint's model name (and host) or the checkpoint folder's name."""
    endpoint = res["model"].get("endpoint")
    if endpoint:
        return f"{endpoint['model']} @ {endpoint['base_url']}"
    return Path(res["model"]["path"]).name or str(res["model"]["path"])


def _cell(r: dict | None) -> str:
    if r is None:
        return "—"
    value, ci = r["metrics"].get(r["metric"]), (r.get("ci95") or {}).get(r["metric"])
    if value is None:
        return "n/a"
    text = f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    if ci:
        text += f" [{ci[0]:.4f}, {ci[1]:.4f}]" if abs(value) < 10 else f" [{ci[0]:.1f}, {ci[1]:.1f}]"
    return text + (" †" if r.get("n_errors") else "")


def compare_results(paths: list[str | Path], out: str | Path, names: list[str] | None = None) -> Path:
    """Write the comparison table ``out`` (markdown) and its plot ``out`` with a .png suffix; return ``out``."""
    runs = [load_results(p) for p in paths]
    if names is not None and len(names) != len(runs):
        raise DataError(f"--names gives {len(names)} name(s) for {len(runs)} results file(s); give one per file")
    labels = _unique(names or [model_label(r) for r in runs])
    tasks = list(dict.fromkeys(t for r in runs for t in r["tasks"]))
    metric = {t: next(r["tasks"][t]["metric"] for r in runs if t in r["tasks"]) for t in tasks}
    lines = ["# vlmkit eval report", "", "| model | " + " | ".join(f"{t} ({metric[t]})" for t in tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    lines += [f"| {label} | " + " | ".join(_cell(r["tasks"].get(t)) for t in tasks) + " |"
              for label, r in zip(labels, runs)]
    lines += ["", "Each cell: the headline metric and its bootstrap 95% confidence interval; — not evaluated; "
              "† incomplete (samples failed and were left out)."] + _notes(runs, labels, paths, tasks)
    out = Path(out)
    _plot(runs, labels, tasks, metric, out.with_suffix(".png"))
    lines += ["", f"![comparison]({out.with_suffix('.png').name})"]
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def _notes(runs: list[dict], labels: list[str], paths, tasks: list[str]) -> list[str]:
    """One line per run (file, split, limit, samples, failures) and a warning per task not compared like for like."""
    lines = ["", "| model | results | split | limit | samples per task | failed |", "|---|---|---|---|---|---|"]
    for label, r, path in zip(labels, runs, paths):
        cfg = r.get("config", {})
        counts = ", ".join(f"{t} {v['n']}" for t, v in r["tasks"].items())
        failed = sum(v.get("n_errors", 0) for v in r["tasks"].values())
        lines.append(f"| {label} | `{path}` | {cfg.get('split', '?')} | {cfg.get('limit') or 'all'} | {counts} | "
                     f"{failed} |")
    for t in tasks:
        seen = {(r["tasks"][t]["metric"], r.get("config", {}).get("split"), r.get("config", {}).get("limit"))
                for r in runs if t in r["tasks"]}
        if len(seen) > 1:
            lines.append(f"\n**{t}** is not compared like for like: the runs differ in metric, split or limit "
                         f"({'; '.join(f'{m}, split {s}, limit {lim}' for m, s, lim in sorted(seen, key=str))}).")
    return lines


def _plot(runs: list[dict], labels: list[str], tasks: list[str], metric: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, max(1, len(tasks)))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows + 0.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, t in zip(axes.flat, tasks):
        for i, r in enumerate(runs):
            res = r["tasks"].get(t)
            value = res["metrics"].get(res["metric"]) if res else None
            if value is None:
                continue
            ci = (res.get("ci95") or {}).get(res["metric"])
            err = [[value - ci[0]], [ci[1] - value]] if ci else None
            ax.bar(i, value, yerr=err, capsize=3, color=colors[i % len(colors)], label=labels[i])
        ax.set_title(f"{t}\n({metric[t]})", fontsize=9)
        ax.set_xticks([])
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[i % len(colors)]) for i in range(len(labels))]
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8)
    fig.tight_layout(rect=(0, 0.12 if rows == 1 else 0.06, 1, 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
