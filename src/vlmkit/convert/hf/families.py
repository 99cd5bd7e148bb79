"""The registry of Hugging Face families vlmkit imports (and exports), keyed by config.json's ``model_type``.

Each family module registers an :class:`HFFamily`: a loader from a checkpoint folder to (model, model config,
processor), and an exporter back to a folder transformers loads with its own class.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlmkit.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class HFFamily:
    name: str  # vlmkit's name for the family (ModelConfig.family)
    model_types: tuple[str, ...]  # config.json model_type values it reads
    load: Callable  # folder -> (model, ModelConfig, Processor)
    export: Callable | None = None  # (model, ModelConfig, Processor, folder) -> None; writes into ``folder``
    transformers_class: str = ""  # the class transformers loads an export with
    doc: str = ""


HF_FAMILIES: dict[str, HFFamily] = {}


def register_family(family: HFFamily) -> HFFamily:
    for t in family.model_types:
        if t in HF_FAMILIES:
            raise ValueError(f"model_type {t!r} registered twice ({HF_FAMILIES[t].name}, {family.name})")
        HF_FAMILIES[t] = family
    return family


def family_by_name(name: str) -> HFFamily:
    for fam in HF_FAMILIES.values():
        if fam.name == name:
            return fam
    raise ConfigError(f"no Hugging Face family {name!r}; vlmkit converts: "
                      f"{', '.join(sorted({f.name for f in HF_FAMILIES.values()}))}")


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


def family_of(folder: Path) -> HFFamily:
    path = folder / "config.json"
    try:
        kind = json.loads(path.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: cannot read a JSON object ({e})") from e
    if kind not in HF_FAMILIES:
        raise ConfigError(f"{path}: model_type {kind!r} is not a family vlmkit imports; supported: "
                          f"{', '.join(sorted(HF_FAMILIES))}")
    return HF_FAMILIES[kind]


def load_hf(path) -> tuple:
    """(model in eval mode, processor, model config, metadata) from a Hugging Face checkpoint folder."""
    folder = Path(path)
    family = family_of(folder)
    model, cfg, processor = family.load(folder)
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
    return {"out": str(out), "family": meta["hf_family"], "parameters": count_parameters(model)}


def convert_to_hf(src, out, overwrite: bool = False) -> dict:
    """A vlmkit checkpoint folder -> a Hugging Face folder that transformers loads with the family's own class
    (written atomically)."""
    from vlmkit.checkpoint import load_checkpoint
    from vlmkit.utils import atomic_directory

    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; pass --overwrite to replace it")
    model, processor, cfg, _ = load_checkpoint(src)
    family = family_by_name(cfg.family)
    if family.export is None:
        raise ConfigError(f"exporting the {family.name} family to Hugging Face is not implemented yet")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        family.export(model, cfg, processor, tmp)
    return {"out": str(out), "family": family.name, "transformers_class": family.transformers_class}
