"""Named model presets. Each cites the checkpoint or paper whose shape it follows.

``tiny-*`` presets train from scratch on a laptop CPU; full-size presets are shape configs for building on
the meta device (parameter counts are tested against the published sizes) and for import. Presets live in this
package's modules, one per kind of family, discovered the first time the registry is read (as the families are).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

from vlmkit.config import ModelConfig, ProcessorConfig
from vlmkit.registry import Registry


@dataclass
class Preset:
    model: ModelConfig
    processor: ProcessorConfig
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.processor.family:  # the processor of a model is its family's
            self.processor.family = self.model.family


class _Presets(Registry):
    """The preset registry, filled from this package's modules on first use."""

    def __init__(self):
        super().__init__("preset")
        self._discovered = False

    def _discover(self) -> None:
        if not self._discovered:
            self._discovered = True
            for module in pkgutil.iter_modules(__path__):
                importlib.import_module(f"{__name__}.{module.name}")

    def get(self, name):
        self._discover()
        return super().get(name)

    def names(self):
        self._discover()
        return super().names()

    def __contains__(self, name):
        self._discover()
        return super().__contains__(name)


PRESETS: Registry[Preset] = _Presets()

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_SO400M = dict(patch_size=14, width=1152, depth=27, heads=16, mlp_dim=4304, act="gelu_tanh", norm_eps=1e-6,
                     class_token=False, patch_bias=True, qkv_bias=True)


def whole(config: type[ProcessorConfig] = ProcessorConfig, **kw) -> ProcessorConfig:
    """An imported family's processor settings: whole-string tokenisation, as its transformers processor."""
    return config(text_mode="whole", **kw)


def get_preset(name: str) -> Preset:
    return PRESETS.build(name)


__all__ = ["CLIP_MEAN", "CLIP_STD", "PRESETS", "SIGLIP_SO400M", "Preset", "get_preset", "whole"]
