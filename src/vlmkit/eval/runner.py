"""``vlmkit eval``: run tasks on a model and write results.json, per-sample predictions and a report.

The model answers through :class:`~vlmkit.pipeline.Pipeline` (its chat template, batched greedy generation), so
it answers as it does everywhere else. results.json holds each task's metrics, sample count, bootstrap 95%
confidence interval of its headline metric, wall time and samples/s, with the resolved config, a fingerprint of
the model's files and the seed; ``predictions_<task>.jsonl`` holds every sample's prompt, prediction, references
and scores; ``<results>.md`` is a report with a plot of the grouped scores. Everything is written atomically.

``model`` may also be ``openai:BASE_URL#MODEL``, an OpenAI-compatible endpoint (:mod:`vlmkit.eval.backends`):
its answers are cached on disk so an interrupted run resumes, the fingerprint is the sha256 of the spec, and a
sample the endpoint failed on (after retries) answers "" with an ``"error"`` in its record; the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from vlmkit.version import __version__
from vlmkit.errors import ConfigError
from vlmkit.eval.backends import OpenAIBackend, is_endpoint_spec, parse_model_spec
from vlmkit.eval.metrics.stats import bootstrap_ci
from vlmkit.eval.readers import load_media
from vlmkit.eval.tasks import TASKS, Task, aggregate, get_task
from vlmkit.utils import atomic_write_json, atomic_write_text


def fingerprint(path: str | Path) -> str:
    """sha256 over a model folder's config and weight files (names and bytes), so results name what ran."""
    folder, h = Path(path), hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors") and p.is_file())
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def run_task(pipe, task: Task, data: Path, split: str, limit: int | None, batch_size: int, post_prompt: str = "",
             seed: int = 0, progress: bool = True) -> tuple[dict, list[dict]]:
    """(the task's results, its per-sample records). Answers are stripped of surrounding whitespace before they
    are scored, as LLaVA's and lmms-eval's evaluation scripts do; ``post_prompt`` is appended to every prompt
    (e.g. LLaVA-1.5's "\nAnswer the question using a single word or phrase.")."""
    samples = task.read(data, split, limit)
    t0 = time.perf_counter()
    if task.evaluate is not None:  # a ranking task: no generation
        if not pipe.can_score and not pipe.can_embed:
            raise ConfigError(f"task {task.name!r} ranks candidates by the model's likelihoods; an endpoint only "
                              f"generates text: evaluate a checkpoint or folder")
        predictions, scores, extra = task.evaluate(pipe, samples, data, progress)
        records = [{"id": s.id, "images": [str(p) for p in s.images], "prompt": task.prompt(s), "prediction": p,
                    "answers": s.answers, **sc, "meta": {k: v for k, v in s.meta.items() if k != "classes"}}
                   for s, p, sc in zip(samples, predictions, scores)]
        seconds = time.perf_counter() - t0
        metrics = {**aggregate(task, scores, samples, predictions), **extra}
        result = {"metric": task.metric, "metrics": metrics, "n": len(samples), "n_errors": 0,
                  "ci95": {task.metric: list(bootstrap_ci([s[task.metric] for s in scores], seed=seed))},
                  "seconds": round(seconds, 3), "samples_per_second": round(len(samples) / max(seconds, 1e-9), 3)}
        return result, records
    records, scores, predictions, n_errors = [], [], [], 0
    bar = tqdm(total=len(samples), desc=task.name, unit="sample", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        prompts = [task.prompt(s) + post_prompt for s in chunk]
        answers = pipe.chat_batch([([load_media(im) for im in s.images], p) for s, p in zip(chunk, prompts)],
                                  max_new_tokens=task.max_new_tokens)
        errors = list(pipe.last_errors) or [None] * len(chunk)  # an endpoint's per-request failures
        for s, prompt, answer, error in zip(chunk, prompts, answers, errors):
            answer = answer.strip()
            score = task.score(answer, s)
            scores.append(score)
            predictions.append(answer)
            records.append({"id": s.id, "images": [str(p) for p in s.images], "prompt": prompt,
                            "prediction": answer, "answers": s.answers, **score, "meta": s.meta})
            if error is not None:
                records[-1]["error"] = error
                n_errors += 1
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - t0
    metrics = aggregate(task, scores, samples, predictions)
    headline = metrics.pop("_per_sample", None) or [s[task.metric] for s in scores]
    result = {"metric": task.metric, "metrics": metrics, "n": len(samples),
              "ci95": {task.metric: list(bootstrap_ci(headline, seed=seed))}, "seconds": round(seconds, 3),
              "samples_per_second": round(len(samples) / max(seconds, 1e-9), 3), "n_errors": n_errors}
    return result, records


def run_eval(model: str | Path, tasks: list[str], data: str | Path, out: str | Path, split: str = "test",
             limit: int | None = None, batch_size: int = 32, seed: int = 0, post_prompt: str = "",
             progress: bool = True, cache: str | Path | None = None, concurrency: int = 4) -> dict:
    """Evaluate the model folder, or the endpoint ``openai:BASE_URL#MODEL``, on ``tasks`` (names) with the data
    under ``data``; write ``out`` (results.json), ``predictions_<task>.jsonl`` beside it and ``<out>.md``. Unknown
    task names fail before the model loads. An endpoint gets ``concurrency`` requests in flight and caches its
    answers under ``cache`` (default: ``.openai_cache`` beside ``out``)."""
    import torch

    from vlmkit.pipeline import Pipeline

    resolved = [get_task(name) for name in tasks]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    out, data = Path(out), Path(data)
    config = {"tasks": tasks, "data": str(data), "split": split, "limit": limit, "batch_size": batch_size,
              "post_prompt": post_prompt, "generation": "greedy"}
    if is_endpoint_spec(model):
        base_url, name = parse_model_spec(model)
        cache = Path(cache) if cache is not None else out.parent / ".openai_cache"
        pipe = OpenAIBackend(base_url, name, concurrency=concurrency, cache_dir=cache)
        model_info = {"path": model, "endpoint": {"api": "openai-chat-completions", "base_url": base_url,
                                                  "model": name},
                      "fingerprint": hashlib.sha256(model.encode("utf-8")).hexdigest()}
        config |= {"cache": str(cache), "concurrency": concurrency}
    else:
        pipe = Pipeline.from_pretrained(model)
        model_info = {"path": str(model), "fingerprint": fingerprint(model)}
        generative = [t.name for t in resolved if t.evaluate is None]
        if not pipe.can_generate and generative:
            raise ConfigError(f"{model} is a dual encoder ({pipe.family.name}): it embeds, it does not answer, so "
                              f"task {generative[0]!r} cannot run; its tasks: "
                              f"{', '.join(t for t in TASKS if TASKS[t].evaluate is not None)}")
    results = {"vlmkit_version": __version__, "model": model_info, "config": config, "seed": seed, "tasks": {}}
    for task in resolved:
        result, records = run_task(pipe, task, data, split, limit, batch_size, post_prompt, seed, progress)
        results["tasks"][task.name] = result
        atomic_write_text(out.parent / f"predictions_{task.name}.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    results["wall_seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_json(out, results)
    write_report(results, out.with_suffix(".md"))
    return results


def write_report(results: dict, path: Path) -> None:
    """A markdown table of every task's metrics with its confidence interval, and a bar chart of the grouped
    headline scores (e.g. accuracy per question type) where a task has groups."""
    lines = [f"# vlmkit eval: {results['model']['path']}", "",
             f"model fingerprint `{results['model']['fingerprint'][:16]}`, split {results['config']['split']}, "
             f"seed {results['seed']}, {results['wall_seconds']:.0f} s", "",
             "| task | metric | value | 95% CI | samples | samples/s |", "|---|---|---|---|---|---|"]
    for name, r in results["tasks"].items():
        lo, hi = r["ci95"][r["metric"]]
        lines.append(f"| {name} | {r['metric']} | {r['metrics'][r['metric']]:.4f} | [{lo:.4f}, {hi:.4f}] | {r['n']} "
                     f"| {r['samples_per_second']:.1f} |")
    failed = {name: r["n_errors"] for name, r in results["tasks"].items() if r.get("n_errors")}
    if failed:
        lines += ["", "Samples the endpoint failed on (scored as empty answers; see `error` in the predictions): "
                  + ", ".join(f"{name} {n}" for name, n in failed.items())]
    for name, r in results["tasks"].items():
        groups = {k.split("/", 1)[1]: v for k, v in r["metrics"].items() if k.startswith(r["metric"] + "/")}
        if not groups:
            continue
        plot = path.with_name(f"{path.stem}_{name}.png")
        _bar_chart(groups, f"{name}: {r['metric']} by group", plot)
        lines += ["", f"## {name}", "", "| group | " + r["metric"] + " |", "|---|---|"]
        lines += [f"| {g} | {v:.4f} |" for g, v in groups.items()]
        lines += ["", f"![{name}]({plot.name})"]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _bar_chart(groups: dict[str, float], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(groups) + 1), 3))
    ax.bar(list(groups), list(groups.values()), color="#4c72b0")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
