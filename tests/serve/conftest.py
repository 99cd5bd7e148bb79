"""Fixtures of the HTTP API tests: tiny real checkpoints (a tiny-llava and a tiny-clip, a few training steps
each), real Engines over them, and the app served by uvicorn in a background thread on a free port.

``ModelSwitch`` wraps a model's forward so that a test can hold the engine inside a forward (a slow request:
the queue fills, the deadline passes) or make one forward fail (a failure inside the engine); everything else
is the real engine on the real model."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

import vlmkit
from vlmkit.data.shapes import generate_shapes
from vlmkit.serve.engine import Engine
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe, only_stages, override_recipe

try:  # the serve extra; the test modules skip, saying so, without it
    import uvicorn

    from vlmkit.serve.api import create_app
except ImportError:  # pragma: no cover
    uvicorn = create_app = None

API_KEY = "sk-vlmkit-test"
MAX_NEW_TOKENS = 64  # the engines' limit: max_tokens above it is a 400
# the main app's limits, small so that the refusals need small bodies
MAX_BODY = 1 << 20
MAX_IMAGE_BYTES = 200_000
MAX_IMAGE_PIXELS = 1_000_000

TINY_LLAVA = [
    "model.vision.image_size=[32, 32]", "model.vision.patch_size=8", "model.vision.width=32",
    "model.vision.depth=1", "model.vision.heads=2", "model.vision.mlp_dim=64",
    "model.lm.width=64", "model.lm.depth=2", "model.lm.heads=4", "model.lm.kv_heads=2",
    "model.lm.mlp_dim=128",
    "train.batch_size=8", "train.log_every=1", "train.eval_every=1000", "data.val_samples=16",
    "stages.0.steps=1", "stages.1.steps=1",
]
TINY_CLIP = [
    "model.vision.image_size=[32, 32]", "model.vision.patch_size=8", "model.vision.width=32",
    "model.vision.depth=1", "model.vision.heads=2", "model.vision.mlp_dim=64", "model.text.width=32",
    "model.text.depth=1", "model.text.heads=2", "model.text.mlp_dim=64", "model.text.context_length=32",
    "model.contrastive.embed_dim=32", "tokenizer.vocab_size=400", "data.train=[pairs_train.csv]",
    "data.val=pairs_val.csv", "data.val_samples=16", "train.batch_size=16", "train.eval_every=1000",
    "train.save_every=1000", "stages.0.steps=2", "stages.0.lr=2e-3", "stages.0.train=[all]",
    "stages.0.objective=contrastive",
]
QUIET = dict(progress=False, log=lambda m: None)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread while a module of this folder runs (the engines' threads included; restored after
    it, so that other folders' tests keep theirs): tiny tensors gain nothing from a pool, and on a busy
    2-core machine a 2-thread pool waits a scheduler tick per op."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "shapes"
    generate_shapes(out, n=40, seed=3, size=32, progress=False)
    return out


@pytest.fixture(scope="session")
def image_path(shapes) -> Path:
    return sorted((shapes / "images").glob("*.png"))[0].resolve()


@pytest.fixture(scope="session")
def llava_checkpoint(shapes, tmp_path_factory) -> Path:
    """A tiny-llava checkpoint trained for 1 + 1 steps: it answers with up to a hundred tokens of byte-level
    junk (split UTF-8 sequences, control characters), ending in EOS or not, which is all the API needs: the
    answers are compared token for token with Pipeline's. (Trained 3 steps longer, it says "no" to
    everything.)"""
    run = tmp_path_factory.mktemp("llava") / "run"
    return train(load_recipe("tiny-llava", [f"data.path={shapes}", *TINY_LLAVA]), run, **QUIET).checkpoint


@pytest.fixture(scope="session")
def clip_checkpoint(shapes, tmp_path_factory) -> Path:
    """A tiny-clip checkpoint (2 contrastive steps, 32-d embeddings)."""
    run = tmp_path_factory.mktemp("clip") / "run"
    recipe = override_recipe(only_stages(load_recipe("tiny-clip"), "contrastive"),
                             [f"data.path={shapes}", *TINY_CLIP])
    return train(recipe, run, **QUIET).checkpoint


JANUS_PROMPT = "a red circle left of a blue square"


@pytest.fixture(scope="session")
def janus_checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny-janus saved as a checkpoint (it reads and draws): its images are noise, which is all the
    API needs (they are compared pixel for pixel with the Pipeline's)."""
    from vlmkit.checkpoint import write_model_files
    from vlmkit.family import get_family
    from vlmkit.presets import get_preset

    torch.manual_seed(0)
    p, fam = get_preset("tiny-janus"), get_family("janus")
    tok = fam.new_tokenizer([JANUS_PROMPT, "what colour"] * 40, 300)
    cfg, model, processor = fam.new_model(p.model, p.processor, tok)
    folder = tmp_path_factory.mktemp("janus")
    write_model_files(folder, model, cfg, processor)
    return folder


@pytest.fixture(scope="session")
def llava_pipe(llava_checkpoint):
    """The reference: the checkpoint loaded on its own (not the engine's copy)."""
    return vlmkit.load(llava_checkpoint)


@pytest.fixture(scope="session")
def clip_pipe(clip_checkpoint):
    return vlmkit.load(clip_checkpoint)


def _need_web_stack() -> None:
    if create_app is None:
        pytest.skip("the API tests need the serve extra (fastapi, uvicorn): pip install 'vlmkit[serve]'")


@contextlib.contextmanager
def started(engine: Engine):
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def engine(llava_checkpoint):
    with started(Engine(vlmkit.load(llava_checkpoint), max_batch=4, max_queue=16,
                        max_new_tokens=MAX_NEW_TOKENS)) as e:
        yield e


@pytest.fixture(scope="session")
def clip_engine(clip_checkpoint):
    with started(Engine(vlmkit.load(clip_checkpoint))) as e:
        yield e


class LiveServer:
    """``app`` under uvicorn in a daemon thread, on a free port of 127.0.0.1."""

    def __init__(self, app):
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on the connections of such a socket
        # (uvicorn's own sockets are); without it each request waits ~40 ms (Nagle's algorithm, delayed ACKs)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextlib.contextmanager
def serve(app):
    _need_web_stack()
    srv = LiveServer(app)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def server(engine):
    """The main app: an API key and small limits (1 MiB bodies, 200 kB and 1 Mpixel images; the engine's
    max_tokens limit is 64): ``server.url``, ``server.api_key``, ``server.limits``."""
    limits = {"max_body_bytes": MAX_BODY, "max_image_bytes": MAX_IMAGE_BYTES,
              "max_image_pixels": MAX_IMAGE_PIXELS}
    with serve(create_app(engine, api_key=API_KEY, request_timeout=60, **limits)) as srv:
        srv.api_key, srv.limits = API_KEY, limits
        yield srv


@pytest.fixture(scope="session")
def clip_server(clip_engine):
    with serve(create_app(clip_engine, api_key=API_KEY)) as srv:
        srv.api_key = API_KEY
        yield srv


class ModelSwitch:
    """Wraps ``model.forward``: ``hold()`` makes the next forward wait until ``release()`` (``entered`` is
    set once the engine waits), ``delay`` sleeps before every forward, ``fail_next()`` makes the next forward
    raise."""

    def __init__(self, model):
        self.forward = model.forward
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.delay = 0.0
        self.failures = 0
        model.forward = self

    def __call__(self, *args, **kwargs):
        if not self.gate.is_set():
            self.entered.set()
            self.gate.wait(timeout=60)
        if self.delay:
            time.sleep(self.delay)
        if self.failures:
            self.failures -= 1
            raise RuntimeError("injected failure inside the model")
        return self.forward(*args, **kwargs)

    def hold(self) -> None:
        self.entered.clear()
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def fail_next(self) -> None:
        self.failures = 1


@pytest.fixture
def switched(llava_checkpoint):
    """(engine over a switchable model, the switch): one batch slot and one queue place."""
    pipe = vlmkit.load(llava_checkpoint)
    switch = ModelSwitch(pipe.model)
    with started(Engine(pipe, max_batch=1, max_queue=1, max_new_tokens=MAX_NEW_TOKENS)) as e:
        try:
            yield e, switch
        finally:
            switch.release()
            switch.delay = 0.0


@pytest.fixture(scope="session")
def serve_app():
    """``with serve_app(app) as srv:`` runs another app (other limits, another engine) for the block."""
    return serve


def _wait_until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture(scope="session")
def wait_until():
    """``wait_until(condition, timeout, what)``: poll until ``condition()`` holds, or fail."""
    return _wait_until
