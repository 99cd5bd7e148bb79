"""Hugging Face folders in and out: whichever family reads a folder's ``model_type`` (``Family.hf``: a loader from a
folder to (model, model config, processor), and an exporter back to a folder transformers loads with its own
class) loads it, converts it to a vlmkit checkpoint or writes one back.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.family import family_of, hf_family_of


def is_hf_folder(path) -> bool:
    """A folder whose config.json names a transformers ``model_type`` (vlmkit's own say ``format: vlmkit``)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and "model_type" in data and data.get("format") != "vlmkit"


def load_hf(path) -> tuple:
    """(model in eval mode, processor, model config, metadata) from a Hugging Face checkpoint folder."""
    folder = Path(path)
    family, _ = hf_family_of(folder)
    model, cfg, processor = family.hf.load(folder)
    meta = {"format": "hf", "source": str(folder), "hf_family": family.name}
    return model.eval(), processor, cfg, meta


def convert_from_hf(src, out, overwrite: bool = False) -> dict:
    """A Hugging Face folder -> a vlmkit checkpoint folder (written atomically: nothing at ``out`` unless the
    whole conversion succeeds)."""
    from vlmkit.checkpoint import write_model_files
    from vlmkit.models import count_parameters
    from vlmkit.utils import atomic_directory

    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; pass --overwrite to replace it")
    model, processor, cfg, meta = load_hf(src)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_model_files(tmp, model, cfg, processor, extra={"converted_from": meta})
    return {"out": str(out), "family": family_of(cfg).name, "parameters": count_parameters(model)}


def convert_to_hf(src, out, overwrite: bool = False) -> dict:
    """A vlmkit checkpoint folder -> a Hugging Face folder that transformers loads with the family's own class
    (written atomically)."""
    from vlmkit.checkpoint import load_checkpoint
    from vlmkit.utils import atomic_directory

    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; pass --overwrite to replace it")
    model, processor, cfg, _ = load_checkpoint(src)
    family = family_of(cfg)
    if family.hf is None or family.hf.export is None:
        raise ConfigError(f"exporting the {family.name} family to Hugging Face is not implemented yet")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        family.hf.export(model, cfg, processor, tmp)
    return {"out": str(out), "family": family.name, "transformers_class": family.export_class(cfg)}
