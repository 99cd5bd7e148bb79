"""An endpoint evaluation with failing requests: how much a few requests that keep failing (retried, then given up)
slow down the whole task, streamed through one pool (vlmkit's way) versus sent one batch at a time (the way
vlmkit did before: a retrying request held up its batch, and every batch after it waited). One JSON line.

    python bench/eval_endpoint.py [--samples 814] [--fail 0.02] [--latency 0.008] [--concurrency 4]
                                  [--batch-size 32] [--retries 3] [--backoff 0.25]

A local fake chat-completions server answers every request after ``--latency`` seconds, and fails (HTTP 500)
every request of a ``--fail`` fraction of the questions; the client retries those ``--retries`` times, the back-off
doubling from ``--backoff``. Both ways run in the same process on the same requests (fresh caches), so their ratio
is meaningful on a noisy machine; absolute seconds are not. The "per batch" way is the same backend asked with
``chat_batch`` one batch after another, as the old runner did.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from vlmkit.eval.backends import OpenAIBackend


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = body["messages"][0]["content"][-1]["text"]
        time.sleep(self.server.latency)
        failing = question in self.server.failing
        data = json.dumps({"error": {"message": "fake"}} if failing else
                          {"choices": [{"message": {"role": "assistant", "content": "yes"}}]}).encode()
        self.send_response(500 if failing else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=814)
    ap.add_argument("--fail", type=float, default=0.02, help="fraction of questions whose requests always fail")
    ap.add_argument("--latency", type=float, default=0.008, help="seconds the fake takes per request")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--retries", type=int, default=3)
    ap.add_argument("--backoff", type=float, default=0.25)
    args = ap.parse_args()
    questions = [f"Is there object {i}?" for i in range(args.samples)]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads, server.latency = True, args.latency
    server.failing = set(random.Random(0).sample(questions, round(args.fail * args.samples)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    requests = [(image, q) for q in questions]
    seconds, errors = {}, 0
    for way in ("per_batch", "streamed", "streamed_no_failures"):
        with tempfile.TemporaryDirectory() as cache:
            backend = OpenAIBackend(url, "fake", concurrency=args.concurrency, retries=args.retries,
                                    backoff=args.backoff, timeout=10, cache_dir=cache)
            failing, server.failing = server.failing, (set() if way == "streamed_no_failures" else server.failing)
            t0 = time.perf_counter()
            if way == "per_batch":
                for i in range(0, len(requests), args.batch_size):
                    backend.chat_batch(requests[i:i + args.batch_size], max_new_tokens=4)
            else:
                n_errors = sum(a.error is not None for a in backend.stream(requests, max_new_tokens=4))
                errors = errors if way == "streamed_no_failures" else n_errors
            seconds[way] = time.perf_counter() - t0
            server.failing = failing
    server.shutdown()
    print(json.dumps({
        "bench": "eval_endpoint", "config": {**vars(args), "failing_questions": len(server.failing)},
        "errors_streamed": errors, "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "per_batch_over_streamed": round(seconds["per_batch"] / seconds["streamed"], 2),
        "streamed_with_failures_over_without": round(seconds["streamed"] / seconds["streamed_no_failures"], 2)}))


if __name__ == "__main__":
    main()
