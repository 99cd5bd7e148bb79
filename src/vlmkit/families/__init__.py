"""The families vlmkit knows: one module each, discovered (the registry below imports every module of this package
the first time it is read, and every entry point of the group ``vlmkit.families``).

A family module registers one :class:`~vlmkit.family.Family` (``@register``) that names its config types, builds its
model, gives its image processor and prompt layout, maps its Hugging Face folders and says what it can do; its
model code, processing and key maps live where the parts of their kind live (models/, processing/, convert/hf/) or
in the module itself. docs/adding-a-family.md walks through adding one.

The registry (:data:`FAMILIES`) and the lookups by config, name or Hugging Face folder live here, below the family
interface itself (vlmkit/family.py), so that the processor and the checkpoint readers find a family without
importing every family's parts.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from vlmkit.config import ModelConfig, ProcessorConfig, from_dict
from vlmkit.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from vlmkit.family import Family


class FamilyRegistry:
    """Family name -> Family, filled by discovery on first use (module docstring)."""

    def __init__(self):
        self._families: dict[str, Family] = {}
        self._discovered = False

    def register(self, cls: type[Family]) -> type[Family]:
        name = cls.name
        if name in self._families:
            raise ValueError(f"family {name!r} registered twice ({type(self._families[name]).__qualname__}, "
                             f"{cls.__qualname__})")
        self._families[name] = cls()
        return cls

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"vlmkit.families.{module.name}")
        for entry in metadata.entry_points(group="vlmkit.families"):
            entry.load()

    def get(self, name: str) -> Family:
        self._discover()
        if name not in self._families:
            raise ConfigError(f"unknown model family {name!r}; families: {', '.join(self.names())}")
        return self._families[name]

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._families)

    def all(self) -> list[Family]:
        return [self._families[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        self._discover()
        return name in self._families


FAMILIES = FamilyRegistry()
register = FAMILIES.register


def get_family(name: str) -> Family:
    return FAMILIES.get(name)


def family_of(cfg: ModelConfig | ProcessorConfig) -> Family:
    """The family of a model or processor config."""
    if not cfg.family:
        raise ConfigError(f"{type(cfg).__name__} names no family")
    return FAMILIES.get(cfg.family)


# ------------------------------------------------------------------------------------------ configs by family


def model_config_from_dict(data: dict, where: str = "model") -> ModelConfig:
    """A model config (config.json's ``model`` section) read into its family's Config type."""
    if not isinstance(data, dict) or "family" not in data:
        raise ConfigError(f"{where}: a model config needs 'family'; families: {', '.join(FAMILIES.names())}")
    family = FAMILIES.get(data["family"])
    data = _drop_legacy(dict(data), LEGACY_MODEL_KEYS, family.Config)
    return from_dict(family.Config, data, where)


def processor_config_from_dict(data: dict, family: str | None = None, where: str = "processor") -> ProcessorConfig:
    """A processor config (processor.json) read into its family's ProcessorConfig type; ``family`` names the family
    of a file written before processor.json said it."""
    data = dict(data)
    name = data.get("family") or family
    if not name:
        raise ConfigError(f"{where}: the processor names no family (and none was given)")
    data["family"] = name
    fam = FAMILIES.get(name)
    return from_dict(fam.ProcessorConfig, _drop_legacy(data, LEGACY_PROCESSOR_KEYS, fam.ProcessorConfig), where)


# Fields of vlmkit 0.1's single model and processor configs that every family's files carried; a family's own
# config type now holds those it uses (or the family decides them: the image processor). Files written before are
# read by dropping the others
LEGACY_MODEL_KEYS = ("vision", "connector", "lm", "image_token", "anyres", "text", "contrastive", "xattn", "mllama")
LEGACY_PROCESSOR_KEYS = ("image_processor", "anyres", "split", "native", "max_image_tiles", "text_padding",
                         "qformer_max_length", "qformer_pad_token")


def _drop_legacy(data: dict, keys: tuple[str, ...], cls: type) -> dict:
    """``data`` without the legacy keys ``cls`` has no field for, when it is a legacy file (it has every one of
    them; a file written since has none a family lacks, and any such key is refused by name)."""
    if not all(k in data for k in keys):
        return data
    fields = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in fields or k not in keys}


def hf_family_of(folder: str | Path) -> tuple[Family, str]:
    """(the family that reads a Hugging Face folder, its model_type), from config.json's ``model_type``."""
    path = Path(folder) / "config.json"
    try:
        kind = json.loads(path.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: cannot read a JSON object ({e})") from e
    readers = {t: f for f in FAMILIES.all() if f.hf is not None for t in f.hf.model_types}
    if kind not in readers:
        raise ConfigError(f"{path}: model_type {kind!r} is not a family vlmkit imports; supported: "
                          f"{', '.join(sorted(readers))}")
    return readers[kind], kind


__all__ = ["FAMILIES", "FamilyRegistry", "family_of", "get_family", "hf_family_of", "model_config_from_dict",
           "processor_config_from_dict", "register"]
