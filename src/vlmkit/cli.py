"""The ``vlmkit`` command line. Each subcommand's help text is its function's docstring."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from pathlib import Path

from vlmkit.errors import ConfigError, VlmkitError


def cmd_demo(args) -> None:
    """Generate ShapesWorld, train tiny-llava from scratch, evaluate it on held-out questions, answer one."""
    from vlmkit.demo import run_demo

    run_demo(args.out, data=args.data, overrides=args.set, n_images=args.n, progress=not args.quiet)


def cmd_train(args) -> None:
    """Train from a recipe (YAML file or built-in name) with optional --set overrides."""
    from vlmkit.train.loop import train
    from vlmkit.train.recipe import load_recipe

    overrides = list(args.set)
    if args.skip_bad_samples:
        overrides.append("data.skip_bad_samples=true")
    recipe = load_recipe(args.recipe, overrides)
    out = args.out or f"runs/{recipe.name}"
    res = train(recipe, out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports for the run
        return
    print(json.dumps({"checkpoint": str(res.checkpoint), "steps": res.steps, "train_seconds": res.train_seconds,
                      "samples_per_second": res.samples_per_second, "val_loss": res.val_loss}))


def cmd_data_shard(args) -> None:
    """Write a dataset (LLaVA / COCO captions JSON, or CSV/TSV pairs) as WebDataset tar shards."""
    from vlmkit.data.shards import write_shards

    index = write_shards(args.src, args.out, args.samples_per_shard, image_root=args.image_root,
                         csv_image_key=args.csv_image_key, csv_caption_key=args.csv_caption_key,
                         csv_separator=args.csv_separator, progress=not args.quiet,
                         skip_bad=args.skip_bad_samples, verify_images=not args.no_verify_images,
                         overwrite=args.overwrite)
    print(json.dumps({"out": str(index.folder), "kind": index.kind, "shards": len(index.shards),
                      "samples": index.samples, "bytes": index.bytes, "skipped": index.skipped}))


def cmd_serve(args) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API (chat completions with images, streaming,
    embeddings for dual encoders) with continuous batching, and a chat page at /."""
    try:
        import uvicorn

        from vlmkit.serve.api import create_app
    except ImportError as e:
        raise ConfigError(f"vlmkit serve needs the web stack ({e.name} is missing): pip install 'vlmkit[serve]'") from e
    from vlmkit.pipeline import Pipeline
    from vlmkit.serve.engine import Engine

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    api_key = args.api_key or os.environ.get("VLMKIT_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it can use the model",
              file=sys.stderr)
    engine = Engine(Pipeline.from_pretrained(args.model), max_batch=args.max_batch, max_queue=args.max_queue,
                    max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_tokens)
    engine.model_name = args.name or Path(args.model).resolve().name
    app = create_app(engine, api_key=api_key, allow_local_files=args.allow_local_files,
                     max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                     request_timeout=args.timeout, max_body_bytes=args.max_body_bytes)
    engine.start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    finally:
        engine.stop()


def cmd_consolidate(args) -> None:
    """Write model.safetensors of a sharded (FSDP) checkpoint from its dcp/ shards, on one process."""
    from vlmkit.train.distributed import consolidate

    consolidate(args.path)
    print(json.dumps({"checkpoint": args.path, "model": f"{args.path}/model.safetensors"}))


def cmd_data_shapes(args) -> None:
    """Generate a ShapesWorld dataset (LLaVA JSON, COCO captions, CSV pairs, scene annotations)."""
    from vlmkit.data.shapes import generate_shapes, parse_size

    summary = generate_shapes(args.out, n=args.n, seed=args.seed, size=parse_size(args.size),
                              min_objects=args.min_objects, max_objects=args.max_objects,
                              allow_overlap=args.allow_overlap, overwrite=args.overwrite, progress=not args.quiet)
    if args.t2i:
        from vlmkit.eval.judge.pairs import write_t2i_pairs

        n_val = max(16, args.t2i // 20)
        for split, n in (("train", args.t2i), ("val", n_val)):
            path = write_t2i_pairs(args.out, n, seed=args.seed, size=parse_size(args.size), split=split,
                                   progress=not args.quiet)
            summary[f"t2i_pairs_{split}"] = {"file": path.name, "pairs": n}
    print(json.dumps(summary, indent=2))


def cmd_chat(args) -> None:
    """Answer a question about one or more images with a trained checkpoint."""
    import vlmkit

    pipe = vlmkit.load(args.model)
    print(pipe.chat(args.image or [], args.question, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed))


def cmd_eval(args) -> None:
    """Evaluate a model folder or OpenAI-compatible endpoint on tasks (see `vlmkit tasks`): results, a report."""
    from vlmkit.eval.runner import run_eval

    tasks = [t for t in args.tasks.split(",") if t]
    res = run_eval(args.model, tasks, args.data, args.out, split=args.split, limit=args.limit,
                   batch_size=args.batch_size, seed=args.seed, post_prompt=args.post_prompt.replace("\\n", "\n"),
                   progress=not args.quiet, cache=args.cache, concurrency=args.concurrency, retries=args.retries,
                   backoff=args.backoff, timeout=args.timeout)
    print(json.dumps({name: {r["metric"]: r["metrics"].get(r["metric"]), "n": r["n"]}
                      | ({"n_errors": r["n_errors"]} if r.get("n_errors") else {})
                      | ({"answers_from_cache": r["answers_from_cache"]} if r.get("answers_from_cache") else {})
                      for name, r in res["tasks"].items()}))
    failed = {name: r["n_errors"] for name, r in res["tasks"].items() if r["n_errors"]}
    if failed and not args.allow_errors:
        print(f"vlmkit: error: the endpoint failed on {sum(failed.values())} sample(s) "
              f"({', '.join(f'{k} {v}' for k, v in failed.items())}): they are left out of the metrics and listed "
              f"with their error in the predictions files beside {args.out}, which says \"complete\": false. Rerun "
              f"the same command to ask again for them only (answers are cached), or pass --allow-errors to accept "
              f"the results without them", file=sys.stderr)
        return 3
    return 0


def cmd_eval_report(args) -> None:
    """Compare several `vlmkit eval` runs (results.json files): one markdown table of models x tasks with the 95%
    confidence intervals, and a plot beside it."""
    from vlmkit.eval.report import compare_results

    out = compare_results(args.results, args.out, names=args.names.split(",") if args.names else None)
    print(json.dumps({"table": str(out), "plot": str(out.with_suffix(".png"))}))


def cmd_embed(args) -> None:
    """Embed images (every image file under a folder) or texts (a file, one per line) with a dual encoder (CLIP,
    SigLIP): an .npy of L2-normalised rows, and beside it the list of what each row is."""
    import numpy as np

    import vlmkit
    from vlmkit.errors import DataError
    from vlmkit.eval.readers import IMAGE_SUFFIXES
    from vlmkit.utils import atomic_write_bytes, atomic_write_text

    if (args.images is None) == (args.texts is None):
        raise ConfigError("give exactly one of --images DIR or --texts FILE")
    out = Path(args.out)
    if out.suffix != ".npy":
        raise ConfigError(f"--out {out}: the embeddings are written as a NumPy .npy file; name it X.npy")
    if args.images is not None:
        root = Path(args.images)
        if not root.is_dir():
            raise DataError(f"--images {root}: not a folder")
        items = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not items:
            raise DataError(f"--images {root}: no image files (ending in {', '.join(IMAGE_SUFFIXES)})")
    else:
        path = Path(args.texts)
        if not path.is_file():
            raise DataError(f"--texts {path}: file not found")
        items = path.read_text(encoding="utf-8").splitlines()
        blank = [i + 1 for i, t in enumerate(items) if not t.strip()]
        if blank or not items:
            raise DataError(f"--texts {path}: line {blank[0] if blank else 1} is empty; the file holds one text per "
                            f"line, every line a text")
    pipe = vlmkit.load(args.model)
    if args.images is not None:
        z = pipe.embed_images(items, batch_size=args.batch_size, progress=not args.quiet)
    else:
        z = pipe.embed_texts(items, batch_size=args.batch_size, progress=not args.quiet)
    buf = io.BytesIO()
    np.save(buf, z.numpy().astype(np.float32))
    listing = out.with_suffix(".images.txt" if args.images is not None else ".texts.txt")
    atomic_write_text(listing, "".join(t + "\n" for t in items))
    atomic_write_bytes(out, buf.getvalue())
    summary = {"out": str(out), "rows": int(z.shape[0]), "dim": int(z.shape[1]), "listing": str(listing)}
    if args.texts is not None:
        summary["truncated"] = pipe.last_truncated
    print(json.dumps(summary))


def cmd_generate_image(args) -> None:
    """Draw images for a text prompt with a model that generates them (tiny-janus): PNGs written into --out, the
    same images for the same --seed."""
    import vlmkit
    from vlmkit.utils import atomic_write_bytes

    pipe = vlmkit.load(args.model)
    images = pipe.generate_image(args.prompt, n=args.n, cfg_scale=args.cfg_scale, temperature=args.temperature,
                                 top_k=args.top_k, seed=args.seed, steps=args.steps, progress=not args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^a-z0-9]+", "-", args.prompt.lower()).strip("-")[:60] or "image"
    files = []
    for i, image in enumerate(images):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        path = out / f"{stem}-{args.seed if args.seed is not None else 'x'}-{i}.png"
        atomic_write_bytes(path, buf.getvalue())
        files.append(str(path))
    print(json.dumps({"prompt": args.prompt, "images": files, "size": list(images[0].size), "seed": args.seed}))


def cmd_tasks(args) -> None:
    """List the evaluation tasks with their metric and the data files they read."""
    import textwrap

    from vlmkit.eval.tasks import TASKS

    for name, t in sorted(TASKS.items()):
        print(f"{name}  [{t.metric}]")
        print(textwrap.fill(t.description, 110, initial_indent="    ", subsequent_indent="    "))
        print(textwrap.fill(f"reads: {t.data}", 110, initial_indent="    ", subsequent_indent="           "))


def cmd_convert(args) -> None:
    """Convert between a Hugging Face checkpoint folder and a vlmkit one (--from hf SRC, or --to hf SRC)."""
    from vlmkit.convert.hf import convert_from_hf, convert_to_hf

    if (args.from_ is None) == (args.to is None):
        raise ConfigError("give exactly one of --from hf (import a Hugging Face folder) or --to hf (export)")
    fn = convert_from_hf if args.from_ else convert_to_hf
    print(json.dumps(fn(args.src, args.out, overwrite=args.overwrite)))


def cmd_presets(args) -> None:
    """List model presets: parameters, tokens per image, and the transformers class their family converts to."""
    import torch

    from vlmkit.family import family_of
    from vlmkit.models import build_model, count_parameters
    from vlmkit.presets import PRESETS

    print(f"{'preset':<22} {'params':>15} {'img tokens':>11}  {'transformers class':<34} description")
    for name in PRESETS.names():
        preset = PRESETS.build(name)
        family = family_of(preset.model)
        with torch.device("meta"):
            model = build_model(preset.model, image_token_id=0)
        tokens, cls = family.image_tokens(model), family.export_class(preset.model) or "-"
        print(f"{name:<22} {count_parameters(model):>15,} {tokens:>11}  {cls:<34} {PRESETS.describe(name)}")


def cmd_recipes(args) -> None:
    """List built-in training recipes."""
    from vlmkit.train.recipe import builtin_recipes, load_recipe

    for name in builtin_recipes():
        r = load_recipe(name)
        stages = ", ".join(f"{s.name} ({'+'.join(s.train)}, {s.steps} steps)" for s in r.stages)
        print(f"{name:<16} preset {r.preset}; {stages}")


def _add_demo(sub) -> None:
    """``vlmkit demo``: data, training and evaluation end to end in one command."""
    d = sub.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    d.add_argument("--out", default="vlmkit-demo", help="output folder (default: vlmkit-demo)")
    d.add_argument("--data", help="ShapesWorld folder (default: OUT/data; generated if absent)")
    d.add_argument("--n", type=int, help="images to generate when the data is absent (default 4000)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(fn=cmd_demo)


def _add_train(sub) -> None:
    """``vlmkit train``: a recipe, its overrides and the run folder."""
    t = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    t.add_argument("recipe", help="a YAML file or a built-in recipe name (see `vlmkit recipes`)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. train.batch_size=16 or stages.0.steps=50")
    t.add_argument("--out", help="run folder (default: runs/RECIPE)")
    how = t.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
    how.add_argument("--overwrite", action="store_true",
                     help="start over in an OUT that holds a run, replacing its checkpoint and logs")
    t.add_argument("--skip-bad-samples", action="store_true", help="skip and count bad rows instead of failing")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train)


def _add_data(sub) -> None:
    """``vlmkit data shard`` and ``vlmkit data shapes``: the dataset tools, under one ``data`` command."""
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    sh = data.add_parser("shard", help=cmd_data_shard.__doc__, description=cmd_data_shard.__doc__)
    sh.add_argument("src", metavar="SRC",
                    help="a LLaVA or COCO captions JSON file (conversations), or a CSV/TSV of image-caption pairs")
    sh.add_argument("--out", required=True, help="output folder of the shards and index.json")
    sh.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar (default 1000)")
    sh.add_argument("--image-root", help="folder the image paths are relative to (default: SRC's folder)")
    sh.add_argument("--csv-image-key", default="image", help="CSV/TSV column of the image path")
    sh.add_argument("--csv-caption-key", default="caption", help="CSV/TSV column of the caption")
    sh.add_argument("--csv-separator", default="", help="CSV/TSV separator (default: by extension)")
    sh.add_argument("--skip-bad-samples", action="store_true", help="skip and count bad rows instead of failing")
    sh.add_argument("--no-verify-images", action="store_true",
                    help="do not decode every image while writing (faster; corrupt ones reach training)")
    sh.add_argument("--overwrite", action="store_true", help="replace the shards of an existing folder")
    sh.add_argument("--quiet", action="store_true", help="no progress bar")
    sh.set_defaults(fn=cmd_data_shard)
    s = data.add_parser("shapes", help=cmd_data_shapes.__doc__, description=cmd_data_shapes.__doc__)
    s.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    s.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", default="64", help="canvas size: PX or WIDTHxHEIGHT (default 64)")
    s.add_argument("--min-objects", type=int, default=1)
    s.add_argument("--max-objects", type=int, default=6)
    s.add_argument("--allow-overlap", action="store_true", help="let objects overlap partially")
    s.add_argument("--t2i", type=int, default=0, metavar="N",
                   help="also N text-to-image training pairs (t2i_pairs_train.csv: shapes_t2i's prompt types, "
                        "held-out prompts excluded) and N/20 validation pairs, for tiny-janus")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_data_shapes)


def _add_checkpoint(sub) -> None:
    """``vlmkit checkpoint consolidate``: the checkpoint tools, under one ``checkpoint`` command."""
    ck = sub.add_parser("checkpoint", help="checkpoint tools").add_subparsers(dest="checkpoint_command",
                                                                              required=True)
    co = ck.add_parser("consolidate", help=cmd_consolidate.__doc__, description=cmd_consolidate.__doc__)
    co.add_argument("path", help="a checkpoint folder with sharded state (dcp/)")
    co.set_defaults(fn=cmd_consolidate)


def _add_serve(sub) -> None:
    """``vlmkit serve``: the model, where it listens, who may call it, and the limits on a request."""
    sv = sub.add_parser("serve", help=cmd_serve.__doc__, description=cmd_serve.__doc__)
    sv.add_argument("--model", required=True, help="a vlmkit checkpoint or Hugging Face folder")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $VLMKIT_API_KEY, else none)")
    sv.add_argument("--name", help="the model id in the API (default: the folder's name)")
    sv.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default 16)")
    sv.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default 64)")
    sv.add_argument("--max-prompt-tokens", type=int, default=4096)
    sv.add_argument("--max-tokens", type=int, default=1024, help="the largest max_tokens a request may ask")
    sv.add_argument("--timeout", type=float, default=120.0, help="seconds per request before 504 (default 120)")
    sv.add_argument("--max-image-bytes", type=int, default=20 * 2**20)
    sv.add_argument("--max-image-pixels", type=int, default=64_000_000)
    sv.add_argument("--max-body-bytes", type=int, default=50 * 2**20, help="largest request body (default 50 MiB)")
    sv.add_argument("--allow-local-files", action="store_true",
                    help="let image_url name a file on this machine (off: data URLs only)")
    sv.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    sv.add_argument("--quiet", action="store_true", help="log warnings only")
    sv.set_defaults(fn=cmd_serve)


def _add_chat(sub) -> None:
    """``vlmkit chat``: one question about some images, and the sampling settings."""
    c = sub.add_parser("chat", help=cmd_chat.__doc__, description=cmd_chat.__doc__)
    c.add_argument("--model", required=True, help="checkpoint folder")
    c.add_argument("--image", action="append", help="image file (repeat for several)")
    c.add_argument("question")
    c.add_argument("--max-new-tokens", type=int, default=32)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--seed", type=int)
    c.set_defaults(fn=cmd_chat)


def _add_eval(sub) -> None:
    """``vlmkit eval``: the model or endpoint, the tasks and their data, and ``vlmkit tasks`` that lists them."""
    ev = sub.add_parser("eval", help=cmd_eval.__doc__, description=cmd_eval.__doc__,
                        epilog="`vlmkit eval report RESULTS.json...` compares several runs in one table and plot "
                        "(see `vlmkit eval report --help`).")
    ev.add_argument("--model", required=True, help="a vlmkit checkpoint or Hugging Face folder, or "
                    "openai:BASE_URL#MODEL for an OpenAI-compatible chat-completions endpoint (API key from "
                    "OPENAI_API_KEY if set), e.g. openai:http://127.0.0.1:8000/v1#my-model for a vLLM server")
    ev.add_argument("--tasks", required=True, help="comma-separated task names (see `vlmkit tasks`)")
    ev.add_argument("--data", required=True, help="the folder holding the tasks' files (e.g. a ShapesWorld folder)")
    ev.add_argument("--out", default="results.json", help="results file; predictions and report go beside it")
    ev.add_argument("--split", default="test", help="the split whose files are read (default test)")
    ev.add_argument("--limit", type=int, help="at most this many samples per task")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--post-prompt", default="", help="text appended to every question, e.g. LLaVA-1.5's "
                    "'\\nAnswer the question using a single word or phrase.' (\\n is a newline)")
    ev.add_argument("--cache", help="endpoint only: where answers are cached so an interrupted run resumes "
                    "(default: .openai_cache beside --out)")
    ev.add_argument("--concurrency", type=int, default=4, help="endpoint only: requests in flight (default 4)")
    ev.add_argument("--retries", type=int, default=3, help="endpoint only: times a request that failed on a "
                    "connection error, timeout, HTTP 429 or 5xx is asked again (default 3)")
    ev.add_argument("--backoff", type=float, default=1.0, help="endpoint only: seconds before the first retry, "
                    "doubled each time; a server's Retry-After wins when longer (default 1)")
    ev.add_argument("--timeout", type=float, default=60.0, help="endpoint only: seconds an attempt may take to "
                    "connect or between reads (default 60)")
    ev.add_argument("--allow-errors", action="store_true", help="exit 0 even when the endpoint failed on samples "
                    "(they are left out of the metrics either way)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(fn=cmd_eval)
    sub.add_parser("tasks", help=cmd_tasks.__doc__).set_defaults(fn=cmd_tasks)


def _eval_report_parser() -> argparse.ArgumentParser:
    """``vlmkit eval report RESULTS.json...`` (a parser of its own: ``vlmkit eval`` itself takes options only)."""
    p = argparse.ArgumentParser(prog="vlmkit eval report", description=cmd_eval_report.__doc__)
    p.add_argument("results", nargs="+", help="results.json files written by `vlmkit eval`")
    p.add_argument("--out", default="comparison.md", help="the markdown table; the plot goes beside it as .png")
    p.add_argument("--names", help="comma-separated model names for the table, one per results file (default: "
                   "each run's model path or endpoint model)")
    p.set_defaults(fn=cmd_eval_report)
    return p


def _add_embed(sub) -> None:
    """``vlmkit embed``: a dual encoder, images or texts to embed, and the .npy to write."""
    em = sub.add_parser("embed", help=cmd_embed.__doc__, description=cmd_embed.__doc__)
    em.add_argument("--model", required=True, help="a dual-encoder checkpoint (vlmkit or Hugging Face CLIP/SigLIP)")
    em.add_argument("--images", help="a folder: every image file under it, in sorted path order")
    em.add_argument("--texts", help="a text file with one text per line")
    em.add_argument("--out", required=True, help="X.npy; X.images.txt or X.texts.txt beside it lists the rows")
    em.add_argument("--batch-size", type=int, default=64)
    em.add_argument("--quiet", action="store_true", help="no progress bar")
    em.set_defaults(fn=cmd_embed)


def _add_generate_image(sub) -> None:
    """``vlmkit generate-image``: a model that draws, a prompt, where the PNGs go and the sampling options."""
    g = sub.add_parser("generate-image", help=cmd_generate_image.__doc__, description=cmd_generate_image.__doc__)
    g.add_argument("prompt", help='what to draw, e.g. "a red circle left of a blue square"')
    g.add_argument("--model", required=True, help="a checkpoint that generates images (e.g. runs/tiny-janus/checkpoint)")
    g.add_argument("--out", required=True, help="folder for the PNGs (created if missing)")
    g.add_argument("--n", type=int, default=4, help="images to draw (default 4)")
    g.add_argument("--seed", type=int, help="the same seed draws the same images")
    g.add_argument("--cfg-scale", type=float, default=5.0, help="classifier-free guidance (1: none; default 5)")
    g.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default 1)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely codes (0: all)")
    g.add_argument("--steps", type=int, default=0,
                   help="denoising / unmasking steps of a diffusion or mask-predict model (0: its default)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(fn=cmd_generate_image)


def _add_convert(sub) -> None:
    """``vlmkit convert``: the direction (--from hf or --to hf), the source and the output folder."""
    cv = sub.add_parser("convert", help=cmd_convert.__doc__, description=cmd_convert.__doc__)
    cv.add_argument("--from", dest="from_", choices=["hf"], help="SRC is a Hugging Face folder: import it")
    cv.add_argument("--to", choices=["hf"], help="SRC is a vlmkit checkpoint: export it for transformers")
    cv.add_argument("src", help="the folder to convert")
    cv.add_argument("--out", required=True, help="output folder (written only when the conversion completes)")
    cv.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    cv.set_defaults(fn=cmd_convert)


def build_parser() -> argparse.ArgumentParser:
    """The ``vlmkit`` parser: one ``_add_*`` helper per command group, called in the order ``vlmkit --help``
    lists the commands; each command's function is in ``args.fn``."""
    p = argparse.ArgumentParser(prog="vlmkit", description="Build, train, evaluate and serve vision-language models.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_train(sub)
    _add_data(sub)
    _add_checkpoint(sub)
    _add_serve(sub)
    _add_chat(sub)
    _add_eval(sub)  # and `tasks`, listed right after it
    _add_embed(sub)
    _add_generate_image(sub)
    _add_convert(sub)
    sub.add_parser("presets", help=cmd_presets.__doc__).set_defaults(fn=cmd_presets)
    sub.add_parser("recipes", help=cmd_recipes.__doc__).set_defaults(fn=cmd_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    report = argv[:2] == ["eval", "report"]
    args = _eval_report_parser().parse_args(argv[2:]) if report else build_parser().parse_args(argv)
    try:
        rc = args.fn(args)
    except VlmkitError as e:
        print(f"vlmkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlmkit: interrupted", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
