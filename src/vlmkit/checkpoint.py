"""Checkpoint folders: config.json + model.safetensors + tokenizer.json + processor.json.

Folders are written atomically (a temporary sibling renamed into place), so a crash mid-write never leaves
a folder that looks complete. Only safetensors are read: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_model, save_model

from vlmkit.version import __version__
from vlmkit.config import ModelConfig, to_dict
from vlmkit.family import model_config_from_dict
from vlmkit.errors import CheckpointError
from vlmkit.models import build_model
from vlmkit.processing import Processor
from vlmkit.utils import atomic_write_json

REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "processor.json")


def write_model_files(folder: Path, model, cfg: ModelConfig, processor: Processor, extra: dict | None = None):
    """Write the model part of a checkpoint into an existing (temporary) folder (``model`` None: all but the
    weights, which a sharded checkpoint keeps in dcp/)."""
    meta = {"format": "vlmkit", "vlmkit_version": __version__, "model": to_dict(cfg)}
    meta.update(extra or {})
    if model is not None:
        save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    processor.save(folder)
    atomic_write_json(folder / "config.json", meta)


def check_folder(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing == ["model.safetensors"] and (path / "dcp" / ".metadata").is_file():
        raise CheckpointError(f"{path} is a sharded checkpoint (FSDP, dcp/): write its model.safetensors with "
                              f"`vlmkit checkpoint consolidate {path}`")
    if missing:
        raise CheckpointError(f"{path} is not a complete vlmkit checkpoint: missing {', '.join(missing)} "
                              f"(a checkpoint folder holds {', '.join(REQUIRED)})")
    return path


def read_config(path: str | Path) -> tuple[ModelConfig, dict]:
    path = check_folder(path)
    try:
        meta = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {e}") from e
    if "model" not in meta:
        raise CheckpointError(f"{path / 'config.json'} has no 'model' section; is this a vlmkit checkpoint?")
    return model_config_from_dict(meta["model"], "config.json:model"), meta


def load_checkpoint(path: str | Path, device="cpu", merge_lora: bool = True):
    """Return (model in eval mode, processor, model config, metadata) from a checkpoint folder. A checkpoint
    trained with LoRA holds its adapters beside the frozen weights; they are merged into a plain model unless
    ``merge_lora=False`` (a resumed run keeps training them)."""
    cfg, meta = read_config(path)
    path = Path(path)
    processor = Processor.from_pretrained(path)
    model = build_model(cfg, processor.image_token_id, init=False)
    lora = meta.get("lora")
    if lora:  # trained with LoRA adapters (saved unmerged, for exact resume): applied, loaded, then merged
        from vlmkit.config import from_dict
        from vlmkit.nn.lora import LoRAConfig, apply_lora

        apply_lora(model, from_dict(LoRAConfig, lora, "config.json:lora"))
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except RuntimeError as e:  # load_state_dict raises on shape mismatches even with strict=False
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e))
        raise CheckpointError(f"{path / 'model.safetensors'} does not match config.json: {detail}") from e
    if missing or unexpected:
        raise CheckpointError(f"{path / 'model.safetensors'} does not match config.json: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if lora and merge_lora:
        from vlmkit.nn.lora import remove_lora

        remove_lora(model)
    return model.to(device).eval(), processor, cfg, meta


__all__ = ["REQUIRED", "check_folder", "load_checkpoint", "read_config", "write_model_files"]
