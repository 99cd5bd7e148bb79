"""Training checkpoints: model files + optimizer state + trainer_state.json, swapped in with one rename, so that a
crash at any point leaves the previous checkpoint whole; and what a killed run left beside it.

Under FSDP every rank writes its shards into ``dcp/`` and the final checkpoint also gets the consolidated
model.safetensors; otherwise rank 0 writes everything. Optimizer state is saved midway through a stage only (a
stage starts with a fresh optimizer).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import torch

from vlmkit.checkpoint import check_folder, write_model_files
from vlmkit.config import to_dict
from vlmkit.errors import CheckpointError
from vlmkit.models import build_model
from vlmkit.nn.lora import apply_lora, save_adapter
from vlmkit.train.distributed import DistInfo, full_state_dict, save_sharded, unwrap
from vlmkit.train.optim import save_optimizer
from vlmkit.train.recipe import Recipe
from vlmkit.utils import atomic_write_json

# fault injection for the crash tests: the process kills itself (SIGKILL) in the middle of writing the checkpoint
# of this global step, after the model files are written and before the folder is swapped in
KILL_IN_CHECKPOINT_ENV = "VLMKIT_TEST_KILL_IN_CHECKPOINT"


def save_training_checkpoint(folder: Path, model, cfg, processor, opt, state: dict, recipe: Recipe,
                             info: DistInfo | None = None, final: bool = False) -> None:
    """Write the checkpoint of ``state`` into a temporary sibling of ``folder`` and swap it in (module docstring)."""
    info = info or DistInfo()
    tmp = folder.with_name(f".{folder.name}.tmp-step{state['global_step']}")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    info.barrier()
    extra = {"recipe": to_dict(recipe)}
    if recipe.lora.targets:
        extra["lora"] = to_dict(recipe.lora)
    plain = unwrap(model)
    if info.strategy == "fsdp":
        save_sharded(tmp / "dcp", model, opt)
        full = full_state_dict(model, info) if final else None
        plain = _plain_copy(full, cfg, processor, recipe) if final and info.is_main else None
        if info.is_main:
            write_model_files(tmp, plain, cfg, processor, extra=extra)
    elif info.is_main:
        write_model_files(tmp, plain, cfg, processor, extra=extra)
        if opt is not None:
            save_optimizer(opt, tmp / "optimizer.safetensors")
    if info.is_main:
        _write_state(tmp, state, info)
        if recipe.lora.targets and final:  # the adapters alone, for the base model
            save_adapter(tmp / "adapter", plain, recipe.lora)
        _swap_in(tmp, folder, state["global_step"])
    info.barrier()


def _write_state(tmp: Path, state: dict, info: DistInfo) -> None:
    state = dict(state, torch_rng=torch.get_rng_state().tolist(), python_rng=list(random.getstate()[1]),
                 world_size=info.world, strategy=info.strategy)
    atomic_write_json(tmp / "trainer_state.json", state, indent=None)
    if os.environ.get(KILL_IN_CHECKPOINT_ENV) == str(state["global_step"]):
        os.kill(os.getpid(), signal.SIGKILL)


def _swap_in(tmp: Path, folder: Path, step: int) -> None:
    """``tmp`` becomes ``folder``; a previous ``folder`` is moved aside first and removed after."""
    if not folder.exists():
        os.replace(tmp, folder)
        return
    old = folder.with_name(f".{folder.name}.old-step{step}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _plain_copy(state_dict: dict, cfg, processor, recipe: Recipe):
    """A one-process model holding ``state_dict`` (gathered from FSDP shards), to be written as safetensors."""
    model = build_model(cfg, processor.image_token_id, init=False)
    if recipe.lora.targets:
        apply_lora(model, recipe.lora)
    model.load_state_dict(state_dict)
    return model


def clean_stale(folder: Path) -> None:
    """Remove what a killed run left beside the checkpoint: a half-written ``.tmp-*`` folder (never read), or, when
    the kill came between the two renames that swap a checkpoint in, put the previous one (``.old-*``) back."""
    for p in folder.parent.glob(f".{folder.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in folder.parent.glob(f".{folder.name}.old-*"):
        if folder.exists():
            shutil.rmtree(p, ignore_errors=True)
        else:  # killed between the two renames: the old checkpoint is the one to resume
            os.replace(p, folder)


def read_state(ckpt: Path) -> dict | None:
    """The trainer state of the checkpoint a run resumes from (None: there is none)."""
    if not ckpt.exists():
        return None
    if not (ckpt / "dcp" / ".metadata").is_file():  # a sharded (FSDP) checkpoint resumes from its shards
        check_folder(ckpt)
    path = ckpt / "trainer_state.json"
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no trainer_state.json, so it cannot be resumed")
    return json.loads(path.read_text())


__all__ = ["KILL_IN_CHECKPOINT_ENV", "clean_stale", "read_state", "save_training_checkpoint"]
