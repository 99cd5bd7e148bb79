"""Multi-process training on PyTorch's own engine: torchrun, DDP or FSDP2, torch.distributed.checkpoint.

``torchrun --nproc_per_node N -m vlmkit train RECIPE`` starts N processes; each reads ``RANK``/``WORLD_SIZE``
from the environment (set by torchrun) and joins one process group (NCCL on CUDA, gloo on CPU). Every rank
draws the same global batch from the data stream and takes its share (samples ``rank::world``); the loss is
normalised by the global number of supervised tokens, so N processes follow the single-process loss curve of
the same global batch (tests/unit/test_distributed.py runs 2 gloo processes against 1).

- ``train.distributed: ddp`` (default): DistributedDataParallel; every rank holds the whole model and optimizer,
  rank 0 writes the usual checkpoint (model.safetensors + optimizer.safetensors).
- ``train.distributed: fsdp``: FSDP2's ``fully_shard`` on every transformer block, then on the whole model;
  parameters, gradients and optimizer state are sharded across ranks. Checkpoints are sharded
  (``checkpoint/dcp/``, torch.distributed.checkpoint, every rank writing its shards) and the final one also gets
  a consolidated model.safetensors; ``vlmkit checkpoint consolidate DIR`` turns any sharded checkpoint into
  one safetensors file, on one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlmkit.errors import ConfigError

STRATEGIES = ("ddp", "fsdp")


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "none"  # none (one process), ddp, fsdp
    owned: bool = False  # the process group was created here (and is destroyed by finish())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def finish(self) -> None:
        """Leave the process group this run joined (one created by the caller is left alone)."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_object(self, obj):
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(strategy: str) -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (else one process, nothing to join)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if strategy not in STRATEGIES:
        raise ConfigError(f"train.distributed: {strategy!r}; valid: {', '.join(STRATEGIES)}")
    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, strategy, owned)


def shard_of(indices: list, info: DistInfo) -> list:
    """This rank's share of a global batch: every ``world``-th sample from ``rank``."""
    return indices[info.rank::info.world]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one (each a unit of all-gather and activation checkpointing):
    the LM's decoder layers, the vision tower's blocks, a dual encoder's text blocks."""
    out = []
    for m in model.modules():
        for name in ("layers", "blocks"):
            seq = getattr(m, name, None)
            if isinstance(seq, nn.ModuleList) and all(isinstance(b, nn.Module) for b in seq):
                out.extend(seq)
    return out


def wrap_model(model: nn.Module, info: DistInfo, unused_parameters: bool = False) -> nn.Module:
    """DDP or FSDP2 around ``model`` for a stage (parameters' requires_grad already set). FSDP2 shards in place
    once (re-wrapping is a no-op); DDP is rebuilt per stage, as it registers the trained parameters.
    ``unused_parameters``: a step may leave trained parameters out of one rank's graph (a rank whose samples hold
    no image to read, or none to write), which DDP then finds before it reduces (find_unused_parameters)."""
    if info.strategy == "ddp":
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError("nothing to train in this stage")
        return DistributedDataParallel(model, device_ids=[info.local_rank] if torch.cuda.is_available() else None,
                                       find_unused_parameters=unused_parameters)
    if info.strategy == "fsdp":
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if not isinstance(model, FSDPModule):
            for block in transformer_blocks(model):
                fully_shard(block)
            fully_shard(model)
        return model
    return model


def batchnorm_note(model: nn.Module, info: DistInfo) -> str:
    """Under DDP, BatchNorm layers that train normalise each rank's share of the batch with its own statistics
    (so the run is not the single-process one); on CUDA they become SyncBatchNorm. Returns what was done."""
    training = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not info.active or not training:
        return ""
    if torch.cuda.is_available():
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return f"{len(training)} BatchNorm layers synchronised across ranks (SyncBatchNorm)"
    return (f"note: {len(training)} BatchNorm layers train and each rank normalises its own share of the batch "
            f"(SyncBatchNorm needs CUDA); the run differs from one process of the same global batch")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def full_state_dict(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere): gathered from the shards under FSDP2."""
    model = unwrap(model)
    if info.strategy != "fsdp":
        return {k: v.detach() for k, v in model.state_dict().items()} if info.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if info.is_main else None


def grad_norm_value(norm) -> float:
    """clip_grad_norm_'s result as a float (a DTensor under FSDP2)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def save_sharded(folder, model: nn.Module, opt) -> None:
    """Every rank writes its shards of the model and optimizer state into ``folder`` (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(unwrap(model), opt if opt is not None else [])
    dcp.save({"model": msd, "optim": osd} if opt is not None else {"model": msd}, checkpoint_id=str(folder))


def load_sharded(folder, model: nn.Module, opt) -> None:
    """Load sharded state saved by :func:`save_sharded` (any world size) into the sharded model/optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(unwrap(model), opt if opt is not None else [])
    state = {"model": msd, "optim": osd} if opt is not None else {"model": msd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(unwrap(model), opt if opt is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))


def consolidate(checkpoint) -> None:
    """Turn a sharded checkpoint (``checkpoint/dcp/``) into ``checkpoint/model.safetensors``, on one process:
    the model is built from config.json and the shards are read into its full tensors (any saving world size)."""
    import json
    from pathlib import Path

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_model

    from vlmkit.config import from_dict
    from vlmkit.errors import CheckpointError
    from vlmkit.family import model_config_from_dict
    from vlmkit.models import build_model
    from vlmkit.processing import Processor
    from vlmkit.nn.lora import LoRAConfig, apply_lora

    folder = Path(checkpoint)
    shards = folder / "dcp"
    if not (shards / ".metadata").is_file():
        raise CheckpointError(f"{folder} has no sharded state (dcp/.metadata): it is not a sharded checkpoint")
    meta = json.loads((folder / "config.json").read_text())
    cfg = model_config_from_dict(meta["model"], "config.json:model")
    processor = Processor.from_pretrained(folder)
    model = build_model(cfg, processor.image_token_id, init=False)
    if meta.get("lora"):
        apply_lora(model, from_dict(LoRAConfig, meta["lora"], "config.json:lora"))
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(shards), no_dist=True)
    model.load_state_dict(state["model"])
    tmp = folder / ".model.safetensors.tmp"
    save_model(model, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")


__all__ = ["STRATEGIES", "DistInfo", "batchnorm_note", "consolidate", "full_state_dict", "grad_norm_value", "init_distributed",
           "load_sharded", "save_sharded", "shard_of", "transformer_blocks", "unwrap", "wrap_model"]
