"""``vlmkit eval``: run tasks on a model and write results.json, per-sample predictions and a report.

The model answers through :class:`~vlmkit.pipeline.Pipeline` (its chat template, batched greedy generation), so
it answers as it does everywhere else. results.json holds each task's metrics, sample count, bootstrap 95%
confidence interval of its headline metric, wall time and samples/s, with the resolved config, a fingerprint of
the model's files and the seed; ``predictions_<task>.jsonl`` holds every sample's prompt, prediction, references
and scores; ``<results>.md`` is a report with a plot of the grouped scores. Everything is written atomically.

A task's ``evaluate`` may return, among its extra metrics, a PIL image under the reserved key ``"_grid"`` (e.g.
``shapes_t2i``'s generated images with their verdicts): it is not a metric; the runner saves it as
``<results>_<task>_grid.png`` beside results.json, records the file's name as the task's ``"grid"`` and shows it in
the report.

``model`` may also be ``openai:BASE_URL#MODEL``, an OpenAI-compatible endpoint (:mod:`vlmkit.eval.backends`):
its requests run concurrently, its answers are cached on disk so an interrupted run resumes (and reports the time
of the whole evaluation and how many answers came from the cache), and the fingerprint is the sha256 of the spec.
A sample the endpoint failed on (after its retries) is never scored: it is left out of every metric, recorded with
its ``"error"`` in the predictions, counted in ``n_errors``, and results.json says ``"complete": false``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from vlmkit.version import __version__
from vlmkit.errors import ConfigError
from vlmkit.eval import backends
from vlmkit.eval.backends import Answer, OpenAIBackend, is_endpoint_spec, parse_model_spec
from vlmkit.eval.metrics.stats import bootstrap_ci
from vlmkit.eval.readers import EvalSample, load_media
from vlmkit.eval.tasks import TASKS, Task, aggregate, get_task
from vlmkit.utils import atomic_write_bytes, atomic_write_json, atomic_write_text

GRID_KEY = "_grid"  # a task's extra metric that is an image to save, not a metric (module docstring)


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
             seed: int = 0, progress: bool = True, ledger: RunLedger | None = None,
             samples: list[EvalSample] | None = None) -> tuple[dict, list[dict]]:
    """(the task's results, its per-sample records). Answers are stripped of surrounding whitespace before they
    are scored, as LLaVA's and lmms-eval's evaluation scripts do; ``post_prompt`` is appended to every prompt
    (e.g. LLaVA-1.5's "\nAnswer the question using a single word or phrase."). A sample the model failed on (an
    endpoint's request that failed after its retries) is left out of every metric, with the samples scored
    together with it (``Task.failure_unit``), and recorded with its ``error``; ``n_errors`` counts them.
    ``ledger`` (an endpoint's) adds the seconds of earlier, interrupted runs of the task to this one's.
    ``samples``: the task's samples if they were read already (else they are read here)."""
    samples = task.read(data, split, limit) if samples is None else samples
    t0 = time.perf_counter()
    if task.evaluate is not None:  # a ranking task: no generation
        return _run_ranking(pipe, task, samples, data, seed, progress, t0)
    prompts = [task.prompt(s) + post_prompt for s in samples]
    answers: list[str | None] = [None] * len(samples)
    errors: list[str | None] = [None] * len(samples)
    n_cached = 0
    bar = tqdm(total=len(samples), desc=task.name, unit="sample", disable=not progress, dynamic_ncols=True)
    try:
        for a in _answers(pipe, samples, prompts, task.max_new_tokens, batch_size):
            answers[a.index], errors[a.index] = (a.answer.strip() if a.answer is not None else None), a.error
            n_cached += a.cached
            bar.update(1)
            if a.error is not None or a.cached:
                bar.set_postfix(errors=sum(e is not None for e in errors), cached=n_cached, refresh=False)
            if ledger is not None:
                ledger.tick(time.perf_counter() - t0)
    finally:
        bar.close()
        if ledger is not None:
            ledger.save(time.perf_counter() - t0)
    result, records = _score(task, samples, prompts, answers, errors, seed)
    seconds = time.perf_counter() - t0
    total = seconds + (ledger.before if ledger is not None else 0.0)
    result |= {"seconds": round(total, 3), "samples_per_second": round(len(samples) / max(total, 1e-9), 3)}
    if ledger is not None:
        result |= {"runs": ledger.runs + 1, "seconds_this_run": round(seconds, 3), "answers_from_cache": n_cached}
    return result, records


def _answers(pipe, samples: list[EvalSample], prompts: list[str], max_new_tokens: int,
             batch_size: int) -> Iterator[Answer]:
    """The model's answer to every sample, as :class:`Answer` s: an endpoint streams them as its concurrent
    requests finish; a Pipeline generates ``batch_size`` at a time (its images decoded per batch)."""
    if isinstance(pipe, backends.OpenAIBackend):
        yield from pipe.stream(((s.images, p) for s, p in zip(samples, prompts)), max_new_tokens=max_new_tokens)
        return
    for start in range(0, len(samples), batch_size):
        chunk = range(start, min(start + batch_size, len(samples)))
        decoded: dict[int, object] = {}  # an embedded image several samples share (MMBench's copies): decoded
        for im in (im for i in chunk for im in samples[i].images):  # once, so the Pipeline encodes it once
            if id(im) not in decoded:
                decoded[id(im)] = load_media(im)
        out = pipe.chat_batch([([decoded[id(im)] for im in samples[i].images], prompts[i]) for i in chunk],
                              max_new_tokens=max_new_tokens)
        yield from (Answer(i, answer) for i, answer in zip(chunk, out))


def _score(task: Task, samples: list[EvalSample], prompts: list[str], answers: list[str | None],
           errors: list[str | None], seed: int) -> tuple[dict, list[dict]]:
    """Scores and metrics over the samples answered (those failed, and their ``failure_unit``, left out), and a
    record per sample in the task's order."""
    failed_units = {u for s, e in zip(samples, errors) if e is not None for u in task.units(s)}
    records, kept, scores = [], [], []
    for i, (s, prompt, answer, error) in enumerate(zip(samples, prompts, answers, errors)):
        record = {"id": s.id, "images": [str(p) for p in s.images], "prompt": prompt, "prediction": answer,
                  "answers": s.answers}
        shared = [u for u in task.units(s) if u in failed_units] if error is None else []
        if error is not None:
            record["error"] = error
        elif shared:
            record["excluded"] = f"another sample scored with it failed ({shared[0]!r})"
        else:
            score = task.score(answer, s)
            scores.append(score)
            kept.append(i)
            record |= score
        records.append(record | {"meta": s.meta})
    kept_samples, predictions = [samples[i] for i in kept], [answers[i] for i in kept]
    metrics = aggregate(task, scores, kept_samples, predictions) if kept else {}
    headline = metrics.pop("_per_sample", None) or [sc[task.metric] for sc in scores]
    n_errors = sum(e is not None for e in errors)
    result = {"metric": task.metric, "metrics": metrics, "n": len(kept), "n_errors": n_errors,
              "n_excluded": len(samples) - len(kept) - n_errors,
              "ci95": {task.metric: list(bootstrap_ci(headline, seed=seed)) if headline else None}}
    return result, records


def _run_ranking(pipe, task: Task, samples: list[EvalSample], data: Path, seed: int, progress: bool,
                 t0: float) -> tuple[dict, list[dict]]:
    """A task that ranks candidates by the model's likelihoods or embeddings (no generation)."""
    if not (pipe.can_score or pipe.can_embed or pipe.can_generate_images):  # a model that draws but does not chat
        raise ConfigError(f"task {task.name!r} ranks candidates by the model's likelihoods; an endpoint only "
                          f"generates text: evaluate a checkpoint or folder")
    predictions, scores, extra = task.evaluate(pipe, samples, data, progress)
    figure = extra.pop(GRID_KEY, None)
    records = [{"id": s.id, "images": [str(p) for p in s.images], "prompt": task.prompt(s), "prediction": p,
                "answers": s.answers, **sc, "meta": {k: v for k, v in s.meta.items() if k != "classes"}}
               for s, p, sc in zip(samples, predictions, scores)]
    seconds = time.perf_counter() - t0
    metrics = {**aggregate(task, scores, samples, predictions), **extra}
    result = {"metric": task.metric, "metrics": metrics, "n": len(samples), "n_errors": 0, "n_excluded": 0,
              "ci95": {task.metric: list(bootstrap_ci([s[task.metric] for s in scores], seed=seed))},
              "seconds": round(seconds, 3), "samples_per_second": round(len(samples) / max(seconds, 1e-9), 3)}
    if figure is not None:
        result[GRID_KEY] = figure  # saved by run_eval (save_grid), which knows where results go
    return result, records


def save_grid(result: dict, out: Path, task: str) -> None:
    """Save a task's ``"_grid"`` image (popped from ``result``) as ``<out stem>_<task>_grid.png`` and record the
    file's name as ``result["grid"]``."""
    import io

    figure = result.pop(GRID_KEY, None)
    if figure is None:
        return
    path = out.with_name(f"{out.stem}_{task}_grid.png")
    buffer = io.BytesIO()
    figure.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    result["grid"] = path.name


class RunLedger:
    """How long earlier runs of one task against one endpoint cache took, so a run that resumes an interrupted one
    reports the time of the whole evaluation. One small JSON file per (endpoint, model, task, data, settings)
    under ``<cache>/runs/``, rewritten at most every ``every`` seconds and when the run stops (Ctrl-C included),
    so a killed run loses at most that much of its time."""

    def __init__(self, cache_dir: Path, identity: dict, every: float = 2.0):
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:32]
        self.path, self.every, self._saved_at = Path(cache_dir) / "runs" / f"{key}.json", every, 0.0
        try:
            entry = json.loads(self.path.read_text(encoding="utf-8"))
            self.before, self.runs = float(entry["seconds"]), int(entry["runs"])
        except (OSError, ValueError, KeyError, TypeError):  # the first run (or an unreadable ledger: start over)
            self.before, self.runs = 0.0, 0

    def tick(self, elapsed: float) -> None:
        if elapsed - self._saved_at >= self.every:
            self.save(elapsed)

    def save(self, elapsed: float) -> None:
        self._saved_at = elapsed
        atomic_write_json(self.path, {"seconds": round(self.before + elapsed, 3), "runs": self.runs + 1})


def run_eval(model: str | Path, tasks: list[str], data: str | Path, out: str | Path, split: str = "test",
             limit: int | None = None, batch_size: int = 32, seed: int = 0, post_prompt: str = "",
             progress: bool = True, cache: str | Path | None = None, concurrency: int = 4, retries: int = 3,
             backoff: float = 1.0, timeout: float = 60.0) -> dict:
    """Evaluate the model folder, or the endpoint ``openai:BASE_URL#MODEL``, on ``tasks`` (names) with the data
    under ``data``; write ``out`` (results.json), ``predictions_<task>.jsonl`` beside it and ``<out>.md``. Unknown
    task names fail before the model loads. An endpoint gets ``concurrency`` requests in flight (each tried
    ``1 + retries`` times, ``backoff`` seconds doubling in between, ``timeout`` seconds per attempt) and caches its
    answers under ``cache`` (default: ``.openai_cache`` beside ``out``). ``results["complete"]`` is False when
    samples failed (they are left out of the metrics and listed in the predictions)."""
    import torch

    resolved = [get_task(name) for name in tasks]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    out, data = Path(out), Path(data)
    # every task's data read and checked before the model loads: a missing or malformed file of the last task is
    # named at once, not after the others ran (results.json is written only when all tasks have run)
    read = {task.name: task.read(data, split, limit) for task in resolved}
    config = {"tasks": tasks, "data": str(data), "split": split, "limit": limit, "batch_size": batch_size,
              "post_prompt": post_prompt, "generation": "greedy"}
    if is_endpoint_spec(model):
        base_url, name = parse_model_spec(model)
        cache = Path(cache) if cache is not None else out.parent / ".openai_cache"
        pipe = OpenAIBackend(base_url, name, concurrency=concurrency, retries=retries, backoff=backoff,
                             timeout=timeout, cache_dir=cache)
        model_info = {"path": model, "endpoint": {"api": "openai-chat-completions", "base_url": base_url,
                                                  "model": name},
                      "fingerprint": hashlib.sha256(model.encode("utf-8")).hexdigest()}
        config |= {"cache": str(cache), "concurrency": concurrency, "retries": retries, "backoff": backoff,
                   "timeout": timeout}
    else:
        pipe, model_info = _load_checkpoint(model, resolved)
    refusals = [f"task {t.name!r}: {why}" for t in resolved if t.refuse is not None and (why := t.refuse(pipe))]
    if refusals:
        raise ConfigError("; ".join(refusals))
    results = {"vlmkit_version": __version__, "model": model_info, "config": config, "seed": seed, "tasks": {}}
    for task in resolved:
        ledger = None
        if isinstance(pipe, backends.OpenAIBackend):
            ledger = RunLedger(cache, {"url": pipe.url, "model": pipe.model, "task": task.name, "data": str(
                data.resolve()), "split": split, "limit": limit, "post_prompt": post_prompt})
        result, records = run_task(pipe, task, data, split, limit, batch_size, post_prompt, seed, progress, ledger,
                                   read[task.name])
        save_grid(result, out, task.name)
        results["tasks"][task.name] = result
        atomic_write_text(out.parent / f"predictions_{task.name}.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    results["wall_seconds"] = round(time.perf_counter() - t0, 3)
    results["complete"] = not any(r["n_errors"] for r in results["tasks"].values())
    atomic_write_json(out, results)
    write_report(results, out.with_suffix(".md"))
    return results


def _load_checkpoint(model: str | Path, tasks: list[Task]):
    """(the Pipeline of a checkpoint or Hugging Face folder, what results.json says of it); a dual encoder is
    refused for the tasks that need answers."""
    from vlmkit.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model)
    generative = [t.name for t in tasks if t.evaluate is None]
    if not pipe.can_generate and generative:
        raise ConfigError(f"{model} is a dual encoder ({pipe.family.name}): it embeds, it does not answer, so "
                          f"task {generative[0]!r} cannot run; its tasks: "
                          f"{', '.join(t for t in TASKS if TASKS[t].evaluate is not None)}")
    return pipe, {"path": str(model), "fingerprint": fingerprint(model)}


def write_report(results: dict, path: Path) -> None:
    """A markdown table of every task's metrics with its confidence interval, and a bar chart of the grouped
    headline scores (e.g. accuracy per question type) where a task has groups."""
    lines = [f"# vlmkit eval: {results['model']['path']}", "",
             f"model fingerprint `{results['model']['fingerprint'][:16]}`, split {results['config']['split']}, "
             f"seed {results['seed']}, {results['wall_seconds']:.0f} s", "",
             "| task | metric | value | 95% CI | samples | samples/s |", "|---|---|---|---|---|---|"]
    for name, r in results["tasks"].items():
        value, ci = r["metrics"].get(r["metric"]), r["ci95"][r["metric"]]
        shown = (f"{value:.4f} | [{ci[0]:.4f}, {ci[1]:.4f}]" if value is not None and ci else "n/a | n/a")
        lines.append(f"| {name} | {r['metric']} | {shown} | {r['n']} | {r['samples_per_second']:.1f} |")
    resumed = {name: r for name, r in results["tasks"].items() if r.get("runs", 1) > 1 or r.get("answers_from_cache")}
    if resumed:
        lines += ["", "Resumed or repeated against the answer cache (times are of the whole evaluation): " + ", ".join(
            f"{name} {r['answers_from_cache']} of {r['n'] + r['n_errors'] + r['n_excluded']} answers from the cache, "
            f"{r['runs']} runs, {r['seconds_this_run']:.1f} s this run" for name, r in resumed.items())]
    failed = {name: r for name, r in results["tasks"].items() if r.get("n_errors")}
    if failed:
        lines += ["", "**Incomplete**: samples the endpoint failed on are left out of every metric (their `error` is "
                  "in the predictions; a rerun with the same cache asks only for them): " + ", ".join(
                      f"{name} {r['n_errors']} failed" + (f" + {r['n_excluded']} scored with them" if r.get(
                          "n_excluded") else "") for name, r in failed.items())]
    for name, r in results["tasks"].items():
        groups = {k.split("/", 1)[1]: v for k, v in r["metrics"].items() if k.startswith(r["metric"] + "/")}
        if not groups:
            continue
        plot = path.with_name(f"{path.stem}_{name}.png")
        _bar_chart(groups, f"{name}: {r['metric']} by group", plot)
        lines += ["", f"## {name}", "", "| group | " + r["metric"] + " |", "|---|---|"]
        lines += [f"| {g} | {v:.4f} |" for g, v in groups.items()]
        lines += ["", f"![{name}]({plot.name})"]
    for name, r in results["tasks"].items():
        if r.get("grid"):
            lines += ["", f"## {name}: samples", "", f"![{name} samples]({r['grid']})"]
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
