"""Training at scale, single-process proofs: packed training equals padded training, token-budget batching
reports its padding, gradient accumulation is normalised by tokens, activation checkpointing changes nothing,
LoRA stages train the adapters alone, and a run killed with SIGKILL (also mid-checkpoint) resumes to the same
final weights, bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import vlmkit
from vlmkit.data.shapes import generate_shapes
from vlmkit.errors import ConfigError
from vlmkit.train.checkpointing import KILL_IN_CHECKPOINT_ENV
from vlmkit.train.loop import train
from vlmkit.train.recipe import load_recipe

TINY = [
    "model.vision.image_size=[32, 32]", "model.vision.patch_size=8", "model.vision.width=32",
    "model.vision.depth=1", "model.vision.heads=2", "model.vision.mlp_dim=64",
    "model.lm.width=64", "model.lm.depth=2", "model.lm.heads=4", "model.lm.kv_heads=2", "model.lm.mlp_dim=128",
    "train.batch_size=8", "train.log_every=1", "train.eval_every=1000", "data.val_samples=16", "train.threads=1",
]
LM_ONLY = "stages=[{name: instruct, train: [connector, lm], steps: 6, lr: 3.0e-3}]"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    generate_shapes(out, n=40, seed=1, size=32, progress=False)
    return out


def recipe(shapes, *extra):
    return load_recipe("tiny-llava", [f"data.path={shapes}", *TINY, *extra])


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run) -> list[float]:
    return [r["loss"] for r in rows(run) if "loss" in r]


def weights(run) -> dict:
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def run(r, out, **kw):
    return train(r, out, progress=False, log=lambda m: None, **kw)


def test_packed_training_equals_padded_training(shapes, tmp_path):
    """Same batches, same losses and weights: packing only removes padding (mixed lengths: grouped questions
    of 1-8 turns and captions)."""
    run(recipe(shapes, LM_ONLY), tmp_path / "padded")
    run(recipe(shapes, LM_ONLY, "train.packing=true", "train.pack_length=256"), tmp_path / "packed")
    a, b = losses(tmp_path / "padded"), losses(tmp_path / "packed")
    assert len(a) == 6 and a == pytest.approx(b, abs=1e-5)
    wa, wb = weights(tmp_path / "padded"), weights(tmp_path / "packed")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
    pad = [r["padding_fraction"] for r in rows(tmp_path / "padded") if "loss" in r]
    packed = [r["padding_fraction"] for r in rows(tmp_path / "packed") if "loss" in r]
    assert all(0 <= x < 1 for x in pad + packed) and pad[-1] > 0.05  # reported (the bench compares them)
    report = (tmp_path / "packed" / "training_report.md").read_text()
    assert "adding" in report and (tmp_path / "packed" / "training_report.png").stat().st_size > 10_000


def test_gradient_accumulation_is_normalised_by_tokens(shapes, tmp_path):
    """8 samples at once == 2 micro-batches of 4: the loss is the mean over every supervised token of the step,
    not a mean of micro-batch means (which weights short micro-batches' tokens more)."""
    run(recipe(shapes, LM_ONLY), tmp_path / "one")
    run(recipe(shapes, LM_ONLY, "train.batch_size=4", "train.grad_accum=2"), tmp_path / "two")
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-5)


def test_token_budget_batches_vary_in_samples_and_log_to_tensorboard(shapes, tmp_path):
    pytest.importorskip("tensorboard")
    run(recipe(shapes, LM_ONLY, "train.batch_tokens=1200", "train.packing=true", "train.tensorboard=true"),
        tmp_path / "run")
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    recs = [r for r in rows(tmp_path / "run") if "loss" in r]
    assert len({r["samples"] for r in recs}) > 1  # as many samples as fit, not a fixed count
    assert all(0 <= r["padding_fraction"] < 0.5 for r in recs)
    assert recs[-1]["loss"] < recs[0]["loss"]


def test_activation_checkpointing_gives_the_same_training(shapes, tmp_path):
    run(recipe(shapes, LM_ONLY, "stages.0.steps=3"), tmp_path / "plain")
    run(recipe(shapes, LM_ONLY, "stages.0.steps=3", "train.activation_checkpointing=true"), tmp_path / "ckpt")
    assert losses(tmp_path / "plain") == pytest.approx(losses(tmp_path / "ckpt"), abs=1e-6)


@pytest.mark.slow
def test_lora_stage_trains_adapters_alone_and_the_checkpoint_merges(shapes, tmp_path):
    lora = ["lora.targets=['lm.layers.*.attn.*_proj', 'lm.layers.*.mlp.*']", "lora.rank=4",
            "stages=[{name: lora, train: [connector, lora], steps: 12, lr: 3.0e-3}]"]
    base = run(recipe(shapes, "stages=[{name: base, train: [all], steps: 3, lr: 3.0e-3}]"), tmp_path / "base")
    r = load_recipe("tiny-llava", [f"data.path={shapes}", *[x for x in TINY if not x.startswith("model.")],
                                   f"init_from={base.checkpoint}", *lora])
    res = run(r, tmp_path / "lora")
    ls = losses(tmp_path / "lora")
    assert sum(ls[-3:]) < sum(ls[:3])
    stage = next(x for x in rows(tmp_path / "lora") if x.get("event") == "stage")
    table = {m["module"]: m for m in stage["modules"]}
    assert table["lora"]["trainable"] and not table["lm"]["trainable"] and table["connector"]["trainable"]
    before, after = weights(tmp_path / "base"), weights(tmp_path / "lora")
    assert torch.equal(before["lm.layers.0.attn.q_proj.weight"], after["lm.layers.0.attn.q_proj.base.weight"])
    assert float(after["lm.layers.0.attn.q_proj.lora_B.weight"].abs().max()) > 0
    assert (res.checkpoint / "adapter" / "adapter.safetensors").is_file()
    # the checkpoint loads as a plain model with the adapters merged in
    pipe = vlmkit.load(res.checkpoint)
    assert not any("lora" in k for k in pipe.model.state_dict())
    assert isinstance(pipe.chat(shapes / "images" / "000000.png", "What shape is it?", max_new_tokens=3), str)


def test_lora_stage_without_targets_is_refused(shapes):
    with pytest.raises(ConfigError, match="lora.targets is empty"):
        recipe(shapes, "stages=[{name: x, train: [lora], steps: 1}]")


def test_resume_with_lora_equals_uninterrupted(shapes, tmp_path):
    extra = ["lora.targets=['lm.layers.*.attn.q_proj']", "stages=[{name: l, train: [connector, lora], steps: 6, "
             "lr: 3.0e-3}]", "train.save_every=3"]
    run(recipe(shapes, *extra), tmp_path / "full")
    run(recipe(shapes, *extra), tmp_path / "cut", stop_at_step=4)
    run(recipe(shapes, *extra), tmp_path / "cut", resume=True)
    wa, wb = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def cli_train(shapes, out, *flags, env=None) -> subprocess.Popen:
    args = [sys.executable, "-m", "vlmkit", "train", "tiny-llava", "--out", str(out), "--quiet", *flags,
            *[x for s in [f"data.path={shapes}", *TINY, "stages.0.steps=2", "stages.1.steps=10",
                          "train.save_every=3"] for x in ("--set", s)]]
    return subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_kill_9_during_training_and_during_a_checkpoint_write_then_resume_is_exact(shapes, tmp_path):
    """SIGKILL mid-run (after the step-6 checkpoint) and SIGKILL inside the write of the step-9 checkpoint: each time
    --resume reaches the final weights of an uninterrupted run bit for bit (deterministic CPU run, one thread)."""
    full = cli_train(shapes, tmp_path / "full")
    assert full.wait(timeout=300) == 0, full.stderr.read().decode()[-2000:]
    cut = tmp_path / "cut"
    proc = cli_train(shapes, cut)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it from outside once the step-6 checkpoint is in place
        state = cut / "checkpoint" / "trainer_state.json"
        if state.exists() and json.loads(state.read_text())["global_step"] >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    # resume; this time the process kills itself while writing the step-9 checkpoint
    proc = cli_train(shapes, cut, "--resume", env={KILL_IN_CHECKPOINT_ENV: "9"})
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert list(cut.glob(".checkpoint.tmp-*")), "the kill left the half-written checkpoint beside the last one"
    assert json.loads((cut / "checkpoint" / "trainer_state.json").read_text())["global_step"] in (6, 8)
    proc = cli_train(shapes, cut, "--resume")
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    assert not list(cut.glob(".checkpoint.tmp-*"))
    wa, wb = weights(tmp_path / "full"), weights(cut)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [r["loss"] for r in rows(tmp_path / "full") if "loss" in r]
    lb = [r["loss"] for r in rows(cut) if "loss" in r]
    assert la == lb  # the metrics log was cut back to the resumed step each time: one line per step, equal



def test_training_streams_shards_and_resumes_exactly(shapes, tmp_path):
    """`vlmkit data shard` of the training JSON, streamed by 2 worker processes with a shuffle buffer: the loss goes
    down, and a run cut at step 4 resumes from its saved stream position to the uninterrupted run's weights."""
    from vlmkit.cli import main

    assert main(["data", "shard", str(shapes / "train.json"), "--out", str(tmp_path / "shards"),
                 "--samples-per-shard", "40", "--quiet"]) == 0
    extra = [f"data.shards={tmp_path / 'shards'}", "data.workers=2", "data.shuffle_buffer=50", "train.save_every=3",
             "stages=[{name: instruct, train: [connector, lm], steps: 8, lr: 3.0e-3}]"]
    run(recipe(shapes, *extra), tmp_path / "full")
    ls = losses(tmp_path / "full")
    assert len(ls) == 8 and sum(ls[-2:]) < sum(ls[:2])
    run(recipe(shapes, *extra), tmp_path / "cut", stop_at_step=4)
    run(recipe(shapes, *extra), tmp_path / "cut", resume=True)
    assert losses(tmp_path / "cut") == ls
    wa, wb = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_shards_with_a_token_budget_are_refused(shapes):
    with pytest.raises(ConfigError, match="batch_tokens with data.shards"):
        recipe(shapes, "data.shards=x", "train.batch_tokens=100")


def test_compiled_blocks_train_as_eager_ones(shapes, tmp_path):
    pytest.importorskip("torch._inductor")
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("torch.compile's CPU backend compiles C++: no C compiler on this machine")
    run(recipe(shapes, LM_ONLY, "stages.0.steps=2"), tmp_path / "eager")
    run(recipe(shapes, LM_ONLY, "stages.0.steps=2", "train.compile=true"), tmp_path / "compiled")
    assert losses(tmp_path / "eager") == pytest.approx(losses(tmp_path / "compiled"), abs=1e-4)


def test_a_kill_between_the_two_renames_leaves_the_previous_checkpoint_to_resume(tmp_path):
    from vlmkit.train.checkpointing import clean_stale

    (tmp_path / ".checkpoint.old-step6").mkdir()
    (tmp_path / ".checkpoint.old-step6" / "trainer_state.json").write_text('{"global_step": 6}')
    (tmp_path / ".checkpoint.tmp-step9").mkdir()
    clean_stale(tmp_path / "checkpoint")
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["global_step"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


@pytest.mark.parametrize("override, message", [
    ("train.pack_length=-1", "must be >= 0"),
    ("train.distributed=zero", "valid: ddp, fsdp"),
    ("train.precision=fp16", "valid: auto, fp32, bf16"),
    ("lora.targets=['lm.*']", None),  # valid alone; with a bad rank below
])
def test_scale_settings_are_checked_when_the_recipe_loads(shapes, override, message):
    if message is None:
        with pytest.raises(ConfigError, match="rank 0 must be >= 1"):
            recipe(shapes, override, "lora.rank=0")
        return
    with pytest.raises(ConfigError, match=message):
        recipe(shapes, override)


def test_packing_streamed_shards_needs_a_pack_length(shapes, tmp_path):
    from vlmkit.cli import main

    assert main(["data", "shard", str(shapes / "train.json"), "--out", str(tmp_path / "shards"), "--quiet"]) == 0
    with pytest.raises(ConfigError, match="needs train.pack_length"):
        run(recipe(shapes, LM_ONLY, f"data.shards={tmp_path / 'shards'}", "train.packing=true"), tmp_path / "run")


def test_dual_encoders_refuse_fsdp_under_torchrun(shapes, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # refused before joining any process group
    r = load_recipe("tiny-clip", [f"data.path={shapes}", "train.distributed=fsdp"])
    with pytest.raises(ConfigError, match="dual encoders train under DDP"):
        run(r, tmp_path / "run")
