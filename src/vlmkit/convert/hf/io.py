"""Reading Hugging Face checkpoint folders safely (safetensors only) and copying tensors through explicit
key tables.

A folder is ``config.json`` plus weights in ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Pickled weights (``*.bin``, ``*.pt``) are never loaded: unpickling runs
arbitrary code. Keys a table does not expect, and keys it expects but the folder lacks, are reported by
name, as are shape mismatches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlmkit.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class HFCheckpoint:
    folder: Path
    config: dict
    tensors: dict[str, torch.Tensor]


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a Hugging Face checkpoint folder: {path.name} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards its index lists; refuses pickled weights."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map' of tensor name -> shard file") from e
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            path = folder / shard
            if not path.is_file():
                raise CheckpointError(f"{index} lists shard {shard!r}, which is not in {folder}")
            tensors.update(load_file(str(path)))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index}: tensors listed but absent from their shards: {missing[:5]}")
        return tensors
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} has only pickled weights ({', '.join(pickles)}); vlmkit never unpickles (it can run "
            f"arbitrary code). Re-save them as safetensors, e.g. with transformers: "
            f"model.save_pretrained(out, safe_serialization=True)")
    raise CheckpointError(f"{folder} has no weights: expected model.safetensors or model.safetensors.index.json")


def read_checkpoint(folder: str | Path) -> HFCheckpoint:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    return HFCheckpoint(folder, read_config(folder), read_weights(folder))



def load_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], table: dict[str, str], where: str,
               ignore: tuple[str, ...] = ()) -> None:
    """Copy ``tensors`` into ``module`` through ``table``; missing, unexpected and mis-shaped keys are errors."""
    missing = sorted(theirs for theirs in table.values() if theirs not in tensors)
    unexpected = sorted(k for k in set(tensors) - set(table.values()) if not (ignore and k.endswith(ignore)))
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not match the config: missing {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                              f"{' ...' if len(unexpected) > 8 else ''}")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for ours, theirs in table.items():
            src, dst = tensors[theirs], params[ours]
            if src.shape != dst.shape:
                raise CheckpointError(f"{where}: {theirs} has shape {tuple(src.shape)}, the config implies "
                                      f"{tuple(dst.shape)}")
            dst.copy_(src.to(dst.dtype))



def find_prefix(tensors: dict, *candidates: str) -> str:
    """The first candidate prefix that some tensor name starts with (checkpoint layouts differ by version)."""
    return next((c for c in candidates if any(k.startswith(c) for k in tensors)), candidates[0])


def write_hf_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """``model.safetensors`` as transformers writes it (contiguous fp tensors, metadata format "pt")."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def read_json(path: Path) -> dict:
    """An optional JSON file of a folder (processor_config.json, tokenizer_config.json, ...): {} when absent or not
    an object; invalid JSON is refused naming the file."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def export_table(module: torch.nn.Module, table: dict[str, str]) -> dict[str, torch.Tensor]:
    """Our parameters renamed through ``table`` (vlmkit name -> transformers name): the import table inverted."""
    params = dict(module.named_parameters(remove_duplicate=False))
    missing = sorted(k for k in table if k not in params)
    if missing:
        raise CheckpointError(f"export: the model has no parameters {missing[:5]} that its config implies")
    return {theirs: params[ours] for ours, theirs in table.items()}
