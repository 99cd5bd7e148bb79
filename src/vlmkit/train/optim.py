"""Freezing, per-module AdamW parameter groups, warm-up + cosine schedule, and optimizer state I/O.

Optimizer state is stored as safetensors + JSON (never pickled), so a resumed run restores it exactly.
"""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlmkit.errors import ConfigError
from vlmkit.nn.lora import LoRALinear, lora_parameters
from vlmkit.train.muon import MuonAdamW
from vlmkit.train.recipe import MODULE_GROUPS, StageConfig


# 2D parameters that are tables of vectors, not linear maps: never Muon's (a perceiver's learned latents, the
# flamingo family's image-index embeddings)
EMBEDDING_TABLES = ("latents", "image_index")


def module_groups(model) -> dict[str, nn.Module]:
    """The model's named module groups (``model.module_groups()``): what a stage trains or freezes."""
    return model.module_groups()


def trained_groups(model, stage: StageConfig) -> set[str]:
    """The model's module groups that ``stage`` trains ("all": every one, adapters included); a name the model has
    no group of is refused, so that a typo never silently freezes everything."""
    groups = list(module_groups(model)) + (["lora"] if lora_parameters(model) else [])
    unknown = [m for m in stage.train if m != "all" and m not in groups]
    if unknown:
        hint = "; lora needs the recipe's lora.targets" if unknown[0] == "lora" else ""
        raise ConfigError(f"stage {stage.name!r}: train {stage.train} names {unknown[0]!r}, which this model does not "
                          f"have; its modules: all, {', '.join(groups)}{hint}")
    return set(groups) if "all" in stage.train else set(stage.train)


def freeze_for_stage(model, stage: StageConfig) -> list[dict]:
    """Set requires_grad per module group; return a table of what trains and what is frozen. The weights that
    LoRA adapts stay frozen in every stage; the adapters train when the stage names ``lora`` (or ``all``)."""
    rows = []
    trained = trained_groups(model, stage)
    adapters = {id(p) for _, p in lora_parameters(model)}
    adapted = {id(p) for m in model.modules() if isinstance(m, LoRALinear) for p in m.base.parameters()}
    for name, module in module_groups(model).items():
        trains = name in trained
        for p in module.parameters():
            p.requires_grad_(trains and id(p) not in adapters and id(p) not in adapted)
        n = sum(p.numel() for p in module.parameters() if id(p) not in adapters)
        rows.append({"module": name, "trainable": trains, "params": n,
                     "lr": stage.lr * stage.lr_scale.get(name, 1.0) if trains else 0.0})
    if adapters:
        trains = "lora" in trained
        for _, p in lora_parameters(model):
            p.requires_grad_(trains)
        rows.append({"module": "lora", "trainable": trains, "params": sum(p.numel() for _, p in lora_parameters(model)),
                     "lr": stage.lr * stage.lr_scale.get("lora", 1.0) if trains else 0.0})
    return rows


def set_train_mode(model, stage: StageConfig) -> None:
    """Training mode for the modules a stage trains, eval mode for the frozen ones: a frozen module must not
    change at all, and BatchNorm running statistics would otherwise keep moving in a frozen tower."""
    model.train()
    trained = trained_groups(model, stage)
    for name, module in module_groups(model).items():
        if name not in trained:
            module.eval()
    if "lora" in trained:  # adapters in a frozen module still train (their dropout on)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.train()


def make_optimizer(model, stage: StageConfig, extra: list[nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """One group per trained module (its own lr), no weight decay on norms/biases; ``extra``: parameters trained
    beside the model's (an objective's heads), at the stage's lr with AdamW.

    ``stage.optimizer``: ``adamw`` for everything, or ``muon``: Muon for the 2D hidden weight matrices
    (attention, MLP, connector), AdamW for embeddings, the LM's output head, norms, biases and conv kernels
    (train/muon.py)."""
    use_muon = stage.optimizer == "muon"
    groups = []
    seen: set[int] = set()
    trained = trained_groups(model, stage)
    adapters = [p for _, p in lora_parameters(model)]
    seen.update(id(p) for p in adapters)
    if "lora" in trained:  # adapters: AdamW with weight decay (peft's default), their own lr
        lr = stage.lr * stage.lr_scale.get("lora", 1.0)
        groups.append({"params": adapters, "lr": lr, "base_lr": lr, "module": "lora", "use_muon": False,
                       "weight_decay": stage.weight_decay})
    for name, module in module_groups(model).items():
        if name not in trained:
            continue
        lr = stage.lr * stage.lr_scale.get(name, 1.0)
        embeddings = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        decay, no_decay, hidden = [], [], []
        for pname, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if p.ndim < 2 or "norm" in pname:
                no_decay.append(p)
            elif (use_muon and p.ndim == 2 and id(p) not in embeddings and not pname.endswith("lm_head.weight")
                  and "pos_embed" not in pname and not pname.endswith(EMBEDDING_TABLES)):
                hidden.append(p)
            else:
                decay.append(p)
        base = {"lr": lr, "base_lr": lr, "module": name, "use_muon": False}
        groups.append({**base, "params": decay, "weight_decay": stage.weight_decay})
        groups.append({**base, "params": no_decay, "weight_decay": 0.0})
        groups.append({**base, "params": hidden, "weight_decay": stage.weight_decay, "use_muon": True})
    if extra:
        base = {"lr": stage.lr, "base_lr": stage.lr, "module": "objective", "use_muon": False}
        groups.append({**base, "params": [p for p in extra if p.ndim > 1], "weight_decay": stage.weight_decay})
        groups.append({**base, "params": [p for p in extra if p.ndim <= 1], "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    if use_muon:
        return MuonAdamW(groups, betas=tuple(stage.betas))
    for g in groups:
        del g["use_muon"]
    return torch.optim.AdamW(groups, betas=tuple(stage.betas))


def lr_factor(step: int, stage: StageConfig) -> float:
    """Linear warm-up to 1, then cosine down to ``min_lr_ratio`` at the end of the stage."""
    warm = max(1, round(stage.warmup * stage.steps))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, stage.steps - warm)
    return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor


def save_optimizer(opt: torch.optim.Optimizer, path) -> None:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"state.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"param_groups": json.dumps(groups)})


def load_optimizer(opt: torch.optim.Optimizer, path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
    tensors = load_file(str(path))
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


__all__ = [
    "MODULE_GROUPS",
    "freeze_for_stage",
    "load_optimizer",
    "lr_factor",
    "make_optimizer",
    "module_groups",
    "save_optimizer",
    "set_lr",
    "set_train_mode",
]
