"""torchrun on the CPU (gloo): 2 processes under DDP or FSDP2 follow the loss curve of 1 process at the same
global batch (within 1e-4 over 20 steps); FSDP's sharded checkpoints consolidate to one safetensors file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vlmkit.data.shapes import generate_shapes

SETTINGS = [
    "model.vision.image_size=[32, 32]", "model.vision.patch_size=8", "model.vision.width=32",
    "model.vision.depth=1", "model.vision.heads=2", "model.vision.mlp_dim=64",
    "model.lm.width=64", "model.lm.depth=2", "model.lm.heads=4", "model.lm.kv_heads=2", "model.lm.mlp_dim=128",
    "train.batch_size=8", "train.log_every=1", "train.eval_every=1000", "data.val_samples=8", "train.threads=1",
    "train.save_every=10", "train.precompute_frozen_vision=false",
    "stages=[{name: instruct, train: [connector, lm], steps: 20, lr: 3.0e-3}]",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    generate_shapes(out, n=30, seed=3, size=32, progress=False)
    return out


def train(shapes, out, nproc: int, *extra):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(29500 + os.getpid() % 1000)] if nproc > 1 else [sys.executable]
    sets = [x for s in [f"data.path={shapes}", *SETTINGS, *extra] for x in ("--set", s)]
    proc = subprocess.run([*launcher, "-m", "vlmkit", "train", "tiny-llava", "--out", str(out), "--quiet", *sets],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def losses(rows):
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def single(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return out, train(shapes, out, 1)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_process_curve(shapes, single, tmp_path, strategy):
    one_dir, one = single
    rows = train(shapes, tmp_path, 2, f"train.distributed={strategy}")
    run = next(r for r in rows if r.get("event") == "run")
    assert run["world_size"] == 2 and run["strategy"] == strategy
    a, b = losses(one), losses(rows)
    assert len(a) == len(b) == 20
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, list(zip(a, b))
    assert a[-1] < 0.7 * a[0]
    wa, wb = load_file(str(one_dir / "checkpoint" / "model.safetensors")), \
        load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-3
    if strategy == "fsdp":  # sharded state beside the gathered weights; consolidating the shards gives the same
        ckpt = tmp_path / "checkpoint"
        assert (ckpt / "dcp" / ".metadata").is_file()
        gathered = load_file(str(ckpt / "model.safetensors"))
        (ckpt / "model.safetensors").unlink()
        from vlmkit.cli import main
        from vlmkit.errors import CheckpointError
        import vlmkit

        with pytest.raises(CheckpointError, match="vlmkit checkpoint consolidate"):
            vlmkit.load(ckpt)
        assert main(["checkpoint", "consolidate", str(ckpt)]) == 0
        merged = load_file(str(ckpt / "model.safetensors"))
        assert merged.keys() == gathered.keys() and all(torch.equal(merged[k], gathered[k]) for k in merged)
        assert isinstance(vlmkit.load(ckpt).chat(shapes / "images" / "000000.png", "What shape?", max_new_tokens=2),
                          str)


CLIP = [
    "model.vision.image_size=[32, 32]", "model.vision.patch_size=8", "model.vision.width=32", "model.vision.depth=1",
    "model.vision.heads=2", "model.vision.mlp_dim=64", "model.text.width=32", "model.text.depth=1",
    "model.text.heads=2", "model.text.mlp_dim=64", "model.text.context_length=32", "model.contrastive.embed_dim=32",
    "tokenizer.vocab_size=400", "data.val_samples=8", "train.batch_size=16", "train.log_every=1",
    "train.eval_every=1000", "train.save_every=1000", "train.threads=1",
    "stages=[{name: contrastive, objective: contrastive, train: [all], steps: 20, lr: 2.0e-3}]",
    "preset=tiny-clip-vit",  # LayerNorm towers: BatchNorm (tiny-clip's CNN) normalises each rank's half on its own
]


def train_clip(shapes, out, nproc: int):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(28500 + os.getpid() % 1000)] if nproc > 1 else [sys.executable]
    sets = [x for s in [f"data.path={shapes}", *CLIP] for x in ("--set", s)]
    proc = subprocess.run([*launcher, "-m", "vlmkit", "train", "tiny-clip", "--out", str(out), "--quiet", *sets],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_contrastive_training_under_ddp_follows_the_single_process_curve(shapes, tmp_path):
    """Each rank embeds its half of the batch; the loss gathers both halves, so the curve is the 1-process one."""
    a = losses(train_clip(shapes, tmp_path / "one", 1))
    b = losses(train_clip(shapes, tmp_path / "two", 2))
    assert len(a) == len(b) == 20 and a[-1] < a[0]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, list(zip(a, b))


def test_fsdp_run_killed_mid_checkpoint_resumes_from_its_shards_exactly(shapes, tmp_path):
    """2 processes under FSDP2, rank 0 killed (SIGKILL) while writing the step-15 checkpoint; torchrun stops the
    run; --resume loads the step-10 shards (weights, optimizer, data position) and ends on the uninterrupted run's
    weights, bit for bit."""
    from vlmkit.train.checkpointing import KILL_IN_CHECKPOINT_ENV

    extra = ["train.distributed=fsdp", "train.save_every=5"]
    train(shapes, tmp_path / "full", 2, *extra)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(27500 + os.getpid() % 1000)]
    sets = [x for s in [f"data.path={shapes}", *SETTINGS, *extra] for x in ("--set", s)]
    args = [*launcher, "-m", "vlmkit", "train", "tiny-llava", "--out", str(tmp_path / "cut"), "--quiet", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(args, capture_output=True, text=True, timeout=600,
                            env={**env, KILL_IN_CHECKPOINT_ENV: "15"})
    assert killed.returncode != 0
    state = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert state["global_step"] == 10 and (tmp_path / "cut" / "checkpoint" / "dcp" / ".metadata").is_file()
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    wa = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "checkpoint" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lora_under_fsdp_follows_one_process_and_saves_the_adapters(shapes, tmp_path):
    lora = ["lora.targets=['lm.layers.*.attn.*_proj']", "lora.rank=4",
            "stages=[{name: lora, train: [connector, lora], steps: 20, lr: 3.0e-3}]"]
    a = losses(train(shapes, tmp_path / "one", 1, *lora))
    b = losses(train(shapes, tmp_path / "two", 2, "train.distributed=fsdp", *lora))
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4 and a[-1] < a[0]
    for run in ("one", "two"):
        assert (tmp_path / run / "checkpoint" / "adapter" / "adapter.safetensors").is_file()
    ad1 = load_file(str(tmp_path / "one" / "checkpoint" / "adapter" / "adapter.safetensors"))
    ad2 = load_file(str(tmp_path / "two" / "checkpoint" / "adapter" / "adapter.safetensors"))
    assert ad1.keys() == ad2.keys() and max(float((ad1[k] - ad2[k]).abs().max()) for k in ad1) < 1e-3
    # the sharded state of a LoRA model consolidates to the weights the run gathered
    import vlmkit
    from vlmkit.cli import main

    ckpt = tmp_path / "two" / "checkpoint"
    assert (ckpt / "dcp" / ".metadata").is_file()
    before = {k: v.clone() for k, v in vlmkit.load(ckpt).model.state_dict().items()}
    (ckpt / "model.safetensors").unlink()
    assert main(["checkpoint", "consolidate", str(ckpt)]) == 0
    after = vlmkit.load(ckpt).model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
