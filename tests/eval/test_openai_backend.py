"""The OpenAI-compatible backend against a small fake chat-completions server on 127.0.0.1: requests carry the
model, base64 PNG data URLs of the right size and max_tokens; answers come back in order; concurrency stays
within its bound; 429/5xx and timeouts are retried, 4xx are not, and a request that keeps failing is recorded per
sample while the others succeed; answers are cached so a second (or interrupted) run asks only for what is
missing; ``vlmkit eval --model openai:URL#MODEL`` writes results.json with the endpoint's fingerprint and the
metrics of the fake's answers."""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from vlmkit.cli import main
from vlmkit.data.shapes import generate_shapes
from vlmkit.errors import ConfigError, DataError
from vlmkit.eval import runner
from vlmkit.eval.backends import OpenAIBackend, message_content, parse_model_spec, request_key
from vlmkit.eval.metrics.pope import pope_metrics, score_pope
from vlmkit.eval.metrics.vqa import exact_match

CANNED = {"color": "red", "shape": "circle", "how many": "3"}  # the fake's answers by a word in the question


def rule(question: str) -> str:
    """The fake's answer: "yes" to "Is there ...", else the first canned answer whose word is in the question."""
    if "Is there" in question:
        return "yes"
    return next((a for word, a in CANNED.items() if word in question.lower()), "none")


class Fake:
    """A chat-completions server's behaviour and what it saw. ``script`` lists what the first calls get instead
    of an answer (an HTTP status, or "hang" past the client's timeout); ``fail_when`` maps a word in the question
    to the status every such request gets; ``delay`` holds each answer back to make concurrency observable."""

    def __init__(self, model: str = "fake", image_size: tuple[int, int] = (24, 16)):
        self.model, self.image_size = model, image_size
        self.script: list = []
        self.fail_when: dict[str, int] = {}
        self.delay = 0.0
        self.lock, self.release = threading.Lock(), threading.Event()
        self.requests = self.in_flight = self.max_in_flight = 0
        self.asked: list[str] = []  # the questions answered, in order of answering
        self.seen: list[dict] = []  # per request: question, part types, max_tokens, authorization
        self.problems: list[str] = []

    def check(self, body: dict, headers) -> tuple[str, list[str]]:
        """The question and the order of parts; every deviation from the expected request shape is a problem."""
        problems = []
        if body.get("model") != self.model:
            problems.append(f"model {body.get('model')!r}")
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1 or body.get("temperature") != 0:
            problems.append(f"max_tokens {body.get('max_tokens')!r} temperature {body.get('temperature')!r}")
        messages = body.get("messages")
        if not (isinstance(messages, list) and len(messages) == 1 and messages[0].get("role") == "user"):
            problems.append(f"messages {str(messages)[:80]}")
            return "", problems
        texts, kinds = [], []
        for part in messages[0]["content"]:
            kinds.append(part["type"])
            if part["type"] == "text":
                texts.append(part["text"])
                continue
            url = part["image_url"]["url"]
            prefix = "data:image/png;base64,"
            if not url.startswith(prefix):
                problems.append(f"image url {url[:40]}")
                continue
            im = Image.open(io.BytesIO(base64.b64decode(url[len(prefix):], validate=True)))
            if im.format != "PNG" or im.size != self.image_size:
                problems.append(f"image {im.format} {im.size}, expected PNG {self.image_size}")
        self.seen.append({"question": " ".join(texts), "kinds": kinds, "max_tokens": body.get("max_tokens"),
                          "authorization": headers.get("Authorization")})
        return " ".join(texts), problems


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def reply(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (timed out)
            pass

    def do_POST(self):
        fake: Fake = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with fake.lock:
            fake.requests += 1
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
            action = fake.script.pop(0) if fake.script else None
            question, problems = fake.check(body, self.headers)
            fake.problems += problems
        code = next((c for word, c in fake.fail_when.items() if word in question), action)
        if self.path != "/v1/chat/completions" or problems:
            code = 400
        if code == "hang":
            fake.release.wait(10)
        time.sleep(fake.delay)
        with fake.lock:
            fake.in_flight -= 1  # before replying: the client's next request must not overlap this one
            if code is None:
                fake.asked.append(question)
        if code is None:
            self.reply(200, {"id": "x", "object": "chat.completion", "model": fake.model,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": rule(question)},
                                          "finish_reason": "stop"}]})
        elif code != "hang":
            self.reply(code, {"error": {"message": f"fake error {code}", "type": "server_error"}})


@pytest.fixture
def fake():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.fake = Fake()
    server.fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.fake
    server.fake.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def no_api_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def _image(size=(24, 16), color=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def _questions(n: int) -> list[str]:
    kinds = ["What is the color of object {i}?", "Is there a star number {i}?", "Which shape is object {i}?",
             "How many things in picture {i}?", "Where is thing {i}?"]
    return [kinds[i % len(kinds)].format(i=i) for i in range(n)]


def backend(fake: Fake, **kw) -> OpenAIBackend:
    return OpenAIBackend(fake.url, fake.model, **{"backoff": 0.01, "timeout": 5.0, **kw})


# ------------------------------------------------------------------------------------------------ requests


def test_answers_come_back_in_order_with_the_request_shape(fake, tmp_path):
    path = tmp_path / "a.jpg"  # a JPEG file: sent re-encoded as PNG
    _image(color=(10, 200, 10)).save(path)
    qs = _questions(10)
    fake.delay = 0.03  # later questions would overtake earlier ones if the order were that of completion
    b = backend(fake, api_key="sk-test", concurrency=3)
    answers = b.chat_batch([([path] if i % 2 else _image(), q) for i, q in enumerate(qs)], max_new_tokens=5)
    assert answers == [rule(q) for q in qs] and b.last_errors == [None] * 10
    assert fake.problems == [] and fake.requests == b.requests_sent == 10
    assert {s["max_tokens"] for s in fake.seen} == {5} and {s["authorization"] for s in fake.seen} == {"Bearer sk-test"}
    assert sorted(s["question"] for s in fake.seen) == sorted(qs)
    assert backend(fake).chat(_image(), "Is there a dog?") == "yes" and fake.seen[-1]["authorization"] is None


@pytest.mark.parametrize("bound", [1, 3])
def test_concurrency_never_exceeds_its_bound(fake, bound):
    fake.delay = 0.05
    b = backend(fake, concurrency=bound)
    b.chat_batch([(_image(), q) for q in _questions(8)])
    assert fake.max_in_flight == bound  # reached (the pool is used) and never exceeded


def test_images_go_where_the_placeholders_are_else_first():
    a, b = _image(), _image(color=(0, 0, 255))
    kinds = [p["type"] for p in message_content([a, b], "Compare <image> with <image>: which is red?")]
    assert kinds == ["text", "image_url", "text", "image_url", "text"]
    assert [p["type"] for p in message_content([a, b], "<image>\n<image>\nSame?")] == ["image_url", "image_url", "text"]
    assert [p["type"] for p in message_content([a, b], "Which is red?")] == ["image_url", "image_url", "text"]
    assert [p["type"] for p in message_content([], "Hi")] == ["text"]
    with pytest.raises(DataError, match=r"1 <image> placeholder\(s\) but 2 image\(s\)"):
        message_content([a, b], "<image> what?")
    with pytest.raises(DataError, match="cannot read image"):
        message_content(["/no/such.png"], "what?")


# ------------------------------------------------------------------------------------------------ failures


@pytest.mark.parametrize("transient", [500, 429, 503, "hang"])
def test_transient_failures_are_retried(fake, transient):
    fake.script = [transient, transient]
    b = backend(fake, retries=3, timeout=0.3)
    assert b.chat_batch([(_image(), "What is the color?")]) == ["red"]
    assert b.last_errors == [None] and fake.requests == 3


def test_a_failing_request_is_recorded_per_sample_and_the_others_succeed(fake, tmp_path):
    fake.fail_when = {"BROKEN": 500, "REJECTED": 400}
    qs = ["What is the color?", "Is there a BROKEN cat?", "How many REJECTED?", "Which shape?"]
    b = backend(fake, retries=2, cache_dir=tmp_path / "cache")
    answers = b.chat_batch([(_image(), q) for q in qs])
    assert answers == ["red", "", "", "circle"]
    assert b.last_errors[0] is None and b.last_errors[3] is None
    assert "HTTP 500" in b.last_errors[1] and "fake error 500" in b.last_errors[1]
    assert "gave up after 3 attempts" in b.last_errors[1]
    assert "HTTP 400" in b.last_errors[2] and "attempt" not in b.last_errors[2]  # a 4xx is not retried
    assert fake.requests == 2 + 3 + 1
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2  # failures are not cached: asked again next time
    fake.requests, fake.fail_when = 0, {}
    assert b.chat_batch([(_image(), q) for q in qs]) == [rule(q) for q in qs] and fake.requests == 2


def test_a_request_that_times_out_is_retried_then_recorded(fake):
    fake.fail_when = {"SLOW": "hang"}
    b = backend(fake, retries=1, timeout=0.3)
    t0 = time.perf_counter()
    answers = b.chat_batch([(_image(), "SLOW: is there a cat?"), (_image(), "What is the color?")])
    assert time.perf_counter() - t0 < 3
    assert answers == ["", "red"] and "timed out after 0.3 s" in b.last_errors[0] and b.last_errors[1] is None
    assert sum(s["question"].startswith("SLOW") for s in fake.seen) == 2


def test_unreachable_endpoint_is_recorded_not_raised():
    b = OpenAIBackend("http://127.0.0.1:9/v1", "m", retries=1, backoff=0.01, timeout=1.0)  # port 9: discard
    assert b.chat_batch([(_image(), "Hi?")]) == [""] and "gave up after 2 attempts" in b.last_errors[0]


# ------------------------------------------------------------------------------------------------ cache


def test_a_second_run_with_the_same_cache_makes_no_request(fake, tmp_path):
    qs = _questions(6)
    reqs = [(_image(), q) for q in qs] + [(_image(), qs[0])]  # a repeated request is asked once
    first = backend(fake, cache_dir=tmp_path).chat_batch(reqs, max_new_tokens=4)
    assert first == [rule(q) for q in qs] + [rule(qs[0])] and fake.requests == 6
    again = backend(fake, cache_dir=tmp_path)
    assert again.chat_batch(reqs, max_new_tokens=4) == first and fake.requests == 6 and again.requests_sent == 0
    again.chat_batch(reqs[:1], max_new_tokens=5)  # max_tokens is part of the key
    assert fake.requests == 7
    key = again.cache_key(again.request_body(reqs[0][0], qs[0], 4, 0.0))  # the sha256 of URL + request body
    assert key == request_key(again.request_body(reqs[0][0], qs[0], 4, 0.0), fake.url + "/chat/completions")
    assert json.loads((tmp_path / f"{key}.json").read_text())["answer"] == rule(qs[0])


def test_parse_model_spec():
    assert parse_model_spec("openai:http://127.0.0.1:8000/v1/#my-model") == ("http://127.0.0.1:8000/v1", "my-model")
    assert parse_model_spec("openai:https://api.openai.com/v1#gpt-4o") == ("https://api.openai.com/v1", "gpt-4o")
    for bad, why in [("openai:http://h/v1", "names no model"), ("openai:http://h/v1#", "names no model"),
                     ("openai:localhost:8000#m", "must be http"), ("openai:#m", "must be http"),
                     ("vllm:http://h/v1#m", "must start with 'openai:'")]:
        with pytest.raises(ConfigError, match=why):
            parse_model_spec(bad)


# ------------------------------------------------------------------------------------------------ vlmkit eval


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai") / "shapes"
    generate_shapes(root, n=16, seed=2, size=32, progress=False)
    return root


def _eval(fake: Fake, shapes, out, *extra) -> int:
    return main(["eval", "--model", f"openai:{fake.url}#{fake.model}", "--tasks", "shapes_vqa,pope", "--data",
                 str(shapes), "--out", str(out), "--limit", "4", "--quiet", *extra])


def _records(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_vlmkit_eval_against_an_endpoint(fake, shapes, tmp_path):
    fake.image_size = (32, 32)
    out = tmp_path / "results.json"
    assert _eval(fake, shapes, out) == 0
    assert fake.problems == []
    res = json.loads(out.read_text())
    spec = f"openai:{fake.url}#fake"
    assert res["model"]["fingerprint"] == hashlib.sha256(spec.encode()).hexdigest()
    assert res["model"]["endpoint"] == {"api": "openai-chat-completions", "base_url": fake.url, "model": "fake"}
    assert res["config"]["cache"] == str(tmp_path / ".openai_cache")
    assert res["tasks"]["shapes_vqa"]["n"] == 4 and res["tasks"]["pope"]["n"] == 4  # --limit: samples per task
    shapes_rows, pope_rows = _records(tmp_path / "predictions_shapes_vqa.jsonl"), _records(
        tmp_path / "predictions_pope.jsonl")
    assert all(r["prediction"] == rule(r["prompt"]) and "error" not in r for r in shapes_rows + pope_rows)
    expected = sum(exact_match(rule(r["prompt"]), r["answers"][0]).score for r in shapes_rows) / 4
    assert res["tasks"]["shapes_vqa"]["metrics"]["exact_match"] == pytest.approx(expected)
    pope = pope_metrics(score_pope("yes", r["answers"][0], r["meta"]["category"]) for r in pope_rows)
    assert res["tasks"]["pope"]["metrics"]["f1"] == pytest.approx(pope["f1"])
    assert res["tasks"]["pope"]["metrics"]["accuracy"] == pytest.approx(pope["accuracy"])
    assert res["tasks"]["shapes_vqa"]["n_errors"] == res["tasks"]["pope"]["n_errors"] == 0
    # one request per distinct (image, question, max_tokens); a rerun is answered from the cache
    distinct = {(tuple(r["images"]), r["prompt"]) for r in shapes_rows + pope_rows}
    assert fake.requests == len(distinct) == len(list((tmp_path / ".openai_cache").glob("*.json")))
    assert _eval(fake, shapes, tmp_path / "again.json", "--cache", str(tmp_path / ".openai_cache")) == 0
    assert fake.requests == len(distinct)
    again = json.loads((tmp_path / "again.json").read_text())["tasks"]
    assert {k: v["metrics"] for k, v in again.items()} == {k: v["metrics"] for k, v in res["tasks"].items()}


def test_an_interrupted_eval_resumes_from_its_cache(fake, shapes, tmp_path, monkeypatch):
    """The resumed run asks only for what is missing, and reports the time of the whole evaluation (it used to
    report its own seconds as if the evaluation had taken that long) and how many answers were cached."""
    fake.image_size = (32, 32)
    fake.delay = 0.15
    calls = []
    real_post = OpenAIBackend._post

    def post_then_interrupt(self, data):
        calls.append(1)
        if len(calls) >= 4:
            raise KeyboardInterrupt  # as Ctrl-C would, after three answers were cached
        return real_post(self, data)

    monkeypatch.setattr(OpenAIBackend, "_post", post_then_interrupt)
    out = tmp_path / "results.json"
    t0 = time.perf_counter()
    assert _eval(fake, shapes, out, "--concurrency", "1") == 130 and not out.exists()
    first_run = time.perf_counter() - t0
    assert len(list((tmp_path / ".openai_cache").glob("*.json"))) == fake.requests == 3  # answered and kept
    monkeypatch.setattr(OpenAIBackend, "_post", real_post)
    fake.delay = 0.0
    assert _eval(fake, shapes, out) == 0
    rows = _records(tmp_path / "predictions_shapes_vqa.jsonl")
    assert all(r["prediction"] == rule(r["prompt"]) for r in rows)
    assert fake.requests == len({(tuple(r["images"]), r["prompt"]) for r in rows}
                                | {(tuple(r["images"]), r["prompt"]) for r in _records(
                                    tmp_path / "predictions_pope.jsonl")}) > 3
    task = json.loads(out.read_text())["tasks"]["shapes_vqa"]
    assert task["runs"] == 2 and task["answers_from_cache"] == 3
    assert task["seconds"] >= 3 * 0.15 and task["seconds"] > task["seconds_this_run"]
    assert task["seconds"] <= first_run + task["seconds_this_run"] + 0.5
    assert task["samples_per_second"] == pytest.approx(task["n"] / task["seconds"], rel=0.01)
    assert "shapes_vqa 3 of 4 answers from the cache, 2 runs" in (tmp_path / "results.md").read_text()


def test_eval_leaves_failed_samples_out_of_the_metrics_and_exits_non_zero(fake, shapes, tmp_path, monkeypatch,
                                                                          capsys):
    """A failed request used to be scored as an empty answer, which POPE's parser reads as "yes": failed probes
    labelled "yes" counted as right and the yes-ratio moved; and the run exited 0."""
    fake.image_size = (32, 32)
    monkeypatch.setattr(runner, "OpenAIBackend", functools.partial(OpenAIBackend, backoff=0.01))
    probes = [json.loads(x) for x in (shapes / "pope_test_random.jsonl").read_text().splitlines()]
    broken = {p["text"] for p in probes if p["label"] == "yes"}
    assert broken and len(broken) < len(probes)
    fake.fail_when = {q: 500 for q in broken}  # every "yes" probe fails; the fake answers "yes" to the rest
    out = tmp_path / "results.json"
    args = ["eval", "--model", f"openai:{fake.url}#{fake.model}", "--tasks", "pope,shapes_vqa", "--data",
            str(shapes), "--out", str(out), "--quiet"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "the endpoint failed on" in err and "--allow-errors" in err and "left out of the metrics" in err
    res = json.loads(out.read_text())
    assert res["complete"] is False
    rows = _records(tmp_path / "predictions_pope.jsonl")
    failed, scored = [r for r in rows if "error" in r], [r for r in rows if "error" not in r]
    assert failed and all(r["prediction"] is None and "accuracy" not in r and "HTTP 500" in r["error"]
                          and "gave up after 4 attempts" in r["error"] for r in failed)
    assert {r["prompt"] for r in failed} <= broken and all(r["answers"] == ["no"] for r in scored)
    pope = res["tasks"]["pope"]
    assert pope["n_errors"] == len(failed) and pope["n"] == len(scored) and pope["n_excluded"] == 0
    # only the answered probes are scored: every one is a "no" the fake answered "yes" to
    assert pope["metrics"]["accuracy"] == 0.0 and pope["metrics"]["yes_ratio"] == 1.0
    assert res["tasks"]["shapes_vqa"]["n_errors"] == 0
    assert "**Incomplete**" in (tmp_path / "results.md").read_text()
    capsys.readouterr()
    fake.requests = 0
    assert main(args + ["--allow-errors"]) == 0  # accepted as it is; the answers came from the cache
    distinct = {(tuple(r["images"]), r["prompt"]) for r in failed}  # a probe asked in two samplings: asked once
    assert fake.requests == len(distinct) * 4  # only the failed probes were asked again (and failed again)


def test_a_failed_sample_takes_its_failure_unit_out_with_it(fake, shapes, tmp_path, monkeypatch):
    """CircularEval scores a question by all its rotations: one failed rotation leaves the question out, not the
    other rotations scored alone."""
    fake.image_size = (32, 32)
    monkeypatch.setattr(runner, "OpenAIBackend", functools.partial(OpenAIBackend, backoff=0.01, retries=0))
    rows = json.loads((shapes / "choice_test.json").read_text())
    first = rows[0]["options"][0]
    fake.fail_when = {f"A. {first}\n": 500}  # the rotations that show the first question's first option as A
    out = tmp_path / "results.json"
    assert main(["eval", "--model", f"openai:{fake.url}#{fake.model}", "--tasks", "multiple_choice_circular",
                 "--data", str(shapes), "--out", str(out), "--quiet", "--limit", "3", "--allow-errors"]) == 0
    res = json.loads(out.read_text())["tasks"]["multiple_choice_circular"]
    records = _records(tmp_path / "predictions_multiple_choice_circular.jsonl")
    failed_q = {r["meta"]["question_id"] for r in records if "error" in r}
    assert rows[0]["id"] in failed_q
    excluded = [r for r in records if "excluded" in r]
    assert excluded and all(r["meta"]["question_id"] in failed_q for r in excluded)
    assert res["n_errors"] + res["n_excluded"] == sum(r["meta"]["question_id"] in failed_q for r in records)
    assert res["metrics"]["n"] == 3 - len(failed_q)  # questions scored


def test_the_cache_is_keyed_by_the_endpoint_not_only_the_model_name(fake, shapes, tmp_path):
    """A second server with the same model name and the same --out used to receive no request at all."""
    fake.image_size = (32, 32)
    out = tmp_path / "results.json"
    assert _eval(fake, shapes, out) == 0 and fake.requests > 0
    other = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    other.fake = Fake()  # same model name ("fake"), another address
    other.fake.image_size, other.fake.url = (32, 32), f"http://127.0.0.1:{other.server_address[1]}/v1"
    thread = threading.Thread(target=other.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        assert _eval(other.fake, shapes, out) == 0
        assert other.fake.requests == fake.requests  # asked everything itself
        assert json.loads(out.read_text())["model"]["endpoint"]["base_url"] == other.fake.url
    finally:
        other.shutdown()
        other.server_close()


def test_a_failing_request_does_not_hold_up_the_others(fake, tmp_path):
    """Requests used to go one batch at a time, so a request retrying stalled its batch and every batch after it."""
    shapes = tmp_path / "shapes"
    generate_shapes(shapes, n=60, seed=3, size=32, progress=False)
    fake.image_size = (32, 32)
    fake.fail_when = {"How many": 503}
    events = []
    real_post = OpenAIBackend._post

    def post(self, data):
        q = json.loads(data)["messages"][0]["content"][-1]["text"]
        events.append(("ask", q))
        return real_post(self, data)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(OpenAIBackend, "_post", post)
        mp.setattr(runner, "OpenAIBackend", functools.partial(OpenAIBackend, backoff=0.4, retries=2))
        assert main(["eval", "--model", f"openai:{fake.url}#{fake.model}", "--tasks", "shapes_vqa", "--data",
                     str(shapes), "--out", str(tmp_path / "r.json"), "--quiet", "--batch-size", "4",
                     "--concurrency", "3", "--allow-errors", "--retries", "2", "--backoff", "0.4"]) == 0
    asks = [q for _, q in events]
    rows = _records(tmp_path / "predictions_shapes_vqa.jsonl")
    first_failing = min(i for i, r in enumerate(rows) if "How many" in r["prompt"])
    assert first_failing < len(rows) - 8  # batches of 4 followed the first failing one's
    last_attempt = max(i for i, q in enumerate(asks) if "How many" in q)
    good = [i for i, q in enumerate(asks) if "How many" not in q]
    assert sum("How many" in q for q in asks) % 3 == 0  # every failing one was tried 3 times
    assert max(good) < last_attempt  # all the others were answered while the failing ones were still retrying


def test_retries_and_timeout_are_options(fake, shapes, tmp_path):
    fake.image_size = (32, 32)
    fake.fail_when = {"How many": 500}
    assert main(["eval", "--model", f"openai:{fake.url}#{fake.model}", "--tasks", "shapes_vqa", "--data",
                 str(shapes), "--out", str(tmp_path / "r.json"), "--quiet", "--retries", "0", "--timeout", "5",
                 "--allow-errors"]) == 0
    rows = _records(tmp_path / "predictions_shapes_vqa.jsonl")
    failing = [r for r in rows if "How many" in r["prompt"]]
    assert failing and all("HTTP 500" in r["error"] and "gave up after 1 attempt)" in r["error"] for r in failing)
    assert fake.requests == len({r["prompt"] for r in rows})  # each asked once: no retry
    config = json.loads((tmp_path / "r.json").read_text())["config"]
    assert (config["retries"], config["timeout"], config["backoff"]) == (0, 5.0, 1.0)


def test_the_progress_bar_counts_errors_live(fake, shapes, tmp_path, capsys):
    fake.image_size = (32, 32)
    fake.fail_when = {"How many": 400}
    assert main(["eval", "--model", f"openai:{fake.url}#{fake.model}", "--tasks", "shapes_vqa", "--data",
                 str(shapes), "--out", str(tmp_path / "r.json"), "--allow-errors"]) == 0
    assert "errors=" in capsys.readouterr().err


def test_a_malformed_spec_is_named_by_the_cli(shapes, tmp_path, capsys):
    assert main(["eval", "--model", "openai:http://127.0.0.1:1/v1", "--tasks", "pope", "--data", str(shapes),
                 "--out", str(tmp_path / "r.json"), "--quiet"]) == 2
    assert "names no model: expected openai:BASE_URL#MODEL" in capsys.readouterr().err
