"""Serving throughput: N concurrent clients x M chat requests against `vlmkit serve`, and the same requests sent
one at a time, as one JSON line.

    python bench/serve.py [--model vlmkit-demo/checkpoint] [--clients 16] [--requests 8] [--max-tokens 16]

The server runs as its own process (`vlmkit serve`, as users start it); the clients are threads of this process
sending OpenAI-shaped requests over HTTP (kept-alive stdlib connections) with a ShapesWorld scene each (a data URL, distinct images so the
feature cache does not help) and a question from ShapesWorld's question types, greedy. Figures: requests/s,
generated tokens/s, p50/p99 latency of each phase, errors, and ``concurrent_vs_sequential_requests_ratio``,
the bar of issue 7 (>= 3 with 16 clients on the demo checkpoint). Ratios are meaningful on a noisy machine,
absolute times are not.

Before the timed phases, ``--hostile N`` (default 1000) malformed and hostile requests are sent (the seeded
generator of tests/serve/test_fuzz.py: broken JSON and base64, wrong types, decompression bombs, oversized
bodies, wrong keys, ...): the line reports their status codes and how many were not 4xx (the bar: none), and
the throughput phases that follow show the server still answering.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from vlmkit.data.shapes import render_scene, sample_scene

QUESTIONS = ["What shape is the {c} object?", "How many objects are there?", "Is there a {c} shape?",
             "What colour is the {s}?", "Describe the image."]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_requests(n: int, max_tokens: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        render_scene(sample_scene(rng, 64, 64, min_objects=1, max_objects=5)).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        q = rng.choice(QUESTIONS).format(c=rng.choice(COLOURS), s=rng.choice(SHAPES))
        out.append({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                              {"type": "text", "text": q}]}],
                    "max_tokens": max_tokens, "temperature": 0})
    return out


KEY = "bench-key"


def hostile(base: str, n: int) -> dict:
    """n requests of the API tests' fuzzer (tests/serve/test_fuzz.py: the bench runs from a checkout) -> status
    counts."""
    from test_fuzz import Bank, Fuzzer

    rng = random.Random(20240611)
    fuzzer, statuses, dropped = Fuzzer(rng, Bank(rng), KEY), {}, 0
    with httpx.Client(base_url=base, timeout=60) as client:
        for _ in range(n):
            _, method, path, headers, body = fuzzer.request()
            try:
                code = client.request(method, path, headers=headers, content=body).status_code
                statuses[code] = statuses.get(code, 0) + 1
            except httpx.HTTPError:
                dropped += 1
    bad = dropped + sum(v for k, v in statuses.items() if not 400 <= k < 500)
    return {"requests": n, "not_4xx": bad, "dropped": dropped, "statuses": dict(sorted(statuses.items()))}


def send(conn: http.client.HTTPConnection, body: bytes) -> tuple[float, int, bool]:
    """One request on a kept-alive connection (the stdlib client: a light load generator, so that the clients'
    own CPU takes as little as possible from the server on a 2-core machine)."""
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json",
                                                             "Authorization": f"Bearer {KEY}"})
        r = conn.getresponse()
        data = r.read()
        ok = r.status == 200
        tokens = json.loads(data)["usage"]["completion_tokens"] if ok else 0
    except (OSError, http.client.HTTPException, ValueError):
        ok, tokens = False, 0
        conn.close()
    return time.perf_counter() - t0, tokens, ok


def phase(base: str, bodies: list[dict], clients: int) -> dict:
    results: list[tuple[float, int, bool]] = []
    lock = threading.Lock()
    encoded = [json.dumps(b).encode() for b in bodies]
    chunks = [encoded[i::clients] for i in range(clients)]
    host, port = base.removeprefix("http://").split(":")

    def worker(chunk):
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
        for body in chunk:
            res = send(conn, body)
            with lock:
                results.append(res)
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(ch,)) for ch in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    return {"requests": len(results), "errors": sum(not r[2] for r in results), "seconds": round(wall, 2),
            "requests_per_s": round(len(results) / wall, 2),
            "generated_tokens_per_s": round(sum(r[1] for r in results) / wall, 1),
            "p50_latency_s": round(lat[len(lat) // 2], 3), "p99_latency_s": round(lat[min(len(lat) - 1,
                                                                                         int(0.99 * len(lat)))], 3)}


def counters(base: str) -> dict[str, float]:
    """The server's unlabelled Prometheus samples."""
    out = {}
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vlmkit-demo/checkpoint")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=16, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--hostile", type=int, default=1000, help="malformed requests first (0: none)")
    ap.add_argument("--threads", type=int, default=0,
                    help="the server's torch threads (0: torch's default, one per core)")
    args = ap.parse_args()
    if not Path(args.model).is_dir():
        sys.exit(f"{args.model} not found: run `vlmkit demo` first, or pass --model")
    # the API tests' limits, which their fuzzer's requests are built to break (tests/serve/conftest.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
    from conftest import MAX_BODY, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_NEW_TOKENS

    limits = ["--max-tokens", str(MAX_NEW_TOKENS), "--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-image-pixels",
              str(MAX_IMAGE_PIXELS), "--max-body-bytes", str(MAX_BODY)]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "vlmkit", "serve", "--model", args.model, "--port", str(port),
                               "--max-batch", str(args.clients), "--max-queue", str(4 * args.clients),
                               "--threads", str(args.threads), "--api-key", KEY, "--quiet", *limits],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                sys.exit(f"the server exited: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        attack = hostile(base, args.hostile) if args.hostile else None
        bodies = make_requests(args.clients * args.requests, args.max_tokens)
        phase(base, make_requests(4, args.max_tokens, seed=1), 1)  # warm-up
        sequential = phase(base, bodies, 1)
        before = counters(base)
        concurrent = phase(base, bodies, args.clients)
        after = counters(base)
        concurrent["mean_decode_batch"] = round(
            (after["vlmkit_decoded_rows_total"] - before["vlmkit_decoded_rows_total"])
            / max(after["vlmkit_decode_steps_total"] - before["vlmkit_decode_steps_total"], 1), 2)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps({"bench": "serve", "config": vars(args), "hostile": attack, "sequential": sequential,
                      "concurrent": concurrent,
                      "concurrent_vs_sequential_requests_ratio": round(
                          concurrent["requests_per_s"] / sequential["requests_per_s"], 2)}))


if __name__ == "__main__":
    main()
